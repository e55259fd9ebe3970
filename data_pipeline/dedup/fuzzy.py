"""Fuzzy (MinHash LSH) dedup of a corpus that is read as a stream, in bounded memory.

    pass 1   documents → shingles → signatures → band keys    (batches, optional worker processes)
             records (band key, doc) → RecordIndex            (RAM, or sorted runs on disk)
    pass 2   records in (key, doc) order → star edges → Components (union-find, 8 B/document)
    verify   (optional) candidate documents' shingle sets (one more read), exact Jaccard per bucket
    keep     `choose_kept`: first | longest | score

Documents are numbered by their position in the stream; `corpus` is a function returning a
fresh iterator over the same documents (it is called again only for verification).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from data_pipeline.dedup import lsh
from data_pipeline.dedup.minhash import (MinHashConfig, MinHasher, band_keys, shingle_set, shingles, sorted_unique,
                                         string_hash64)
from data_pipeline.dedup.spill import RecordIndex, peak_memory


@dataclasses.dataclass
class DedupResult:
    """kept_for: int64 [N], the document kept in each document's cluster (itself if kept)."""

    kept_for: np.ndarray
    stats: dict

    @property
    def removed(self) -> np.ndarray:
        """bool [N]: True for documents removed as near-duplicates."""
        return self.kept_for != np.arange(self.kept_for.size)


# --------------------------------------------------------------------------- signatures

_worker_state: dict = {}


def _init_worker(num_perm: int, seed: int, ngram: int, bands: int, rows: int) -> None:
    _worker_state.update(hasher=MinHasher(num_perm, seed), ngram=ngram, bands=bands, rows=rows, keep_shingles=False)


def _keys_of(batch: tuple[list[str], list[str] | None]) -> tuple[np.ndarray, np.ndarray, list | None]:
    """(band keys uint64 [n, bands], has-shingles bool [n], the shingle arrays if kept) of a batch."""
    texts, sources = batch
    st = _worker_state
    sh = [shingles(t, st["ngram"]) for t in texts]
    sigs = st["hasher"].signatures(sh)
    salt = string_hash64(sources) if sources is not None else None
    has = np.fromiter((s.size > 0 for s in sh), bool, len(sh))
    return band_keys(sigs, st["bands"], st["rows"], salt), has, (sh if st.get("keep_shingles") else None)


def _batches(docs: Iterable[dict], cfg: MinHashConfig, batch_bytes: int, meta: dict) -> Iterator[tuple]:
    """Batches of (texts, sources) of about `batch_bytes` characters; fills meta's lists."""
    texts: list[str] = []
    sources: list[str] = []
    size = 0
    for doc in docs:
        text = doc["text"]
        texts.append(text)
        sources.append(str(doc.get("source", "")))
        meta["lengths"].append(len(text))
        if cfg.keep == "score":
            s = doc.get(cfg.score_field)
            meta["scores"].append(float(s) if isinstance(s, (int, float)) else np.nan)
        meta["bytes"] += len(text)
        size += len(text)
        if size >= batch_bytes:
            yield texts, (sources if cfg.scope == "source" else None)
            texts, sources, size = [], [], 0
    if texts:
        yield texts, (sources if cfg.scope == "source" else None)


def fuzzy_dedup(corpus: Callable[[], Iterable[dict]], cfg: MinHashConfig = MinHashConfig(), *,
                memory_budget_mb: float | None = None, workdir: str | None = None,
                workers: int = 1) -> DedupResult:
    """Near-duplicate clusters of the documents `corpus()` yields, and the one kept in each.

    Args:
      corpus: returns a fresh iterator of documents (dicts with "text"; "source" for
        scope="source"; cfg.score_field for keep="score").
      memory_budget_mb: bound on the band-key records held in RAM (None: all in RAM); beyond
        it they are spilled to sorted run files under `workdir` (a temp dir by default).
      workers: processes computing signatures (results are used in input order, so the
        outcome does not depend on it).

    Returns:
      DedupResult with `stats`: documents, bytes, bands, rows, records, runs (spilled
      files), edges, clusters, removed, pairs_compared (with verify), seconds, peak memory.
    """
    t0 = time.perf_counter()
    bands, rows = cfg.band_rows()
    budget = None if memory_budget_mb is None else int(memory_budget_mb * (1 << 20))
    # Text per signature batch: a slice of the budget (its shingles and keys are a few times larger).
    batch_bytes = 4 << 20 if budget is None else max(1 << 18, min(4 << 20, budget // 4))
    index = RecordIndex(budget, workdir)
    meta = {"lengths": [], "scores": [], "bytes": 0}
    init = (cfg.num_perm, cfg.seed, cfg.ngram, bands, rows)
    n = 0
    kept_shingles: list[np.ndarray] = []
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init)
            results = pool.imap(_keys_of, _batches(corpus(), cfg, batch_bytes, meta), chunksize=1)
        else:
            _init_worker(*init)
            # Without a budget, verification reuses the first pass's shingles (about 1.3x the text
            # in RAM) instead of reading and shingling the corpus again.
            _worker_state["keep_shingles"] = cfg.verify and budget is None
            results = map(_keys_of, _batches(corpus(), cfg, batch_bytes, meta))
        for keys, has, sh in results:
            docs = np.arange(n, n + keys.shape[0], dtype=np.int64)
            index.add(keys[has], docs[has])  # documents without words join no bucket
            if sh is not None:
                kept_shingles.extend(sh)
            n += keys.shape[0]
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    t_sig = time.perf_counter() - t0

    comps = lsh.Components(n)
    compared = 0
    try:
        if not cfg.verify:
            head_key, head_doc = None, -1
            for keys, docs in index.blocks():
                if keys.size == 0:
                    continue
                u, v = lsh.star_edges(keys, docs, head_key, head_doc)
                comps.add_edges(u, v)
                # The bucket this block ends in may go on in the next block.
                last = keys[-1]
                if head_key is None or last != np.uint64(head_key):
                    same = np.flatnonzero(keys == last)
                    head_key, head_doc = int(last), int(docs[same[0]])
        else:
            in_bucket = np.zeros(n, dtype=bool)
            for group in _groups(index):
                in_bucket[group] = True
            needed = np.flatnonzero(in_bucket)
            sets: dict[int, np.ndarray] = {}
            if kept_shingles:
                for i in needed.tolist():
                    sets[i] = sorted_unique(kept_shingles[i])
                kept_shingles.clear()
            else:
                want = set(needed.tolist())
                for i, doc in enumerate(corpus()):
                    if i in want:
                        sets[i] = shingle_set(doc["text"], cfg.ngram)
            cache: dict = {}
            u, v, compared = lsh.verified_edges(_groups(index), sets.__getitem__, cfg.threshold, cache)
            comps.add_edges(u, v)
        labels = comps.labels()
        runs = len(index.runs)
    finally:
        index.close()
    lengths = np.asarray(meta["lengths"], dtype=np.int64)
    scores = np.asarray(meta["scores"], dtype=np.float64) if cfg.keep == "score" else None
    kept_for = lsh.choose_kept(labels, cfg.keep, lengths, scores)
    removed = int((kept_for != np.arange(n)).sum())
    stats = {
        "documents": n, "bytes": meta["bytes"], "bands": bands, "rows": rows, "records": index.records,
        "spill_runs": runs,
        "edges": comps.edges, "clusters": int(np.unique(labels[kept_for != np.arange(n)]).size),
        "removed": removed, "pairs_compared": compared,
        "seconds": round(time.perf_counter() - t0, 3), "signature_seconds": round(t_sig, 3),
        **peak_memory(),
    }
    return DedupResult(kept_for, stats)


def _groups(index: RecordIndex) -> Iterator[np.ndarray]:
    """Buckets with >= 2 members from the index's blocks (a bucket may span blocks)."""
    carry_key: int | None = None
    carry: list[np.ndarray] = []
    for keys, docs in index.blocks():
        if keys.size == 0:
            continue
        if carry_key is not None:
            cont = int(np.searchsorted(keys, np.uint64(carry_key), side="right")) if keys[0] == np.uint64(carry_key) else 0
            if cont:
                carry.append(docs[:cont])
                keys, docs = keys[cont:], docs[cont:]
            if keys.size or not cont:
                merged = np.concatenate(carry)
                if merged.size >= 2:
                    yield merged
                carry_key, carry = None, []
            if not keys.size:
                continue
        # Hold back the last bucket of the block: it may continue in the next one.
        last = keys[-1]
        cut = int(np.searchsorted(keys, last, side="left"))
        yield from lsh.iter_groups(keys[:cut], docs[:cut])
        carry_key, carry = int(last), [docs[cut:]]
    if carry_key is not None:
        merged = np.concatenate(carry)
        if merged.size >= 2:
            yield merged
