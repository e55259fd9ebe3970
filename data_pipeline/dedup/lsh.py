"""LSH buckets → candidate edges → clusters (connected components) → which document stays.

Documents are numbered 0..N-1 in input order. Every band key is one record ``(key, doc)``;
records sorted by (key, doc) put each bucket's members next to each other in increasing doc
order. Clustering only needs the connectivity of "shares a bucket", so a bucket of m documents
contributes m-1 *star* edges (every member to the bucket's smallest doc) instead of m(m-1)/2.

With verification, an edge is kept only if the exact Jaccard of the two shingle sets is at least
the threshold; each bucket then contributes a spanning forest of its verified pairs (a pair is
tested only while its two documents are not yet connected inside the bucket). Either way the
clusters are the connected components of the graph {(i, j): i, j share a bucket [and J(i, j) >=
threshold]}, whatever order the buckets come in: the local runner, the spilling runner and the
Beam runner all compute exactly that, so they agree.

A cluster's label is its smallest document number; the kept document is chosen by `choose_kept`.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np


def sort_records(keys: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, docs) sorted by key then doc. uint64 [n], int64 [n] in and out."""
    order = np.lexsort((docs, keys))
    return keys[order], docs[order]


def star_edges(keys: np.ndarray, docs: np.ndarray, head_key: int | None = None,
               head_doc: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Edges (first member of the bucket, other member) of records sorted by (key, doc).

    `head_key`/`head_doc`: the key and first doc of the bucket the previous block ended in (for
    streams of blocks); records with that key link to `head_doc`.
    """
    if keys.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    start = np.empty(keys.size, dtype=bool)
    start[0] = head_key is None or keys[0] != np.uint64(head_key)
    np.not_equal(keys[1:], keys[:-1], out=start[1:])
    group = np.cumsum(start) - 1  # group number of each record (-1: continues the head bucket)
    firsts = docs[start]
    first = np.where(group >= 0, firsts[np.maximum(group, 0)], head_doc)
    other = ~start
    return first[other], docs[other]


def iter_groups(keys: np.ndarray, docs: np.ndarray) -> Iterator[np.ndarray]:
    """The doc arrays of the buckets with >= 2 members, from records sorted by (key, doc)."""
    if keys.size < 2:
        return
    bounds = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1], [True]]))
    sizes = np.diff(bounds)
    for b in np.flatnonzero(sizes >= 2):
        yield docs[bounds[b]:bounds[b + 1]]


class Components:
    """Union-find over N documents, fed batches of edges; the root is the smallest member.

    ``parent`` is an int64 [N] array; a batch of edges is merged with scipy's
    connected_components on the roots it touches (vectorised, no Python loop over edges).
    Memory: 8 bytes per document, whatever the number of edges.
    """

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.edges = 0

    def _compress(self) -> None:
        p = self.parent
        while True:  # pointer jumping: parents always point to smaller numbers, so this ends
            pp = p[p]
            if np.array_equal(pp, p):
                break
            p = pp
        self.parent = p

    def add_edges(self, u: np.ndarray, v: np.ndarray) -> None:
        """Merges the clusters of u[k] and v[k] for every k (int64 [E] each)."""
        if u.size == 0:
            return
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        self.edges += int(u.size)
        self._compress()
        ru, rv = self.parent[u], self.parent[v]
        nodes, inv = np.unique(np.concatenate([ru, rv]), return_inverse=True)
        k = ru.size
        graph = coo_matrix((np.ones(k, dtype=np.int8), (inv[:k], inv[k:])), shape=(nodes.size, nodes.size))
        ncomp, lab = connected_components(graph, directed=False)
        mins = np.full(ncomp, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(mins, lab, nodes)
        self.parent[nodes] = mins[lab]

    def labels(self) -> np.ndarray:
        """int64 [N]: the smallest document number of each document's cluster."""
        self._compress()
        return self.parent


def verified_edges(groups: Iterator[np.ndarray], shingle_sets: Callable[[int], np.ndarray],
                   threshold: float, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges (j, i) of each bucket's spanning forest of pairs with Jaccard >= threshold.

    Within a bucket, i is compared with each earlier member j not yet connected to it; the
    result's connectivity is that of all verified pairs of the bucket. `cache` maps (j, i) to the
    verdict across buckets (a near-duplicate pair shares many buckets). Returns (u, v, pairs
    compared).
    """
    from data_pipeline.dedup.minhash import jaccard_at_least

    cache = {} if cache is None else cache
    us: list[int] = []
    vs: list[int] = []
    compared = 0
    for members in groups:
        members = [int(x) for x in members]
        local = {m: m for m in members}

        def find(x: int) -> int:
            while local[x] != x:
                local[x] = local[local[x]]
                x = local[x]
            return x

        for a, i in enumerate(members):
            for j in members[:a]:
                ri, rj = find(i), find(j)
                if ri == rj:
                    continue
                verdict = cache.get((j, i))
                if verdict is None:
                    verdict = jaccard_at_least(shingle_sets(j), shingle_sets(i), threshold)
                    cache[(j, i)] = verdict
                    compared += 1
                if verdict:
                    local[max(ri, rj)] = min(ri, rj)
                    us.append(j)
                    vs.append(i)
    return np.asarray(us, dtype=np.int64), np.asarray(vs, dtype=np.int64), compared


def choose_kept(labels: np.ndarray, keep: str = "first", lengths: np.ndarray | None = None,
                scores: np.ndarray | None = None) -> np.ndarray:
    """int64 [N]: for every document, the document kept in its cluster (itself if it stays).

    keep: "first" (the smallest number), "longest" (largest `lengths`, ties to the smallest
    number) or "score" (largest `scores`, NaN = -inf, ties to the smallest number).
    """
    n = labels.size
    if keep == "first":
        return labels.copy()
    if keep == "longest":
        if lengths is None:
            raise ValueError("keep='longest' needs lengths")
        metric = -np.asarray(lengths, dtype=np.float64)
    elif keep == "score":
        if scores is None:
            raise ValueError("keep='score' needs scores")
        s = np.asarray(scores, dtype=np.float64)
        metric = -np.where(np.isnan(s), -np.inf, s)
    else:
        raise ValueError(f"keep must be 'first', 'longest' or 'score', got {keep!r}")
    idx = np.arange(n, dtype=np.int64)
    order = np.lexsort((idx, metric, labels))
    first_of_label = np.ones(n, dtype=bool)
    first_of_label[1:] = labels[order][1:] != labels[order][:-1]
    best = np.empty(n, dtype=np.int64)
    best[labels[order][first_of_label]] = order[first_of_label]
    return best[labels]
