"""`danlu import-hf HF_DIR OUT_DIR [--config PRESET] [overrides]`: a Hugging Face LLaMA or GPT-2
model into a danlu run directory that `danlu train` continues from (see pretrain/hf.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("out_dir", help="new run directory: config.yaml, checkpoints/0, tokenizer.model")
    parser.add_argument("--config", default=None, help="train preset for everything but the model (default: danlu's defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-4 train.steps=500")


def main(args: argparse.Namespace) -> int:
    import sys

    from pretrain.config import ConfigError
    from pretrain.hf import import_hf

    try:
        s = import_hf(args.hf_dir, args.out_dir, base_config=args.config, overrides=args.overrides)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"danlu import-hf: {e}", file=sys.stderr)
        return 2
    print(f"imported {s['family']} ({s['parameters']:,} parameters) into {s['out_dir']}; continue pretraining with\n"
          f"  danlu train {s['config']} data.path=SHARDS"
          + ("" if s["tokenizer"] else "\n(no tokenizer.model in the HF directory: tokenize the data with the model's own vocabulary)"))
    return 0
