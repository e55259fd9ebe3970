"""Readers of `danlu clean`: JSONL (bad lines, .gz/.zst truncation), Parquet, WARC/WET written in the
test, Project Gutenberg books, source-code trees, a TFDS dataset built in the test, fsspec URLs."""
import gzip
import io
import json
import os
import random
from collections import Counter

import pytest
import zstandard

from danlu.base import fs as dio
from data_pipeline import readers as R


def _read(path, reader, source="src", **opts):
    options = R.READERS[reader].options(**opts)
    shards = R.plan_input(str(path), reader, source, options)
    counters = Counter()
    out = [rec for s in shards for rec in R.read_shard(s, counters)]
    return out, counters, shards


def _docs(recs):
    return [r for r in recs if isinstance(r, dict)]


def _errors(recs):
    return [r for r in recs if isinstance(r, R.ReadError)]


def _lines(n, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [json.dumps({"text": " ".join(rng.choice(words) + str(rng.randint(0, 9999)) for _ in range(40)),
                        "meta": {"i": i}}) for i in range(n)]


def test_jsonl_bad_lines_ids_and_unknown_fields(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"id": "keep-me", "text": "one", "extra": [1, 2]}\n'
                  b'{"text": "two"}\n'
                  b"\n"  # blank: not a record
                  b"{broken\n"
                  b"[1, 2]\n"
                  b'{"text": 5}\n'
                  b'{"text": "caf\xe9"}\n'
                  b'{"id": 12, "text": "three"}\r\n')
    recs, _, _ = _read(p, "jsonl", source="web")
    docs, errs = _docs(recs), _errors(recs)
    assert [d["text"] for d in docs] == ["one", "two", "three"]
    assert docs[0] == {"id": "keep-me", "text": "one", "extra": [1, 2], "source": "web"}
    assert docs[2]["id"] == "12"  # a non-string id is kept as a string
    assert docs[1]["id"].startswith("web-") and len(docs[1]["id"]) == 24
    # generated ids are stable: same file name and line, same id
    again = _docs(_read(p, "jsonl", source="web")[0])
    assert again[1]["id"] == docs[1]["id"]
    assert [(e.kind, e.location) for e in errs] == [("invalid_json", {"line": 4}), ("not_object", {"line": 5}),
                                                   ("bad_text", {"line": 6}), ("invalid_utf8", {"line": 7})]
    assert errs[3].raw.startswith('{"text": "caf')


def test_jsonl_invalid_utf8_repair_mode_counts(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    recs, counters, _ = _read(p, "jsonl", invalid_utf8="repair")
    assert [d["text"] for d in _docs(recs)] == ["caf\ufffd au lait"]
    assert counters["utf8_repaired"] == 1


def test_jsonl_text_key_and_id_key(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"uid": "u1", "content": "hello", "text_meta": 1}) + "\n")
    docs = _docs(_read(p, "jsonl", text_key="content", id_key="uid")[0])
    assert docs == [{"id": "u1", "text": "hello", "text_meta": 1, "source": "src"}]


def test_enormous_record_is_an_error_and_reading_goes_on(tmp_path):
    p = tmp_path / "big.jsonl"
    big = json.dumps({"text": "x" * 50_000})
    p.write_text("\n".join([_lines(1)[0], big, _lines(1, seed=1)[0]]) + "\n")
    recs, _, _ = _read(p, "jsonl", max_doc_bytes=10_000)
    assert len(_docs(recs)) == 2
    [e] = _errors(recs)
    assert e.kind == "too_large" and e.location == {"line": 2} and e.nbytes == len(big) + 1


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_jsonl_keeps_what_came_before(tmp_path, suffix):
    lines = _lines(3000)
    raw = ("\n".join(lines) + "\n").encode()
    data = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    whole = tmp_path / f"whole.jsonl{suffix}"
    whole.write_bytes(data)
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    recs, _, _ = _read(whole, "jsonl")
    assert len(_docs(recs)) == 3000 and not _errors(recs)
    recs, _, _ = _read(cut, "jsonl")
    docs, errs = _docs(recs), _errors(recs)
    assert 0 < len(docs) < 3000
    assert [d["meta"]["i"] for d in docs] == list(range(len(docs)))  # no partial line passed on
    assert len(errs) == 1 and errs[0].kind == "truncated" and errs[0].location == {"line": len(docs) + 1}


def test_multi_frame_zstd(tmp_path):
    lines = _lines(10)
    c = zstandard.ZstdCompressor()
    p = tmp_path / "m.jsonl.zst"
    p.write_bytes(c.compress(("\n".join(lines[:4]) + "\n").encode()) + c.compress(("\n".join(lines[4:]) + "\n").encode()))
    assert len(_docs(_read(p, "jsonl")[0])) == 10


@pytest.mark.parametrize("suffix", [".bz2", ".xz"])
def test_truncated_bz2_and_xz_keep_the_complete_lines(tmp_path, suffix):
    import bz2
    import lzma

    raw = ("\n".join(_lines(3000)) + "\n").encode()
    data = bz2.compress(raw, 1) if suffix == ".bz2" else lzma.compress(raw)  # bz2: 100 kB blocks
    cut = data[: len(data) // 2]
    # what survives, by the stdlib decompressor alone: the complete lines of the cut stream's output
    d = bz2.BZ2Decompressor() if suffix == ".bz2" else lzma.LZMADecompressor()
    survivors = d.decompress(cut).split(b"\n")[:-1]
    assert 0 < len(survivors) < 3000
    (tmp_path / f"whole.jsonl{suffix}").write_bytes(data)
    (tmp_path / f"cut.jsonl{suffix}").write_bytes(cut)
    recs, _, _ = _read(tmp_path / f"whole.jsonl{suffix}", "jsonl")
    assert len(_docs(recs)) == 3000 and not _errors(recs)
    recs, _, _ = _read(tmp_path / f"cut.jsonl{suffix}", "jsonl")
    assert [d["text"] for d in _docs(recs)] == [json.loads(line)["text"] for line in survivors]
    [e] = _errors(recs)
    assert e.kind == "truncated" and e.location == {"line": len(survivors) + 1}


def test_a_nul_byte_is_one_line_s_error_not_the_file_s(tmp_path):
    lines = _lines(6)
    p = tmp_path / "nul.jsonl"
    p.write_bytes("\n".join(lines[:2]).encode() + b'\n{"text": "a raw \x00 byte"}\n' + "\n".join(lines[2:]).encode() + b"\n")
    recs, _, _ = _read(p, "jsonl")
    assert [d["meta"]["i"] for d in _docs(recs)] == list(range(6))
    [e] = _errors(recs)
    assert (e.kind, e.location, e.reason) == ("invalid_json", {"line": 3}, "invalid JSON: NUL byte at byte 16")
    # a line longer than the 8 kB head with a NUL byte in it: still that line's error only
    q = tmp_path / "long.jsonl"
    q.write_bytes(b'{"text": "' + b"y" * 9000 + b'\x00"}\n' + lines[0].encode() + b"\n")
    recs, _, _ = _read(q, "jsonl")
    assert len(_docs(recs)) == 1 and [e.kind for e in _errors(recs)] == ["invalid_json"]
    # a NUL byte in a head with no record-like line, or NUL bytes an eighth of the head: binary
    for name, data in [("one.jsonl", b"\x01\x02\x00\x03 not json\n{nor this\n"),
                       ("padded.jsonl", lines[0].encode() + b"\n" + b"\x00" * 2000)]:
        (tmp_path / name).write_bytes(data)
        recs, _, _ = _read(tmp_path / name, "jsonl")
        assert [e.kind for e in recs] == ["binary_file"], name


def test_empty_and_binary_files(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty2.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "bin.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4)
    recs, _, shards = _read(tmp_path, "jsonl")
    assert len(shards) == 3
    assert sorted(e.kind for e in recs) == ["binary_file", "empty_file", "empty_file"]
    assert all(isinstance(r, R.ReadError) for r in recs)


def test_missing_input_is_an_error_before_reading(tmp_path):
    with pytest.raises(R.InputError, match="does not exist"):
        R.plan_input(str(tmp_path / "nope.jsonl"), "jsonl", "s", R.JsonlOptions())
    with pytest.raises(R.InputError, match="matches no file"):
        R.plan_input(str(tmp_path / "*.jsonl"), "jsonl", "s", R.JsonlOptions())


def test_a_clean_output_directory_gives_its_documents_and_hidden_files_are_skipped(tmp_path):
    """`danlu mix --input web=clean/web`: the documents, not report.json, errors.jsonl or .state/."""
    out = tmp_path / "web"
    (out / "documents").mkdir(parents=True)
    (out / ".state").mkdir()
    dio.write_jsonl(str(out / "documents" / "part-00000-0000.jsonl.gz"), [{"id": "a", "text": "kept"}])
    dio.write_jsonl(str(out / "documents" / ".tmp.part-00001-0000.jsonl.gz"), [{"id": "b", "text": "half"}])
    dio.write_jsonl(str(out / "errors.jsonl"), [{"file": "x", "kind": "invalid_json"}])
    (out / "report.json").write_text('{\n "documents_in": 1\n}\n')
    (out / ".state" / "shard-00000.json").write_text("{}")
    files = R.list_files(str(out), R.READERS["jsonl"].suffixes)
    assert [rel for _, rel in files] == ["part-00000-0000.jsonl.gz"]
    docs = [rec for s in R.plan_inputs([str(out)]) for rec in R.read_shard(s)]
    assert [d["id"] for d in docs] == ["a"]


def test_fsspec_memory_url_and_glob():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a/x.jsonl", b'{"text": "from memory"}\n')
    fs.pipe("/corpus/b/y.jsonl.gz", gzip.compress(b'{"text": "gz in memory"}\n'))
    try:
        recs, _, shards = _read("memory://corpus/*/*", "jsonl")
        assert [d["text"] for d in _docs(recs)] == ["from memory", "gz in memory"]
        assert [s.files[0] for s in shards] == [("memory:///corpus/a/x.jsonl", "a/x.jsonl"),
                                                ("memory:///corpus/b/y.jsonl.gz", "b/y.jsonl.gz")]
        assert R.guess_reader("memory://corpus/a") == "jsonl"
    finally:
        fs.rm("/corpus", recursive=True)


def test_parquet_batched_with_columns_and_json_safe_values(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 2500
    table = pa.table({"body": [f"row {i}" for i in range(n)], "id": [f"r{i}" for i in range(n)],
                      "when": [datetime.date(2024, 1, 1 + i % 28) for i in range(n)],
                      "score": [float("nan") if i == 3 else i / 2 for i in range(n)]})
    p = tmp_path / "t.parquet"
    pq.write_table(table, p, row_group_size=700)
    recs, _, _ = _read(p, "parquet", text_column="body", batch_size=300)
    docs = _docs(recs)
    assert len(docs) == n and docs[5] == {"text": "row 5", "id": "r5", "when": "2024-01-06", "score": 2.5,
                                          "source": "src"}
    assert docs[3]["score"] is None  # NaN is not JSON
    json.dumps(docs)  # everything serialisable
    with pytest.raises(R.InputError, match="no column 'text'"):
        _read(p, "parquet")


# ---------------------------------------------------------------------------------------------
# WARC / WET


def _warc_bytes(records):
    """A WARC file (one gzip member per record, like Common Crawl) from (type, uri, payload, http) tuples."""
    from fastwarc.warc import WarcRecord, WarcRecordType

    out = io.BytesIO()
    for kind, uri, payload in records:
        r = WarcRecord()
        r.init_headers(getattr(WarcRecordType, kind))
        r.headers["WARC-Target-URI"] = uri
        r.headers["Content-Type"] = "application/http; msgtype=response" if kind == "response" else "text/plain"
        r.set_bytes_content(payload)
        buf = io.BytesIO()
        r.write(buf)
        out.write(gzip.compress(buf.getvalue()))
    return out.getvalue()


def _http(body: bytes, ctype="text/html; charset=utf-8", status="200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n\r\n".encode() + body


PAGE = (b"<html><head><title>Caf\xc3\xa9 news</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>About"
        b"</a></nav><article><h1>Main story</h1><p>The town council met on Tuesday to discuss the new library."
        b"</p><p>Residents asked many questions about opening hours and the budget.</p></article>"
        b"<footer>Copyright 2024 | Privacy</footer></body></html>")


def test_warc_response_and_wet_records(tmp_path):
    data = _warc_bytes([
        ("response", "http://a/1", _http(PAGE)),
        ("response", "http://a/img", _http(b"\x89PNG", ctype="image/png")),
        ("response", "http://a/missing", _http(b"<html>404</html>", status="404 Not Found")),
        ("response", "http://a/latin", _http("<p>Gr\u00fc\u00dfe aus K\u00f6ln</p>".encode("latin-1"),
                                             ctype="text/html; charset=iso-8859-1")),
        ("conversion", "http://a/1", "Plain text from WET. Caf\u00e9.".encode()),
    ])
    p = tmp_path / "x.warc.gz"
    p.write_bytes(data)
    recs, _, _ = _read(p, "warc", source="cc")
    docs = _docs(recs)
    skipped = [r.reason for r in recs if isinstance(r, R.Skipped)]
    assert skipped == ["warc:not_html", "warc:not_ok_status"]
    html_doc, latin, wet = docs
    assert html_doc["url"] == "http://a/1" and html_doc["text"] == "" and "Main story" in html_doc["html"]
    assert html_doc["warc"]["status"] == 200 and html_doc["warc"]["content_type"] == "text/html"
    assert html_doc["id"] == html_doc["warc"]["record_id"] and len(html_doc["id"]) == 36
    assert "Grüße aus Köln" in latin["html"]  # the HTTP charset is honoured
    assert wet["text"] == "Plain text from WET. Café." and "html" not in wet

    from data_pipeline.extract import HtmlExtract

    out = HtmlExtract().apply(html_doc)
    assert "html" not in out and out["title"] == "Café news"
    assert "The town council met on Tuesday" in out["text"] and "Residents asked" in out["text"]
    assert "Home" not in out["text"] and "Privacy" not in out["text"]  # boilerplate removed
    assert HtmlExtract().apply(wet) is wet  # no html: passed through
    assert HtmlExtract().apply({**html_doc, "html": "<html><body></body></html>"}).reason == "html_extract:empty"


def test_truncated_warc_reports_the_cut_record(tmp_path):
    data = _warc_bytes([("conversion", f"http://a/{i}", f"document number {i} ".encode() * 50) for i in range(6)])
    p = tmp_path / "cut.warc.gz"
    p.write_bytes(data[: len(data) - 20])  # inside the last record's gzip member
    recs, _, _ = _read(p, "warc", records=("conversion",))
    docs, errs = _docs(recs), _errors(recs)
    assert [d["url"] for d in docs] == [f"http://a/{i}" for i in range(5)]
    assert all(d["text"] == f"document number {i} " * 50 for i, d in enumerate(docs))
    assert len(errs) == 1 and errs[0].kind == "truncated" and errs[0].location["offset"] > 0


# ---------------------------------------------------------------------------------------------
# Books and code


GUTENBERG = """\ufeffThe Project Gutenberg eBook of A Small Tale

This ebook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost and with almost no restrictions.

Title: A Small Tale

Author: Jane Writer

Language: English

*** START OF THE PROJECT GUTENBERG EBOOK A SMALL TALE ***

CHAPTER I.

It was a bright cold day in April, and the clocks were striking thirteen.

*** END OF THE PROJECT GUTENBERG EBOOK A SMALL TALE ***

Section 1. General Terms of Use and Redistributing Project Gutenberg-tm
electronic works. Updated editions will replace the previous one.
"""


def test_books_gutenberg_stripped_one_file_one_document(tmp_path):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    (d / "tale.txt").write_text(GUTENBERG)
    (d / "sub" / "plain.txt").write_text("Just a plain text book.\nSecond line.\n")
    (d / "notes.md").write_text("not a .txt file")
    recs, counters, _ = _read(d, "books", source="gutenberg")
    plain, tale = _docs(recs)  # sorted by relative path: sub/plain.txt < tale.txt
    assert tale["path"] == "tale.txt" and plain["path"] == "sub/plain.txt"
    assert tale["text"] == "CHAPTER I.\n\nIt was a bright cold day in April, and the clocks were striking thirteen.\n"
    assert tale["gutenberg"] == {"title": "A Small Tale", "author": "Jane Writer", "language": "English"}
    assert plain["text"] == "Just a plain text book.\nSecond line.\n" and "gutenberg" not in plain
    assert counters["gutenberg_stripped"] == 1
    # no START marker: unchanged
    assert R.strip_gutenberg("no markers here") == ("no markers here", {})


def test_code_tree_languages_and_skips(tmp_path):
    repo = tmp_path / "myrepo"
    files = {
        "src/app.py": "def main():\n    return 1\n",
        "src/util.ts": "export const x = 1;\n",
        "Makefile": "all:\n\techo hi\n",
        "node_modules/lib/index.js": "module.exports = 1;\n",
        "third_party/zlib/zlib.c": "int x;\n",
        "README.unknownext": "what\n",
        "big.py": "x = 1\n" * 500,
        "empty.py": "",
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    (repo / "logo.c").write_bytes(b"\x89PNG\0\0binary")
    (repo / "latin.py").write_bytes(b"# caf\xe9\n")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    recs, _, shards = _read(repo, "code", source="code", max_file_bytes=1000, files_per_shard=4)
    assert len(shards) == 3  # 10 files (.git pruned) in shards of 4
    docs = {d["path"]: d for d in _docs(recs)}
    assert sorted(docs) == ["Makefile", "src/app.py", "src/util.ts"]
    assert docs["src/app.py"]["language"] == "python" and docs["src/app.py"]["repository"] == "myrepo"
    assert docs["Makefile"]["language"] == "makefile" and docs["src/util.ts"]["language"] == "typescript"
    skipped = Counter(r.reason for r in recs if isinstance(r, R.Skipped))
    assert skipped == {"code_tree:vendored": 2, "code_tree:binary": 2, "code_tree:oversized": 1,
                       "code_tree:unknown_extension": 1, "code_tree:empty": 1}
    assert not _errors(recs)


def test_code_tree_layout_repos(tmp_path):
    for repo in ("r1", "r2"):
        (tmp_path / repo).mkdir()
        (tmp_path / repo / "main.go").write_text("package main\n")
    docs = _docs(_read(tmp_path, "code", layout="repos")[0])
    assert [(d["repository"], d["path"], d["language"]) for d in docs] == [("r1", "main.go", "go"),
                                                                         ("r2", "main.go", "go")]


# ---------------------------------------------------------------------------------------------
# TFDS

TFDS_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds


class CleanTestTiny(tfds.core.GeneratorBasedBuilder):
    """A dataset built inside the test: nothing is downloaded."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "n": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"text": f"example {i} caf\\u00e9", "n": i}
'''


@pytest.fixture(scope="module")
def tfds_dataset(tmp_path_factory):
    """(builder module path, data_dir) of a tiny TFDS dataset prepared in a temp dir."""
    from data_pipeline.clean import import_modules

    root = tmp_path_factory.mktemp("tfds")
    module = root / "clean_test_tiny.py"
    module.write_text(TFDS_BUILDER)
    import_modules([str(module)])
    import tensorflow_datasets as tfds

    tfds.builder("clean_test_tiny", data_dir=str(root / "data"), file_format="array_record").download_and_prepare()
    return str(module), str(root / "data")


def test_tfds_reader(tfds_dataset):
    _, data_dir = tfds_dataset
    recs, _, shards = _read("clean_test_tiny", "tfds", source="tfds", data_dir=data_dir, examples_per_shard=3)
    assert [s.span for s in shards] == [(0, 3), (3, 6), (6, 7)]
    docs = _docs(recs)
    assert len(docs) == 7 and not _errors(recs)
    assert sorted(d["n"] for d in docs) == list(range(7))
    assert all(d["text"] == f"example {d['n']} café" and d["source"] == "tfds" for d in docs)
    assert docs[0]["id"] == "clean_test_tiny/train/0"
    test_docs = _docs(_read("clean_test_tiny", "tfds", data_dir=data_dir, split="test")[0])
    assert len(test_docs) == 2


def test_tfds_unprepared_or_unknown_is_an_error(tfds_dataset, tmp_path):
    with pytest.raises(R.InputError, match="no prepared split 'train'"):
        _read("clean_test_tiny", "tfds", data_dir=str(tmp_path / "empty"))
    with pytest.raises(R.InputError, match="no prepared split 'validation'"):
        _read("clean_test_tiny", "tfds", data_dir=tfds_dataset[1], split="validation")
    with pytest.raises(R.InputError, match="tfds dataset 'no_such_dataset_xyz'"):
        _read("no_such_dataset_xyz", "tfds")


@pytest.mark.parametrize("command", ["mix", "dedup"])
def test_a_mix_or_dedup_output_directory_gives_its_documents(tmp_path, command):
    """`danlu tokenize --input mixed/`: the documents of the parts, not mix.json, report.json,
    clusters.jsonl or errors.jsonl (each of which would be read as bad records)."""
    from danlu.cli import main

    src = tmp_path / "web.jsonl"
    texts = [f"document number {i} " + "word " * (5 + i) for i in range(12)] + ["document number 0 " + "word " * 5]
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)) + "not json\n")
    out = tmp_path / command
    args = ["--input", f"web={src}", "--epochs", "web=1", "--shards", "2"] if command == "mix" else ["--input", str(src)]
    assert main([command, *args, "--output", str(out)]) == 0
    parts = sorted(out.glob("mix-*.jsonl" if command == "mix" else "kept-*.jsonl"))
    expected = [d["id"] for p in parts for d in dio.read_jsonl(str(p))]
    assert expected and len(expected) < len(texts) + (command == "mix")  # dedup drops the copy; mix the bad line
    errors: list = []
    docs = [doc for _, doc in R.read_documents(R.plan_inputs([str(out)]), errors)]
    assert sorted(d["id"] for d in docs) == sorted(expected) and errors == []
