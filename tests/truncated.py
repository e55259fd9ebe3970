"""Compressed JSONL files cut in the middle of the stream, and what must survive the cut.

The survivors are computed without danlu's readers: what zlib / zstandard decompress from the cut
bytes, split on b"\\n", the piece after the last newline (the cut line) dropped.
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import zstandard


def _lines(docs: list[dict]) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode("utf-8") + b"\n" for d in docs)


def _survivors(prefix: bytes) -> list[dict]:
    return [json.loads(line) for line in prefix.split(b"\n")[:-1]]


def _cut(data: bytes, decompress) -> int:
    """A cut near the middle of `data` whose decompressed prefix ends inside a line."""
    cut = len(data) // 2
    while decompress(data[:cut]).endswith(b"\n"):
        cut -= 1
    return cut


def write_cut_gz(path: Path, docs: list[dict]) -> list[dict]:
    """Writes `docs` as gzipped JSONL cut mid-stream; returns the documents of its complete lines."""
    data = gzip.compress(_lines(docs), mtime=0)

    def gunzip(b: bytes) -> bytes:
        return zlib.decompressobj(wbits=31).decompress(b)

    cut = _cut(data, gunzip)
    path.write_bytes(data[:cut])
    survivors = _survivors(gunzip(data[:cut]))
    assert 0 < len(survivors) < len(docs)
    return survivors


def write_cut_zst(path: Path, docs: list[dict]) -> list[dict]:
    """Writes `docs` as one zstd frame (a block every 500 bytes, so a prefix decompresses) cut
    mid-frame; returns the documents of its complete lines."""
    raw = _lines(docs)
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    parts = []
    for k in range(0, len(raw), 500):
        parts += [cobj.compress(raw[k:k + 500]), cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    data = b"".join(parts) + cobj.flush()

    def unzstd(b: bytes) -> bytes:
        return zstandard.ZstdDecompressor().decompressobj().decompress(b)

    cut = _cut(data, unzstd)
    path.write_bytes(data[:cut])
    survivors = _survivors(unzstd(data[:cut]))
    assert 0 < len(survivors) < len(docs)
    return survivors


def read_rows(path: Path) -> list[dict]:
    """The rows of an uncompressed JSONL file (errors.jsonl), read with json alone."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_one_truncated_row(rows: list[dict], path: Path, survivors: list[dict]) -> None:
    """errors.jsonl holds one row, for the cut: the line after the last complete one."""
    assert [(r["file"], r["line"], r["kind"]) for r in rows] == [(str(path), len(survivors) + 1, "truncated")], rows
    assert {"reason", "bytes", "raw"} <= set(rows[0])
