"""`danlu demo --no-sweep`, cut short: the quickstart's main job runs end to end on the embedded
corpus (clean, tokenizer, shards, training, loss curve), and a bad step count is refused before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def danlu(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "danlu.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def test_demo_without_sweep_runs_end_to_end(tmp_path):
    work = tmp_path / "demo"
    proc = danlu("demo", "--workdir", str(work), "--no-sweep", "--steps", "8", "--corpus-mb", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[6/6] scaling sweep skipped" in proc.stdout
    report = json.loads((work / "clean" / "report.json").read_text())
    corpus_docs = sum(1 for _ in (work / "corpus.jsonl").open())
    assert report["documents_in"] == corpus_docs > 0
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    assert sum(s["tokens"] for s in manifest["shards"]) > 0
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_loss"] < summary["first_loss"]
    steps = [json.loads(line)["step"] for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps and max(steps) == 8
    assert (work / "loss.png").stat().st_size > 0


def test_demo_refuses_a_bad_step_count_before_any_work(tmp_path):
    proc = danlu("demo", "--workdir", str(tmp_path / "demo"), "--steps", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "train.steps must be a positive integer" in proc.stderr
    assert not (tmp_path / "demo").exists()
