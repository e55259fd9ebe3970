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
documents and characters in and out, the epochs and the realised share.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from typing import Iterator, Sequence

from data_pipeline import io as dio

MIX_REPORT = "mix.json"


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


def split_inputs(inputs: Sequence[str]) -> list[tuple[str | None, str]]:
    """[(source or None, path)] from "name=path" or plain "path" arguments, globs expanded."""
    out: list[tuple[str | None, str]] = []
    for item in inputs:
        name, sep, path = item.partition("=")
        if sep and not os.path.exists(item):
            out += [(name, p) for p in dio.expand_inputs([path])]
        else:
            out += [(None, p) for p in dio.expand_inputs([item])]
    return out


def _docs(inputs: list[tuple[str | None, str]]) -> Iterator[tuple[str, dict]]:
    for name, path in inputs:
        for doc in dio.read_jsonl(path):
            err = dio.document_error(doc)
            if err:
                raise ValueError(f"{path}: document {doc.get('id')!r}: {err}")
            yield (name or doc.get("source") or "unknown"), doc


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
        seed: int = 0) -> dict:
    """Writes the mixture as JSONL shards in `output_dir` and returns (and writes) the report."""
    if bool(weights) == bool(epochs):
        raise ValueError("give exactly one of weights or epochs")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    pairs = split_inputs(inputs)
    stats: dict[str, dict] = {}
    if weights:
        for src, doc in _docs(pairs):
            s = stats.setdefault(src, {"documents_in": 0, "chars_in": 0})
            s["documents_in"] += 1
            s["chars_in"] += len(doc["text"])
        plan = plan_epochs({k: v["chars_in"] for k, v in stats.items()}, weights, total_chars)
    else:
        plan = dict(epochs)
    os.makedirs(output_dir, exist_ok=True)
    names = [os.path.join(output_dir, f"mix-{i:05d}-of-{shards:05d}.jsonl") for i in range(shards)]
    writers = [dio.JsonlWriter(p) for p in names]
    counted = bool(weights)
    try:
        for src, doc in _docs(pairs):
            if src not in plan:
                raise ValueError(f"document {doc['id']!r} has source {src!r}, which has no epochs; "
                                 f"known: {sorted(plan)}")
            s = stats.setdefault(src, {"documents_in": 0, "chars_in": 0})
            if not counted:
                s["documents_in"] += 1
                s["chars_in"] += len(doc["text"])
            k = copies(plan[src], seed, doc["id"])
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
    total_out = sum(s.get("chars_out", 0) for s in stats.values()) or 1
    for src, s in stats.items():
        s.setdefault("documents_out", 0)
        s.setdefault("chars_out", 0)
        s["epochs"] = round(plan.get(src, 0.0), 6)
        s["share_out"] = round(s["chars_out"] / total_out, 6)
    report = {"weights": weights or None, "epochs": {k: round(v, 6) for k, v in plan.items()},
              "seed": seed, "shards": [os.path.basename(p) for p in names], "sources": dict(sorted(stats.items()))}
    with open(os.path.join(output_dir, MIX_REPORT), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help="JSONL files/dirs/globs, optionally name=PATH to set the source")
    p.add_argument("--output", required=True, help="output directory (JSONL shards + mix.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--weights", help="output character shares, e.g. web=0.6,books=0.2,code=0.2")
    g.add_argument("--epochs", help="passes per source, e.g. web=1,books=2.5,code=0.5")
    p.add_argument("--total-chars", type=int, default=None, help="output size for --weights (default: the input's)")
    p.add_argument("--shards", type=int, default=4, help="output files (default 4)")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    report = mix(args.input, args.output, weights=parse_assignments(args.weights, "--weights"),
                 epochs=parse_assignments(args.epochs, "--epochs"), total_chars=args.total_chars,
                 shards=args.shards, seed=args.seed)
    for src, s in report["sources"].items():
        print(f"{src}: {s['documents_in']} docs in, {s['documents_out']} out, epochs {s['epochs']}, "
              f"share {s['share_out']:.3f}")
    print(f"wrote {args.output}")
    return 0
