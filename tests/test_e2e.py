"""A tiny end-to-end `danlu train` in a subprocess: real corpus, real tokenizer, loss falls, run
directory as docs/design.md says, and rerunning the command resumes from the checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def danlu_train(run_dir, shards, *extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "danlu.cli", "train", str(ROOT / "configs/train/tiny.yaml"),
           f"data.path={shards}", f"train.run_dir={run_dir}", "model.vocab_size=512", "model.d_model=64",
           "model.n_layers=2", "data.seq_len=64", "train.global_batch_size=8", "optimizer.warmup_steps=5",
           "logging.log_every=5", "train.eval_every=20", "data.eval_batches=2", "mesh.data=2", "mesh.fsdp=2",
           *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_train_end_to_end_loss_falls_and_resumes(shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = danlu_train(run_dir, shards, "train.steps=40", "checkpoint.every=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("step", "loss", "lr", "tokens_per_sec", "mfu", "grad_norm"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "eval_loss" in r] == [20, 40]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert rows[-1]["eval_loss"] < rows[3]["eval_loss"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "tensorboard").is_dir()
    resolved = load_config(run_dir / "config.yaml")  # the resolved config reloads to the same values
    assert resolved.data.path == str(shards) and resolved.model.d_model == 64 and resolved.model.d_ff == 384
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]

    # The same command with more steps continues from step 40 instead of starting again.
    proc = danlu_train(run_dir, shards, "train.steps=50", "checkpoint.every=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "at step 40" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-2:] == [45, 50]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(shards, tmp_path):
    """A fake pod: 2 processes x 2 CPU devices (gloo collectives), each loading only its half of
    every global batch, give the losses of 1 process with 4 devices."""
    args = [sys.executable, "-m", "danlu.cli", "train", str(ROOT / "configs/train/tiny.yaml"),
            f"data.path={shards}", "model.vocab_size=512", "model.d_model=64", "model.n_layers=2",
            "data.seq_len=64", "train.global_batch_size=8", "optimizer.warmup_steps=2", "train.steps=6",
            "logging.log_every=2", "train.eval_every=6", "data.eval_batches=1", "mesh.data=2", "mesh.fsdp=2",
            "checkpoint.enabled=false", "logging.tensorboard=false"]
    base = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    procs = [subprocess.Popen(args + [f"train.run_dir={tmp_path / 'pod'}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                   "DANLU_COORDINATOR": f"127.0.0.1:{port}", "DANLU_NUM_PROCESSES": "2",
                                   "DANLU_PROCESS_ID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run(args + [f"train.run_dir={tmp_path / 'one'}"], cwd=ROOT, text=True, capture_output=True,
                            env={**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    pod = [json.loads(x) for x in (tmp_path / "pod" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in pod] == [r["step"] for r in one] == [2, 4, 6]
    for a, b in zip(pod, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert pod[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert "done: 6 steps" in outs[1][0]  # process 1 trained too, but wrote no metrics of its own
