"""Beam runner (real DirectRunner): the same documents as the local runner, counters per drop
reason, connected components inside the graph."""
from __future__ import annotations

import random

import pytest

from danlu.base import fs as dio
from data_pipeline.dedup.stages import StageContext, build_stages, run_stages

beam = pytest.importorskip("apache_beam")

import dataclasses  # noqa: E402
from typing import ClassVar  # noqa: E402

from data_pipeline import beam_runner  # noqa: E402
from data_pipeline.steps import Filter, register  # noqa: E402
from test_dedup import edit_words, real_texts  # noqa: E402


@register
@dataclasses.dataclass(frozen=True)
class _MinWords(Filter):
    name: ClassVar[str] = "test_min_words"
    min_words: int = 50

    def reason(self, doc):
        return "too_short" if len(doc["text"].split()) < self.min_words else None


@pytest.fixture(scope="module")
def corpus():
    """Real texts with near-duplicates at several similarities, exact copies, shared boilerplate
    lines, URLs with crawl dates, in two sources."""
    rng = random.Random(1)
    docs = []
    for b, t in enumerate(real_texts(14, 220)):
        src = "web" if b % 2 else "code"
        docs.append({"id": f"b{b}", "text": t + "\nShared footer line of every page\n", "source": src,
                     "url": f"https://ex.org/{b % 5}", "date": f"202{b % 4}-01-01", "quality_score": b / 14})
        for v, e in enumerate((2, 6, 15, 40)):
            docs.append({"id": f"b{b}v{v}", "text": edit_words(t, e, rng, f"{b}_{v}"), "source": src,
                         "quality_score": (b + v) / 20})
    docs.append(dict(docs[3], id="copy3"))
    docs.append({"id": "only-footer", "text": "Shared footer line of every page\n", "source": "web"})
    return docs


def _local(docs, specs, tmp_path, budget=None):
    path = tmp_path / "in.jsonl"
    dio.write_jsonl(str(path), docs)
    res = run_stages(build_stages(specs), [str(path)], str(tmp_path / "out"), StageContext(memory_budget_mb=budget))
    return list(dio.read_jsonl(res["files"][0])), res


@pytest.mark.parametrize("specs", [
    ["exact", {"stage": "lines", "max_count": 3}, {"stage": "url"},
     {"stage": "minhash", "threshold": 0.8, "keep": "longest", "scope": "source"}],
    [{"stage": "minhash", "threshold": 0.6, "verify": True, "keep": "score"}],
], ids=["exact-lines-url-minhash", "minhash-verified-score"])
def test_beam_keeps_the_same_documents_as_local(corpus, specs, tmp_path):
    kept_beam, rep = beam_runner.run_docs_beam(corpus, [], specs)
    kept_local, res = _local(corpus, specs, tmp_path)
    assert [d["id"] for d in kept_beam] == [d["id"] for d in kept_local]
    assert kept_beam == kept_local  # text edits (line removal) too
    dropped_local = {}
    for st in res["stages"]:
        for r, n in st["dropped"].items():
            dropped_local[r] = dropped_local.get(r, 0) + n
    assert rep["dropped"] == dropped_local
    assert sum(dropped_local.values()) >= 10
    assert rep["cc_unconverged"] == 0
    assert rep["accounted"] and rep["documents_out"] == len(kept_beam)


def test_components_need_rounds_and_fall_back_when_too_few(tmp_path):
    """A path graph 0-1-...-63 has diameter 63: one round is not enough, and the in-graph check
    finishes the contracted edges so the answer is still right (and the counter says so)."""
    edges = [(i, i + 1) for i in range(63)] + [(100, 101), (101, 102)]

    def run(rounds):
        with beam.Pipeline(options=beam_runner.pipeline_options()) as p:
            labels = beam_runner.connected_components(p | beam.Create(edges), rounds, "cc")
            _ = (labels | beam.Map(lambda kv: f"{kv[0]} {kv[1]}")
                 | beam.io.WriteToText(str(tmp_path / f"r{rounds}"), shard_name_template=""))
        got = dict(tuple(map(int, line.split())) for line in open(tmp_path / f"r{rounds}"))
        return got, beam_runner.counters_of(p.result).get("minhash:cc_unconverged", 0)

    want = {**{i: 0 for i in range(1, 64)}, 101: 100, 102: 100}
    got, bad = run(8)
    assert got == want and bad == 0
    got, bad = run(1)
    assert got == want and bad > 0


def test_steps_then_stages_counters(corpus):
    from data_pipeline.steps import build_steps

    steps = build_steps([{"step": "test_min_words", "min_words": 60}])
    kept, rep = beam_runner.run_docs_beam(corpus, steps, ["exact"])
    assert rep["per_source"]["web"]["dropped"] == {"test_min_words:too_short": 1}  # "only-footer"
    assert rep["per_source"]["code"]["dropped"] == {"exact:duplicate": 1}  # "copy3" (b0's source: code)
    assert rep["accounted"] and rep["documents_in"] == len(corpus)
    assert rep["documents_out"] == len(kept) == len(corpus) - 2


def _documents(out_dir):
    import glob
    import os

    return sorted((d["id"], d["text"]) for p in glob.glob(os.path.join(out_dir, "documents", "*"))
                  for d in dio.read_jsonl(p))


def test_danlu_clean_local_and_beam_keep_the_same_documents(corpus, tmp_path):
    """`danlu clean` with per-document steps and corpus stages, on both runners."""
    import json

    import yaml

    from danlu.cli import main

    dio.write_jsonl(str(tmp_path / "a.jsonl"), corpus[:40])
    dio.write_jsonl(str(tmp_path / "b.jsonl"), corpus[40:])
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write("{broken\n")
    job = {"name": "t", "inputs": [{"path": str(tmp_path / "a.jsonl"), "source": "web"},
                                   {"path": str(tmp_path / "b.jsonl"), "source": "code"}],
           "steps": [{"step": "test_min_words", "min_words": 60}],
           "stages": ["exact", {"stage": "lines", "max_count": 3},
                      {"stage": "minhash", "threshold": 0.8, "keep": "longest"}],
           "stage_options": {"memory_budget_mb": 0.05, "cc_rounds": 6},
           "output": {"compression": "gz", "docs_per_shard": 20}, "workers": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    local, beam_out = tmp_path / "local", tmp_path / "beam"
    assert main(["clean", str(tmp_path / "job.yaml"), "--output", str(local), "--no-progress"]) == 0
    assert main(["clean", str(tmp_path / "job.yaml"), "--output", str(beam_out), "--runner", "beam",
                 "--no-progress", "--", "--runner=DirectRunner"]) == 0
    docs_local, docs_beam = _documents(local), _documents(beam_out)
    assert docs_local == docs_beam and len(docs_local) < len(corpus) - 15
    rl = json.loads((local / "report.json").read_text())
    rb = json.loads((beam_out / "report.json").read_text())
    assert rl["accounted"] and rb["accounted"]
    for key in ("run", "files", "stages"):  # wall times; Beam's file names; Beam counts no per-stage figures
        rl.pop(key), rb.pop(key)
    rl_stages_examples = {r for r in rl["examples"] if r.startswith(("exact:", "lines:", "minhash:"))}
    for r in rl_stages_examples:  # the local stages keep examples of their drops; Beam's count only
        rl["examples"].pop(r)
    assert rl == rb  # the same report, field by field: one loop, one merge
    errors = [sorted(json.dumps(json.loads(line), sort_keys=True) for line in open(d / "errors.jsonl"))
              for d in (local, beam_out)]
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert rl["per_source"].keys() == {"web", "code"}
    assert rl["dropped"]["minhash:near_duplicate"] > 5 and rl["dropped"]["exact:duplicate"] == 1
    assert rl["documents_out"] == len(docs_local) and rl["errors"] == 1
    # rerun: nothing is redone, the stages are not applied twice
    assert main(["clean", str(tmp_path / "job.yaml"), "--output", str(local), "--no-progress"]) == 0
    assert _documents(local) == docs_local
    assert json.loads((local / "report.json").read_text())["dropped"] == rl["dropped"]
    bad = dict(job, stages=["exact", {"stage": "minhash", "treshold": 0.8}])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["clean", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "x"), "--no-progress"]) == 2
    assert not (tmp_path / "x").exists()  # refused before any work


def test_a_reader_failing_mid_shard_keeps_what_it_read_on_both_runners(tmp_path, monkeypatch):
    """A reader that raises after three documents: both runners keep those three and set the
    failure aside as one `unreadable` row (Beam used to replace the whole shard by the error)."""
    import json

    import yaml

    from data_pipeline import readers as R
    from danlu.cli import main

    def flaky(shard, counters):
        for i in range(3):
            yield R._finish({"text": f"document number {i} " * 5}, shard, "x", i)
        raise RuntimeError("disk went away")

    monkeypatch.setitem(R.READERS, "jsonl", dataclasses.replace(R.READERS["jsonl"], read=flaky))
    dio.write_jsonl(str(tmp_path / "a.jsonl"), [{"id": "unused", "text": "never read"}])
    job = {"name": "t", "inputs": [{"path": str(tmp_path / "a.jsonl"), "reader": "jsonl"}], "steps": [],
           "workers": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    for out, extra in ((tmp_path / "local", []), (tmp_path / "beam", ["--runner", "beam"])):
        assert main(["clean", str(tmp_path / "job.yaml"), "--output", str(out), "--no-progress", *extra]) == 0
        assert len(_documents(out)) == 3, extra
        rows = [json.loads(line) for line in open(out / "errors.jsonl")]
        assert [(r["kind"], "disk went away" in r["reason"]) for r in rows] == [("unreadable", True)]
        rep = json.loads((out / "report.json").read_text())
        assert (rep["documents_in"], rep["documents_out"], rep["errors"]) == (4, 3, 1)
