"""`danlu demo`: the embedded end-to-end job, from raw text on this machine to a loss curve.

corpus (the Python standard library's source and rendered docs) -> sentencepiece tokenizer ->
ArrayRecord token shards -> the `tiny` model trained on CPU -> loss.png. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pretrain.config import CONFIGS_DIR, load_config


def run_demo(workdir: str | os.PathLike = "demo", *, minutes: float = 8.0, steps: int = 1200,
             vocab_size: int = 4096, max_bytes: int = 8_000_000) -> dict:
    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer
    from pretrain.plots import plot_loss
    from pretrain.train import train

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # --- 1. corpus --------------------------------------------------------------------------
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        stats = build_demo_corpus(str(corpus), max_bytes=max_bytes)
        print(f"[1/4] corpus: {stats} -> {corpus}")
    else:
        print(f"[1/4] corpus: reusing {corpus}")

    # --- 2. tokenizer and shards ------------------------------------------------------------
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        model = train_tokenizer([str(corpus)], str(work / "tokenizer"), vocab_size=vocab_size)
        manifest = encode_to_shards([str(corpus)], str(shards), model, num_shards=4, eval_fraction=0.02)
        print(f"[2/4] tokenizer {model}; shards {shards}: "
              f"{sum(s['tokens'] for s in manifest['shards']):,} tokens")
    else:
        print(f"[2/4] shards: reusing {shards}")

    # --- 3. train the tiny model ------------------------------------------------------------
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: same corpus and seed, same curve
    cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", [
        f"data.path={shards}", f"train.run_dir={run_dir}", f"train.steps={steps}",
        f"train.max_seconds={minutes * 60}", f"model.vocab_size={vocab_size}"])
    print(f"[3/4] training configs/train/tiny.yaml for at most {steps} steps / {minutes:g} min -> {run_dir}")
    summary = train(cfg)

    # --- 4. loss curve ------------------------------------------------------------------------
    png = plot_loss(run_dir, work / "loss.png")
    print(f"[4/4] loss curve: {png}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
          + (f", eval loss {summary['final_eval_loss']:.3f}" if summary["final_eval_loss"] is not None else ""))
    print(f"  corpus       {corpus}\n  shards       {shards}\n  run          {run_dir} (metrics.jsonl, tensorboard/, "
          f"checkpoints/, config.yaml)\n  loss curve   {png}")
    return {**summary, "loss_png": str(png)}
