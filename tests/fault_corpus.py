"""A corpus of good documents mixed with every reading fault, and its expected outcome (the oracle).

Files (written by `build`):

    good.jsonl      good documents with bad lines planted among them: malformed JSON, invalid
                    UTF-8, a JSON array and a number, an object without `text`, a non-string
                    `text`, a raw NUL byte, a record over MAX_DOC_BYTES, blank lines
    cut.jsonl.gz    good documents, gzip stream cut in the middle
    cut.jsonl.zst   good documents, zstd frame (several blocks) cut in the middle
    cut.warc.gz     WET-style `conversion` records, one gzip member each, cut inside a record's body

The oracle never uses the project's readers: what survives a cut is what zlib / zstandard
decompress from the cut bytes, split on b"\\n" with the last (partial) piece dropped; a WARC
record survives when its whole Content-Length body lies before the cut. Each cut file adds one
`truncated` row to errors.jsonl and nothing for its partial line or record.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import uuid
import zlib
from collections import Counter
from pathlib import Path

import zstandard

MAX_DOC_BYTES = 5000  # readers.max_doc_bytes / --max-doc-bytes of every command under test
SOURCE = "web"  # `source` field of every good JSONL document (mix --epochs web=1)

# ---------------------------------------------------------------------------------------------
# Good documents: distinct multi-sentence English prose, none a near-duplicate of another.

_SUBJECTS = ["The harbour master", "A retired schoolteacher", "The city council", "Our new neighbour",
             "The night nurse", "A young civil engineer", "The village baker", "The museum curator",
             "A travelling violinist", "The river pilot", "The school librarian", "A beekeeper from the valley",
             "The station master", "An amateur astronomer", "The ferry captain", "A local historian",
             "The lighthouse keeper", "A market gardener", "The parish clerk", "A visiting geologist"]
_VERBS = ["repaired", "described", "photographed", "measured", "painted", "rebuilt", "catalogued", "inspected",
          "sketched", "recorded", "discussed", "restored", "mapped", "questioned", "praised", "documented"]
_OBJECTS = ["the old stone bridge", "a bundle of forgotten letters", "the broken clock tower",
            "the damage from the spring flood", "a faded map of the northern coast", "the orchard behind the mill",
            "the choir's winter programme", "a wooden rowing boat", "the drainage ditches along the lane",
            "the east wall of the granary", "a box of glass negatives", "the route of the old tram line",
            "the stained glass in the chapel", "a ledger of grain prices", "the nesting site of the herons",
            "the foundations of the toll house"]
_TIMES = ["before the first snow", "after the market had closed", "during the long dry summer",
          "on a foggy Tuesday morning", "late one October evening", "while the tide was out",
          "in the weeks before the fair", "just after the harvest", "at the height of the storm",
          "between two shifts at the hospital"]
_REMARKS = ["Nobody had expected the work to take so long.", "Several visitors stopped to ask questions.",
            "The weather held, which surprised everyone.", "A few people still remember that day clearly.",
            "It was, by all accounts, a careful and patient job.", "The result was better than anyone had hoped.",
            "Some of the details were later disputed in the newspaper.", "Children from the school came to watch.",
            "Much of the original material had survived intact.", "The committee thanked everyone involved."]
_COUNTED = ["carts of timber", "volunteers", "letters of complaint", "photographs", "pages of notes",
            "sacks of lime", "donations", "interviews", "drawings", "lanterns"]


def good_text(i: int) -> str:
    """Document `i`: 5-9 sentences from a seeded generator, with its own number and year."""
    rng = random.Random(1_000 + i)
    year = 1820 + (i * 7) % 190
    sentences = [f"This is entry {i} of the town archive, written in {year}."]
    for _ in range(rng.randint(4, 8)):
        sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                         f"{rng.choice(_TIMES)}.")
        if rng.random() < 0.5:
            sentences.append(rng.choice(_REMARKS))
    sentences.append(f"The records mention {rng.randint(3, 400)} {rng.choice(_COUNTED)} in all.")
    return " ".join(sentences)


def good_doc(k: int, prefix: str) -> dict:
    """Good document `k` (each file draws from its own range of k, so no text repeats)."""
    return {"id": f"{prefix}-{k:03d}", "text": good_text(k), "source": SOURCE}


def _line(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"


def junk_texts(n: int, seed: int = 0) -> list[str]:
    """Crawl-like junk (link lists, menus, shuffled words): the negatives of a quality model."""
    rng = random.Random(seed)
    words = " ".join(good_text(k) for k in range(5)).split()
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(" ".join(f"http://x{rng.randrange(99)}.com/{rng.choice(words)}" for _ in range(40)))
        elif i % 3 == 1:
            out.append(" | ".join(f"Home Login Cart {rng.choice(words)}" for _ in range(25)))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(80)))
    return out


# ---------------------------------------------------------------------------------------------
# The oracle


@dataclasses.dataclass(frozen=True)
class Row:
    """One expected errors.jsonl row: file name, line (None: not fixed) and kind (None: not fixed)."""

    file: str
    line: int | None
    kind: str | None


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a command must produce: every surviving good document (id -> text) and the error rows."""

    docs: dict[str, str]
    rows: tuple[Row, ...]

    def kinds(self) -> Counter:
        return Counter(r.kind for r in self.rows if r.kind is not None)

    def __add__(self, other: "Expected") -> "Expected":
        assert not set(self.docs) & set(other.docs)
        return Expected({**self.docs, **other.docs}, self.rows + other.rows)


@dataclasses.dataclass(frozen=True)
class FaultCorpus:
    dir: Path
    good: Path
    cut_gz: Path
    cut_zst: Path
    cut_warc: Path
    per_file: dict[str, Expected]  # file name -> expected outcome with max_doc_bytes = MAX_DOC_BYTES
    long_doc: tuple[str, str]  # (id, text) of the over-long record: a good document when no limit is set
    nul_line: int  # the line of good.jsonl holding a raw NUL byte

    @property
    def jsonl_files(self) -> list[str]:
        return [str(self.good), str(self.cut_gz), str(self.cut_zst)]

    @property
    def jsonl(self) -> Expected:
        """The three JSONL files together."""
        return self.per_file["good.jsonl"] + self.per_file["cut.jsonl.gz"] + self.per_file["cut.jsonl.zst"]

    @property
    def warc(self) -> Expected:
        return self.per_file["cut.warc.gz"]

    def without_limit(self, name: str) -> Expected:
        """The outcome of file `name` with the default max_doc_bytes: the long record is a document."""
        e = self.per_file[name]
        if name != "good.jsonl":
            return e
        return Expected({**e.docs, self.long_doc[0]: self.long_doc[1]},
                        tuple(r for r in e.rows if r.kind != "too_large"))


def complete_lines(data: bytes) -> list[bytes]:
    """The whole lines of a decompressed prefix; the piece after the last newline is dropped."""
    return data.split(b"\n")[:-1]


def gunzip_prefix(data: bytes) -> bytes:
    """Everything zlib decompresses from (possibly cut) gzip bytes, over all members."""
    out = []
    while data:
        d = zlib.decompressobj(wbits=31)
        out.append(d.decompress(data))
        if not d.eof:
            break
        data = d.unused_data
    return b"".join(out)


def unzstd_prefix(data: bytes) -> bytes:
    """Everything zstandard decompresses from a (possibly cut) single-frame zstd stream."""
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _docs_of_lines(lines: list[bytes]) -> dict[str, str]:
    docs = {}
    for raw in lines:
        obj = json.loads(raw)
        docs[obj["id"]] = obj["text"]
    return docs


# ---------------------------------------------------------------------------------------------
# The files


def _good_jsonl(path: Path) -> tuple[Expected, tuple[str, str], int]:
    """good.jsonl: good lines with one of every bad line planted; returns (expected, long doc, NUL line)."""
    name = path.name
    good = iter([good_doc(k, "plain") for k in range(24)])
    long_doc = {"id": "too-long", "text": " ".join(good_text(900 + k) for k in range(12)), "source": SOURCE}
    assert len(_line(long_doc)) > MAX_DOC_BYTES + 1000
    plan: list[tuple[bytes, str | None]] = [  # (line, error kind or "" for a blank line or None for good)
        (_line(next(good)), None),
        (_line(next(good)), None),
        (b"\n", ""),
        (b'{"id": "bad-json", "text": "an unterminated string\n', "invalid_json"),
        (_line(next(good)), None),
        (b'{"id": "bad-utf8", "text": "caf\xe9 au lait and a \xff\xfe byte pair"}\n', "invalid_utf8"),
        (b'{"id": "nul-byte", "text": "a raw \x00 NUL byte inside the text"}\n', "nul"),  # early: in the first 8 kB
        (_line(next(good)), None),
        (b'["an", "array", "not", "an", "object"]\n', "not_object"),
        (b"42\n", "not_object"),
        (_line({"id": "no-text", "title": "An object without a text field", "source": SOURCE}), "bad_text"),
        (_line({"id": "number-text", "text": 12345, "source": SOURCE}), "bad_text"),
        (_line(next(good)), None),
        (_line(long_doc), "too_large"),
        (b"   \t \n", ""),
        (_line(next(good)), None),
    ]
    plan += [(_line(d), None) for d in good]
    plan.append((b"\n", ""))
    data = b"".join(line for line, _ in plan)
    path.write_bytes(data)
    docs, rows, nul_line = {}, [], 0
    for line_no, (line, kind) in enumerate(plan, start=1):
        if kind is None:
            obj = json.loads(line)
            docs[obj["id"]] = obj["text"]
        elif kind == "nul":
            nul_line = line_no
            rows.append(Row(name, line_no, None))  # one row for this line; which kind is the reader's call
        elif kind:
            rows.append(Row(name, line_no, kind))
    assert b"\x00" in data[:8192] and nul_line
    return Expected(docs, tuple(rows)), (long_doc["id"], long_doc["text"]), nul_line


def _cut_gz(path: Path, n: int) -> Expected:
    raw = b"".join(_line(good_doc(100 + i, "gz")) for i in range(n))
    data = gzip.compress(raw, mtime=0)
    cut = len(data) // 2
    while gunzip_prefix(data[:cut]).endswith(b"\n"):  # the cut must leave a partial line behind
        cut -= 1
    path.write_bytes(data[:cut])
    lines = complete_lines(gunzip_prefix(data[:cut]))
    assert 0 < len(lines) < n
    return Expected(_docs_of_lines(lines), (Row(path.name, len(lines) + 1, "truncated"),))


def _cut_zst(path: Path, n: int) -> Expected:
    """One zstd frame flushed into blocks every 700 bytes (blocks end mid-line), cut mid-frame."""
    raw = b"".join(_line(good_doc(200 + i, "zst")) for i in range(n))
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    parts = []
    for k in range(0, len(raw), 700):
        parts.append(cobj.compress(raw[k:k + 700]))
        parts.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(cobj.flush())
    data = b"".join(parts)
    assert unzstd_prefix(data) == raw
    cut = len(data) // 2
    while unzstd_prefix(data[:cut]).endswith(b"\n"):
        cut -= 1
    path.write_bytes(data[:cut])
    lines = complete_lines(unzstd_prefix(data[:cut]))
    assert 0 < len(lines) < n
    return Expected(_docs_of_lines(lines), (Row(path.name, len(lines) + 1, "truncated"),))


def warc_record(record_id: str, uri: str, body: bytes) -> bytes:
    """A WARC/1.0 conversion record (WET style: plain text body)."""
    head = (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: {uri}\r\n"
            f"WARC-Date: 2024-03-01T12:00:00Z\r\nWARC-Record-ID: <urn:uuid:{record_id}>\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body + b"\r\n\r\n"


def parse_warc_prefix(data: bytes) -> list[tuple[str, bytes]]:
    """(record id, body) of every record whose whole Content-Length body lies in `data`."""
    out, pos = [], 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        headers = dict(line.split(b": ", 1) for line in data[pos:end].split(b"\r\n")[1:])
        length = int(headers[b"Content-Length"])
        start = end + 4
        if start + length > len(data):
            return out
        rid = headers[b"WARC-Record-ID"].decode().strip("<>").removeprefix("urn:uuid:")
        out.append((rid, data[start:start + length]))
        pos = start + length + 4


def _cut_warc(path: Path, n: int) -> Expected:
    """n conversion records, one gzip member each; cut inside the gzip member of record n//2+1,
    at a point where the decompressed prefix ends inside that record's body."""
    members, records = [], []
    for i in range(n):
        rid = str(uuid.UUID(int=0x5EED_0000 + i))
        rec = warc_record(rid, f"https://example.org/archive/{i}", good_text(500 + i).encode("utf-8"))
        records.append(rec)
        members.append(gzip.compress(rec, mtime=0))
    k = n // 2 + 1
    before = b"".join(members[:k])
    whole_before = b"".join(records[:k])
    header_len = records[k].index(b"\r\n\r\n") + 4
    body_len = len(records[k]) - header_len - 4
    cut = None
    for c in range(len(members[k]) // 2, len(members[k])):
        got = len(gunzip_prefix(before + members[k][:c])) - len(whole_before)
        if header_len + 10 < got < header_len + body_len - 10:
            cut = c
            break
    assert cut is not None
    data = before + members[k][:cut]
    path.write_bytes(data)
    recs = parse_warc_prefix(gunzip_prefix(data))
    assert len(recs) == k
    return Expected({rid: body.decode("utf-8") for rid, body in recs}, (Row(path.name, None, "truncated"),))


def build(directory: Path) -> FaultCorpus:
    """Writes the four fault files into `directory` and returns them with their oracle."""
    directory.mkdir(parents=True, exist_ok=True)
    good = directory / "good.jsonl"
    expected_good, long_doc, nul_line = _good_jsonl(good)
    per_file = {
        "good.jsonl": expected_good,
        "cut.jsonl.gz": _cut_gz(directory / "cut.jsonl.gz", 60),
        "cut.jsonl.zst": _cut_zst(directory / "cut.jsonl.zst", 60),
        "cut.warc.gz": _cut_warc(directory / "cut.warc.gz", 10),
    }
    return FaultCorpus(directory, good, directory / "cut.jsonl.gz", directory / "cut.jsonl.zst",
                       directory / "cut.warc.gz", per_file, long_doc, nul_line)
