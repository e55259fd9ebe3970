"""Fault injection: every command that reads documents, on a corpus with every reading fault.

The expected documents and errors.jsonl rows come from tests/fault_corpus.py, which computes
them without the project's readers (zlib / zstandard on the cut bytes, a WARC parser of its own,
the list of planted lines). Each test compares the command's output files with that oracle, as
sets of ids and texts, never with the command's own counters.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml
import zstandard

import fault_corpus as F

LIMIT = ["--max-doc-bytes", str(F.MAX_DOC_BYTES)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> F.FaultCorpus:
    return F.build(tmp_path_factory.mktemp("faults"))


# ---------------------------------------------------------------------------------------------
# Helpers: run a command in-process, read what it wrote (without the project's readers)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `danlu ARGV`; an argparse error is exit code 2."""
    from danlu.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def assert_ok(rc: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    assert rc == 0, f"exit code {rc}; stderr: {err.strip()[-2000:]}"


def read_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return [json.loads(line) for line in raw.split(b"\n") if line.strip()]


def read_docs(paths) -> list[dict]:
    return [d for p in sorted(paths) for d in read_lines(Path(p))]


def assert_docs(docs: list[dict], expected: F.Expected) -> None:
    """Exactly the expected documents, each once, with its text unchanged."""
    ids = Counter(d["id"] for d in docs)
    assert not [i for i, n in ids.items() if n > 1], "documents written more than once"
    got = {d["id"]: d["text"] for d in docs}
    missing, extra = sorted(set(expected.docs) - set(got)), sorted(set(got) - set(expected.docs))
    assert not missing and not extra, f"{len(got)} documents, expected {len(expected.docs)}; " \
                                      f"missing {missing[:8]}, unexpected {extra[:8]}"
    assert got == expected.docs, "texts differ from the input's"


def assert_rows(rows: list[dict], expected: F.Expected, kinds: bool = True) -> None:
    """One errors.jsonl row per planted bad line and per cut file; the planted lines by number."""
    def where(r):
        return os.path.basename(str(r.get("file", ""))), r.get("line")

    assert len(rows) == len(expected.rows), \
        f"{len(rows)} error rows, expected {len(expected.rows)}: {sorted(map(where, rows), key=str)}"
    planted = sorted((r.file, r.line) for r in expected.rows if r.file == "good.jsonl")
    assert sorted(where(r) for r in rows if where(r)[0] == "good.jsonl") == planted
    per_file = Counter(where(r)[0] for r in rows)
    assert per_file == Counter(r.file for r in expected.rows)
    if kinds:
        fixed = {(r.file, r.line) for r in expected.rows if r.kind is not None}
        got = Counter(r.get("kind") for r in rows if where(r) in fixed or where(r)[0] != "good.jsonl")
        assert got == expected.kinds()


def clean_job(path: Path, inputs: list[dict]) -> str:
    job = {"name": "faults", "inputs": inputs, "steps": [], "output": {"compression": "gz"}, "workers": 1}
    path.write_text(yaml.safe_dump(job))
    return str(path)


def all_inputs(c: F.FaultCorpus) -> list[dict]:
    return ([{"path": p, "reader": "jsonl", "source": "web"} for p in c.jsonl_files]
            + [{"path": str(c.cut_warc), "reader": "warc", "source": "cc", "options": {"records": ["conversion"]}}])


def clean(cfg: str, out: Path | str, *extra: str) -> tuple[int, str, str]:
    return run_cli(["clean", cfg, f"readers.max_doc_bytes={F.MAX_DOC_BYTES}", "--output", str(out),
                    "--workers", "1", "--no-progress", *extra])


# ---------------------------------------------------------------------------------------------
# danlu clean: local runner, Beam runner, the same report


@pytest.fixture(scope="module")
def local_clean(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("clean_local")
    cfg = clean_job(d / "job.yaml", all_inputs(corpus))
    return (*clean(cfg, d / "out"), d / "out", cfg)


def _check_clean_output(out: Path, corpus: F.FaultCorpus) -> dict:
    expected = corpus.jsonl + corpus.warc
    assert_docs(read_docs(out.glob("documents/*.jsonl*")), expected)
    assert_rows(read_lines(out / "errors.jsonl"), expected)
    rep = json.loads((out / "report.json").read_text())
    n_docs, n_err = len(expected.docs), len(expected.rows)
    assert (rep["documents_in"], rep["documents_out"], rep["errors"], rep["dropped"]) == \
        (n_docs + n_err, n_docs, n_err, {})
    assert rep["error_kinds"].get("truncated") == expected.kinds()["truncated"]
    web, cc = corpus.jsonl, corpus.warc
    assert {s: (c["documents_out"], c["errors"]) for s, c in rep["per_source"].items()} == \
        {"web": (len(web.docs), len(web.rows)), "cc": (len(cc.docs), len(cc.rows))}
    assert rep["accounted"]
    assert not rep.get("warnings"), rep["warnings"]  # every input has its right reader
    return rep


def test_clean_local_keeps_every_good_document_and_one_row_per_fault(local_clean, corpus):
    rc, out, err, out_dir, _ = local_clean
    assert_ok(rc, out, err)
    _check_clean_output(out_dir, corpus)


def test_clean_beam_gives_the_same_documents_errors_and_report(local_clean, corpus, tmp_path):
    pytest.importorskip("apache_beam")
    rc_local, _, _, local_out, cfg = local_clean
    rc, out, err = clean(cfg, tmp_path / "beam", "--runner", "beam", "--", "--runner=DirectRunner")
    assert_ok(rc, out, err)
    assert rc_local == 0
    # first the runners against each other, then both against the oracle
    rep_local = json.loads((local_out / "report.json").read_text())
    rep_beam = json.loads((tmp_path / "beam" / "report.json").read_text())
    runner_specific = {"run", "files", "rejected_files", "shards"}  # file names, timing, shard count
    a = {k: v for k, v in rep_local.items() if k not in runner_specific}
    b = {k: v for k, v in rep_beam.items() if k not in runner_specific}
    assert sorted(a) == sorted(b), f"only local: {sorted(set(a) - set(b))}, only beam: {sorted(set(b) - set(a))}"
    assert {k: a[k] for k in a if a[k] != b[k]} == {k: b[k] for k in a if a[k] != b[k]}
    assert sorted(map(json.dumps, read_lines(local_out / "errors.jsonl"))) == \
        sorted(map(json.dumps, read_lines(tmp_path / "beam" / "errors.jsonl")))
    assert sorted(json.dumps(d, sort_keys=True) for d in read_docs(local_out.glob("documents/*.jsonl*"))) == \
        sorted(json.dumps(d, sort_keys=True) for d in read_docs((tmp_path / "beam").glob("documents/*.jsonl*")))
    _check_clean_output(tmp_path / "beam", corpus)


# ---------------------------------------------------------------------------------------------
# The other commands that read JSONL documents: tokenize, dedup, mix, quality score


def test_tokenize_encodes_every_good_document(corpus, tmp_path):
    d = tmp_path / "tok"
    rc, out, err = run_cli(["tokenize", "--input", *corpus.jsonl_files, "--output", str(d), "--train-model",
                            "--vocab-size", "400", "--sample-docs", "1000", "--train-threads", "1",
                            "--num-shards", "2", "--eval-fraction", "0.1", "--workers", "1", *LIMIT])
    assert_ok(rc, out, err)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["documents"] == len(corpus.jsonl.docs)
    assert manifest["errors"]["count"] == len(corpus.jsonl.rows)
    assert_rows(read_lines(d / "errors.jsonl"), corpus.jsonl)


def test_dedup_keeps_every_good_document(corpus, tmp_path):
    d = tmp_path / "dedup"
    rc, out, err = run_cli(["dedup", "--input", *corpus.jsonl_files, "--output", str(d), *LIMIT])
    assert_ok(rc, out, err)
    assert_docs(read_docs(d.glob("kept-*.jsonl*")), corpus.jsonl)  # distinct texts: no near-duplicates
    assert_rows(read_lines(d / "errors.jsonl"), corpus.jsonl)


def test_mix_writes_every_good_document_once(corpus, tmp_path):
    d = tmp_path / "mix"
    rc, out, err = run_cli(["mix", "--input", *corpus.jsonl_files, "--epochs", f"{F.SOURCE}=1", "--shards", "2",
                            "--output", str(d), *LIMIT])
    assert_ok(rc, out, err)
    docs = read_docs(d.glob("mix-*.jsonl*"))
    assert not [x for x in docs if "repeat" in x]
    assert_docs(docs, corpus.jsonl)
    assert_rows(read_lines(d / "errors.jsonl"), corpus.jsonl)


def test_quality_score_scores_every_good_document(corpus, tmp_path):
    pos, neg = tmp_path / "pos.jsonl", tmp_path / "neg.jsonl"
    pos.write_text("".join(json.dumps(F.good_doc(300 + k, "pos")) + "\n" for k in range(40)))
    neg.write_text("".join(json.dumps({"id": f"neg-{k}", "text": t}) + "\n" for k, t in enumerate(F.junk_texts(40))))
    model = tmp_path / "model" / "q"
    assert_ok(*run_cli(["quality", "train", "--positive", str(pos), "--negative", str(neg), "--output", str(model),
                        "--features", "4096"]))
    d = tmp_path / "scored"
    d.mkdir()
    rc, out, err = run_cli(["quality", "score", "--model", str(model), "--input", *corpus.jsonl_files,
                            "--output", str(d / "scored.jsonl"), *LIMIT])
    assert_ok(rc, out, err)
    docs = read_lines(d / "scored.jsonl")
    assert_docs(docs, corpus.jsonl)
    assert all(0.0 <= x["quality_score"] <= 1.0 for x in docs)
    error_files = sorted(p for p in d.iterdir() if "error" in p.name)
    assert len(error_files) == 1, f"expected one errors file next to the output, found {os.listdir(d)}"
    assert_rows(read_lines(error_files[0]), corpus.jsonl)


# ---------------------------------------------------------------------------------------------
# Readers of evaluation text: `danlu eval` on JSONL, decontamination's evaluation sets.
# No max_doc_bytes is set here, so the over-long record is an ordinary document.

JSONL_NAMES = ["good.jsonl", "cut.jsonl.gz", "cut.jsonl.zst"]


def _unlimited(c: F.FaultCorpus) -> F.Expected:
    return c.without_limit("good.jsonl") + c.per_file["cut.jsonl.gz"] + c.per_file["cut.jsonl.zst"]


def _kind(e) -> str:
    return e["kind"] if isinstance(e, dict) else e.kind


@pytest.mark.parametrize("reader", ["eval", "decontam"])
def test_evaluation_text_readers_yield_exactly_the_good_texts(corpus, reader):
    from data_pipeline.dedup.decontam import load_eval_texts
    from danlu.evaluate import document_texts

    read = (lambda p: list(document_texts()(p, []))) if reader == "eval" else load_eval_texts
    texts = [t for name in JSONL_NAMES for t in read(str(corpus.dir / name))]
    assert len(texts) == len(set(texts)) and set(texts) == set(_unlimited(corpus).docs.values())


@pytest.mark.parametrize("reader", ["eval", "decontam"])
def test_evaluation_text_readers_count_the_errors(corpus, reader):
    """The errors are handed to an `errors` list, as tokenize's and dedup's document iterators do."""
    from data_pipeline.dedup.decontam import load_eval_texts
    from danlu.evaluate import document_texts

    errors: list = []
    for name in JSONL_NAMES:
        path = str(corpus.dir / name)
        if reader == "eval":
            list(document_texts()(path, errors))
        else:
            load_eval_texts(path, errors=errors)
    expected = _unlimited(corpus)
    assert len(errors) == len(expected.rows)
    assert not expected.kinds() - Counter(_kind(e) for e in errors)  # the NUL line's kind is not fixed


# ---------------------------------------------------------------------------------------------
# danlu clean: a wrong reader, output URLs


def test_clean_with_the_wrong_reader_warns_and_fails_when_nothing_was_read(corpus, tmp_path):
    wrong = {"path": str(corpus.good), "reader": "warc", "source": "web", "options": {"records": ["conversion"]}}
    cfg = clean_job(tmp_path / "wrong.yaml", [wrong])
    rc, out, err = clean(cfg, tmp_path / "wrong")
    assert "Traceback" not in out + err
    assert rc != 0, "no record of any input could be read: the exit code must say so"
    rep = json.loads((tmp_path / "wrong" / "report.json").read_text())
    warnings = rep.get("warnings")
    assert isinstance(warnings, list) and warnings, f"report.json has no warnings: {sorted(rep)}"
    assert any(corpus.good.name in w and "jsonl" in w for w in warnings), warnings
    assert corpus.good.name in out + err and "jsonl" in out + err  # said on the console too

    # one wrong input next to a readable one: the warning stays, the job succeeds
    ok = all_inputs(corpus)[-1]
    cfg = clean_job(tmp_path / "mixed.yaml", [wrong, ok])
    rc, out, err = clean(cfg, tmp_path / "mixed")
    assert_ok(rc, out, err)
    assert_docs(read_docs((tmp_path / "mixed").glob("documents/*.jsonl*")), corpus.warc)
    rep = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert any(corpus.good.name in w and "jsonl" in w for w in rep.get("warnings", [])), rep.get("warnings")


def test_clean_output_urls(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder named "file:" would appear here
    cfg = clean_job(tmp_path / "job.yaml", [{"path": str(corpus.cut_gz), "reader": "jsonl", "source": "web"}])
    rc, out, err = clean(cfg, f"file://{tmp_path / 'via_url'}")  # a str: Path would fold the "//"
    assert_ok(rc, out, err)
    assert not (tmp_path / "file:").exists(), "wrote into a folder called 'file:'"
    assert_docs(read_docs((tmp_path / "via_url").glob("documents/*.jsonl*")), corpus.per_file["cut.jsonl.gz"])
    assert (tmp_path / "via_url" / "report.json").exists()

    rc, out, err = clean(cfg, "memory://x")
    assert rc == 2 and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and "memory://x" in err, err
