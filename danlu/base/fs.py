"""Bytes and files: local paths and fsspec URLs, (de)compression by suffix, JSON Lines writing.

The layer under `data_pipeline.readers`, which turns files into documents:

- `open_input(path)` opens a local path or URL (``gs://``, ``memory://``, ``file://``) for binary
  reading, decompressed by suffix (.gz, .zst/.zstd, .bz2, .xz). A truncated compressed stream
  raises EOFError while reading, never a silent end of file; a damaged one one of STREAM_ERRORS.
- `open_output(path)` opens one for writing, compressed by suffix; a local path's parent
  directories are created, a remote URL is written through fsspec. `write_text` writes a small
  file that way; `local_path` says whether a path or URL names a local file. `rewrite(path, data)`
  replaces a file at once (temp file + rename, or one object upload): how a growing file is
  "appended" to on an object store, which has no append.
- `JsonlWriter` / `write_jsonl` write one JSON object per line, byte-deterministically: keys keep
  their order, gzip headers carry no timestamp or file name, so the same objects give the same file.
- `read_jsonl` is the strict reader of JSONL files we wrote ourselves: it raises on the first bad
  line. Corpora are read with `readers.plan_inputs` + `readers.read_inputs`, which never die on a
  bad record.

The document contract (docs/design.md): one JSON object per line,
``{"id": str, "text": str, "source": str, ...}``; unknown fields are kept.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import zlib
from typing import IO, Any, BinaryIO, Iterable, Iterator

import fsspec
import zstandard

# Compressed-file suffixes and the codec each one means.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
JSONL_SUFFIXES = tuple(base + c for base in (".jsonl", ".json", ".ndjson") for c in ("", *COMPRESSIONS))
# What reading a compressed stream raises when it is cut short (EOFError) or damaged.
STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, lzma.LZMAError)


def compression_of(path: str) -> str | None:
    """'gzip', 'zstd', 'bz2', 'xz' or None, from the file name."""
    for suffix, kind in COMPRESSIONS.items():
        if path.endswith(suffix):
            return kind
    return None


def is_url(path: str) -> bool:
    return "://" in path


def local_path(path: str) -> str | None:
    """The local path a plain path or ``file://`` URL names; None for a remote URL (gs://, memory://)."""
    if path.startswith("file://"):
        return path[len("file://"):] or "/"
    return None if is_url(path) else path


def isfile(path: str) -> bool:
    """Whether a local path or URL (through fsspec) names an existing file, not a directory."""
    local = local_path(path)
    if local is not None:
        return os.path.isfile(local)
    filesystem, inner = fsspec.core.url_to_fs(path)
    return filesystem.isfile(inner)


# Buckets mounted as local directories (gcsfuse on Cloud TPU workers, set up by `danlu launch tpu
# setup`): "gs://bucket=/mnt/dir[,gs://other=/mnt/other]". Readers that need POSIX files (the
# ArrayRecord token shards) read a URL under a mounted prefix from its local directory.
MOUNTS_ENV = "DANLU_MOUNTS"


def mounts() -> list[tuple[str, str]]:
    """The (URL prefix, local directory) pairs of $DANLU_MOUNTS, longest prefix first."""
    out = []
    for item in filter(None, (x.strip() for x in os.environ.get(MOUNTS_ENV, "").split(","))):
        prefix, sep, local = item.partition("=")
        if not sep or not is_url(prefix) or not local:
            raise ValueError(f"${MOUNTS_ENV}: {item!r} is not of the form gs://bucket=/local/dir")
        out.append((prefix.rstrip("/"), local.rstrip("/") or "/"))
    return sorted(out, key=lambda m: -len(m[0]))


def mounted(path: str) -> str:
    """The local directory path of a URL under a mounted prefix ($DANLU_MOUNTS); else `path` as given."""
    for prefix, local in mounts():
        if path == prefix or path.startswith(prefix + "/"):
            return local + path[len(prefix):]
    return path


def require_local(path: str, flag: str, what: str) -> str:
    """The local path of `path`; a remote URL raises ValueError naming `flag` and what to do instead."""
    local = local_path(path)
    if local is None:
        raise ValueError(f"{flag} {path}: {what} can only be written to a local directory; write to one, "
                         f"then copy (e.g. gcloud storage cp -r LOCAL_DIR {path})")
    return local


# ---------------------------------------------------------------------------------------------
# Reading


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) zstd stream; raises EOFError when the last frame is cut short.

    `zstandard`'s stream reader returns a clean end of file on a truncated frame, which would
    silently lose the tail; this reader feeds a fresh decompressobj per frame and checks `eof`.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its last frame")
                return 0
            while chunk:
                self._in_frame = True
                try:
                    self._pending += self._dobj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise OSError(f"corrupt zstd stream: {e}") from None
                if self._dobj.eof:  # a frame ended; what follows starts the next one
                    chunk = self._dobj.unused_data
                    self._dobj = zstandard.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    chunk = b""
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


# fsspec's names of the stdlib codecs, for remote files (fsspec's GzipFile, BZ2File and LZMAFile
# raise EOFError on a cut stream like the stdlib's, and its file closes every layer).
_FSSPEC_CODEC = {"gzip": "gzip", "bz2": "bz2", "xz": "xz"}


def open_input(path: str) -> BinaryIO:
    """Opens a local path or URL for binary reading, decompressing by suffix (.gz, .zst, .bz2, .xz).

    A truncated compressed stream raises EOFError while reading (never a silent end of file); the
    result is buffered (``peek``, ``readline``). A missing file raises FileNotFoundError.
    """
    kind = compression_of(path)
    local = local_path(path)
    if kind == "zstd":
        raw = open(local, "rb") if local is not None else fsspec.open(path, "rb").open()
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 16)
    if local is None:
        f = fsspec.open(path, "rb", compression=_FSSPEC_CODEC.get(kind)).open()
        return f if kind or isinstance(f, io.BufferedReader) else io.BufferedReader(f, buffer_size=1 << 16)
    # The stdlib's readers are buffered themselves (peek, readline, read1); another BufferedReader on
    # top would fill its buffer with several reads and lose the bytes before a truncation.
    if kind == "gzip":
        return gzip.GzipFile(local, "rb")
    if kind == "bz2":
        return bz2.BZ2File(local, "rb")
    if kind == "xz":
        return lzma.LZMAFile(local, "rb")
    return open(local, "rb")


def read_jsonl(path: str) -> Iterator[dict]:
    """Yields the objects of a JSONL file we wrote ourselves (strict).

    Raises ValueError naming file and line on the first line that is not a JSON object (invalid
    UTF-8 or JSON, another JSON value) and on a truncated or damaged stream. Blank lines are skipped.
    """
    line_no = 0
    with open_input(path) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid UTF-8: {e.reason} at byte {e.start}") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{line_no}: not a JSON object: {type(obj).__name__}")
                yield obj
        except STREAM_ERRORS as e:
            raise ValueError(f"{path}:{line_no + 1}: stream ended early or is damaged: {e}") from None


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


# ---------------------------------------------------------------------------------------------
# Writing


class _ClosingGzip(gzip.GzipFile):
    """GzipFile over an owned raw file that is closed with it (gzip.GzipFile won't)."""

    def __init__(self, raw: BinaryIO):
        # mtime=0 and no file name in the header: identical input gives identical bytes.
        super().__init__(filename="", mode="wb", fileobj=raw, mtime=0)
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def makedirs(path: str) -> None:
    """Creates a local directory and its parents; nothing for a remote URL (object stores have none)."""
    local = local_path(path)
    if local is not None:
        os.makedirs(local, exist_ok=True)


def open_output(path: str, mode: str = "wb") -> IO:
    """Opens a local path or URL for writing, binary ('wb') or UTF-8 text ('wt', newlines kept),
    compressed by suffix (.gz, .zst, .bz2, .xz). A local path's parent directories are created."""
    if mode not in ("wb", "wt"):
        raise ValueError(f"mode must be 'wb' or 'wt', got {mode!r}")
    if mode == "wt":
        return io.TextIOWrapper(open_output(path, "wb"), encoding="utf-8", newline="")
    kind = compression_of(path)
    local = local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        if kind == "bz2":
            return bz2.BZ2File(local, "wb")
        if kind == "xz":
            return lzma.LZMAFile(local, "wb")
        raw = open(local, "wb")
    elif kind in ("bz2", "xz"):
        return fsspec.open(path, "wb", compression=_FSSPEC_CODEC[kind]).open()
    else:
        raw = fsspec.open(path, "wb").open()
    if kind == "gzip":
        return _ClosingGzip(raw)
    if kind == "zstd":
        return zstandard.open(raw, "wb", cctx=zstandard.ZstdCompressor(level=10), closefd=True)
    return raw


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to a local path or URL, compressed by suffix; parents are created."""
    with open_output(path, "wt") as f:
        f.write(text)


def rewrite(path: str, data: bytes) -> None:
    """Replaces the file at a local path or URL by `data` at once (no compression by suffix): a
    reader sees the old bytes or the new, never a mix. Local: a temporary ``path + ".tmp"`` renamed
    over it, parents created; URL: one object upload. Object stores have no append: a file that
    grows (metrics, event logs) is kept by its writer and rewritten whole."""
    local = local_path(path)
    if local is None:
        with fsspec.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = local + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, local)


def put_dir(local: str, url: str) -> None:
    """Copies a local directory tree to a URL (fsspec), e.g. a trace written locally into a remote run directory."""
    filesystem, path = fsspec.core.url_to_fs(url)
    filesystem.put(local, path, recursive=True)


def dumps_line(obj: Any) -> str:
    """One JSONL line (with trailing newline); non-ASCII kept as UTF-8, key order kept."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")) + "\n"


class JsonlWriter:
    """Writes objects one per line to a local path or URL (compressed by suffix); use as a context manager.

    Parent directories of a local path are created. `count` is the number of objects written.
    """

    def __init__(self, path: str):
        self.path = path
        self._f = open_output(path, "wt")
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
