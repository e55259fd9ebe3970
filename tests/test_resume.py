"""Runs die and come back: SIGKILL and resume = uninterrupted (bit for bit on CPU), restore onto
another mesh, a damaged checkpoint is set aside, poisoned batches are skipped and counted, and a
run of bad steps rolls back to the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pretrain import checkpoint as ckpt_lib
from pretrain.config import load_config
from pretrain.train import build

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "data.seq_len=64", "train.global_batch_size=8",
        "optimizer.warmup_steps=2", "logging.log_every=1", "train.eval_every=0", "data.eval_batches=0",
        "mesh.data=2", "mesh.fsdp=2", "logging.tensorboard=false"]


# `danlu train` with train()'s batch_hook giving data batches BAD out-of-range targets (512 =
# TINY's model.vocab_size), which make their loss NaN.
POISONED = """
import functools, sys
import numpy as np
import pretrain.train
from danlu.cli import main

BAD = {bad}

def poison(index, batch):
    return {{**batch, "targets": np.full_like(batch["targets"], 512)}} if index in BAD else batch

pretrain.train.train = functools.partial(pretrain.train.train, batch_hook=poison)
sys.exit(main())
"""


def command(run_dir, shards, *extra, nan_batches=()):
    entry = ["-c", POISONED.format(bad=sorted(nan_batches))] if nan_batches else ["-m", "danlu.cli"]
    return [sys.executable, *entry, "train", str(ROOT / "configs/train/tiny.yaml"),
            f"data.path={shards}", f"train.run_dir={run_dir}", *TINY, *extra]


ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir, step):
    cfg = load_config(Path(run_dir) / "config.yaml")
    built = build(cfg, devices=jax.devices()[:4])
    manager = ckpt_lib.make_manager(Path(run_dir) / "checkpoints", cfg.checkpoint)
    state, _ = ckpt_lib.restore(manager, step, built.state, built.state_sharding)
    manager.close()
    return jax.device_get(state.params)


def test_sigkill_and_resume_equals_uninterrupted(shards, tmp_path):
    extra = ["train.steps=24", "checkpoint.every=5"]
    ref = subprocess.run(command(tmp_path / "ref", shards, *extra), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(run, shards, *extra), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it between two checkpoints, mid-run
        if (run / "metrics.jsonl").exists() and any(r["step"] >= 13 for r in rows(run)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in rows(run))
    assert 13 <= killed_at < 24

    again = subprocess.run(command(run, shards, *extra), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    a, b = rows(tmp_path / "ref"), rows(run)
    assert [r["step"] for r in b] == list(range(1, 25))  # no step missing or repeated in the log
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # the same trajectory, bit for bit
    for x, y in zip(jax.tree.leaves(final_params(run, 24)), jax.tree.leaves(final_params(tmp_path / "ref", 24))):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_stops(shards, tmp_path):
    run = tmp_path / "term"
    proc = subprocess.Popen(command(run, shards, "train.steps=200", "checkpoint.every=0"), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and rows(run)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["signal"] == "SIGTERM" and summary["steps"] < 200
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [summary["steps"]]  # checkpoint.every=0, yet the preempted step was saved


BASE = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=32", "train.global_batch_size=8", "train.steps=10",
        "optimizer.warmup_steps=2", "optimizer.lr=1e-2"]


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 128, (8, 32)).astype(np.int32),
            "targets": rng.integers(0, 128, (8, 32)).astype(np.int32),
            "segment_ids": np.ones((8, 32), np.int32), "positions": np.tile(np.arange(32), (8, 1)).astype(np.int32)}


def test_restore_onto_another_mesh(tmp_path):
    saved = build(load_config(None, BASE + ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]), devices=jax.devices())
    state, losses = saved.state, []
    for i in range(5):
        if i == 3:
            manager = ckpt_lib.make_manager(tmp_path / "ckpt", saved.cfg.checkpoint)
            ckpt_lib.save(manager, 3, state, {"iterator": {"step": 3}}, saved.cfg.to_dict())
            manager.wait_until_finished()
        state, m = saved.train_step(state, jax.device_put(_batch(i), saved.batch_sharding))
        losses.append(float(m["loss"]))

    other = build(load_config(None, BASE + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]), devices=jax.devices())
    restored, data = ckpt_lib.restore(manager, 3, other.state, other.state_sharding)
    assert data == {"iterator": {"step": 3}} and int(restored.step) == 3
    q = restored.params["blocks"]["attn"]["q"]
    assert q.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}  # really on the new mesh
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    for i in (3, 4):
        restored, m = other.train_step(restored, jax.device_put(_batch(i), other.batch_sharding))
        np.testing.assert_allclose(float(m["loss"]), losses[i], rtol=2e-6)
    manager.close()


def test_damaged_latest_checkpoint_is_set_aside(shards, tmp_path):
    run = tmp_path / "damaged"
    first = subprocess.run(command(run, shards, "train.steps=10", "checkpoint.every=5"), env=ENV, cwd=ROOT,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = run / "checkpoints" / "10"
    victims = sorted((p for p in latest.rglob("*") if p.is_file() and "state" in p.parts), key=lambda p: -p.stat().st_size)
    for victim in victims[:3]:  # truncate the largest array files, as a half-finished copy would
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    again = subprocess.run(command(run, shards, "train.steps=12", "checkpoint.every=5"), env=ENV, cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is damaged" in again.stdout and "resumed from" in again.stdout and "at step 5" in again.stdout
    assert (run / "checkpoints" / "10.damaged").is_dir()
    assert [r["step"] for r in rows(run)] == list(range(1, 13))
    # A third run finds the good checkpoints only: no crash loop.
    third = subprocess.run(command(run, shards, "train.steps=12", "checkpoint.every=5"), env=ENV, cwd=ROOT,
                           capture_output=True, text=True)
    assert third.returncode == 0 and "is damaged" not in third.stdout


def test_poisoned_batch_is_skipped_and_counted(shards, tmp_path):
    run = tmp_path / "poison"
    proc = subprocess.run(command(run, shards, "train.steps=12", "checkpoint.every=0", nan_batches=[6]),
                          env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 7 not applied: non-finite loss nan" in proc.stdout
    r = rows(run)
    assert [x["skipped_steps"] for x in r] == [0] * 6 + [1] * 6
    assert all(np.isfinite(x["loss"]) for x in r if x["step"] != 7)
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 1
    assert r[6]["loss_mean"] is None and all(x["loss_mean"] == x["loss"] for x in r if x["step"] != 7)

    # logged every 4 steps, loss_mean is the mean loss of the applied steps since the previous row
    coarse = tmp_path / "coarse"
    proc = subprocess.run(command(coarse, shards, "train.steps=12", "checkpoint.every=0", "logging.log_every=4",
                                  nan_batches=[6]), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c, losses = rows(coarse), {x["step"]: x["loss"] for x in r}
    assert [x["step"] for x in c] == [4, 8, 12]
    for row, steps in zip(c, ([1, 2, 3, 4], [5, 6, 8], [9, 10, 11, 12])):
        assert row["loss_mean"] == pytest.approx(np.mean([losses[s] for s in steps]), rel=1e-6)


def test_bad_steps_in_a_row_roll_back_or_stop(shards, tmp_path):
    extra = ["train.steps=16", "checkpoint.every=5", "train.max_bad_steps=3"]
    proc = subprocess.run(command(tmp_path / "rb", shards, *extra, nan_batches=[7, 8, 9]), env=ENV, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Batches 7, 8, 9 feed steps 8, 9, 10; no checkpoint is taken at step 10, inside the bad run.
    assert "rolled back to the checkpoint of step 5; batches [7, 8, 9] will be skipped" in proc.stdout
    summary = json.loads((tmp_path / "rb" / "summary.json").read_text())
    assert summary["rollbacks"] == 1 and summary["steps"] == 16 and summary["skipped_steps"] == 3
    r = rows(tmp_path / "rb")
    assert [x["step"] for x in r] == list(range(1, 17))
    assert all(np.isfinite(x["loss"]) for x in r)  # the rows of the bad steps were rolled back too

    stop = subprocess.run(command(tmp_path / "stop", shards, *extra, "train.bad_step_policy=stop",
                                  nan_batches=[7, 8, 9]), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert stop.returncode == 3
    assert "3 steps in a row were not applied (batches [7, 8, 9])" in stop.stderr
