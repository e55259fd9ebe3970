"""Corpus stages: config errors before work, local runs, report accounting."""
from __future__ import annotations

import pytest

from danlu.base import fs as dio
from data_pipeline.dedup.stages import StageContext, apply_to_report, build_stages, run_stages
from data_pipeline.report import balanced
from data_pipeline.steps import StepError
from test_dedup import edit_words, real_texts


def test_bad_stages_are_refused_before_work(tmp_path):
    with pytest.raises(StepError, match=r"stages\[0\]: unknown stage 'minhsah'; did you mean 'minhash'"):
        build_stages(["minhsah"])
    with pytest.raises(StepError, match=r"stages\[1\]: stage 'minhash' has no parameter 'treshold'; did you mean 'threshold'"):
        build_stages(["exact", {"stage": "minhash", "treshold": 0.7}])
    with pytest.raises(StepError, match="threshold must be in"):
        build_stages([{"stage": "minhash", "threshold": 1.2}])
    with pytest.raises(StepError, match="max_count must be >= 1"):
        build_stages([{"stage": "lines", "max_count": 0}])
    with pytest.raises(StepError, match="does not exist"):
        build_stages([{"stage": "decontaminate", "eval_sets": [str(tmp_path / "nope.jsonl")]}])


def test_stages_over_files_and_report_balance(tmp_path):
    import random

    rng = random.Random(3)
    texts = real_texts(12, 150)
    docs = []
    for i, t in enumerate(texts):
        docs.append({"id": f"d{i}", "text": t + "\ncopyright footer\n", "source": "a" if i < 6 else "b"})
        docs.append({"id": f"d{i}n", "text": edit_words(t, 2, rng, str(i)), "source": "b"})
    eval_file = tmp_path / "ev.jsonl"
    dio.write_jsonl(str(eval_file), [{"text": " ".join(texts[5].split()[20:50])}])
    files = [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl.gz")]
    dio.write_jsonl(files[0], docs[:10])
    dio.write_jsonl(files[1], docs[10:])
    specs = [{"stage": "lines", "max_count": 2}, {"stage": "minhash", "threshold": 0.7},
             {"stage": "decontaminate", "eval_sets": [str(eval_file)]}]
    res = run_stages(build_stages(specs), files, str(tmp_path / "out"), StageContext(memory_budget_mb=0.01))
    assert [st["stage"] for st in res["stages"]] == ["lines", "minhash", "decontaminate"]
    assert res["stages"][0]["changed"] == 12  # the footer went from every document
    assert res["stages"][1]["dropped"] == {"minhash:near_duplicate": 12}
    assert res["stages"][2]["dropped"] == {"decontaminate:ev": 1}
    out = [d for f in res["files"] for d in dio.read_jsonl(f)]
    assert len(out) == 11 and sum(res["file_counts"]) == 11
    assert all("copyright footer" not in d["text"] for d in out)
    assert [f.rsplit("/", 1)[1] for f in res["files"]] == ["part-0.jsonl", "part-1.jsonl.gz"]
    # a map-phase report (balanced) stays balanced once the stages' drops and edits are added
    nb = sum(len(d["text"].encode()) for d in docs)
    rep = {"documents_in": 24, "documents_out": 24, "dropped": {}, "errors": 0, "bytes_in": nb, "bytes_out": nb,
           "bytes_dropped": {}, "bytes_errors": 0, "bytes_edited": 0, "per_source": {}}
    for src in ("a", "b"):
        sd = [d for d in docs if d["source"] == src]
        b = sum(len(d["text"].encode()) for d in sd)
        rep["per_source"][src] = {"documents_in": len(sd), "documents_out": len(sd), "dropped": {}, "errors": 0,
                                  "bytes_in": b, "bytes_out": b, "bytes_dropped": {}, "bytes_errors": 0,
                                  "bytes_edited": 0}
    apply_to_report(rep, res)
    assert rep["accounted"] and balanced(rep)
    assert rep["documents_out"] == 11 and rep["dropped"]["minhash:near_duplicate"] == 12
    assert rep["bytes_out"] == sum(len(d["text"].encode()) for d in out)
