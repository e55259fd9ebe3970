"""`danlu eval`: loss, perplexity and bits per byte of a checkpoint on token shards or documents.

The command composes pretrain/evaluate.py (the scoring) with data_pipeline/readers.py (documents:
JSONL plain, .gz, .zst, .bz2 or .xz, Parquet, WET; files, globs, directories, URLs; ``--reader``,
``--max-doc-bytes``, ``--text-key``). Records that cannot be read are skipped and counted
(``errors`` in the report). What is scored, and how, is in pretrain/evaluate.py's docstring.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Iterator


def document_texts(flags=None) -> Callable[[str, list], Iterator[str]]:
    """`texts(path, errors)`: the non-empty texts of the documents of `path` (a file, glob, directory or URL,
    read with `flags`, a readers.InputFlags); records that cannot be read go to `errors` as
    errors.jsonl rows. Planning (a missing input) raises readers.InputError, a ValueError, at the
    call, before the first text."""
    from data_pipeline import readers as R

    def texts(path: str, errors: list) -> Iterator[str]:
        shards = (flags or R.InputFlags()).plan([path], where="--data")
        return (doc["text"] for _, doc in R.read_documents(shards, errors) if doc["text"])
    return texts


def evaluate(ckpt, data: list[str], *, flags=None, **kwargs) -> dict:
    """pretrain.evaluate.evaluate_checkpoint with text inputs read by data_pipeline's readers."""
    from pretrain.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, data, documents=document_texts(flags), **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data_pipeline.readers import add_input_arguments

    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoints/STEP directory")
    parser.add_argument("--data", nargs="+", required=True,
                        help="token shard directories and/or documents: files, globs, directories, URLs (JSONL, Parquet, WET)")
    parser.add_argument("--split", default="eval", help="split of token shards to score (default: eval)")
    parser.add_argument("--seq-len", type=int, default=None, help="context per window (default: the run's data.seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--max-documents", type=int, default=None, help="score at most this many documents per input")
    parser.add_argument("--packed", action="store_true",
                        help="score shards exactly like the train loop's evaluation (equals the run's eval_loss)")
    parser.add_argument("--batches", type=int, default=None, help="with --packed: batches (default: data.eval_batches)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the full result as one JSON object")
    add_input_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from danlu.base.config import ConfigError
    from data_pipeline.readers import InputFlags
    from pretrain.generate import load_checkpoint

    try:
        ckpt = load_checkpoint(args.checkpoint, args.step)
        result = evaluate(ckpt, args.data, flags=InputFlags.from_args(args), tokenizer=args.tokenizer, split=args.split,
                          seq_len=args.seq_len, batch_size=args.batch_size, max_documents=args.max_documents,
                          packed=args.packed, batches=args.batches)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"danlu eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    rows = list(result["inputs"].items()) + ([("total", result["total"])] if len(result["inputs"]) > 1 else [])
    for name, r in rows:
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "n/a"
        skipped = f", {r['errors']:,} bad records skipped" if r["errors"] else ""
        print(f"{name}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  bits/byte {bpb}  "
              f"({r['tokens']:,} tokens, {r['documents']:,} documents{skipped})")
    return 0
