"""Dedup: MinHash/LSH against planted near-duplicates of real text, spilling, determinism, CLI,
exact/URL/line dedup, decontamination, bands × rows against datasketch."""
from __future__ import annotations

import glob
import json
import os
import random
import sysconfig

import numpy as np
import pytest

from danlu.base import fs as dio
from data_pipeline.dedup import exact, lsh
from data_pipeline.dedup.decontam import Decontaminate, ngram_hashes
from data_pipeline.dedup.fuzzy import fuzzy_dedup
from data_pipeline.dedup.minhash import (MinHashConfig, MinHasher, jaccard, optimal_bands, shingle_set, shingles,
                                         words_re)
from data_pipeline.dedup.spill import RecordIndex
from data_pipeline.steps import StepError, build_step
from truncated import assert_one_truncated_row, read_rows, write_cut_gz, write_cut_zst


def real_texts(count: int, words: int = 300) -> list[str]:
    """`count` texts of `words` whitespace tokens from distinct standard-library modules,
    none a near-duplicate of another (max pairwise shingle Jaccard < 0.3)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out: list[str] = []
    sets: list[np.ndarray] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            toks = f.read().split()
        if len(toks) < words + 50:
            continue
        text = " ".join(toks[50:50 + words])  # past the licence/docstring headers
        s = shingle_set(text)
        if any(jaccard(s, t) >= 0.3 for t in sets):
            continue
        out.append(text)
        sets.append(s)
        if len(out) == count:
            return out
    raise RuntimeError("not enough standard-library files")


def edit_words(text: str, edits: int, rng: random.Random, tag: str) -> str:
    """`text` with `edits` distinct word positions replaced by new words."""
    toks = text.split()
    for k, pos in enumerate(rng.sample(range(len(toks)), edits)):
        toks[pos] = f"zq{tag}x{k}"
    return " ".join(toks)


@pytest.fixture(scope="module")
def planted():
    """Real base texts, each followed by edited copies at a spread of exact Jaccard similarities.

    Returns (docs, truth) where truth[i] is the exact Jaccard of doc i with its base (None for bases).
    """
    rng = random.Random(0)
    docs, truth = [], []
    for b, text in enumerate(real_texts(40)):
        base_set = shingle_set(text)
        docs.append({"id": f"b{b}", "text": text, "source": "code" if b % 2 else "docs"})
        truth.append(None)
        for v, edits in enumerate((1, 3, 6, 12, 25, 50)):
            t = edit_words(text, edits, rng, f"{b}_{v}_")
            docs.append({"id": f"b{b}v{v}", "text": t, "source": "code" if b % 2 else "docs"})
            truth.append(jaccard(base_set, shingle_set(t)))
    return docs, truth


def test_shingles_are_the_regex_word_ngrams():
    """Same sets as 5-grams of `words_re` words: what the benchmark feeds datasketch."""
    texts = real_texts(3) + ["Ünïcode wörds, ÇA VA? and_under_scores 42x", "one two", ""]
    for t in texts:
        w = words_re.findall(t.lower())
        grams = {" ".join(w[i:i + 5]) for i in range(max(1, len(w) - 4))} if w else set()
        assert shingle_set(t).size == len(grams)
    a, b = "the cat sat on the mat today", "the cat sat on a mat today"
    wa, wb = words_re.findall(a), words_re.findall(b)
    ga = {" ".join(wa[i:i + 5]) for i in range(len(wa) - 4)}
    gb = {" ".join(wb[i:i + 5]) for i in range(len(wb) - 4)}
    assert jaccard(shingle_set(a), shingle_set(b)) == len(ga & gb) / len(ga | gb)
    assert shingles("Hello, WORLD!", 5).size == 1 and shingles("  ...  ", 5).size == 0


def test_signature_agreement_estimates_jaccard(planted):
    docs, truth = planted
    mh = MinHasher(256, seed=3)
    sigs = mh.signatures([shingles(d["text"]) for d in docs])
    errs = []
    base = 0
    for i, j in enumerate(truth):
        if j is None:
            base = i
        else:
            errs.append(abs((sigs[i] == sigs[base]).mean() - j))
    # standard error of the estimate is sqrt(J(1-J)/256) <= 0.031
    assert np.mean(errs) < 0.03 and np.max(errs) < 0.13


@pytest.mark.parametrize("threshold,num_perm,weights", [
    (0.8, 128, (0.5, 0.5)), (0.5, 128, (0.5, 0.5)), (0.9, 64, (0.5, 0.5)), (0.7, 64, (0.2, 0.8)),
])
def test_bands_rows_golden_vs_datasketch(threshold, num_perm, weights):
    from datasketch.lsh import _optimal_param

    assert optimal_bands(threshold, num_perm, *weights) == _optimal_param(threshold, num_perm, *weights)


def test_planted_near_duplicates_recall_and_precision(planted):
    docs, truth = planted
    base_of = {}
    for i, j in enumerate(truth):
        base_of[i] = i if j is None else base_of[i - 1]
    for verify in (False, True):
        res = fuzzy_dedup(lambda: iter(docs), MinHashConfig(threshold=0.8, verify=verify))
        removed = set(np.flatnonzero(res.removed).tolist())
        should = {i for i, j in enumerate(truth) if j is not None and j >= 0.8}
        clear = {i for i, j in enumerate(truth) if j is not None and j >= 0.9}
        far = {i for i, j in enumerate(truth) if j is None or j < 0.6}
        assert len(clear) >= 60 and len(far) >= 80
        # no base document ever goes ("first" keeps the earliest), and each removed one points to its base
        assert all(truth[i] is not None for i in removed)
        for i in removed:
            assert base_of[int(res.kept_for[i])] == base_of[i]
        assert len(removed & clear) / len(clear) >= 0.97, "recall on J >= 0.9"
        assert not (removed & far), "nothing below J 0.6 is removed"
        if verify:  # exact: precision 1 against J >= threshold
            assert removed <= should
            precision = 1.0
        else:
            precision = len(removed & should) / max(1, len(removed))
        assert precision >= (1.0 if verify else 0.85)


def test_spilling_gives_the_same_result(planted, tmp_path):
    docs, _ = planted
    for cfg in (MinHashConfig(), MinHashConfig(verify=True, keep="longest")):
        ref = fuzzy_dedup(lambda: iter(docs), cfg)
        small = fuzzy_dedup(lambda: iter(docs), cfg, memory_budget_mb=0.02, workdir=str(tmp_path))
        assert ref.stats["spill_runs"] == 0 and small.stats["spill_runs"] >= 2
        np.testing.assert_array_equal(ref.kept_for, small.kept_for)
        assert ref.removed.sum() > 20
    assert os.listdir(tmp_path) == []  # run files removed


def test_same_result_for_any_worker_count_and_run(planted):
    docs, _ = planted
    cfg = MinHashConfig(threshold=0.7)
    a = fuzzy_dedup(lambda: iter(docs), cfg, workers=1)
    b = fuzzy_dedup(lambda: iter(docs), cfg, workers=2)
    c = fuzzy_dedup(lambda: iter(docs), cfg, workers=1)
    np.testing.assert_array_equal(a.kept_for, b.kept_for)
    np.testing.assert_array_equal(a.kept_for, c.kept_for)
    # a different seed changes the hash functions (so the test above could fail)
    d = fuzzy_dedup(lambda: iter(docs), MinHashConfig(threshold=0.7, seed=2))
    assert not np.array_equal(MinHasher(8, 1).a, MinHasher(8, 2).a)
    assert abs(int(d.removed.sum()) - int(a.removed.sum())) < 20


def test_keep_rules_and_scope():
    base = " ".join(real_texts(1, 200))
    longer = base + " and a few more words at the end of it"
    docs = [{"id": "a", "text": base, "source": "web", "quality_score": 0.1},
            {"id": "b", "text": longer, "source": "books", "quality_score": 0.9},
            {"id": "c", "text": base, "source": "web", "quality_score": 0.5}]
    ids = lambda res: [docs[i]["id"] for i in res.kept_for]  # noqa: E731
    assert ids(fuzzy_dedup(lambda: iter(docs), MinHashConfig())) == ["a", "a", "a"]
    assert ids(fuzzy_dedup(lambda: iter(docs), MinHashConfig(keep="longest"))) == ["b", "b", "b"]
    assert ids(fuzzy_dedup(lambda: iter(docs), MinHashConfig(keep="score"))) == ["b", "b", "b"]
    assert ids(fuzzy_dedup(lambda: iter(docs), MinHashConfig(scope="source"))) == ["a", "b", "a"]
    with pytest.raises(ValueError, match="keep must be"):
        MinHashConfig(keep="best")
    with pytest.raises(ValueError, match="threshold"):
        MinHashConfig(threshold=1.5)


def test_components_match_scipy():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n = 2000
    u, v = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    comps = lsh.Components(n)
    for k in range(0, 1500, 100):  # in batches, like the streaming merge
        comps.add_edges(u[k:k + 100], v[k:k + 100])
    labels = comps.labels()
    _, ref = connected_components(coo_matrix((np.ones(1500), (u, v)), shape=(n, n)), directed=False)
    mins = {}
    for i, r in enumerate(ref):
        mins.setdefault(r, i)
    np.testing.assert_array_equal(labels, [mins[r] for r in ref])


def test_record_index_merge_is_sorted_and_complete(tmp_path):
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, 20000).astype(np.uint64)  # many equal keys across runs
    docs = rng.permutation(20000).astype(np.int64)
    idx = RecordIndex(budget_bytes=40_000, workdir=str(tmp_path))
    for k in range(0, 20000, 997):
        idx.add(keys[k:k + 997], docs[k:k + 997])
    assert len(idx.runs) > 5
    got = list(idx.blocks())
    assert len(got) > 1
    k2 = np.concatenate([g[0] for g in got])
    d2 = np.concatenate([g[1] for g in got])
    order = np.lexsort((docs, keys))
    np.testing.assert_array_equal(k2, keys[order])
    np.testing.assert_array_equal(d2, docs[order])
    idx.close()


def test_exact_url_and_line_dedup():
    docs = [{"id": "1", "text": "Hello   World", "url": "https://www.Example.com/a/?utm_source=x&b=2", "date": "2020-01-01"},
            {"id": "2", "text": "hello world", "url": "http://example.com/a?b=2#top", "date": "2023-05-01T00:00:00Z"},
            {"id": "3", "text": "Other text", "url": "https://example.com/b", "date": "2021-01-01"},
            {"id": "4", "text": "other text!", "url": "https://example.com/a?b=2", "date": "2022-01-01"},
            {"id": "5", "text": "no url here"}]
    kept = exact.exact_dedup(lambda: iter(docs))
    assert kept.tolist() == [0, 0, 2, 3, 4]
    assert exact.exact_dedup(lambda: iter(docs), memory_budget_mb=0.001).tolist() == kept.tolist()
    kept = exact.url_dedup(lambda: iter(docs))
    assert kept.tolist() == [1, 1, 2, 1, 4]  # the newest crawl (doc 2) stays; no url: kept
    assert exact.normalize_url("HTTPS://www.x.org:443/p/?b=1&a=2&fbclid=z#f") == "x.org/p?a=2&b=1"

    lines = [{"id": str(i), "text": f"unique line {i}\nCookie policy: we use cookies\nshared footer\n"} for i in range(3)]
    lines.append({"id": "x", "text": "Cookie  policy: WE use cookies\n"})
    bad = exact.repeated_lines(lambda: iter(lines), max_count=1)
    assert bad.size == 2
    assert exact.repeated_lines(lambda: iter(lines), max_count=3).size == 1  # the cookie line: 4 times
    small = exact.repeated_lines(lambda: iter(lines), max_count=1, memory_budget_mb=0.0001)
    np.testing.assert_array_equal(small, bad)
    text, n = exact.remove_lines(lines[0]["text"], bad)
    assert (text, n) == ("unique line 0\n", 2)
    assert exact.split_units("a\nb\n\n\nc\n", "paragraph") == ["a\nb\n\n\n", "c\n"]


def test_decontamination_removes_exactly_the_planted_overlaps(tmp_path):
    texts = [" ".join(words_re.findall(t.lower())) for t in real_texts(30, 200)]  # words: exact n-gram counts
    evals = [" ".join(t.split()[60:90]) for t in texts[20:]]  # 30-word questions from 10 documents
    eval_file = tmp_path / "quiz.test.jsonl"
    dio.write_jsonl(str(eval_file), [{"text": e} for e in evals])
    docs = []
    planted = set()
    for i, t in enumerate(texts[:20]):
        toks = t.split()
        if i % 4 == 0:  # plant 13 consecutive words of an eval example inside the document
            q = evals[i % len(evals)].split()
            toks = toks[:100] + q[5:18] + toks[100:]
            planted.add(str(i))
        elif i % 4 == 1:  # 12 words only: must stay
            q = evals[i % len(evals)].split()
            toks = toks[:100] + q[5:17] + toks[100:]
        docs.append({"id": str(i), "text": " ".join(toks)})
    docs += [{"id": f"e{i}", "text": texts[20 + i]} for i in range(3)]  # the eval sources themselves
    planted |= {"e0", "e1", "e2"}
    step = build_step({"step": "decontaminate", "eval_sets": [str(eval_file)]})
    dropped = {d["id"]: r.reason for d, r in zip(docs, step(docs)) if not isinstance(r, dict)}
    assert set(dropped) == planted
    assert set(dropped.values()) == {"decontaminate:quiz"}
    assert ngram_hashes("a b c", 13).size == 0
    with pytest.raises(StepError, match="does not exist"):
        build_step({"step": "decontaminate", "eval_sets": [str(tmp_path / "missing.jsonl")]})
    assert isinstance(step, Decontaminate)


def test_decontamination_sets_skip_and_count_bad_records(tmp_path, capsys):
    from data_pipeline.dedup.decontam import EvalIndex, load_eval_texts

    evals = [{"id": f"q{i}", "text": t} for i, t in enumerate(real_texts(20, 40))]
    good = tmp_path / "quiz.jsonl.xz"
    dio.write_jsonl(str(good), evals[:3])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "one two"}\n{broken\n{"question": "no text"}\n{"text": "a \x00 NUL"}\n')
    cut = tmp_path / "cut.jsonl.gz"
    survivors = write_cut_gz(cut, evals)
    errors: list = []
    assert load_eval_texts(str(good)) == [e["text"] for e in evals[:3]]
    assert load_eval_texts(str(bad), errors=errors) == ["one two"]
    assert [(e["line"], e["kind"]) for e in errors] == [(2, "invalid_json"), (3, "bad_text"), (4, "invalid_json")]
    assert load_eval_texts(str(bad), field=("text", "question")) == ["one two", "no text"]
    assert load_eval_texts(str(cut)) == [e["text"] for e in survivors]
    index = EvalIndex([str(bad), str(cut)], n=3)
    assert index.errors == {"bad": 3, "cut": 1}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "bad.jsonl: 3 records could not be read" in err[0] and "truncated" in err[1]


def test_dedup_cli(planted, tmp_path):
    from danlu.cli import main

    docs, truth = planted
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl.zst"
    dio.write_jsonl(str(a), [dict(d, extra={"k": i}) for i, d in enumerate(docs[:140])])
    dio.write_jsonl(str(b), docs[140:])
    with open(a, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "out"
    assert main(["dedup", "--input", str(a), str(b), "--output", str(out), "--verify", "--memory-budget", "0.05"]) == 0
    report = json.loads((out / "report.json").read_text())
    kept = list(dio.read_jsonl(str(out / "kept-00000-of-00002.jsonl"))) + \
        list(dio.read_jsonl(str(out / "kept-00001-of-00002.jsonl")))
    clusters = list(dio.read_jsonl(str(out / "clusters.jsonl")))
    assert report["documents_in"] == len(docs) + 1 and report["errors"] == 1
    assert report["error_kinds"] == {"invalid_json": 1}
    assert report["documents_in"] == report["documents_out"] + sum(report["dropped"].values()) + report["errors"]
    assert report["documents_out"] == len(kept) == len(docs) - len(clusters)
    assert report["stats"]["spill_runs"] > 1
    assert kept[0] == dict(docs[0], extra={"k": 0})  # fields and order kept
    by_id = {d["id"]: j for d, j in zip(docs, truth)}
    assert all(by_id[c["id"]] >= 0.8 and c["kept"] == c["id"].split("v")[0] for c in clusters)
    assert main(["dedup", "--input", str(a), "--output", str(out), "--threshold", "2"]) == 2
    assert main(["dedup", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2


@pytest.mark.parametrize("cut", [write_cut_gz, write_cut_zst])
def test_dedup_cli_truncated_stream(tmp_path, capsys, cut):
    from danlu.cli import main

    texts = real_texts(30, 60)
    path = tmp_path / ("docs.jsonl.gz" if cut is write_cut_gz else "docs.jsonl.zst")
    survivors = cut(path, [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    assert main(["dedup", "--input", str(path), "--output", str(out)]) == 0
    assert list(dio.read_jsonl(str(out / "kept-00000-of-00001.jsonl"))) == survivors  # distinct texts: all kept
    assert_one_truncated_row(read_rows(out / "errors.jsonl"), path, survivors)
    report = json.loads((out / "report.json").read_text())
    n = len(survivors)
    assert (report["documents_in"], report["documents_out"], report["errors"]) == (n + 1, n, 1)
    assert f"{n + 1} records in, {n} kept, 0 dropped" in capsys.readouterr().out


def test_dedup_cli_reads_parquet_and_wet(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from danlu.cli import main

    texts = real_texts(6, 60)
    pq.write_table(pa.table({"id": ["p0", "p1", "p2"], "body": texts[:3]}), tmp_path / "a.parquet")
    wet = b""
    for i, t in enumerate(texts[3:]):
        body = t.encode()
        wet += gzip.compress(f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: https://x.org/{i}\r\n"
                             f"WARC-Date: 2024-03-01T12:00:00Z\r\nWARC-Record-ID: <urn:uuid:{i:08d}-0000-0000-0000-"
                             f"000000000000>\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
                             .encode() + body + b"\r\n\r\n")
    (tmp_path / "b.warc.wet.gz").write_bytes(wet)
    out = tmp_path / "out"
    assert main(["dedup", "--input", str(tmp_path / "a.parquet"), str(tmp_path / "b.warc.wet.gz"), "--output",
                 str(out), "--text-key", "body"]) == 0
    kept = [d for i in range(2) for d in dio.read_jsonl(str(out / f"kept-0000{i}-of-00002.jsonl"))]
    assert [d["text"] for d in kept] == texts and [d["id"] for d in kept[:3]] == ["p0", "p1", "p2"]
    assert kept[3]["url"] == "https://x.org/0"


def test_dedup_cli_writes_to_a_url(tmp_path):
    import fsspec

    from danlu.cli import main

    path = tmp_path / "docs.jsonl"
    dio.write_jsonl(str(path), [{"id": f"d{i}", "text": t} for i, t in enumerate(real_texts(5, 60))])
    assert main(["dedup", "--input", str(path), "--output", "memory://dedup-out", "--memory-budget", "1"]) == 0
    fs = fsspec.filesystem("memory")
    assert sorted(fs.ls("/dedup-out", detail=False)) == [
        "/dedup-out/clusters.jsonl", "/dedup-out/errors.jsonl", "/dedup-out/kept-00000-of-00001.jsonl",
        "/dedup-out/report.json"]
    assert json.loads(fs.cat("/dedup-out/report.json"))["documents_out"] == 5
    assert not os.path.exists("memory:")
