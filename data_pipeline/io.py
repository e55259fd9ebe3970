"""JSON Lines documents: reading, writing, validating (plain, .gz, .zst).

The document contract (docs/DESIGN.md): one JSON object per line,
``{"id": str, "text": str, "source": str, ...}``; unknown fields are kept.

Reading never dies on one bad line: `iter_jsonl` yields a `JsonlLine` that carries
either the parsed object or the reason it could not be parsed, with file and line
number, so a job can count it, set it aside and go on. `read_jsonl` is the strict
variant for inputs we wrote ourselves.

Writing is byte-deterministic: keys keep their order, gzip headers carry no
timestamp or file name, so the same documents give the same file.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
from typing import Any, BinaryIO, Iterable, Iterator

try:  # optional: .zst support only when the `zstandard` package is installed
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")


def compression_of(path: str) -> str | None:
    """'gzip', 'zstd' or None, from the file name."""
    if path.endswith(".gz"):
        return "gzip"
    if path.endswith(".zst") or path.endswith(".zstd"):
        return "zstd"
    return None


def _require_zstandard(path: str) -> None:
    if zstandard is None:
        raise ImportError(
            f"{path}: reading/writing .zst needs the 'zstandard' package (pip install zstandard)"
        )


def open_binary(path: str, mode: str = "rb") -> BinaryIO:
    """Opens `path` for binary reading ('rb') or writing ('wb'), (de)compressing by suffix."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"mode must be 'rb' or 'wb', got {mode!r}")
    kind = compression_of(path)
    if kind == "gzip":
        if mode == "rb":
            return gzip.open(path, "rb")
        # mtime=0 and no file name in the header: identical input gives identical bytes.
        raw = open(path, "wb")
        return _ClosingGzip(raw)
    if kind == "zstd":
        _require_zstandard(path)
        if mode == "rb":
            # Buffered: zstandard's reader is not line-iterable (iter_jsonl reads lines).
            return io.BufferedReader(zstandard.open(path, "rb"))
        return zstandard.open(path, "wb", cctx=zstandard.ZstdCompressor(level=10))
    return open(path, mode)


class _ClosingGzip(gzip.GzipFile):
    """GzipFile over an owned raw file that is closed with it (gzip.GzipFile won't)."""

    def __init__(self, raw: BinaryIO):
        super().__init__(filename="", mode="wb", fileobj=raw, mtime=0)
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_text(path: str, mode: str = "rt", encoding: str = "utf-8") -> io.TextIOBase:
    """Text-mode counterpart of `open_binary` ('rt' or 'wt'); newlines are not translated."""
    if mode not in ("rt", "wt"):
        raise ValueError(f"mode must be 'rt' or 'wt', got {mode!r}")
    return io.TextIOWrapper(open_binary(path, mode[0] + "b"), encoding=encoding, newline="")


@dataclasses.dataclass(frozen=True)
class JsonlLine:
    """One non-blank line of a JSONL file.

    Exactly one of `obj` and `error` is set. `line` is 1-based; `raw` is the line's text
    (invalid UTF-8 replaced), kept so a bad line can be written aside for inspection.
    """

    path: str
    line: int
    obj: dict | None
    error: str | None
    raw: str


def iter_jsonl(path: str) -> Iterator[JsonlLine]:
    """Yields every non-blank line of `path` as a `JsonlLine`; never raises on a bad line.

    Lines are split on b"\\n" only (not on U+2028 etc.), and decoded one at a time so
    one line of invalid UTF-8 does not end the file. A line that is valid JSON but
    not an object is an error too. Missing files raise FileNotFoundError.
    """
    with open_binary(path, "rb") as f:
        for line_no, raw_bytes in enumerate(f, start=1):
            if not raw_bytes.strip():
                continue  # blank lines (often a trailing one) are not records
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                yield JsonlLine(path, line_no, None, f"invalid UTF-8: {e.reason} at byte {e.start}",
                                raw_bytes.decode("utf-8", errors="replace").rstrip("\r\n"))
                continue
            raw = raw.rstrip("\r\n")
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield JsonlLine(path, line_no, None, f"invalid JSON: {e.msg} (column {e.colno})", raw)
                continue
            if not isinstance(obj, dict):
                yield JsonlLine(path, line_no, None, f"not a JSON object: {type(obj).__name__}", raw)
                continue
            yield JsonlLine(path, line_no, obj, None, raw)


def read_jsonl(path: str) -> Iterator[dict]:
    """Yields the objects of `path`; raises ValueError naming file and line on the first bad line."""
    for rec in iter_jsonl(path):
        if rec.error is not None:
            raise ValueError(f"{rec.path}:{rec.line}: {rec.error}")
        yield rec.obj


def document_error(obj: dict) -> str | None:
    """Why `obj` breaks the document contract, or None if it is a valid document.

    Requires a string `id` and a string `text`; `source`, when present, must be a
    string. Empty text is valid here (callers decide what to do with it).
    """
    doc_id = obj.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        return "missing or non-string id" if not isinstance(doc_id, str) else "empty id"
    if "text" not in obj:
        return "missing text"
    if not isinstance(obj["text"], str):
        return f"non-string text ({type(obj['text']).__name__})"
    if "source" in obj and not isinstance(obj["source"], str):
        return f"non-string source ({type(obj['source']).__name__})"
    return None


def dumps_line(obj: Any) -> str:
    """One JSONL line (with trailing newline); non-ASCII kept as UTF-8, key order kept."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")) + "\n"


class JsonlWriter:
    """Writes objects one per line to `path` (compressed by suffix); use as a context manager.

    Parent directories are created. `count` is the number of objects written.
    """

    def __init__(self, path: str):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._f = open_text(path, "wt")
        self.count = 0

    def write(self, obj: Any) -> None:
        self._f.write(dumps_line(obj))
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl(path: str, objs: Iterable[Any]) -> int:
    """Writes `objs` to `path` as JSONL; returns how many were written."""
    with JsonlWriter(path) as w:
        for obj in objs:
            w.write(obj)
        return w.count


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files named by `inputs`: plain paths as given, globs and directories expanded, sorted.

    A directory contributes its JSONL files (suffixes in `JSONL_SUFFIXES`), recursively.
    Order of the arguments is kept; duplicates are dropped (first wins). Raises
    FileNotFoundError naming any argument that matches nothing.
    """
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if name.endswith(JSONL_SUFFIXES)
            )
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"input {item!r} matches no file")
        out.extend(found)
    return list(dict.fromkeys(out))


def local_path(path: str) -> str | None:
    """The local path a plain path or ``file://`` URL names; None for a remote URL (gs://, memory://)."""
    if path.startswith("file://"):
        return path[len("file://"):] or "/"
    return None if "://" in path else path
