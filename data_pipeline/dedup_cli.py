"""`danlu dedup`: fuzzy (MinHash LSH) dedup of documents (JSONL, Parquet, WET: `readers`).

    danlu dedup --input crawl/*.jsonl.gz --output dedup/ [--threshold 0.8] [--ngram 5]
                [--num-perm 128] [--memory-budget 512] [--keep first|longest|score] [--verify]

Writes to DIR (a local directory or a URL: gs://, memory://, file://):

    kept-00000-of-0000N.jsonl   the kept documents of input shard 0 (a file; order, ids and fields kept)
    clusters.jsonl              one row per removed document: {"id", "kept", "source", "kept_source"}
    report.json                 documents_in (every record read) = documents_out + sum(dropped) + errors;
                                bands × rows, spill runs, peak memory, seconds
    errors.jsonl                records that could not be read, one row each: file, line/row/offset,
                                kind, reason, bytes, raw snippet; they are skipped

Documents are numbered in input order (files in the order given, lines in file order), which is
what "first" means; the result does not depend on --workers or --memory-budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Iterator, Sequence

import numpy as np

from danlu.base import fs as dio
from data_pipeline import readers as R
from data_pipeline.dedup.fuzzy import DedupResult, fuzzy_dedup
from data_pipeline.dedup.minhash import MinHashConfig


def iter_documents(shards: Sequence[R.Shard], errors: list | None = None,
                   dropped: Counter | None = None) -> Iterator[tuple[int, dict]]:
    """(shard index, document) for the documents of `shards`; records that cannot be read go to
    `errors` as errors.jsonl rows, records a reader skips on purpose to `dropped`."""
    for shard, doc in R.read_documents(shards, errors, dropped):
        yield shard.index, doc


def dedup_files(inputs: Sequence[str], output_dir: str, cfg: MinHashConfig = MinHashConfig(), *,
                memory_budget_mb: float | None = None, workers: int = 1,
                flags: R.InputFlags = R.InputFlags()) -> dict:
    """Runs `fuzzy_dedup` over the documents of `inputs` (read with `flags`) and writes kept
    documents, clusters, errors and report to `output_dir` (a local directory or a URL)."""
    t0 = time.perf_counter()
    shards = flags.plan(inputs)
    local = dio.local_path(output_dir)
    dio.makedirs(output_dir)
    # Spill files are local: next to a local output, else in a temporary directory.
    spill_dir = os.path.join(local, ".spill") if memory_budget_mb is not None and local is not None else None
    result: DedupResult = fuzzy_dedup(lambda: (d for _, d in iter_documents(shards)), cfg,
                                      memory_budget_mb=memory_budget_mb, workdir=spill_dir, workers=workers)
    if spill_dir and os.path.isdir(spill_dir):
        os.rmdir(spill_dir)
    kept_for = result.kept_for
    removed = result.removed
    need = set(np.unique(kept_for[removed]).tolist())
    names: dict[int, tuple[str, str]] = {}
    removed_rows: list[tuple[int, str, str]] = []
    errors: list[dict] = []
    dropped: Counter = Counter()
    n = len(shards)
    writers = [dio.JsonlWriter(os.path.join(output_dir, f"kept-{i:05d}-of-{n:05d}.jsonl")) for i in range(n)]
    per_source: dict[str, dict] = {}
    try:
        for i, (si, doc) in enumerate(iter_documents(shards, errors, dropped)):
            src = str(doc.get("source", ""))
            ps = per_source.setdefault(src, {"documents_in": 0, "documents_out": 0, "removed": 0})
            ps["documents_in"] += 1
            if i in need:
                names[i] = (doc["id"], src)
            if removed[i]:
                ps["removed"] += 1
                removed_rows.append((i, doc["id"], src))
            else:
                ps["documents_out"] += 1
                writers[si].write(doc)
    finally:
        for w in writers:
            w.close()
    with dio.JsonlWriter(os.path.join(output_dir, "clusters.jsonl")) as w:
        for i, doc_id, src in removed_rows:
            kept_id, kept_src = names[int(kept_for[i])]
            w.write({"id": doc_id, "kept": kept_id, "source": src, "kept_source": kept_src})
    dio.write_jsonl(os.path.join(output_dir, "errors.jsonl"), errors)
    documents_in = int(kept_for.size) + sum(dropped.values()) + len(errors)  # every record read
    dropped["minhash:near_duplicate"] = int(removed.sum())
    report = {
        "documents_in": documents_in,  # = documents_out + sum(dropped) + errors
        "documents_out": int((~removed).sum()),
        "dropped": dict(sorted(dropped.items())), "errors": len(errors),
        "error_kinds": dict(sorted(Counter(e["kind"] for e in errors).items())),
        "config": {"threshold": cfg.threshold, "ngram": cfg.ngram, "num_perm": cfg.num_perm,
                   "bands": result.stats["bands"], "rows": result.stats["rows"], "keep": cfg.keep,
                   "verify": cfg.verify, "scope": cfg.scope, "seed": cfg.seed,
                   "memory_budget_mb": memory_budget_mb},
        "sources": dict(sorted(per_source.items())),
        "stats": result.stats,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    dio.write_text(os.path.join(output_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help="documents: files, globs, directories or URLs (JSONL, Parquet, WET; see --reader)")
    p.add_argument("--output", required=True, help="output directory or URL (gs://, memory://, file://)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold (default 0.8)")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle (default 5)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--bands", type=int, default=0, help="LSH bands (default: chosen from the threshold)")
    p.add_argument("--rows", type=int, default=0, help="rows per band (default: chosen from the threshold)")
    p.add_argument("--keep", choices=["first", "longest", "score"], default="first",
                   help="which document of a cluster stays (default first)")
    p.add_argument("--score-field", default="quality_score", help="field read by --keep score")
    p.add_argument("--scope", choices=["global", "source"], default="global",
                   help="duplicates across sources (global) or only within one source")
    p.add_argument("--verify", action="store_true", help="keep only candidate pairs with exact Jaccard >= threshold")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                   help="RAM for band-key records; beyond it they spill to sorted files (default: no limit)")
    p.add_argument("--workers", type=int, default=1, help="signature processes (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the hash functions (default 1)")
    R.add_input_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Runs `danlu dedup`; returns the exit code (2: bad flags or inputs, before any work)."""
    try:
        cfg = MinHashConfig(threshold=args.threshold, ngram=args.ngram, num_perm=args.num_perm, bands=args.bands,
                            rows=args.rows, keep=args.keep, score_field=args.score_field, scope=args.scope,
                            verify=args.verify, seed=args.seed)
    except ValueError as e:
        print(f"danlu dedup: error: {e}", file=sys.stderr)
        return 2
    try:  # the inputs are planned (and checked) first thing, before any work
        report = dedup_files(args.input, args.output, cfg, memory_budget_mb=args.memory_budget,
                             workers=args.workers, flags=R.InputFlags.from_args(args))
    except R.InputError as e:
        print(f"danlu dedup: error: {e}", file=sys.stderr)
        return 2
    st = report["stats"]
    print(f"{report['documents_in']} records in, {report['documents_out']} kept, "
          f"{sum(report['dropped'].values())} dropped ({report['dropped']['minhash:near_duplicate']} near-duplicates "
          f"in {st['clusters']} clusters), {report['errors']} errors -> {os.path.join(args.output, 'errors.jsonl')} "
          f"(bands {st['bands']} x rows {st['rows']}, {st['spill_runs']} spill runs, "
          f"peak RSS {st['peak_rss_mb']} MB, {report['seconds']} s)")
    print(f"wrote {args.output}")
    return 0
