"""MinHash signatures of word n-gram shingles, vectorised with numpy.

Text → words → shingles → signature:

* **Words**: the text is lower-cased and encoded as UTF-8; a word is a maximal run of bytes that
  are ASCII letters, digits or ``_``, or any non-ASCII byte (so words of every script survive,
  and ASCII punctuation and whitespace separate words). Same split as the regular expression
  ``[0-9a-z_\\u0080-\\U0010ffff]+`` on the lower-cased text (`words_re`), which the tests and the
  benchmark use to give datasketch the very same shingles.
* **Word hashes**: a polynomial hash of each word's bytes computed for all words at once from one
  prefix sum (``sum_j b_j P^(j-start)`` mod 2^64, P odd so P^-start exists), then mixed with
  the splitmix64 finaliser. No Python loop over words.
* **Shingles**: the hash of each run of ``n`` consecutive words (default 5), order-sensitive;
  a document with 1..n-1 words has one shingle (all its words), an empty one has none.
* **Signature**: ``num_perm`` hash functions from the multiply-shift family
  ``h_i(x) = (a_i x + b_i mod 2^64) >> 32`` (a_i odd; a 2-universal family, Dietzfelbinger et al.
  1997), the minimum over the document's shingles of each: uint32 ``[num_perm]``. Parameters
  come from ``numpy.random.default_rng(seed)``, so every worker and every run agrees.

`optimal_bands` picks bands × rows for a Jaccard threshold like datasketch's `_optimal_param`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

_M64 = (1 << 64) - 1
_P = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so invertible mod 2^64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))

# Byte classes: True for bytes that belong to words.
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyz0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True

words_re = re.compile(r"[0-9a-z_\u0080-\U0010ffff]+")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on a uint64 array (a new array)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class _Powers:
    """P^j and P^-j mod 2^64 for j < len, grown by doubling as longer texts arrive."""

    def __init__(self) -> None:
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.pow):
            size = max(n, 2 * len(self.pow), 1 << 16)
            with np.errstate(over="ignore"):
                self.pow = np.cumprod(np.full(size, _P, dtype=np.uint64)) * _P_INV  # P^0..P^(size-1)
                self.inv = np.cumprod(np.full(size, _P_INV, dtype=np.uint64)) * _P
        return self.pow[:n], self.inv[:n]


_POWERS = _Powers()
# Constants that make the n-gram hash order-sensitive (fixed: part of the shingle definition).
_NGRAM_MULT = splitmix64(np.arange(1, 65, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)


def word_hashes(text: str) -> np.ndarray:
    """uint64 [words]: one hash per word of `text` (see the module docstring for "word")."""
    data = np.frombuffer(text.lower().encode("utf-8", "surrogatepass"), dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64)
    is_word = _WORD_BYTE[data]
    edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    pw, inv = _POWERS.get(data.size)
    prefix = np.empty(data.size + 1, dtype=np.uint64)
    prefix[0] = 0
    with np.errstate(over="ignore"):
        np.cumsum(data.astype(np.uint64) * pw, out=prefix[1:])
        h = (prefix[ends] - prefix[starts]) * inv[starts]
        h += (ends - starts).astype(np.uint64)  # length in: "a" and "a\x00"-like aliases differ
    return splitmix64(h)


def shingles(text: str, ngram: int = 5) -> np.ndarray:
    """uint64 [shingles]: hashes of the word `ngram`-grams of `text`, in text order (may repeat).

    1..ngram-1 words give one shingle of all the words; no words give none.
    """
    w = word_hashes(text)
    m = w.size
    if m == 0:
        return w
    k = min(ngram, m)
    count = m - k + 1
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            acc += w[j:j + count] * _NGRAM_MULT[j]
    return splitmix64(acc)


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a uint64 array (a sort and a mask: faster than np.unique here)."""
    if x.size < 2:
        return x.copy()
    y = np.sort(x)
    keep = np.empty(y.size, dtype=bool)
    keep[0] = True
    np.not_equal(y[1:], y[:-1], out=keep[1:])
    return y[keep]


def shingle_set(text: str, ngram: int = 5) -> np.ndarray:
    """uint64 [distinct shingles], sorted: the set exact Jaccard is computed on."""
    return sorted_unique(shingles(text, ngram))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two sorted unique uint64 arrays (0 when both are empty)."""
    if a.size == 0 and b.size == 0:
        return 0.0
    if a.size < b.size:
        a, b = b, a
    if b.size == 0:
        return 0.0
    pos = np.searchsorted(a, b)  # the smaller set looked up in the larger: no merge sort
    pos[pos == a.size] = 0
    inter = int(np.count_nonzero(a[pos] == b))
    return inter / (a.size + b.size - inter)


def jaccard_at_least(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """jaccard(a, b) >= threshold, with the cheap cases first: sizes too far apart
    (J <= min/max) and identical sets."""
    small, large = (a.size, b.size) if a.size <= b.size else (b.size, a.size)
    if large == 0 or small < threshold * large:
        return False
    if a.size == b.size and np.array_equal(a, b):
        return True
    return jaccard(a, b) >= threshold


class MinHasher:
    """`num_perm` seeded multiply-shift hash functions; signatures of many documents at once."""

    def __init__(self, num_perm: int = 128, seed: int = 1, chunk: int = 8192):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2)
        self.chunk = chunk  # shingles per numpy block: a [num_perm, chunk] uint64 temporary

    def signatures(self, shingle_arrays: Sequence[np.ndarray]) -> np.ndarray:
        """uint32 [docs, num_perm]; a document without shingles gets all 0xFFFFFFFF."""
        n = len(shingle_arrays)
        out = np.full((n, self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        sizes = np.fromiter((s.size for s in shingle_arrays), dtype=np.int64, count=n)
        nonempty = np.flatnonzero(sizes > 0)
        if nonempty.size == 0:
            return out
        # Walk the documents in groups of about `chunk` shingles (a big document is its own group).
        i = 0
        shift = np.uint64(32)
        while i < nonempty.size:
            j, total = i, 0
            while j < nonempty.size and (j == i or total + sizes[nonempty[j]] <= self.chunk):
                total += sizes[nonempty[j]]
                j += 1
            docs = nonempty[i:j]
            if docs.size == 1 and total > self.chunk:  # one big document: min over its pieces
                x = shingle_arrays[docs[0]]
                acc = np.full(self.num_perm, _M64, dtype=np.uint64)
                for k in range(0, x.size, self.chunk):
                    with np.errstate(over="ignore"):
                        h = np.multiply.outer(self.a, x[k:k + self.chunk])
                        h += self.b[:, None]
                    np.minimum(acc, h.min(axis=1), out=acc)
                out[docs[0]] = (acc >> shift).astype(np.uint32)
                i = j
                continue
            x = np.concatenate([shingle_arrays[d] for d in docs]) if j - i > 1 else shingle_arrays[docs[0]]
            offsets = np.zeros(docs.size, dtype=np.int64)
            np.cumsum(sizes[docs][:-1], out=offsets[1:])
            with np.errstate(over="ignore"):
                h = np.multiply.outer(self.a, x)  # [num_perm, shingles]: the min runs along rows
                h += self.b[:, None]
            # min then >> 32 == min of the >> 32 (monotone): one pass less over the block.
            out[docs] = (np.minimum.reduceat(h, offsets, axis=1).T >> shift).astype(np.uint32)
            i = j
        return out

    def signature(self, shingle_array: np.ndarray) -> np.ndarray:
        """uint32 [num_perm] of one document."""
        return self.signatures([shingle_array])[0]


# Per band: a random odd multiplier per row and an offset, so equal rows in different bands
# give different keys. Fixed (not seeded): part of the key format.
_ROW_MULT = splitmix64(np.arange(1, 1025, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)) | np.uint64(1)
_BAND_SALT = splitmix64(np.arange(1, 4097, dtype=np.uint64) * np.uint64(0x8CB92BA72F3D8DD7))


def band_keys(sigs: np.ndarray, bands: int, rows: int, salt: np.ndarray | None = None) -> np.ndarray:
    """uint64 [docs, bands]: a 64-bit hash of each band's `rows` signature values.

    Args:
      sigs: uint32 [docs, num_perm] with num_perm >= bands * rows.
      salt: optional uint64 [docs] mixed into every key (e.g. a hash of the source, so that
        documents collide only within their source).
    """
    n = sigs.shape[0]
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"bands*rows={bands * rows} exceeds num_perm={sigs.shape[1]}")
    if rows > len(_ROW_MULT) or bands > len(_BAND_SALT):
        raise ValueError("at most 1024 rows and 4096 bands")
    s = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        acc = (s * _ROW_MULT[:rows]).sum(axis=2, dtype=np.uint64) + _BAND_SALT[:bands]
        if salt is not None:
            acc += salt.astype(np.uint64)[:, None]
    return splitmix64(acc)


def string_hash64(values: Sequence[str]) -> np.ndarray:
    """uint64 [len(values)]: stable 64-bit hashes of strings (blake2b), e.g. sources or URLs."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for v in values], dtype=np.uint64)


# ----------------------------------------------------------------------------- bands × rows

def _fp_area(threshold: float, b: int, r: int) -> float:
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)[0]


def _fn_area(threshold: float, b: int, r: int) -> float:
    from scipy.integrate import quad

    return quad(lambda s: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)[0]


@functools.lru_cache(maxsize=256)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false-positive and
    false-negative areas of the LSH S-curve ``1 - (1 - s^r)^b`` around `threshold`.

    The same search and integrals as datasketch's ``MinHashLSH`` (``_optimal_param``), so the
    defaults agree with it; scipy's ``quad`` does the integrals.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if fp_weight < 0 or fn_weight < 0 or fp_weight + fn_weight == 0:
        raise ValueError(f"weights must be >= 0 and not both 0, got {fp_weight}, {fn_weight}")
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = fp_weight * _fp_area(threshold, b, r) + fn_weight * _fn_area(threshold, b, r)
            if err < best:
                best, opt = err, (b, r)
    return opt


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """Fuzzy dedup settings. `bands`/`rows` of 0 mean "chosen from threshold" (`optimal_bands`).

    keep: which document of a cluster stays: "first" (earliest in input order), "longest"
      (most characters; ties to the earliest) or "score" (highest `score_field`; ties to the
      earliest; a missing score counts as -inf).
    scope: "global" (duplicates across sources too) or "source" (only within one `source`).
    verify: candidate pairs are kept as edges only if their exact shingle Jaccard >= threshold.
    """

    threshold: float = 0.8
    ngram: int = 5
    num_perm: int = 128
    bands: int = 0
    rows: int = 0
    seed: int = 1
    fp_weight: float = 0.5
    fn_weight: float = 0.5
    verify: bool = False
    keep: str = "first"
    score_field: str = "quality_score"
    scope: str = "global"

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {self.num_perm}")
        if (self.bands == 0) != (self.rows == 0):
            raise ValueError("give both bands and rows, or neither (then they come from threshold)")
        if self.bands < 0 or self.rows < 0 or self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows={self.bands}*{self.rows} must be <= num_perm={self.num_perm}")
        if self.keep not in ("first", "longest", "score"):
            raise ValueError(f"keep must be 'first', 'longest' or 'score', got {self.keep!r}")
        if self.scope not in ("global", "source"):
            raise ValueError(f"scope must be 'global' or 'source', got {self.scope!r}")

    def band_rows(self) -> tuple[int, int]:
        if self.bands:
            return self.bands, self.rows
        return optimal_bands(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)
