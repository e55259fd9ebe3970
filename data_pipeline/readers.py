"""Readers: raw corpora in, documents out, one input shard at a time.

A cleaning job's inputs (paths, globs, directories or fsspec URLs such as ``gs://b/x/*.jsonl.gz``)
are planned into *shards*, the unit of work of the runners: one file for JSONL, Parquet and
WARC/WET; a group of files for book directories and source-code trees; a range of examples for
a TFDS split. `plan_input` does this (and checks that the input exists) before any document is
read; `read_shard` then yields, in a deterministic order, one of

- a document: a ``dict`` with at least ``id`` (stable: kept from the input or derived from the
  source, the file and the position in it), ``text`` and ``source``, plus every other field;
- a `ReadError`: a record that could not be read (malformed JSON, a NUL byte, invalid UTF-8, a
  truncated compressed stream, an empty or binary file, a record over ``max_doc_bytes``), with the
  file and line/row/offset, so the runner can count it and write it to ``errors.jsonl``;
- a `Skipped`: a record the reader removes on purpose (a vendored, binary or oversized file in a
  code tree, a non-HTML WARC response), counted as a drop with its reason.

Readers: ``jsonl`` (.jsonl/.json/.ndjson, plain, .gz, .zst, .bz2 or .xz), ``parquet`` (batched, text column
configurable), ``warc`` (WARC response records -> ``html`` for the ``html_extract`` step; WET
conversion records -> ``text``), ``books`` (one file one document, Project Gutenberg header and
licence footer stripped), ``code`` (source trees: language from the extension; vendored, binary
and oversized files skipped; path and repository kept) and ``tfds`` (any registered
tensorflow-datasets builder whose data are prepared; nothing is downloaded).

Every command that reads documents goes through here (`danlu clean` by its config; `tokenize`,
`dedup`, `mix`, `quality`, `eval` and decontamination's evaluation sets by `InputFlags.plan` +
`read_documents`, with the flags of `add_input_arguments`), so all of them read the same formats
and set aside the same bad records as errors.jsonl rows (`error_row`). Files are opened by
`danlu.base.fs.open_input`.
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import glob as globlib
import hashlib
import io
import json
import math
import posixpath
import re
from collections import Counter
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import fsspec

# The bytes layer: opening paths and URLs, decompression with truncation detected (importable from
# here too, as before the split).
from danlu.base.fs import JSONL_SUFFIXES, STREAM_ERRORS, _ZstdReader, is_url, open_input  # noqa: F401

# ---------------------------------------------------------------------------------------------
# What a reader yields besides documents


@dataclasses.dataclass(frozen=True)
class ReadError:
    """A record (or a whole file) that could not be read; it ends up in errors.jsonl.

    `kind` is one of READ_ERROR_KINDS; `location` is ``{"line": n}``, ``{"row": n}``,
    ``{"offset": n}`` or ``{}`` (the whole file); `nbytes` is the size of what was set aside
    (0 when unknown, e.g. the lost tail of a truncated stream); `raw` is a short snippet.
    """

    file: str
    kind: str
    reason: str
    location: dict = dataclasses.field(default_factory=dict)
    nbytes: int = 0
    raw: str = ""


READ_ERROR_KINDS = ("invalid_json", "invalid_utf8", "not_object", "bad_text", "truncated", "empty_file",
                    "binary_file", "too_large", "unreadable", "step_failed", "empty_text")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the reader removes on purpose: counted as dropped with `reason` ("<reader>:<why>")."""

    reason: str
    file: str
    nbytes: int


Record = dict | ReadError | Skipped

# ---------------------------------------------------------------------------------------------
# Options. Every reader's options include the common ones; the YAML's `readers:` section sets
# them for all inputs, `readers.<reader>:` for one reader, and an input's `options:` for one input.


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    max_doc_bytes: int = 20_000_000  # a bigger record is an error ("too_large"), not parsed
    invalid_utf8: str = "error"  # error: the record goes to errors.jsonl | repair: U+FFFD, counted


@dataclasses.dataclass(frozen=True)
class JsonlOptions(CommonOptions):
    text_key: str = "text"  # renamed to `text` when different
    id_key: str = "id"  # renamed to `id` when different; a generated id when missing


@dataclasses.dataclass(frozen=True)
class ParquetOptions(CommonOptions):
    text_column: str = "text"
    id_column: str = "id"
    columns: tuple[str, ...] = ()  # columns to keep (empty: all)
    batch_size: int = 1024  # rows decoded at a time


@dataclasses.dataclass(frozen=True)
class WarcOptions(CommonOptions):
    records: tuple[str, ...] = ("response", "conversion")  # WARC-Type values read
    only_ok: bool = True  # response records with an HTTP status other than 2xx are skipped
    html_types: tuple[str, ...] = ("text/html", "application/xhtml+xml")  # other responses are skipped


@dataclasses.dataclass(frozen=True)
class BooksOptions(CommonOptions):
    extensions: tuple[str, ...] = (".txt",)
    strip_gutenberg: bool = True  # keep only the text between the *** START/END OF ... *** markers
    files_per_shard: int = 64


@dataclasses.dataclass(frozen=True)
class CodeOptions(CommonOptions):
    layout: str = "repo"  # repo: the input is one repository | repos: each subdirectory is one
    max_file_bytes: int = 1_000_000  # bigger files are skipped ("code_tree:oversized")
    excluded_dirs: tuple[str, ...] = ("node_modules", "vendor", "vendors", "third_party", "third-party",
                                      "thirdparty", "3rdparty", "bower_components", "site-packages",
                                      ".venv", "venv", "__pycache__")
    languages: tuple[str, ...] = ()  # keep only these languages (empty: every language known)
    files_per_shard: int = 1000


@dataclasses.dataclass(frozen=True)
class TfdsOptions(CommonOptions):
    split: str = "train"
    data_dir: str = ""  # empty: TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    text_key: str = "text"
    id_key: str = ""  # a feature holding the id; empty: "<dataset>/<split>/<index>"
    examples_per_shard: int = 100_000


# Directories that are never part of a source tree (version control): pruned without counting.
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".bzr"})


class InputError(ValueError):
    """An input that cannot be read at all (missing, wrong reader, bad options); raised while planning."""


# ---------------------------------------------------------------------------------------------
# Shards


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: what one worker reads, in order, into one set of output files.

    `files` holds (path or URL, name relative to the input's root); the relative name (not the
    absolute path) goes into generated ids, so moving a corpus does not change them. `span` is a
    TFDS example range [start, stop).
    """

    index: int
    reader: str
    source: str
    files: tuple[tuple[str, str], ...]
    options: Any
    input_index: int = 0
    span: tuple[int, int] | None = None
    dataset: str = ""  # tfds: the builder name

    @property
    def name(self) -> str:
        if self.reader == "tfds":
            return f"{self.dataset}/{self.options.split}[{self.span[0]}:{self.span[1]}]"
        if len(self.files) == 1:
            return self.files[0][0]
        return f"{self.files[0][0]} (+{len(self.files) - 1} files)"


# ---------------------------------------------------------------------------------------------
# Files: local paths and fsspec URLs


def _fs(path: str):
    fs, p = fsspec.core.url_to_fs(path)
    return fs, p


def _as_url(fs, path: str, template: str) -> str:
    """A path found by `fs` in the same form as the user's input (plain for local files)."""
    return fs.unstrip_protocol(path) if is_url(template) else path


# The output directories of danlu's data commands: (the file that marks one, its documents: a
# directory/ or a file-name prefix). Their reports, errors and clusters are not documents.
OUTPUT_DOCUMENTS = (("report.json", "documents/"),  # danlu clean
                    ("report.json", "kept-"),  # danlu dedup
                    ("mix.json", "mix-"))  # danlu mix


def list_files(path: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """(file, name relative to the input's root) for a path, glob, directory or URL; sorted.

    A directory contributes its files with one of `suffixes` (all files when None), recursively,
    except hidden ones (a name starting with "."; e.g. a job's `.state/` and temporary files). The
    output directory of a danlu data command contributes only its documents (OUTPUT_DOCUMENTS).
    Raises InputError naming the input when nothing matches.
    """
    fs, p = _fs(path)
    if globlib.has_magic(p):
        root = p
        while globlib.has_magic(root):
            root = posixpath.dirname(root)
        found = sorted(f for f in fs.glob(p) if fs.isfile(f))
    elif fs.isdir(p):
        prefix = ""
        for marker, documents in OUTPUT_DOCUMENTS:
            if not fs.isfile(posixpath.join(p, marker)):
                continue
            if documents.endswith("/") and fs.isdir(posixpath.join(p, documents)):
                p = posixpath.join(p, documents.rstrip("/"))
                break
            if any(posixpath.basename(f).startswith(documents) for f in fs.ls(p, detail=False)):
                prefix = documents
                break
        root = p
        found = sorted(f for f in fs.find(p) if (suffixes is None or f.endswith(suffixes))
                       and posixpath.relpath(f, root).startswith(prefix)
                       and not any(part.startswith(".") for part in posixpath.relpath(f, root).split("/")))
    elif fs.isfile(p):
        root = posixpath.dirname(p)
        found = [p]
    else:
        raise InputError(f"input {path!r} does not exist")
    if not found:
        what = f" with a suffix in {list(suffixes)}" if suffixes and fs.isdir(p) else ""
        raise InputError(f"input {path!r} matches no file{what}")
    return [(_as_url(fs, f, path), posixpath.relpath(f, root) if root else f) for f in found]


def file_size(path: str) -> int:
    fs, p = _fs(path)
    try:
        return int(fs.size(p) or 0)
    except OSError:
        return 0


# Errors that mean "the stream is cut short or damaged" while reading a compressed file.
_STREAM_ERRORS = STREAM_ERRORS


# ---------------------------------------------------------------------------------------------
# Text


def decode_utf8(raw: bytes, mode: str, counters: Counter) -> str:
    """UTF-8 text of `raw`. mode 'error': raises UnicodeDecodeError; 'repair': invalid bytes become
    U+FFFD and ``counters['utf8_repaired']`` is incremented."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if mode != "repair":
            raise
        counters["utf8_repaired"] += 1
        return raw.decode("utf-8", errors="replace")


def make_id(source: str, name: str, position: str | int) -> str:
    """A stable document id from the source label, the file's relative name and the position in it."""
    digest = hashlib.blake2b(f"{name}\0{position}".encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()
    return f"{source}-{digest}" if source else digest


def jsonable(value: Any) -> Any:
    """A value JSON can hold: dates as ISO strings, bytes as UTF-8 text (else hex), NaN as null."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def _snippet(raw: bytes | str, n: int = 200) -> str:
    if isinstance(raw, bytes):
        raw = raw[: 4 * n].decode("utf-8", errors="replace")
    return raw[:n]


def _finish(doc: dict, shard: Shard, name: str, position: str | int, id_key: str = "id") -> dict:
    """Sets `id` (kept, renamed from `id_key`, or generated) and `source` (the input's label; with no
    label, as for the commands that read documents we wrote, the document's own `source` stays)."""
    if id_key != "id" and id_key in doc:
        doc["id"] = doc.pop(id_key)
    doc_id = doc.get("id")
    if doc_id is None or doc_id == "":
        doc["id"] = make_id(shard.source, name, position)
    elif not isinstance(doc_id, str):
        doc["id"] = str(doc_id)
    if shard.source or not isinstance(doc.get("source", ""), str):
        doc["source"] = shard.source
    return doc


# ---------------------------------------------------------------------------------------------
# JSONL

def _read_jsonl(shard: Shard, counters: Counter) -> Iterator[Record]:
    o: JsonlOptions = shard.options
    for path, name in shard.files:
        for rec in _jsonl_objects(path, o, counters):
            if isinstance(rec, ReadError):
                yield rec
                continue
            line_no, obj, body = rec
            if o.text_key != "text" and o.text_key in obj:
                obj["text"] = obj.pop(o.text_key)
            if not isinstance(obj.get("text"), str):
                what = "no" if "text" not in obj else f"a non-string ({type(obj['text']).__name__})"
                yield ReadError(path, "bad_text", f"{what} {o.text_key!r} field", {"line": line_no},
                                len(body), _snippet(body))
                continue
            yield _finish(obj, shard, name, line_no, o.id_key)


def read_jsonl_objects(path: str, options: JsonlOptions | None = None,
                       counters: Counter | None = None) -> Iterator[tuple[int, dict] | ReadError]:
    """(line, object) for every JSON object of a JSONL file, or a ReadError for a line or a stream
    that cannot be read: what the ``jsonl`` reader does, without asking for a text field or an id."""
    o = options or JsonlOptions()
    for rec in _jsonl_objects(path, o, counters if counters is not None else Counter()):
        yield rec if isinstance(rec, ReadError) else rec[:2]


def _looks_like_record(line: bytes, cut: bool) -> bool:
    """A JSONL record's line: no NUL byte, UTF-8, ``{`` ... ``}`` (a `cut` line: only its start)."""
    body = line.strip()
    if b"\0" in body or not body.startswith(b"{") or not (cut or body.endswith(b"}")):
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return cut and e.reason == "unexpected end of data"  # a character cut at the end of the head
    return True


def _sniff(f: io.BufferedReader, path: str) -> ReadError | None:
    """An error for an empty file or a binary one.

    JSON text never holds a raw NUL byte, but one line holding one is that line's error, not the
    file's: a file is binary when NUL bytes are an eighth of its first 8 kB, or when these hold a
    NUL byte and no line that looks like a record.
    """
    head = f.peek(8192)[:8192]
    if not head:
        return ReadError(path, "empty_file", "empty file (no records)")
    nuls = head.count(b"\0")
    if not nuls:
        return None
    lines = head.split(b"\n")
    cut = len(head) == 8192  # the head's last piece may go on after it
    if nuls * 8 >= len(head) or not any(_looks_like_record(line, cut and i == len(lines) - 1)
                                        for i, line in enumerate(lines)):
        return ReadError(path, "binary_file", "binary file (NUL bytes and no JSON record in the first 8 kB)",
                         nbytes=file_size(path), raw=_snippet(head, 60))
    return None


def _jsonl_objects(path: str, o: JsonlOptions, counters: Counter) -> Iterator[tuple[int, dict, bytes] | ReadError]:
    """(line, object, the line's bytes) for every JSON object line of a file, else a ReadError."""
    limit = o.max_doc_bytes
    line_no = 0
    try:
        f = open_input(path)
    except OSError as e:
        yield ReadError(path, "unreadable", f"cannot open: {e}", nbytes=file_size(path))
        return
    with f:
        try:
            bad = _sniff(f, path)
            if bad is not None:
                yield bad
                return
            while True:
                raw = f.readline(limit + 2)  # + room for "\r\n": reading is bounded by max_doc_bytes
                if not raw:
                    break
                line_no += 1
                if len(raw) > limit and not raw.endswith(b"\n"):
                    n = len(raw)
                    while True:  # skip the rest of the enormous line without holding it
                        more = f.readline(1 << 20)
                        n += len(more)
                        if not more or more.endswith(b"\n"):
                            break
                    yield ReadError(path, "too_large", f"record of {n} bytes exceeds max_doc_bytes={limit}",
                                    {"line": line_no}, n, _snippet(raw, 100))
                    continue
                body = raw.rstrip(b"\r\n")
                if not body.strip():
                    continue  # blank lines are not records
                nul = body.find(b"\0")
                if nul >= 0:  # binary data in a text line (json.loads would call it a control character)
                    yield ReadError(path, "invalid_json", f"invalid JSON: NUL byte at byte {nul}",
                                    {"line": line_no}, len(body), _snippet(body.replace(b"\0", b"\\0")))
                    continue
                try:
                    text = decode_utf8(body, o.invalid_utf8, counters)
                except UnicodeDecodeError as e:
                    yield ReadError(path, "invalid_utf8", f"invalid UTF-8: {e.reason} at byte {e.start}",
                                    {"line": line_no}, len(body), _snippet(body))
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    yield ReadError(path, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno})",
                                    {"line": line_no}, len(body), _snippet(text))
                    continue
                if not isinstance(obj, dict):
                    yield ReadError(path, "not_object", f"not a JSON object: {type(obj).__name__}",
                                    {"line": line_no}, len(body), _snippet(text))
                    continue
                yield line_no, obj, body
        except _STREAM_ERRORS as e:
            yield ReadError(path, "truncated", f"stream ended early or is damaged after line {line_no}: {e}",
                            {"line": line_no + 1})


# ---------------------------------------------------------------------------------------------
# Parquet

PARQUET_SUFFIXES = (".parquet", ".pq")


def _check_parquet(files: list[tuple[str, str]], o: ParquetOptions, where: str) -> None:
    import pyarrow.parquet as pq

    path = files[0][0]  # the schema of the first file; the others are checked as they are read
    try:
        with fsspec.open(path, "rb") as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except Exception as e:  # noqa: BLE001 - any pyarrow failure: the message names the file
        raise InputError(f"{where}: {path}: not a readable Parquet file: {e}") from None
    if o.text_column not in names:
        raise InputError(f"{where}: {path} has no column {o.text_column!r} (set text_column); columns: {names}")


def _read_parquet(shard: Shard, counters: Counter) -> Iterator[Record]:
    import pyarrow.parquet as pq

    o: ParquetOptions = shard.options
    for path, name in shard.files:
        row = 0
        try:
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if o.text_column not in pf.schema_arrow.names:
                    yield ReadError(path, "bad_text", f"no column {o.text_column!r}", {},
                                    file_size(path))
                    continue
                columns = list(o.columns) if o.columns else None
                if columns is not None:
                    columns = list(dict.fromkeys([o.text_column, *columns] +
                                                 ([o.id_column] if o.id_column in pf.schema_arrow.names else [])))
                for batch in pf.iter_batches(batch_size=o.batch_size, columns=columns):
                    for rec in batch.to_pylist():
                        row += 1
                        text = rec.pop(o.text_column)
                        if isinstance(text, bytes):
                            try:
                                text = decode_utf8(text, o.invalid_utf8, counters)
                            except UnicodeDecodeError as e:
                                yield ReadError(path, "invalid_utf8", f"invalid UTF-8 at byte {e.start}",
                                                {"row": row}, len(text), _snippet(text))
                                continue
                        if not isinstance(text, str):
                            yield ReadError(path, "bad_text", f"{o.text_column!r} is {type(text).__name__}",
                                            {"row": row})
                            continue
                        n = len(text.encode("utf-8", "surrogatepass"))
                        if n > o.max_doc_bytes:
                            yield ReadError(path, "too_large", f"record of {n} bytes exceeds "
                                            f"max_doc_bytes={o.max_doc_bytes}", {"row": row}, n, text[:100])
                            continue
                        doc = {"text": text, **{k: jsonable(v) for k, v in rec.items()}}
                        yield _finish(doc, shard, name, row, o.id_column)
        except Exception as e:  # noqa: BLE001 - a damaged file: the rows read so far are kept
            yield ReadError(path, "unreadable", f"Parquet read failed after row {row}: {e}", {"row": row + 1})


# ---------------------------------------------------------------------------------------------
# WARC / WET

WARC_SUFFIXES = (".warc", ".warc.gz", ".warc.zst", ".wet", ".wet.gz", ".wet.zst", ".arc.gz")


def _read_warc(shard: Shard, counters: Counter) -> Iterator[Record]:
    """Response records -> {"html", "url", "warc": {...}}; conversion (WET) records -> {"text", ...}.

    Decompression happens here (not in fastwarc) so that a truncated file raises instead of ending
    quietly; each record is held back until the next one starts, so the record cut by a truncation
    is reported as an error and not passed on with half its text. Offsets are in the
    decompressed stream.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    o: WarcOptions = shard.options
    mask = WarcRecordType.no_type
    for r in o.records:
        mask |= getattr(WarcRecordType, r)
    for path, name in shard.files:
        held: tuple[int, Record] | None = None
        try:
            f = open_input(path)
        except OSError as e:
            yield ReadError(path, "unreadable", f"cannot open: {e}", nbytes=file_size(path))
            continue
        count = 0
        with f:
            try:
                if not f.peek(1):
                    yield ReadError(path, "empty_file", "empty file (no records)")
                    continue
            except _STREAM_ERRORS as e:
                yield ReadError(path, "truncated", f"stream ended early or is damaged: {e}", {"offset": 0})
                continue
            guard = _EofGuard(f)
            try:
                for rec in ArchiveIterator(guard, record_types=mask, parse_http=True, stream_detect=False):
                    if held is not None:
                        yield held[1]
                    held = (rec.stream_pos, _warc_record(rec, shard, path, name, o, counters))
                    count += 1
            except _STREAM_ERRORS as e:  # fastwarc's own parse errors
                guard.error = guard.error or e
            if guard.error is not None:
                # the record being read when the stream broke is incomplete: set aside, not passed on
                where = {"offset": held[0]} if held is not None else {"offset": 0}
                yield ReadError(path, "truncated", f"stream ended early or is damaged: {guard.error}", where)
            elif held is not None:
                yield held[1]
            if count == 0 and guard.error is None:
                yield ReadError(path, "empty_file", f"no WARC records of type {list(o.records)}")


class _EofGuard(io.RawIOBase):
    """Turns a read error of the underlying (decompressing) stream into a clean end of file, noted in
    `error`: fastwarc reads ahead in big blocks and would lose the complete records before the break."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._pos = 0
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # fastwarc asks for the position
        return self._pos

    def readinto(self, b) -> int:
        if self.error is not None:
            return 0
        try:
            # read1: at most one read of the decompressor, so the bytes before a break are returned
            data = self._f.read1(min(len(b), 1 << 16))
        except _STREAM_ERRORS as e:
            self.error = e
            return 0
        n = len(data)
        b[:n] = data
        self._pos += n
        return n


def _warc_record(rec, shard: Shard, path: str, name: str, o: WarcOptions, counters: Counter) -> Record:
    from fastwarc.warc import WarcRecordType
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    pos = rec.stream_pos
    body = rec.reader.read(o.max_doc_bytes + 1)
    if len(body) > o.max_doc_bytes:
        n = len(body) + len(rec.reader.read())
        return ReadError(path, "too_large", f"record of {n} bytes exceeds max_doc_bytes={o.max_doc_bytes}",
                         {"offset": pos}, n)
    record_id = (rec.record_id or "").strip("<>").removeprefix("urn:uuid:")
    url = rec.headers.get("WARC-Target-URI", "")
    meta = {"record_id": record_id, "date": rec.record_date.isoformat() if rec.record_date else None}
    if rec.record_type == WarcRecordType.response and rec.is_http:
        status = rec.http_headers.status_code
        ctype = (rec.http_content_type or "").lower()
        meta.update(status=status, content_type=ctype)
        if o.only_ok and not 200 <= (status or 0) < 300:
            return Skipped("warc:not_ok_status", path, len(body))
        if ctype not in o.html_types:
            return Skipped("warc:not_html", path, len(body))
        charset = rec.http_charset or detect_encoding(body)
        html = bytes_to_str(body, charset)
        doc = {"id": record_id, "text": "", "html": html, "url": url, "warc": meta}
    else:
        try:
            text = decode_utf8(body, o.invalid_utf8, counters)
        except UnicodeDecodeError as e:
            return ReadError(path, "invalid_utf8", f"invalid UTF-8 at byte {e.start}", {"offset": pos}, len(body),
                             _snippet(body))
        doc = {"id": record_id, "text": text, "url": url, "warc": meta}
        refers = rec.headers.get("WARC-Refers-To")
        if refers:
            meta["refers_to"] = refers.strip("<>").removeprefix("urn:uuid:")
    return _finish(doc, shard, name, pos)


# ---------------------------------------------------------------------------------------------
# Books

_GUTENBERG_START = re.compile(
    r"^\s*(?:\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*"
    r"|\*END\*THE SMALL PRINT![^\n]*)$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*"
    r"|End of (?:the )?Project Gutenberg'?s?\b[^\n]*)$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_FIELD = re.compile(r"^(Title|Author|Language|Release Date):\s*(.+?)\s*$", re.MULTILINE)


def strip_gutenberg(text: str) -> tuple[str, dict]:
    """The body of a Project Gutenberg e-text and its header fields (title, author, ...).

    Keeps what lies between the ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` line and the
    ``*** END OF ... ***`` (or "End of the Project Gutenberg EBook") line, which drops the header
    and the licence after it. Text without a START marker comes back unchanged with no fields.
    """
    start = _GUTENBERG_START.search(text)
    if start is None:
        return text, {}
    fields = {k.lower().replace(" ", "_"): v for k, v in _GUTENBERG_FIELD.findall(text[: start.start()])}
    end = _GUTENBERG_END.search(text, start.end())
    body = text[start.end(): end.start() if end else len(text)]
    return body.strip("\r\n") + "\n", fields


def _read_books(shard: Shard, counters: Counter) -> Iterator[Record]:
    o: BooksOptions = shard.options
    for path, name in shard.files:
        size = file_size(path)
        if size > o.max_doc_bytes:
            yield ReadError(path, "too_large", f"file of {size} bytes exceeds max_doc_bytes={o.max_doc_bytes}",
                            {}, size)
            continue
        try:
            with open_input(path) as f:
                raw = f.read()
        except _STREAM_ERRORS as e:
            yield ReadError(path, "truncated" if isinstance(e, EOFError) else "unreadable", str(e), {}, size)
            continue
        if not raw.strip():
            yield ReadError(path, "empty_file", "empty file", {}, len(raw))
            continue
        if b"\0" in raw[:8192]:
            yield ReadError(path, "binary_file", "binary file (NUL bytes)", {}, len(raw), _snippet(raw, 60))
            continue
        try:
            text = decode_utf8(raw, o.invalid_utf8, counters)
        except UnicodeDecodeError as e:
            yield ReadError(path, "invalid_utf8", f"invalid UTF-8 at byte {e.start}", {"offset": e.start},
                            len(raw), _snippet(raw[max(0, e.start - 40): e.start + 40]))
            continue
        text = text.lstrip("\ufeff")
        doc: dict = {"text": text, "path": name}
        if o.strip_gutenberg:
            body, fields = strip_gutenberg(text)
            if fields or body is not text:
                doc["text"] = body
                doc["gutenberg"] = fields
                counters["gutenberg_stripped"] += 1
        yield _finish(doc, shard, name, 0)


# ---------------------------------------------------------------------------------------------
# Source-code trees

# Extension (or whole file name) -> language, after The Stack's language table (the common ones).
CODE_LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".ipynb": "jupyter", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript", ".java": "java",
    ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".go": "go", ".rs": "rust", ".c": "c", ".h": "c",
    ".cc": "c++", ".cpp": "c++", ".cxx": "c++", ".hpp": "c++", ".hh": "c++", ".hxx": "c++", ".cu": "cuda",
    ".cs": "c-sharp", ".fs": "f-sharp", ".swift": "swift", ".m": "objective-c", ".mm": "objective-c++",
    ".rb": "ruby", ".php": "php", ".pl": "perl", ".pm": "perl", ".lua": "lua", ".r": "r", ".R": "r",
    ".jl": "julia", ".hs": "haskell", ".ml": "ocaml", ".mli": "ocaml", ".ex": "elixir", ".exs": "elixir",
    ".erl": "erlang", ".clj": "clojure", ".dart": "dart", ".sh": "shell", ".bash": "shell", ".zsh": "shell",
    ".ps1": "powershell", ".sql": "sql", ".html": "html", ".htm": "html", ".css": "css", ".scss": "scss",
    ".less": "less", ".vue": "vue", ".svelte": "svelte", ".md": "markdown", ".rst": "restructuredtext",
    ".tex": "tex", ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".xml": "xml",
    ".proto": "protocol-buffer", ".f90": "fortran", ".f": "fortran", ".asm": "assembly", ".s": "assembly",
    ".v": "verilog", ".sv": "systemverilog", ".vhd": "vhdl", ".zig": "zig", ".nim": "nim", ".cmake": "cmake",
    "Dockerfile": "dockerfile", "Makefile": "makefile", "CMakeLists.txt": "cmake",
}


def code_language(filename: str) -> tuple[str | None, str]:
    """(language or None, extension) of a file name: whole-name matches first (Makefile, Dockerfile)."""
    base = posixpath.basename(filename)
    if base in CODE_LANGUAGES:
        return CODE_LANGUAGES[base], ""
    ext = posixpath.splitext(base)[1]
    return CODE_LANGUAGES.get(ext) or CODE_LANGUAGES.get(ext.lower()), ext


def _plan_code_files(path: str, o: CodeOptions) -> list[tuple[str, str, int]]:
    """(file, relative name, size) for every file of the tree(s) under `path`, VCS dirs pruned."""
    fs, root = _fs(path)
    if not fs.isdir(root):
        raise InputError(f"input {path!r} is not a directory (the code reader reads source trees)")
    out = []
    for dirpath, dirs, files in fs.walk(root, detail=True, topdown=True):
        for d in [d for d in dirs if d in VCS_DIRS]:
            del dirs[d]
        for fname, info in files.items():
            if info.get("islink") or info.get("type") not in (None, "file"):
                continue  # symlinks: the target is elsewhere in the tree or not part of it
            full = posixpath.join(dirpath, fname)
            out.append((_as_url(fs, full, path), posixpath.relpath(full, root), int(info.get("size") or 0)))
    out.sort(key=lambda t: t[1])
    if not out:
        raise InputError(f"input {path!r} holds no file")
    return out


def _read_code(shard: Shard, counters: Counter) -> Iterator[Record]:
    o: CodeOptions = shard.options
    excluded = set(o.excluded_dirs)
    allowed = set(o.languages)
    for path, name in shard.files:
        parts = name.split("/")
        if o.layout == "repos":
            repository, rel = parts[0], "/".join(parts[1:])
        else:
            repository, rel = shard.dataset, name
        if excluded.intersection(parts[:-1]):
            yield Skipped("code_tree:vendored", path, file_size(path))
            continue
        language, ext = code_language(name)
        if language is None:
            yield Skipped("code_tree:unknown_extension", path, file_size(path))
            continue
        if allowed and language not in allowed:
            yield Skipped("code_tree:language", path, file_size(path))
            continue
        size = file_size(path)
        if size > o.max_file_bytes:
            yield Skipped("code_tree:oversized", path, size)
            continue
        try:
            with open_input(path) as f:
                raw = f.read(o.max_file_bytes + 1)
        except _STREAM_ERRORS as e:
            yield ReadError(path, "unreadable", str(e), {}, size)
            continue
        if len(raw) > o.max_file_bytes:  # the listed size was stale or compressed
            yield Skipped("code_tree:oversized", path, len(raw))
            continue
        if not raw.strip():
            yield Skipped("code_tree:empty", path, len(raw))
            continue
        try:
            if b"\0" in raw[:8192]:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Skipped("code_tree:binary", path, len(raw))
            continue
        doc = {"text": text, "repository": repository, "path": rel, "language": language,
               "extension": ext, "size": len(raw)}
        yield _finish(doc, shard, f"{repository}/{rel}", 0)


# ---------------------------------------------------------------------------------------------
# TFDS


def _tfds_builder(name: str, o: TfdsOptions):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=o.data_dir or None)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
        raise InputError(f"tfds dataset {name!r}: {e}".splitlines()[0]) from None


def _plan_tfds(name: str, o: TfdsOptions, where: str) -> list[tuple[int, int]]:
    builder = _tfds_builder(name, o)
    splits = builder.info.splits
    if not splits or o.split not in splits:
        known = list(splits.keys()) if splits else []
        raise InputError(
            f"{where}: tfds dataset {name!r} has no prepared split {o.split!r} in {builder.data_dir} "
            f"(prepared splits: {known}); nothing is downloaded: prepare it first (tfds build, or "
            f"builder.download_and_prepare()) and set data_dir")
    if str(builder.info.file_format).lower().endswith("tfrecord"):
        import importlib.util

        if importlib.util.find_spec("tensorflow") is None:
            raise InputError(f"{where}: tfds dataset {name!r} is stored as TFRecord, which needs tensorflow; "
                             "install it or prepare the dataset with file_format='array_record'")
    n = splits[o.split].num_examples
    step = o.examples_per_shard
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


def _read_tfds(shard: Shard, counters: Counter) -> Iterator[Record]:
    o: TfdsOptions = shard.options
    builder = _tfds_builder(shard.dataset, o)
    a, b = shard.span
    split = f"{o.split}[{a}:{b}]"
    if str(builder.info.file_format).lower().endswith("array_record"):
        source = builder.as_data_source(split=split)
        examples = (source[i] for i in range(len(source)))
    else:
        import tensorflow_datasets as tfds

        examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    name = f"{shard.dataset}/{o.split}"
    for i, ex in enumerate(examples, start=a):
        ex = jsonable(dict(ex))
        if o.text_key not in ex or not isinstance(ex[o.text_key], str):
            yield ReadError(name, "bad_text", f"example has no text feature {o.text_key!r}", {"row": i})
            continue
        doc = {"text": ex.pop(o.text_key), **ex}
        if o.id_key:
            doc["id"] = doc.pop(o.id_key, None)
        else:
            doc.pop("id", None)
            doc["id"] = f"{name}/{i}"
        yield _finish(doc, shard, name, i)


# ---------------------------------------------------------------------------------------------
# Registry and planning


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    name: str
    options: type
    read: Callable[[Shard, Counter], Iterator[Record]]
    suffixes: tuple[str, ...] = ()


READERS: dict[str, ReaderSpec] = {
    "jsonl": ReaderSpec("jsonl", JsonlOptions, _read_jsonl, JSONL_SUFFIXES),
    "parquet": ReaderSpec("parquet", ParquetOptions, _read_parquet, PARQUET_SUFFIXES),
    "warc": ReaderSpec("warc", WarcOptions, _read_warc, WARC_SUFFIXES),
    "books": ReaderSpec("books", BooksOptions, _read_books),
    "code": ReaderSpec("code", CodeOptions, _read_code),
    "tfds": ReaderSpec("tfds", TfdsOptions, _read_tfds),
}


def guess_reader(path: str) -> str:
    """The reader for a path from its suffix (or, for a directory, the suffixes of its files)."""
    base = path.rstrip("/")
    for reader in ("jsonl", "parquet", "warc"):
        if base.endswith(READERS[reader].suffixes):
            return reader
    fs, p = _fs(path)
    if not globlib.has_magic(p) and fs.isdir(p):
        counts = Counter()
        for f in fs.find(p, maxdepth=3)[:1000]:
            for reader in ("jsonl", "parquet", "warc"):
                if f.endswith(READERS[reader].suffixes):
                    counts[reader] += 1
        if counts:
            return counts.most_common(1)[0][0]
    raise InputError(f"input {path!r}: cannot tell the reader from the name; set `reader:` "
                     f"(one of {', '.join(READERS)})")


def check_options(reader: str, o: Any, where: str) -> None:
    """Rejects option values no reader could use, naming the key."""
    if o.max_doc_bytes <= 0:
        raise InputError(f"{where}: max_doc_bytes must be positive, got {o.max_doc_bytes}")
    if o.invalid_utf8 not in ("error", "repair"):
        raise InputError(f"{where}: invalid_utf8 must be 'error' or 'repair', got {o.invalid_utf8!r}")
    for key in ("batch_size", "files_per_shard", "examples_per_shard", "max_file_bytes"):
        if hasattr(o, key) and getattr(o, key) <= 0:
            raise InputError(f"{where}: {key} must be positive, got {getattr(o, key)}")
    if reader == "warc":
        from fastwarc.warc import WarcRecordType

        for r in o.records:
            if r not in ("response", "conversion", "resource"):
                raise InputError(f"{where}: records: {r!r} is not one of response, conversion, resource")
        del WarcRecordType
    if reader == "code" and o.layout not in ("repo", "repos"):
        raise InputError(f"{where}: layout must be 'repo' or 'repos', got {o.layout!r}")


def plan_input(path: str, reader: str, source: str, options: Any, input_index: int = 0,
               where: str = "inputs") -> list[Shard]:
    """The shards of one input (indices are assigned by the caller); raises InputError before work."""
    check_options(reader, options, where)
    if reader == "tfds":
        spans = _plan_tfds(path, options, where)
        return [Shard(0, reader, source, (), options, input_index, span, dataset=path) for span in spans]
    if reader == "code":
        files = _plan_code_files(path, options)
        repo = posixpath.basename(_fs(path)[1].rstrip("/"))
        k = options.files_per_shard
        return [Shard(0, reader, source, tuple((f, rel) for f, rel, _ in files[i:i + k]), options, input_index,
                      dataset=repo) for i in range(0, len(files), k)]
    if reader == "books":
        files = list_files(path, tuple(options.extensions))
        k = options.files_per_shard
        return [Shard(0, reader, source, tuple(files[i:i + k]), options, input_index)
                for i in range(0, len(files), k)]
    files = list_files(path, READERS[reader].suffixes)
    if reader == "parquet":
        _check_parquet(files, options, where)
    return [Shard(0, reader, source, (f,), options, input_index) for f in files]


def read_shard(shard: Shard, counters: Counter | None = None) -> Iterator[Record]:
    """Documents, ReadErrors and Skipped records of one shard, in a deterministic order."""
    return READERS[shard.reader].read(shard, counters if counters is not None else Counter())


def doc_bytes(doc: dict) -> int:
    """Bytes a document weighs in the report: UTF-8 bytes of its text (and of its HTML before extraction)."""
    n = len(doc["text"].encode("utf-8", "surrogatepass"))
    html = doc.get("html")
    if isinstance(html, str):
        n += len(html.encode("utf-8", "surrogatepass"))
    return n


# ---------------------------------------------------------------------------------------------
# The input layer of every command that reads documents


def input_options(reader: str, max_doc_bytes: int | None = None, text_key: str | None = None) -> Any:
    """The options of `reader` for the commands that read documents (tokenize, dedup, mix, quality, eval).

    The reader's defaults, except that a WARC file gives its WET ``conversion`` records only (a
    response record holds HTML, which only `danlu clean`'s ``html_extract`` step turns into text);
    `max_doc_bytes` and `text_key` (the JSONL field, Parquet column or TFDS feature holding the
    text; other readers have none) replace the defaults when given.
    """
    changes: dict[str, Any] = {}
    if reader == "warc":
        changes["records"] = ("conversion",)
    if max_doc_bytes is not None:
        changes["max_doc_bytes"] = max_doc_bytes
    if text_key is not None and reader in ("jsonl", "parquet", "tfds"):
        changes["text_column" if reader == "parquet" else "text_key"] = text_key
    return READERS[reader].options(**changes)


def plan_inputs(inputs: Sequence[str], reader: str = "auto", source: str = "",
                options: Any | Callable[[str], Any] | None = None, where: str = "--input") -> list[Shard]:
    """The shards of several inputs (paths, globs, directories or URLs), in argument order.

    `reader` "auto" picks each input's reader from its suffix. `source` "" keeps each document's own
    `source` field. `options` is the reader's options dataclass, or a function of the reader's name
    giving it; by default `input_options(reader)`. Raises InputError naming the input before any
    document is read.
    """
    shards: list[Shard] = []
    for i, path in enumerate(inputs):
        name = guess_reader(path) if reader == "auto" else reader
        if name not in READERS:
            raise InputError(f"{where}: unknown reader {name!r}; readers: {', '.join(READERS)}")
        opts = (options(name) if callable(options) else options) if options is not None else input_options(name)
        shards.extend(plan_input(path, name, source, opts, i, f"{where} {path!r}"))
    return [dataclasses.replace(s, index=k) for k, s in enumerate(shards)]


@dataclasses.dataclass(frozen=True)
class InputFlags:
    """The input flags every command that reads documents shares (`add_input_arguments`)."""

    reader: str = "auto"
    max_doc_bytes: int | None = None  # None: the reader's default
    text_key: str | None = None

    @classmethod
    def from_args(cls, args: Any) -> "InputFlags":
        return cls(args.reader, args.max_doc_bytes, args.text_key)

    def options(self, reader: str) -> Any:
        return input_options(reader, self.max_doc_bytes, self.text_key)

    def plan(self, inputs: Sequence[str], source: str = "", where: str = "--input") -> list[Shard]:
        """`plan_inputs` with these flags; raises InputError before any document is read."""
        return plan_inputs(inputs, self.reader, source, self.options, where)


def add_input_arguments(parser: Any) -> None:
    """The flags of `InputFlags`, for the commands that read documents."""
    g = parser.add_argument_group("input")
    g.add_argument("--reader", choices=("auto", *READERS), default="auto",
                   help="reader of the inputs (default auto, from each input's suffix: JSONL .jsonl/.json/.ndjson "
                        "plain, .gz, .zst, .bz2 or .xz; Parquet .parquet; WARC/WET .warc/.wet (WET text records))")
    g.add_argument("--max-doc-bytes", type=int, default=None, metavar="N",
                   help=f"a bigger record goes to errors.jsonl, unparsed (default {CommonOptions.max_doc_bytes})")
    g.add_argument("--text-key", default=None, metavar="FIELD",
                   help="the JSONL field / Parquet column holding the text (default text)")


def read_guarded(shard: Shard, counters: Counter | None = None) -> Iterator[Record]:
    """`read_shard`, except that an unexpected exception from a reader ends the shard as one error
    after the records already read (they are kept)."""
    try:
        yield from read_shard(shard, counters)
    except Exception as e:  # noqa: BLE001 - a reader bug or an odd file must not end the job
        yield ReadError(shard.name, "unreadable", f"reader failed: {type(e).__name__}: {e}")


def read_inputs(shards: Sequence[Shard], counters: Counter | None = None) -> Iterator[tuple[Shard, Record]]:
    """(shard, record) for every record of `shards`, in order; never raises on a bad record or file."""
    for shard in shards:
        for rec in read_guarded(shard, counters):
            yield shard, rec


def read_documents(shards: Sequence[Shard], errors: list | None = None,
                   dropped: Counter | None = None) -> Iterator[tuple[Shard, dict]]:
    """(shard, document) for the documents of `shards`, in order; never raises on a bad record or file.

    A record that cannot be read goes to `errors` as its errors.jsonl row (`error_row`); one a
    reader removes on purpose (a vendored file of a code tree) is counted in `dropped` by reason.
    """
    for shard, rec in read_inputs(shards):
        if isinstance(rec, dict):
            yield shard, rec
        elif isinstance(rec, ReadError):
            if errors is not None:
                errors.append(error_row(rec))
        elif dropped is not None:
            dropped[rec.reason] += 1


def error_row(e: ReadError, **extra: Any) -> dict:
    """The errors.jsonl row of a record set aside: file, line/row/offset, kind, reason, bytes, raw."""
    return {"file": e.file, **e.location, "kind": e.kind, "reason": e.reason, "bytes": e.nbytes, **extra,
            "raw": e.raw}
