"""Mixing sources by weights or epochs; the result tokenizes with tokens counted per source."""
from __future__ import annotations

import json

import pytest

from danlu.base import fs as dio
from data_pipeline.mix import copies, mix, parse_assignments, plan_epochs
from test_dedup import real_texts
from truncated import assert_one_truncated_row, read_rows, write_cut_gz, write_cut_zst


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    texts = real_texts(60, 80)
    dio.write_jsonl(str(d / "web.jsonl"), [{"id": f"w{i}", "text": t, "source": "crawl"} for i, t in enumerate(texts[:40])])
    dio.write_jsonl(str(d / "books.jsonl"), [{"id": f"b{i}", "text": t} for i, t in enumerate(texts[40:50])])
    dio.write_jsonl(str(d / "code.jsonl"), [{"id": f"c{i}", "text": t, "source": "code"} for i, t in enumerate(texts[50:])])
    return d


def test_epochs_are_per_document_and_seeded():
    n = [copies(2.5, 0, f"d{i}") for i in range(2000)]
    assert set(n) == {2, 3} and abs(sum(n) / 2000 - 2.5) < 0.05
    assert n == [copies(2.5, 0, f"d{i}") for i in range(2000)]
    assert n != [copies(2.5, 1, f"d{i}") for i in range(2000)]
    assert plan_epochs({"a": 100, "b": 300}, {"a": 1, "b": 1}) == {"a": 2.0, "b": 2 / 3}
    with pytest.raises(ValueError, match="without a weight"):
        plan_epochs({"a": 1, "b": 1}, {"a": 1})
    with pytest.raises(ValueError, match="name=number"):
        parse_assignments("web=0.6,books", "--weights")


def test_weights_give_the_shares_and_tokenize_counts_sources(sources, tmp_path):
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer

    inputs = [f"web={sources / 'web.jsonl'}", f"books={sources / 'books.jsonl'}", str(sources / "code.jsonl")]
    rep = mix(inputs, str(tmp_path / "m"), weights={"web": 0.6, "books": 0.2, "code": 0.2}, shards=2, seed=0)
    shares = {s: v["share_out"] for s, v in rep["sources"].items()}
    assert shares.keys() == {"web", "books", "code"}
    for s, w in {"web": 0.6, "books": 0.2, "code": 0.2}.items():
        assert abs(shares[s] - w) < 0.07, (s, shares)
    assert rep["sources"]["books"]["epochs"] > 1 > rep["sources"]["web"]["epochs"]
    out = [d for p in sorted((tmp_path / "m").glob("mix-*.jsonl")) for d in dio.read_jsonl(str(p))]
    assert {d["source"] for d in out} == {"web", "books", "code"}
    assert any(d.get("repeat") for d in out if d["source"] == "books")
    assert json.loads((tmp_path / "m" / "mix.json").read_text()) == rep
    rep2 = mix(inputs, str(tmp_path / "m2"), weights={"web": 0.6, "books": 0.2, "code": 0.2}, shards=2, seed=0)
    assert rep2["sources"] == rep["sources"]
    assert (tmp_path / "m" / "mix-00000-of-00002.jsonl").read_bytes() == \
        (tmp_path / "m2" / "mix-00000-of-00002.jsonl").read_bytes()

    model = train_tokenizer([str(tmp_path / "m")], str(tmp_path / "tok"), vocab_size=400)
    manifest = encode_to_shards([str(tmp_path / "m")], str(tmp_path / "shards"), model, num_shards=1,
                                eval_fraction=0.0, workers=1)
    per_source = manifest["sources"]
    assert set(per_source) == {"web", "books", "code"}
    assert per_source["books"]["documents"] == rep["sources"]["books"]["documents_out"]


def test_epochs_cli(sources, tmp_path, capsys):
    from danlu.cli import main

    assert main(["mix", "--input", str(sources / "web.jsonl"), str(sources / "code.jsonl"), "--epochs",
                 "crawl=0.5,code=2", "--output", str(tmp_path / "e"), "--shards", "1"]) == 0
    rep = json.loads((tmp_path / "e" / "mix.json").read_text())
    assert rep["sources"]["code"]["documents_out"] == 20
    assert 10 <= rep["sources"]["crawl"]["documents_out"] <= 30
    # documents_in + repeats = documents_out + sum(dropped) + errors
    assert rep["documents_in"] == 50 and rep["repeats"] == 10 and rep["errors"] == 0
    assert rep["dropped"] == {"mix:not_sampled": 40 - rep["sources"]["crawl"]["documents_out"]}
    assert rep["documents_in"] + rep["repeats"] == rep["documents_out"] + sum(rep["dropped"].values())
    assert (tmp_path / "e" / "errors.jsonl").read_text() == ""
    assert "50 records in" in capsys.readouterr().out
    assert main(["mix", "--input", str(tmp_path / "nope.jsonl"), "--epochs", "x=1", "--output", str(tmp_path / "n")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has source 'books'|no epochs"):
        mix([f"books={sources / 'books.jsonl'}"], str(tmp_path / "x"), epochs={"code": 1})


@pytest.mark.parametrize("cut", [write_cut_gz, write_cut_zst])
def test_truncated_stream_keeps_complete_lines(tmp_path, capsys, cut):
    from danlu.cli import main

    path = tmp_path / ("web.jsonl.gz" if cut is write_cut_gz else "web.jsonl.zst")
    survivors = cut(path, [{"id": f"w{i}", "text": t} for i, t in enumerate(real_texts(30, 60))])
    assert main(["mix", "--input", f"web={path}", "--epochs", "web=1", "--shards", "1",
                 "--output", str(tmp_path / "m")]) == 0
    assert [d["id"] for d in dio.read_jsonl(str(tmp_path / "m" / "mix-00000-of-00001.jsonl"))] == \
        [d["id"] for d in survivors]
    assert_one_truncated_row(read_rows(tmp_path / "m" / "errors.jsonl"), path, survivors)
    rep = json.loads((tmp_path / "m" / "mix.json").read_text())
    n = len(survivors)
    assert (rep["documents_in"], rep["documents_out"], rep["errors"], rep["dropped"]) == (n + 1, n, 1, {})
    assert f"{n + 1} records in, {n} written (0 repeats), 0 dropped, 1 errors" in capsys.readouterr().out


def test_writes_to_a_url(sources):
    import fsspec

    rep = mix([str(sources / "code.jsonl")], "memory://mix-out", epochs={"code": 1}, shards=1)
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat("/mix-out/mix.json")) == rep
    assert len(list(dio.read_jsonl("memory://mix-out/mix-00000-of-00001.jsonl"))) == 10
    assert fs.cat("/mix-out/errors.jsonl") == b""
