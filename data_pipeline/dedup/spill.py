"""Band-key records larger than memory: sorted run files on disk, merged in bounded blocks.

`RecordIndex` collects ``(key uint64, doc int64)`` records. While they fit the memory budget they
stay in RAM; beyond it each full buffer is sorted by (key, doc) and written as a run file
(raw little-endian records, 16 bytes each). `blocks()` then streams all records in global
(key, doc) order by a k-way merge that holds one block per run: the records up to the smallest
"last record" among the runs' current blocks are final (no unread record can be smaller), so they
are emitted, and the runs whose block is used up read their next block. Memory is
``runs × block`` records however many records there are.

`peak_memory()` reports the process's peak resident set (resource.getrusage) and, when
tracemalloc is tracing, the peak of Python/numpy allocations.
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import tracemalloc
from typing import Iterator

import numpy as np

RECORD = np.dtype([("key", "<u8"), ("doc", "<i8")])


def peak_memory() -> dict:
    """{"peak_rss_mb": ..., "traced_peak_mb": ... (only while tracemalloc traces)}."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    if tracemalloc.is_tracing():
        out["traced_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / (1 << 20), 2)
    return out


class RecordIndex:
    """(key, doc) records, in memory up to `budget_bytes`, spilled as sorted runs beyond."""

    def __init__(self, budget_bytes: int | None = None, workdir: str | None = None):
        self.budget = budget_bytes
        self.workdir = workdir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._keys: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._buffered = 0
        self.runs: list[str] = []
        self.records = 0

    @property
    def capacity(self) -> int | None:
        """Records held in memory before a spill (a quarter of the budget: sort needs copies)."""
        return None if self.budget is None else max(256, self.budget // (4 * RECORD.itemsize))

    def add(self, keys: np.ndarray, docs: np.ndarray) -> None:
        """Adds records; keys uint64 [n], docs int64 [n] (or keys [n, B] with docs [n])."""
        keys = np.asarray(keys, dtype=np.uint64)
        docs = np.asarray(docs, dtype=np.int64)
        if keys.ndim == 2:
            docs = np.repeat(docs, keys.shape[1])
            keys = keys.reshape(-1)
        self._keys.append(keys)
        self._docs.append(docs)
        self._buffered += keys.size
        self.records += keys.size
        cap = self.capacity
        if cap is not None and self._buffered >= cap:
            self._spill()

    def _spill(self) -> None:
        if not self._buffered:
            return
        if self._tmp is None:
            if self.workdir:
                os.makedirs(self.workdir, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="danlu-lsh-", dir=self.workdir)
        keys, docs = self._take()
        rec = np.empty(keys.size, dtype=RECORD)
        order = np.lexsort((docs, keys))
        rec["key"] = keys[order]
        rec["doc"] = docs[order]
        path = os.path.join(self._tmp.name, f"run-{len(self.runs):06d}.bin")
        rec.tofile(path)
        self.runs.append(path)

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, np.uint64)
        docs = np.concatenate(self._docs) if self._docs else np.zeros(0, np.int64)
        self._keys, self._docs, self._buffered = [], [], 0
        return keys, docs

    @property
    def spilled(self) -> bool:
        return bool(self.runs)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, docs) blocks whose concatenation is every record in (key, doc) order.

        Can be called more than once (the runs stay until `close`).
        """
        if not self.runs:
            keys, docs = self._take()
            order = np.lexsort((docs, keys))
            self._keys, self._docs, self._buffered = [keys], [docs], keys.size  # keep for a re-read
            yield keys[order], docs[order]
            return
        self._spill()
        block = max(64, (self.capacity or 1 << 20) // max(1, len(self.runs)))
        readers = [_RunReader(p, block) for p in self.runs]
        pending: list[np.ndarray] = [r.next() for r in readers]
        while True:
            live = [i for i, blk in enumerate(pending) if blk is not None and blk.size]
            if not live:
                return
            # The smallest last record among the current blocks of runs that still have more to read.
            bound = None
            for i in live:
                if not readers[i].done:
                    last = pending[i][-1]
                    t = (int(last["key"]), int(last["doc"]))
                    bound = t if bound is None or t < bound else bound
            take, keep = [], []
            for i in live:
                blk = pending[i]
                if bound is None:
                    n = blk.size
                else:
                    # records <= bound: key < bound.key, or key == bound.key and doc <= bound.doc
                    lo = np.searchsorted(blk["key"], np.uint64(bound[0]), side="left")
                    hi = np.searchsorted(blk["key"], np.uint64(bound[0]), side="right")
                    n = lo + np.searchsorted(blk["doc"][lo:hi], bound[1], side="right")
                take.append(blk[:n])
                keep.append((i, blk[n:]))
            out = np.concatenate(take)
            out.sort(order=("key", "doc"))
            for i, rest in keep:
                pending[i] = rest if rest.size else readers[i].next()
            yield out["key"], out["doc"]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.runs = []


class _RunReader:
    """Reads a run file `block` records at a time; `done` once the last block was handed out."""

    def __init__(self, path: str, block: int):
        self.f = open(path, "rb")
        self.block = block
        self.done = False

    def next(self) -> np.ndarray | None:
        if self.done:
            return None
        data = np.fromfile(self.f, dtype=RECORD, count=self.block)
        if data.size < self.block:
            self.done = True
            self.f.close()
        return data
