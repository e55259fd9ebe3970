"""The per-document loop of a cleaning job, written once for every runner.

    records of one shard ─► `process_records` ─► ("doc", kept document)
                                                 ("rejected", dropped document + drop_reason)
                                                 ("error", errors.jsonl row)
                          and every count in one `ShardStats`

The local runner (data_pipeline/clean.py) and the Beam runner (data_pipeline/beam_runner.py) both
call it on a shard's records, and both merge the shards' `ShardStats.to_dict()` with
`report.merge`, so they write the same report fields and the same error rows for the same input.
The corpus stages (data_pipeline/dedup/stages.py) count their drops and edits with the same
`ShardStats`.

Every record ends up in exactly one place (the accounting identity of data_pipeline/report.py):

* a reader's `ReadError` and a document over `max_doc_bytes` → an error row (kind, file,
  line/row/offset, bytes);
* a reader's `Skipped` → a drop with the reader's reason;
* a step that raises, or returns something that is not a document with string `text` → an
  error row of kind ``step_failed`` (one bad document does not end the job);
* a step's `Drop` → a drop with the step's reason (what the step saw is kept as an example and,
  when asked, written aside);
* otherwise → kept, with the bytes the steps cut counted as edited.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Iterable, Iterator, Sequence

from data_pipeline import readers as R
from data_pipeline.steps import Drop, Step


def empty_counts() -> dict:
    return {"documents_in": 0, "documents_out": 0, "dropped": {}, "errors": 0, "bytes_in": 0, "bytes_out": 0,
            "bytes_dropped": {}, "bytes_errors": 0, "bytes_edited": 0, "pii_redactions": {}}


class ShardStats:
    """Counts of one shard: overall, per source, per step, per error kind; a few examples per reason."""

    def __init__(self, shard: R.Shard | None, step_names: Sequence[str], examples_per_reason: int = 3):
        self.total = empty_counts()
        self.per_source: dict[str, dict] = {}
        self.steps = [{"step": n, "documents_in": 0, "dropped": 0, "changed": 0} for n in step_names]
        self.step_seconds = [0.0] * len(step_names)
        self.error_kinds: Counter = Counter()
        self.examples: dict[str, list] = {}
        self.k = examples_per_reason
        self.shard = shard
        self.reader_counters: Counter = Counter()

    def _both(self, source: str) -> tuple[dict, dict]:
        if source not in self.per_source:
            self.per_source[source] = empty_counts()
        return self.total, self.per_source[source]

    def read(self, source: str, nbytes: int) -> None:
        for c in self._both(source):
            c["documents_in"] += 1
            c["bytes_in"] += nbytes

    def kept(self, source: str, nbytes_in: int, nbytes_out: int, pii: dict | None = None) -> None:
        for c in self._both(source):
            c["documents_out"] += 1
            c["bytes_out"] += nbytes_out
            c["bytes_edited"] += nbytes_in - nbytes_out
            for kind, n in (pii or {}).items():  # the `pii` step's replacements on this document
                c["pii_redactions"][kind] = c["pii_redactions"].get(kind, 0) + n

    def dropped(self, source: str, reason: str, nbytes: int, example: dict) -> None:
        for c in self._both(source):
            c["dropped"][reason] = c["dropped"].get(reason, 0) + 1
            c["bytes_dropped"][reason] = c["bytes_dropped"].get(reason, 0) + nbytes
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.k:
            ex.append(example)

    def edited(self, source: str, nbytes: int) -> None:
        """Bytes cut from a document that stays (by a corpus stage: the steps' cuts go through `kept`)."""
        for c in self._both(source):
            c["bytes_edited"] += nbytes

    def error(self, source: str, kind: str, nbytes: int) -> None:
        for c in self._both(source):
            c["errors"] += 1
            c["bytes_errors"] += nbytes
        self.error_kinds[kind] += 1

    def to_dict(self) -> dict:
        shard = {} if self.shard is None else {"shard": self.shard.index, "name": self.shard.name,
                                               "reader": self.shard.reader, "source": self.shard.source}
        out = {**shard, **self.total, "per_source": self.per_source, "steps": self.steps,
               "error_kinds": dict(self.error_kinds), "examples": self.examples,
               "reader_counters": dict(self.reader_counters)}
        warning = wrong_reader_warning(self)
        if warning:
            out["warnings"] = [warning]
        return out


def process_records(records: Iterable[R.Record], steps: Sequence[Step], shard: R.Shard, stats: ShardStats,
                    max_doc_bytes: int | None = None) -> Iterator[tuple[str, dict]]:
    """The loop: each record of `shard` → ("doc" | "rejected" | "error", dict), counted in `stats`.

    `records` are what `readers.read_guarded(shard)` yields (documents, ReadErrors, Skipped).
    Rejected documents come with ``drop_reason`` and are what the dropping step saw.
    """
    source = shard.source
    limit = shard.options.max_doc_bytes if max_doc_bytes is None else max_doc_bytes

    def error(src: str, e: R.ReadError) -> tuple[str, dict]:
        stats.error(src, e.kind, e.nbytes)
        return "error", R.error_row(e, source=src, shard=shard.index)

    for rec in records:
        if isinstance(rec, R.ReadError):
            stats.read(source, rec.nbytes)
            yield error(source, rec)
            continue
        if isinstance(rec, R.Skipped):
            stats.read(source, rec.nbytes)
            stats.dropped(source, rec.reason, rec.nbytes, {"file": rec.file, "bytes": rec.nbytes})
            continue
        doc = rec
        src = doc.get("source") or source  # readers label documents with the shard's source
        n_in = R.doc_bytes(doc)
        stats.read(src, n_in)
        if n_in > limit:
            yield error(src, R.ReadError(shard.name, "too_large", f"document {doc['id']} of {n_in} bytes "
                                         f"exceeds max_doc_bytes={limit}", {"id": doc["id"]}, n_in, doc["text"][:100]))
            continue
        current, drop, failed = doc, None, None
        for k, step in enumerate(steps):
            stats.steps[k]["documents_in"] += 1
            before = current.get("text")
            t0 = time.perf_counter()
            try:
                out = step.apply(current)
            except Exception as ex:  # noqa: BLE001 - one bad document must not end the job
                failed = f"{step.name}: {type(ex).__name__}: {ex}"
                break
            finally:
                stats.step_seconds[k] += time.perf_counter() - t0
            if isinstance(out, Drop):
                stats.steps[k]["dropped"] += 1
                drop = out
                break
            if not isinstance(out, dict) or not isinstance(out.get("text"), str):
                failed = f"{step.name}: returned {type(out).__name__} without a string `text`"
                break
            after = out["text"]
            if after is not before and after != before:
                stats.steps[k]["changed"] += 1
            current = out
        if failed is not None:
            yield error(src, R.ReadError(shard.name, "step_failed", failed, {"id": doc["id"]}, n_in,
                                         str(current.get("text", ""))[:100]))
        elif drop is not None:  # the example and the rejected copy show what the dropping step saw
            stats.dropped(src, drop.reason, n_in,
                          {"id": current.get("id"), "source": src, "text": current["text"][:600]})
            yield "rejected", {**current, "drop_reason": drop.reason}
        else:
            stats.kept(src, n_in, R.doc_bytes(current), current.get("pii_redactions"))
            yield "doc", current


# ---------------------------------------------------------------------------------------------
# A wrong reader: every record of a file fails the same way

_FORMAT_OF_HEAD = (("jsonl", (b"{",)), ("warc", (b"WARC/",)), ("parquet", (b"PAR1",)))


def sniff_format(path: str) -> str | None:
    """The reader a file's first bytes look like (after decompression by suffix), or None."""
    try:
        with R.open_input(path) as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except (OSError, EOFError):
        return None
    for reader, prefixes in _FORMAT_OF_HEAD:
        if head.startswith(prefixes):
            return reader
    return None


def wrong_reader_warning(stats: ShardStats) -> str | None:
    """A warning when every record of the shard failed with one error kind (typical of a wrong
    reader), with the likely fix; None otherwise."""
    shard, t = stats.shard, stats.total
    if shard is None or not t["documents_in"] or t["errors"] != t["documents_in"] or len(stats.error_kinds) != 1:
        return None
    kind = next(iter(stats.error_kinds))
    if kind in ("step_failed", "too_large"):
        return None
    what = "its only record" if t["errors"] == 1 else f"all {t['errors']} records"
    msg = f"{shard.name}: {what} failed as {kind!r} with the {shard.reader} reader"
    guess = sniff_format(shard.files[0][0]) if shard.files else None
    if guess and guess != shard.reader:
        return f"{msg}; the file looks like {guess}: use --reader {guess} (or `reader: {guess}` in the input)"
    return f"{msg}; is it the right reader and file?"
