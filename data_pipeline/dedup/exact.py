"""Exact dedup: normalised text, normalised URL (newest crawl kept), and repeated lines.

All three hash something per document (or per line) to 64 bits and sort (hash, doc) records
through `spill.RecordIndex`, so memory stays within the budget however large the corpus; what
stays in RAM is 8 bytes per document (the result) and, for lines, 8 bytes per *repeated* line.

* `exact_dedup`: documents whose normalised text (NFC, case-folded, whitespace runs collapsed,
  stripped) is equal; the earliest is kept.
* `url_dedup`: documents whose normalised URL (`normalize_url`) is equal; the newest by a date
  field is kept (ISO-8601 text or a number; ties and missing dates go to the earliest).
  Documents without a URL are kept.
* `repeated_lines` + `LineFilter`: the lines (or paragraphs) that occur more than `max_count`
  times across the corpus, then their removal from every document, as CCNet does for
  paragraphs and C4 for repeated sentences. Lines shorter than `min_chars` are never counted.

64-bit hashes (blake2b): two different texts collide with probability ~N²/2^65, about 3e-6 for
ten million documents.
"""
from __future__ import annotations

import datetime
import hashlib
import re
import unicodedata
import urllib.parse
from typing import Callable, Iterable

import numpy as np

from data_pipeline.dedup import lsh
from data_pipeline.dedup.spill import RecordIndex

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFC, case-folded, whitespace runs → one space, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()


def hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


_TRACKING = re.compile(r"^(utm_\w+|fbclid|gclid|mc_cid|mc_eid|ref|ref_src)$", re.I)


def normalize_url(url: str) -> str:
    """Canonical form: lower-case scheme and host, no "www.", no default port, no fragment,
    no tracking parameters (utm_*, fbclid, gclid, ...), sorted query, no trailing "/"; http and
    https are the same page.
    """
    try:
        p = urllib.parse.urlsplit(url.strip())
    except ValueError:
        return url.strip()
    host = (p.hostname or "").lower()
    if host.startswith("www."):
        host = host[4:]
    port = p.port if p.port not in (None, 80, 443) else None
    netloc = host + (f":{port}" if port else "")
    query = urllib.parse.urlencode(sorted((k, v) for k, v in urllib.parse.parse_qsl(p.query, keep_blank_values=True)
                                          if not _TRACKING.match(k)))
    path = p.path.rstrip("/") or ""
    return f"{netloc}{path}" + (f"?{query}" if query else "")


def parse_date(value) -> float:
    """Seconds since the epoch from ISO-8601 text (a "Z" suffix allowed) or a number; NaN if unusable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            d = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return float("nan")
        if d.tzinfo is None:
            d = d.replace(tzinfo=datetime.timezone.utc)
        return d.timestamp()
    return float("nan")


def _labels_from_keys(keys: Iterable[tuple[int, int]], n: Callable[[], int], budget_bytes: int | None,
                      workdir: str | None) -> np.ndarray:
    """int64 [n()]: for each document, the earliest document with the same key (itself if none).

    `keys` yields (doc, key) for the documents that have a key; `n` gives the number of
    documents once `keys` is consumed.
    """
    index = RecordIndex(budget_bytes, workdir)
    buf_k: list[int] = []
    buf_d: list[int] = []
    for doc, key in keys:
        buf_k.append(key)
        buf_d.append(doc)
        if len(buf_k) >= 65536:
            index.add(np.array(buf_k, dtype=np.uint64), np.array(buf_d, dtype=np.int64))
            buf_k, buf_d = [], []
    if buf_k:
        index.add(np.array(buf_k, dtype=np.uint64), np.array(buf_d, dtype=np.int64))
    labels = np.arange(n(), dtype=np.int64)
    head_key, head_doc = None, -1
    try:
        for k, d in index.blocks():
            if k.size == 0:
                continue
            first, other = lsh.star_edges(k, d, head_key, head_doc)
            labels[other] = first
            last = k[-1]
            if head_key is None or last != np.uint64(head_key):
                head_key, head_doc = int(last), int(d[np.flatnonzero(k == last)[0]])
    finally:
        index.close()
    return labels


def exact_dedup(corpus: Callable[[], Iterable[dict]], *, normalize: bool = True,
                memory_budget_mb: float | None = None, workdir: str | None = None) -> np.ndarray:
    """int64 [N]: the document kept for each document (the earliest with the same text)."""
    count = [0]

    def keys():
        for i, doc in enumerate(corpus()):
            count[0] = i + 1
            text = doc["text"]
            yield i, hash64(normalize_text(text) if normalize else text)

    return _labels_from_keys(keys(), lambda: count[0], _budget(memory_budget_mb), workdir)


def _budget(memory_budget_mb: float | None) -> int | None:
    return None if memory_budget_mb is None else int(memory_budget_mb * (1 << 20))


def url_dedup(corpus: Callable[[], Iterable[dict]], *, url_field: str = "url", date_field: str = "date",
              memory_budget_mb: float | None = None, workdir: str | None = None) -> np.ndarray:
    """int64 [N]: the document kept for each document (same normalised URL: the newest)."""
    count = [0]
    dates: list[float] = []

    def keys():
        for i, doc in enumerate(corpus()):
            count[0] = i + 1
            url = doc.get(url_field)
            dates.append(parse_date(doc.get(date_field)))
            if isinstance(url, str) and url.strip():
                yield i, hash64(normalize_url(url))

    labels = _labels_from_keys(keys(), lambda: count[0], _budget(memory_budget_mb), workdir)
    return lsh.choose_kept(labels, "score", scores=np.asarray(dates, dtype=np.float64))


def split_units(text: str, unit: str) -> list[str]:
    """Lines (keeping their newline) or paragraphs (blocks separated by blank lines, keeping
    the separator) of `text`; "".join(result) == text."""
    if unit == "line":
        return text.splitlines(keepends=True)
    if unit == "paragraph":
        parts = re.split(r"(\n[ \t]*\n+)", text)
        return [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]
    raise ValueError(f"unit must be 'line' or 'paragraph', got {unit!r}")


def unit_key(unit_text: str, min_chars: int) -> int | None:
    """64-bit hash of a normalised line/paragraph, or None if it is too short to count."""
    norm = normalize_text(unit_text)
    if len(norm) < max(1, min_chars):
        return None
    return hash64(norm)


def repeated_lines(corpus: Callable[[], Iterable[dict]], *, max_count: int = 1, unit: str = "line",
                   min_chars: int = 0, memory_budget_mb: float | None = None,
                   workdir: str | None = None) -> np.ndarray:
    """uint64 [R] sorted: hashes of the normalised lines seen more than `max_count` times."""
    index = RecordIndex(_budget(memory_budget_mb), workdir)
    buf: list[int] = []
    for doc in corpus():
        for u in split_units(doc["text"], unit):
            k = unit_key(u, min_chars)
            if k is not None:
                buf.append(k)
        if len(buf) >= 65536:
            index.add(np.array(buf, dtype=np.uint64), np.zeros(len(buf), np.int64))
            buf = []
    if buf:
        index.add(np.array(buf, dtype=np.uint64), np.zeros(len(buf), np.int64))
    bad: list[np.ndarray] = []
    carry_key, carry_n = None, 0
    try:
        for k, _ in index.blocks():
            if k.size == 0:
                continue
            uniq, counts = np.unique(k, return_counts=True)
            if carry_key is not None:
                if uniq[0] == np.uint64(carry_key):
                    counts[0] += carry_n
                elif carry_n > max_count:
                    bad.append(np.array([carry_key], dtype=np.uint64))
            # the last key may continue in the next block
            bad.append(uniq[:-1][counts[:-1] > max_count])
            carry_key, carry_n = int(uniq[-1]), int(counts[-1])
        if carry_key is not None and carry_n > max_count:
            bad.append(np.array([carry_key], dtype=np.uint64))
    finally:
        index.close()
    return np.unique(np.concatenate(bad)) if bad else np.zeros(0, np.uint64)


def remove_lines(text: str, bad: np.ndarray, *, unit: str = "line", min_chars: int = 0) -> tuple[str, int]:
    """(text without the units whose hash is in sorted `bad`, number of units removed)."""
    out: list[str] = []
    removed = 0
    for u in split_units(text, unit):
        k = unit_key(u, min_chars)
        if k is not None and bad.size:
            pos = np.searchsorted(bad, np.uint64(k))
            if pos < bad.size and bad[pos] == np.uint64(k):
                removed += 1
                continue
        out.append(u)
    return "".join(out), removed
