"""Mixing sources with weights or epochs, written as the input of `danlu tokenize`.

    danlu mix --input web=clean/web books=clean/books code=clean/code \\
              --weights web=0.6,books=0.2,code=0.2 --output mixed/
    danlu tokenize --input mixed/ --output shards/ ...   # manifest.json counts tokens per source

A document's source is the `name=` prefix of the input it came from, else its ``source`` field.

* **epochs** (``--epochs web=1,books=2.5``): each document of the source is written
  ``floor(e)`` times, plus once more if ``u < e - floor(e)``, where ``u`` is a uniform draw from
  a hash of (seed, id); so ``e = 0.3`` keeps a fixed 30% sample and ``e = 2.5`` repeats
  everything twice and half of it three times.
* **weights** (``--weights web=0.6,...``): shares of the output's characters; converted to
  epochs ``e_s = w_s / sum(w) * total / chars_s`` with ``total`` = the input's characters
  (``--total-chars`` to set it), after one counting pass.

Repeats keep the document's ``id`` (so `danlu tokenize` puts every copy in the same split: no
train/eval leak) and carry ``"repeat": k`` for k >= 1. Documents go to ``--shards`` files by a
hash of (seed, id, repeat), in input order within a file. `DIR/mix.json` records, per source,
documents and characters in and out, the epochs and the realised share, and overall
``documents_in`` (every record read) ``+ repeats = documents_out + sum(dropped) + errors``.
Records that cannot be read (inputs are read by `readers`: JSONL, Parquet, WET) are skipped and
written to `DIR/errors.jsonl` (file, line/row/offset, kind, reason, bytes, raw snippet).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections import Counter
from typing import Iterator, Sequence

from danlu.base import fs as dio
from data_pipeline import readers as R

MIX_REPORT = "mix.json"
ERRORS = "errors.jsonl"


def _u(seed: int, doc_id: str, salt: str = "") -> float:
    h = hashlib.blake2b(f"{seed}:{salt}:{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def copies(epochs: float, seed: int, doc_id: str) -> int:
    """How many times a document of a source with `epochs` is written."""
    whole = math.floor(epochs)
    return whole + (1 if _u(seed, doc_id) < epochs - whole else 0)


def parse_assignments(text: str | None, what: str) -> dict[str, float]:
    """"web=0.6,books=0.2" → {"web": 0.6, "books": 0.2}; errors name the bad item."""
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not sep or not name.strip() or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: expected name=number (>= 0), got {item!r}")
        out[name.strip()] = v
    return out


def plan_sources(inputs: Sequence[str], flags: R.InputFlags = R.InputFlags()) -> list[R.Shard]:
    """The shards of "name=path" or plain "path" arguments; a name becomes the shards' source."""
    shards: list[R.Shard] = []
    for item in inputs:
        name, sep, path = item.partition("=")
        if sep and not os.path.exists(item):
            shards += flags.plan([path], source=name)
        else:
            shards += flags.plan([item])
    return shards


def _docs(shards: Sequence[R.Shard], errors: list | None = None,
          dropped: Counter | None = None) -> Iterator[tuple[str, dict]]:
    """(source, document): the input's name, else the document's `source`, else "unknown"."""
    for shard, doc in R.read_documents(shards, errors, dropped):
        yield (shard.source or doc.get("source") or "unknown"), doc


def plan_epochs(chars: dict[str, int], weights: dict[str, float], total_chars: int | None = None) -> dict[str, float]:
    """Epochs per source that give output character shares `weights` (normalised)."""
    missing = sorted(set(weights) - set(chars))
    if missing:
        raise ValueError(f"weights name sources with no documents: {missing}; sources found: {sorted(chars)}")
    unweighted = sorted(set(chars) - set(weights))
    if unweighted:
        raise ValueError(f"sources without a weight: {unweighted} (give 0 to drop one)")
    wsum = sum(weights.values())
    if wsum <= 0:
        raise ValueError("weights sum to 0")
    total = sum(chars.values()) if total_chars is None else total_chars
    return {s: (weights[s] / wsum * total / chars[s]) if chars[s] else 0.0 for s in sorted(chars)}


def mix(inputs: Sequence[str], output_dir: str, *, weights: dict[str, float] | None = None,
        epochs: dict[str, float] | None = None, total_chars: int | None = None, shards: int = 4,
        seed: int = 0, flags: R.InputFlags = R.InputFlags()) -> dict:
    """Writes the mixture as JSONL shards in `output_dir` (a local directory or a URL) and returns
    (and writes) the report; records that cannot be read go to `output_dir`/errors.jsonl."""
    if bool(weights) == bool(epochs):
        raise ValueError("give exactly one of weights or epochs")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    planned = plan_sources(inputs, flags)
    stats: dict[str, dict] = {}
    if weights:  # a counting pass; its errors are the writing pass's, counted there
        for src, doc in _docs(planned):
            s = stats.setdefault(src, {"documents_in": 0, "chars_in": 0})
            s["documents_in"] += 1
            s["chars_in"] += len(doc["text"])
        plan = plan_epochs({k: v["chars_in"] for k, v in stats.items()}, weights, total_chars)
    else:
        plan = dict(epochs)
    dio.makedirs(output_dir)
    names = [os.path.join(output_dir, f"mix-{i:05d}-of-{shards:05d}.jsonl") for i in range(shards)]
    writers = [dio.JsonlWriter(p) for p in names]
    counted = bool(weights)
    errors: list[dict] = []
    skipped: Counter = Counter()  # records the reader removed on purpose
    documents = not_sampled = 0
    try:
        for src, doc in _docs(planned, errors, skipped):
            documents += 1
            if src not in plan:
                raise ValueError(f"document {doc['id']!r} has source {src!r}, which has no epochs; "
                                 f"known: {sorted(plan)}")
            s = stats.setdefault(src, {"documents_in": 0, "chars_in": 0})
            if not counted:
                s["documents_in"] += 1
                s["chars_in"] += len(doc["text"])
            k = copies(plan[src], seed, doc["id"])
            not_sampled += k == 0
            s["documents_out"] = s.get("documents_out", 0) + k
            s["chars_out"] = s.get("chars_out", 0) + k * len(doc["text"])
            for r in range(k):
                out = dict(doc)
                out["source"] = src
                if r:
                    out["repeat"] = r
                shard = int(_u(seed, doc["id"], f"shard{r}") * shards)
                writers[shard].write(out)
    finally:
        for w in writers:
            w.close()
    dio.write_jsonl(os.path.join(output_dir, ERRORS), errors)
    total_out = sum(s.get("chars_out", 0) for s in stats.values()) or 1
    for src, s in stats.items():
        s.setdefault("documents_out", 0)
        s.setdefault("chars_out", 0)
        s["epochs"] = round(plan.get(src, 0.0), 6)
        s["share_out"] = round(s["chars_out"] / total_out, 6)
    documents_out = sum(w.count for w in writers)  # copies written, repeats included
    dropped = {**skipped, "mix:not_sampled": not_sampled} if not_sampled else dict(skipped)
    report = {"documents_in": documents + sum(skipped.values()) + len(errors),  # every record read
              "documents_out": documents_out, "repeats": documents_out - (documents - not_sampled),
              "dropped": dict(sorted(dropped.items())), "errors": len(errors),
              "error_kinds": dict(sorted(Counter(e["kind"] for e in errors).items())),
              "weights": weights or None, "epochs": {k: round(v, 6) for k, v in plan.items()},
              "seed": seed, "shards": [os.path.basename(p) for p in names], "sources": dict(sorted(stats.items()))}
    dio.write_text(os.path.join(output_dir, MIX_REPORT), json.dumps(report, indent=1) + "\n")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="documents: files, dirs, globs or URLs (JSONL, Parquet, WET), optionally name=PATH to set the source")
    p.add_argument("--output", required=True,
                   help="output directory or URL (gs://, memory://): JSONL shards, mix.json, errors.jsonl")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="output character shares, e.g. web=0.6,books=0.2,code=0.2")
    g.add_argument("--epochs", help="passes per source, e.g. web=1,books=2.5,code=0.5")
    p.add_argument("--total-chars", type=int, default=None, help="output size for --weights (default: the input's)")
    p.add_argument("--shards", type=int, default=4, help="output files (default 4)")
    p.add_argument("--seed", type=int, default=0)
    R.add_input_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Runs `danlu mix`; returns the exit code (2: bad flags or inputs, before any work)."""
    flags = R.InputFlags.from_args(args)
    try:
        weights = parse_assignments(args.weights, "--weights")
        epochs = parse_assignments(args.epochs, "--epochs")
    except ValueError as e:
        print(f"danlu mix: error: {e}", file=sys.stderr)
        return 2
    try:
        report = mix(args.input, args.output, weights=weights, epochs=epochs, total_chars=args.total_chars,
                     shards=args.shards, seed=args.seed, flags=flags)
    except ValueError as e:  # missing inputs (planned before any work), weights or epochs not matching the sources
        print(f"danlu mix: error: {e}", file=sys.stderr)
        return 2
    for src, s in report["sources"].items():
        print(f"{src}: {s['documents_in']} docs in, {s['documents_out']} out, epochs {s['epochs']}, "
              f"share {s['share_out']:.3f}")
    print(f"{report['documents_in']} records in, {report['documents_out']} written ({report['repeats']} repeats), "
          f"{sum(report['dropped'].values())} dropped, {report['errors']} errors -> "
          f"{os.path.join(args.output, ERRORS)}")
    print(f"wrote {args.output}")
    return 0
