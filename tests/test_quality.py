"""GPT-3-style quality classifier: trains, separates, saves/loads exactly, filters reproducibly."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from danlu.base import fs as dio
from data_pipeline.quality import QualityModel, VectorizerConfig, pareto_keep, train
from data_pipeline.steps import StepError, build_step
from test_dedup import real_texts
from truncated import assert_one_truncated_row, read_rows, write_cut_gz, write_cut_zst


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Positives: prose-like lines from standard-library docstrings and comments; negatives:
    the same vocabulary as crawl-like junk (shuffled words, repeated boilerplate, link lists)."""
    rng = random.Random(0)
    texts = real_texts(60, 120)
    words = " ".join(texts).split()
    pos = [{"id": f"p{i}", "text": t} for i, t in enumerate(texts)]
    neg = []
    for i in range(60):
        kind = i % 3
        if kind == 0:
            t = " ".join(rng.choice(words) for _ in range(120))
        elif kind == 1:
            t = " | ".join(f"Home Login Cart {rng.choice(words)}" for _ in range(30))
        else:
            t = " ".join(f"http://x{rng.randrange(99)}.com/{rng.choice(words)}" for _ in range(60))
        neg.append({"id": f"n{i}", "text": t})
    d = tmp_path_factory.mktemp("q")
    dio.write_jsonl(str(d / "pos.jsonl"), pos)
    dio.write_jsonl(str(d / "neg.jsonl"), neg)
    return d


def test_train_save_load_and_score(corpora, tmp_path):
    vec = VectorizerConfig(n_features=1 << 12)
    m = train([str(corpora / "pos.jsonl")], [str(corpora / "neg.jsonl")], vec=vec, heldout=0.25, seed=0)
    assert m.metrics["heldout"] > 10 and m.metrics["heldout_accuracy"] >= 0.9
    m.save(str(tmp_path / "q"))
    first = (tmp_path / "q.npz").read_bytes(), (tmp_path / "q.json").read_bytes()
    m2 = train([str(corpora / "pos.jsonl")], [str(corpora / "neg.jsonl")], vec=vec, heldout=0.25, seed=0)
    m2.save(str(tmp_path / "q"))
    assert ((tmp_path / "q.npz").read_bytes(), (tmp_path / "q.json").read_bytes()) == first  # deterministic
    loaded = QualityModel.load(str(tmp_path / "q.json"))
    texts = [d["text"] for d in dio.read_jsonl(str(corpora / "pos.jsonl"))][:5] + ["buy cheap http://x.com"]
    np.testing.assert_allclose(loaded.score(texts), m.score(texts), rtol=0, atol=1e-12)
    with pytest.raises(FileNotFoundError, match="missing"):
        QualityModel.load(str(tmp_path / "nope"))


def test_pareto_rule_is_reproducible_and_order_free(corpora, tmp_path):
    m = train([str(corpora / "pos.jsonl")], [str(corpora / "neg.jsonl")], vec=VectorizerConfig(n_features=1 << 12))
    m.save(str(tmp_path / "q"))
    docs = list(dio.read_jsonl(str(corpora / "pos.jsonl"))) + list(dio.read_jsonl(str(corpora / "neg.jsonl")))
    step = build_step({"step": "quality", "model": str(tmp_path / "q"), "seed": 7})

    def kept(ds, s=step):
        return {d["id"]: d["quality_score"] for d in s(ds) if isinstance(d, dict)}

    a = kept(docs)
    assert kept(list(reversed(docs))) == a  # order (and batching) does not matter
    assert a == kept(docs)
    other = kept(docs, build_step({"step": "quality", "model": str(tmp_path / "q"), "seed": 8}))
    assert set(other) != set(a)  # the seed matters: the test above can fail
    kept_pos, kept_neg = sum(i.startswith("p") for i in a), sum(i.startswith("n") for i in a)
    scores = {d["id"]: m.score([d["text"]])[0] for d in docs}
    expected = sum((2 - s) ** -9 for s in scores.values())  # P(keep) under GPT-3's rule, summed
    assert abs(len(a) - expected) < 3 * expected ** 0.5 + 1
    assert kept_pos > 2 * max(kept_neg, 1)
    # GPT-3's rule: P(keep | score s) = P(pareto(9) > 1 - s) = (2 - s)^-9 for s < 1
    for s in (0.1, 0.5, 0.9):
        rate = np.mean([pareto_keep(s, 0, f"d{i}") for i in range(4000)])
        assert abs(rate - (2 - s) ** -9) < 0.03
    thr = build_step({"step": "quality", "model": str(tmp_path / "q"), "rule": "threshold", "threshold": 0.5})
    out = list(thr(docs))
    assert all(isinstance(o, dict) == (m.score([d["text"]])[0] >= 0.5) for o, d in zip(out, docs))
    assert {o.reason for o in out if not isinstance(o, dict)} == {"quality:low_score"}
    with pytest.raises(StepError, match="rule must be"):
        build_step({"step": "quality", "model": str(tmp_path / "q"), "rule": "coin"})
    with pytest.raises(StepError, match="does not exist"):
        build_step({"step": "quality", "model": str(tmp_path / "missing")})


def test_cli_train(corpora, tmp_path, capsys):
    from danlu.cli import main

    assert main(["quality", "train", "--positive", str(corpora / "pos.jsonl"), "--negative", str(corpora / "neg.jsonl"),
                 "--output", str(tmp_path / "m"), "--features", "4096"]) == 0
    assert (tmp_path / "m.npz").exists() and "heldout_accuracy" in capsys.readouterr().out


@pytest.fixture(scope="module")
def model_prefix(corpora, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("qm") / "m")
    train([str(corpora / "pos.jsonl")], [str(corpora / "neg.jsonl")], vec=VectorizerConfig(n_features=1 << 12)).save(prefix)
    return prefix


@pytest.mark.parametrize("cut", [write_cut_gz, write_cut_zst])
def test_cli_score_truncated_stream(model_prefix, tmp_path, capsys, cut):
    from danlu.cli import main

    path = tmp_path / ("crawl.jsonl.gz" if cut is write_cut_gz else "crawl.jsonl.zst")
    survivors = cut(path, [{"id": f"c{i}", "text": t} for i, t in enumerate(real_texts(30, 60))])
    out = tmp_path / "scored" / "crawl.jsonl"
    assert main(["quality", "score", "--model", model_prefix, "--input", str(path), "--output", str(out)]) == 0
    scored = list(dio.read_jsonl(str(out)))
    assert [{k: v for k, v in d.items() if k != "quality_score"} for d in scored] == survivors
    assert all(0.0 < d["quality_score"] < 1.0 for d in scored)
    assert sorted(os.listdir(out.parent)) == ["crawl.errors.jsonl", "crawl.jsonl"]
    assert_one_truncated_row(read_rows(out.parent / "crawl.errors.jsonl"), path, survivors)
    n = len(survivors)
    assert f"{n + 1} records in, {n} scored, 0 dropped, 1 errors -> {out.parent / 'crawl.errors.jsonl'}" in \
        capsys.readouterr().out


def test_train_counts_bad_records_and_score_writes_to_a_url(corpora, model_prefix, tmp_path, capsys):
    import fsspec

    from danlu.cli import main

    neg = tmp_path / "neg.jsonl"
    neg.write_bytes((corpora / "neg.jsonl").read_bytes() + b"{broken\n")
    assert main(["quality", "train", "--positive", str(corpora / "pos.jsonl"), "--negative", str(neg),
                 "--output", "memory://q/m", "--features", "4096"]) == 0
    assert '"errors": {"positive": 0, "negative": 1}' in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    assert fs.exists("/q/m.npz") and json.loads(fs.cat("/q/m.json"))["metrics"]["negative"] == 60
    assert main(["quality", "score", "--model", model_prefix, "--input", str(neg), "--output",
                 "memory://q/scored.jsonl.gz"]) == 0
    assert len(list(dio.read_jsonl("memory://q/scored.jsonl.gz"))) == 60
    assert [r["kind"] for r in dio.read_jsonl("memory://q/scored.errors.jsonl")] == ["invalid_json"]
    assert main(["quality", "score", "--model", str(tmp_path / "none"), "--input", str(neg), "--output", "x"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
