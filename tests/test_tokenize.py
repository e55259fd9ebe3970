"""Tokenizer training, token shards and their manifest, JSONL io, the demo corpus."""
import argparse
import gzip
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
from array_record.python import array_record_module

from data_pipeline import demo_corpus
from danlu.base import fs as dio
from data_pipeline import readers as R
from data_pipeline import tokenize as tok
from truncated import assert_one_truncated_row, read_rows, write_cut_gz, write_cut_zst

WORDS = ("the of and to in is for that with as on by this data model token shard loss step "
         "def return import class self if else for while None True False print").split()
UNICODE = ["naïve", "café", "中文", "日本語", "Ελληνικά", "🙂", "ß"]


def make_docs(n, seed=0, prefix="doc"):
    """n deterministic documents mixing prose, code-like lines (indentation, tabs) and Unicode."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 8)):
            words = [rng.choice(WORDS if rng.random() > 0.05 else UNICODE) for _ in range(rng.randint(1, 14))]
            indent = rng.choice(["", "", "    ", "        ", "\t"])
            lines.append(indent + " ".join(words))
        docs.append({"id": f"{prefix}{i}", "text": "\n".join(lines) + rng.choice(["", "\n"]),
                     "source": "code" if i % 3 == 0 else "web", "extra": i})
    return docs


def write_docs(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(120)
    return write_docs(d / "docs.jsonl", docs), docs


@pytest.fixture(scope="module")
def model(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "sp")
    return tok.train_tokenizer([corpus[0]], prefix, vocab_size=400, sample_docs=1000)


def read_shard(path):
    r = array_record_module.ArrayRecordReader(path)
    recs = r.read_all()
    r.close()
    return [np.frombuffer(x, dtype="<u4") for x in recs]


# ----------------------------------------------------------------------------- tokenizer

def test_special_ids_and_roundtrip(model, corpus):
    sp = spm.SentencePieceProcessor(model_file=model)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    texts = [d["text"] for d in corpus[1][:10]] + [
        "  leading spaces, trailing\t\n", "unseen: Ünïcödé ✓ 漢字 🚀 \u2028 done", "x\n\n\n    y", ""]
    for text in texts:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert sp.unk_id() not in ids  # byte fallback: nothing is unknown


def test_training_is_deterministic(corpus, tmp_path):
    a = tok.train_tokenizer([corpus[0]], str(tmp_path / "a"), vocab_size=350, sample_docs=50, seed=1)
    b = tok.train_tokenizer([corpus[0]], str(tmp_path / "b"), vocab_size=350, sample_docs=50, seed=1)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_sample_is_order_independent(corpus, tmp_path):
    docs = corpus[1]
    rev = write_docs(tmp_path / "rev.jsonl", docs[::-1])
    assert tok.sample_documents([corpus[0]], 30, seed=3) == tok.sample_documents([rev], 30, seed=3)
    assert tok.sample_documents([corpus[0]], 30, seed=3) != tok.sample_documents([corpus[0]], 30, seed=4)


def test_training_chunks_keep_lines_and_bytes():
    text = "a" * 10 + "\n" + "b" * 5 + "\n" + "é" * 40 + "\nlast"
    chunks = list(tok._training_chunks(text, max_bytes=32))
    assert "".join(chunks) == text
    assert all(len(c.encode()) <= 32 for c in chunks)


# ----------------------------------------------------------------------------- shards

@pytest.fixture(scope="module")
def shards(corpus, model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    manifest = tok.encode_to_shards([corpus[0]], out, model, num_shards=3, eval_fraction=0.1, workers=1)
    return out, manifest


def test_shards_match_manifest(shards, corpus, model):
    out, m = shards
    assert m == json.load(open(os.path.join(out, "manifest.json")))
    assert m["eos_appended"] is False and m["eos_id"] == 3 and m["pad_id"] == 0 and m["bos_id"] == 2
    assert m["tokenizer"]["sha256"] == tok.sha256_file(os.path.join(out, "tokenizer.model"))
    assert m["tokenizer"]["sha256"] == tok.sha256_file(model)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, m["tokenizer"]["path"]))
    assert m["vocab_size"] == sp.vocab_size()
    texts = {d["id"]: d["text"] for d in corpus[1]}
    decoded = []
    for sh in m["shards"]:
        recs = read_shard(os.path.join(out, sh["path"]))
        lengths = np.load(os.path.join(out, sh["lengths"]))
        assert len(recs) == sh["documents"] == len(lengths)
        assert [len(r) for r in recs] == lengths.tolist()
        assert sum(map(len, recs)) == sh["tokens"]
        assert sum(s["documents"] for s in sh["sources"].values()) == sh["documents"]
        assert sum(s["tokens"] for s in sh["sources"].values()) == sh["tokens"]
        assert all(r.max() < m["vocab_size"] and m["eos_id"] not in r for r in recs)
        decoded += [sp.decode(r.tolist()) for r in recs]
    assert sorted(decoded) == sorted(texts.values())  # every document exactly once, intact
    assert m["documents"] == len(texts) and m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert m["splits"]["train"]["documents"] + m["splits"]["eval"]["documents"] == len(texts)
    assert [s["split"] for s in m["shards"]] == ["train"] * 3 + ["eval"]
    for name, src in m["sources"].items():
        assert src["documents"] == src.get("train", {}).get("documents", 0) + src.get("eval", {}).get("documents", 0)
    assert m["errors"]["count"] == 0 and open(os.path.join(out, "errors.jsonl")).read() == ""


def test_output_is_deterministic_and_independent_of_workers(shards, corpus, model, tmp_path):
    out, _ = shards
    out2 = str(tmp_path / "again")
    tok.encode_to_shards([corpus[0]], out2, model, num_shards=3, eval_fraction=0.1, workers=2)
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(out2))
    for name in names:
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(out2, name), "rb").read(), name


def test_bad_records_are_counted_and_set_aside(model, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = make_docs(4)
    lines = [json.dumps(good[0]), "{not json", json.dumps({"id": "a", "text": 5}), "",
             json.dumps({"id": "b"}), json.dumps([1, 2]), json.dumps({"text": "no id"}),
             json.dumps(good[1]), json.dumps({"id": "e", "text": ""})]
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"id": "u", "text": "\xff\xfe"}\n')
        f.write((json.dumps(good[2]) + "\n").encode())
    out = str(tmp_path / "out")
    m = tok.encode_to_shards([str(path)], out, model, num_shards=2, eval_fraction=0.0, workers=1)
    assert m["documents"] == 4  # the document without an id gets a generated one
    errs = [json.loads(x) for x in open(os.path.join(out, "errors.jsonl"))]
    # line 4 is blank: not a record; the empty text (line 9) is named by its id
    assert [(e.get("line"), e.get("id"), e["kind"]) for e in errs] == [
        (2, None, "invalid_json"), (3, None, "bad_text"), (5, None, "bad_text"), (6, None, "not_object"),
        (None, "e", "empty_text"), (10, None, "invalid_utf8")]
    assert all(e["file"] == str(path) for e in errs)
    assert m["errors"]["count"] == 6 and m["inputs"][0] == {"path": str(path), "documents": 4, "errors": 6}
    assert m["errors"]["kinds"] == {"bad_text": 2, "empty_text": 1, "invalid_json": 1, "invalid_utf8": 1,
                                    "not_object": 1}
    assert (m["documents_in"], m["documents_out"], m["dropped"]) == (10, 4, {})
    assert errs[0]["raw"] == "{not json"
    assert "eval" not in m["splits"]  # eval_fraction=0: no eval shards


def test_split_depends_only_on_id(corpus, model, tmp_path):
    docs = make_docs(300, seed=5)
    a = write_docs(tmp_path / "a.jsonl", docs)
    b = write_docs(tmp_path / "b.jsonl", docs[::-1] + make_docs(50, seed=6, prefix="more"))

    def eval_texts(out, inp, k):
        m = tok.encode_to_shards([inp], str(tmp_path / out), model, num_shards=k, eval_fraction=0.05, workers=1)
        sp = spm.SentencePieceProcessor(model_file=model)
        return {sp.decode(r.tolist()) for sh in m["shards"] if sh["split"] == "eval"
                for r in read_shard(str(tmp_path / out / sh["path"]))}

    e1 = eval_texts("one", a, 1)
    e2 = eval_texts("many", b, 7)
    assert e1 and e1 == {d["text"] for d in docs if tok.split_key(d["id"]) < 0.05}
    assert e1 <= e2  # reordered, re-sharded, grown: the old eval docs are still eval
    keys = [tok.split_key(f"id-{i}") for i in range(4000)]
    assert 0.08 < np.mean(np.array(keys) < 0.1) < 0.12


def test_split_by_a_group_field_keeps_groups_together(model, tmp_path):
    docs = make_docs(240, seed=7)
    for i, d in enumerate(docs[:200]):
        d["group"] = f"module-{i // 4}"  # 50 groups of 4; the last 40 documents have no group
    inp = write_docs(tmp_path / "g.jsonl", docs)
    m = tok.encode_to_shards([inp], str(tmp_path / "g"), model, num_shards=3, eval_fraction=0.2, workers=1,
                             split_by="group")
    sp = spm.SentencePieceProcessor(model_file=model)
    evals = {sp.decode(r.tolist()) for sh in m["shards"] if sh["split"] == "eval"
             for r in read_shard(str(tmp_path / "g" / sh["path"]))}
    expect = {d["text"] for d in docs if tok.split_key(d.get("group", d["id"])) < 0.2}
    assert evals == expect
    groups_in_eval = {d["group"] for d in docs[:200] if d["text"] in evals}
    assert groups_in_eval and all(d["text"] in evals for d in docs[:200] if d["group"] in groups_in_eval)
    assert any(d["text"] in evals for d in docs[200:])  # no group: split by its id
    assert "blake2b(group (id when absent)" in m["split_rule"]
    m_id = tok.encode_to_shards([inp], str(tmp_path / "i"), model, num_shards=3, eval_fraction=0.2, workers=1)
    assert m_id["splits"]["eval"]["documents"] != m["splits"]["eval"]["documents"]  # by id: another split


def test_small_corpus_still_gets_an_eval_document(model, tmp_path):
    docs = [d for d in make_docs(60) if tok.split_key(d["id"]) >= 0.01][:3]  # none would be eval by hash
    inp = write_docs(tmp_path / "three.jsonl", docs)
    m = tok.encode_to_shards([inp], str(tmp_path / "o3"), model, num_shards=2, workers=1)
    assert m["splits"]["eval"]["documents"] == 1 and m["splits"]["train"]["documents"] == 2
    assert m["splits"]["eval"]["tokens"] > 0
    inp1 = write_docs(tmp_path / "one.jsonl", docs[:1])
    m1 = tok.encode_to_shards([inp1], str(tmp_path / "o1"), model, num_shards=2, workers=1)
    assert m1["splits"]["train"]["documents"] == 1 and m1["splits"]["eval"]["documents"] == 0


def test_compressed_input_and_stale_shards(corpus, model, shards, tmp_path):
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(open(corpus[0], "rb").read())
    out = tmp_path / "gz"
    tok.encode_to_shards([str(gz)], str(out), model, num_shards=5, eval_fraction=0.1, workers=1)
    m = tok.encode_to_shards([str(gz)], str(out), model, num_shards=3, eval_fraction=0.1, workers=1)
    assert m["splits"] == shards[1]["splits"]
    assert not (out / "train-00004-of-00005.array_record").exists()  # an earlier run's shards are gone


def test_cli_trains_then_encodes(corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tok.add_arguments(parser)
    out = str(tmp_path / "cli")
    args = parser.parse_args(["--input", corpus[0], "--output", out, "--vocab-size", "320",
                              "--num-shards", "2", "--workers", "1"])
    assert tok.main(args) == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["tokenizer"]["path"] == "tokenizer.model" and "copied_from" not in m["tokenizer"]
    assert m["documents"] == len(corpus[1])
    bad = parser.parse_args(["--input", corpus[0], "--output", out, "--model", "x.model", "--train-model"])
    assert tok.main(bad) == 2
    missing = parser.parse_args(["--input", str(tmp_path / "nope.jsonl"), "--output", out, "--model", "x"])
    assert tok.main(missing) == 2
    assert "does not exist" in capsys.readouterr().err


def test_remote_output_is_refused_up_front(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    tok.add_arguments(parser)
    assert tok.main(parser.parse_args(["--input", corpus[0], "--output", "memory://shards"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output memory://shards" in err and "copy" in err
    assert os.listdir(tmp_path) == []  # no local folder named after the URL


@pytest.mark.parametrize("cut", [write_cut_gz, write_cut_zst])
def test_truncated_stream_keeps_complete_lines(model, tmp_path, capsys, cut):
    from danlu.cli import main

    path = tmp_path / ("docs.jsonl.gz" if cut is write_cut_gz else "docs.jsonl.zst")
    survivors = cut(path, make_docs(80, seed=3))
    out = tmp_path / "out"
    assert main(["tokenize", "--input", str(path), "--output", f"file://{out}", "--model", model,
                 "--num-shards", "1", "--eval-fraction", "0", "--workers", "1"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sorted(sp.decode(r.tolist()) for r in read_shard(str(out / "train-00000-of-00001.array_record"))) == \
        sorted(d["text"] for d in survivors)
    assert_one_truncated_row(read_rows(out / "errors.jsonl"), path, survivors)
    assert (m["documents_in"], m["documents_out"], m["errors"]["count"]) == (len(survivors) + 1, len(survivors), 1)
    assert f"{len(survivors) + 1} records in, {len(survivors)} documents out, 0 dropped, 1 set aside" in \
        capsys.readouterr().out


# ----------------------------------------------------------------------------- io

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_roundtrip_is_byte_deterministic(tmp_path, suffix):
    docs = make_docs(5) + [{"id": "u", "text": "line\u2028sep 🙂", "source": "x"}]
    a, b = str(tmp_path / ("a" + suffix)), str(tmp_path / ("b" + suffix))
    assert dio.write_jsonl(a, docs) == len(docs)
    dio.write_jsonl(b, docs)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert list(dio.read_jsonl(a)) == docs


def test_read_jsonl_strict_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "text": "t"}\n[1]\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not a JSON object"):
        list(dio.read_jsonl(str(p)))


def test_directory_and_glob_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ["b.jsonl", "a.jsonl.gz", "c.json.xz", "skip.txt"]:
        (tmp_path / "d" / name).write_text("")
    names = [s.name for s in R.plan_inputs([str(tmp_path / "d")])]
    assert names == [str(tmp_path / "d" / n) for n in ["a.jsonl.gz", "b.jsonl", "c.json.xz"]]
    assert [s.name for s in R.plan_inputs([str(tmp_path / "d" / "*.jsonl")])] == [str(tmp_path / "d" / "b.jsonl")]
    with pytest.raises(R.InputError, match="nothing"):
        R.plan_inputs([str(tmp_path / "nothing*.jsonl")])


@pytest.mark.parametrize("suffix", [".jsonl.bz2", ".jsonl.xz", ".jsonl.zst"])
def test_jsonl_roundtrip_in_every_compression(tmp_path, suffix):
    docs = make_docs(5)
    assert dio.write_jsonl(str(tmp_path / ("a" + suffix)), docs) == 5
    assert list(dio.read_jsonl(str(tmp_path / ("a" + suffix)))) == docs


def test_outputs_to_urls_and_file_urls(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.chdir(tmp_path)
    docs = make_docs(3)
    dio.write_jsonl("memory://io-test/deep/a.jsonl.gz", docs)
    dio.write_text("memory://io-test/r.json", "{}\n")
    assert list(dio.read_jsonl("memory://io-test/deep/a.jsonl.gz")) == docs
    assert fsspec.filesystem("memory").cat("/io-test/r.json") == b"{}\n"
    dio.write_jsonl(f"file://{tmp_path}/x/b.jsonl", docs)
    assert list(dio.read_jsonl(str(tmp_path / "x" / "b.jsonl"))) == docs
    assert sorted(os.listdir(tmp_path)) == ["x"]  # no folder named "file:" or "memory:"
    assert (dio.local_path("file:///a/b"), dio.local_path("a/b"), dio.local_path("gs://b/a")) == ("/a/b", "a/b", None)


def test_read_jsonl_strict_on_a_cut_stream(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    survivors = write_cut_gz(path, make_docs(60))
    with pytest.raises(ValueError, match=rf"cut\.jsonl\.gz:{len(survivors) + 1}: stream ended early"):
        list(dio.read_jsonl(str(path)))


def test_document_error():
    assert dio.document_error({"id": "a", "text": "t", "source": "s"}) is None
    assert dio.document_error({"id": 3, "text": "t"}) == "missing or non-string id"
    assert dio.document_error({"id": "a"}) == "missing text"
    assert dio.document_error({"id": "a", "text": None}).startswith("non-string text")


# ----------------------------------------------------------------------------- demo corpus

def test_demo_corpus_small(tmp_path):
    out = str(tmp_path / "demo.jsonl")
    stats = demo_corpus.build_demo_corpus(out, max_docs=12, max_bytes=400_000)
    docs = list(dio.read_jsonl(out))
    assert len(docs) == stats["documents"] <= 12
    assert set(stats["sources"]) == {"code", "docs"}
    assert stats["bytes"] == sum(len(d["text"].encode()) for d in docs) <= 400_000
    assert all(dio.document_error(d) is None and d["text"] for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    code = [d for d in docs if d["source"] == "code"]
    assert all(d["id"] == "code:" + d["path"] and d["path"].endswith(".py") for d in code)
    text = "".join(d["text"] for d in docs)
    assert " at 0x7" not in text and os.path.expanduser("~") + "/" not in text
    assert all(d["group"] == demo_corpus.module_group(d["path"]) for d in code)
    assert all(d["group"] == d["module"] for d in docs if d["source"] == "docs")


def test_demo_corpus_groups_and_packages(tmp_path):
    assert demo_corpus.module_group("json/decoder.py") == "json.decoder"
    assert demo_corpus.module_group("json/__init__.py") == "json"
    assert demo_corpus.module_group("argparse.py") == "argparse"
    files = demo_corpus.package_py_files("optax")  # a pinned dependency, found without importing it
    assert files and all(rel.startswith("optax/") and rel.endswith(".py") and os.path.isfile(path)
                         for rel, path in files)
    assert not any("/tests/" in rel or "/test/" in rel for rel, _ in files)  # test directories are skipped
    out = str(tmp_path / "p.jsonl")
    stats = demo_corpus.build_demo_corpus(out, max_docs=2000, max_bytes=600_000, packages=["optax"])
    docs = list(dio.read_jsonl(out))
    optax_docs = [d for d in docs if d.get("path", "").startswith("optax/")]
    assert optax_docs and all(d["group"].startswith("optax.") or d["group"] == "optax" for d in optax_docs)
    assert stats["bytes"] <= 600_000
    with pytest.raises(ValueError, match="package 'json' is part of the standard library"):
        demo_corpus.build_demo_corpus(out, max_bytes=1000, packages=["json"])
    with pytest.raises(ValueError, match="package 'no_such_pkg_x' is not installed"):
        demo_corpus.build_demo_corpus(out, max_bytes=1000, packages=["no_such_pkg_x"])
