"""`danlu launch local`: a fake pod of N processes on this machine (launch/local.py)."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import local

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    local.add_arguments(parser)
    return parser.parse_args(argv)


def python_child(code: str) -> list[str]:
    return ["--", sys.executable, "-c", code]


def test_dry_run_prints_env_and_commands(capsys, monkeypatch, tmp_path):
    # `danlu` resolves to the script beside the launcher's interpreter (the same install).
    (tmp_path / "python").touch()
    (tmp_path / "danlu").write_text("#!/bin/sh\n")
    (tmp_path / "danlu").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
    rc = local.main(parse(["--processes", "3", "--port", "4567", "--devices-per-process", "2", "--dry-run",
                           "--", "danlu", "train", "configs/train/tiny.yaml", "model.name=a b"]))
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == ["# process 0", "# process 1", "# process 2"]
    for i, line in enumerate(lines[1::2]):
        assert line == ("env DANLU_COORDINATOR=127.0.0.1:4567 DANLU_NUM_PROCESSES=3 "
                        f"DANLU_PROCESS_ID={i} JAX_PLATFORMS=cpu "
                        "'XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2' "
                        f"PYTHONUNBUFFERED=1 {tmp_path}/danlu train configs/train/tiny.yaml 'model.name=a b'")

    # Defaults: a free port shared by all processes, one device each; commands stay argument lists.
    monkeypatch.delenv("XLA_FLAGS")
    plans = local.plan(["prog", "x y"], 2, local.free_port())
    assert [env["DANLU_PROCESS_ID"] for env, _ in plans] == ["0", "1"]
    assert plans[0][0]["DANLU_COORDINATOR"] == plans[1][0]["DANLU_COORDINATOR"]
    assert plans[0][0]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    assert plans[1][1] == ["prog", "x y"]

    assert local.main(parse(["-n", "2", "--dry-run"])) == 2  # no command
    assert local.main(parse(["-n", "0", "--dry-run", "--", "true"])) == 2
    assert "no command" in capsys.readouterr().err


def test_failing_child_stops_the_others(tmp_path, capsys):
    """Process 1 fails with code 3: process 0 (which would sleep a minute) is terminated and the
    launcher exits with 3; per-process logs go to --log-dir."""
    code = ("import os, sys, time\n"
            "i = int(os.environ['DANLU_PROCESS_ID'])\n"
            "print('started', i, os.environ['DANLU_NUM_PROCESSES'], flush=True)\n"
            "time.sleep(60 if i == 0 else 0.5)\n"
            "print('finished', i, flush=True)\n"
            "sys.exit(3 if i == 1 else 0)\n")
    t0 = time.monotonic()
    rc = local.main(parse(["-n", "2", "--log-dir", str(tmp_path / "logs"), *python_child(code)]))
    assert rc == 3
    assert time.monotonic() - t0 < 20
    assert (tmp_path / "logs" / "process_0.log").read_text() == "started 0 2\n"  # killed while sleeping
    assert (tmp_path / "logs" / "process_1.log").read_text() == "started 1 2\nfinished 1\n"
    out = capsys.readouterr().out
    assert "process 1 exited with code 3; stopping the others" in out and "finished 1" in out  # log tail


def test_signals_are_forwarded_and_output_is_prefixed(tmp_path):
    code = ("import os, signal, sys, time\n"
            "def h(s, f):\n"
            "    print('got', signal.Signals(s).name, flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, h)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "launch.local", "-n", "2", *python_child(code)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    ready = [proc.stdout.readline(), proc.stdout.readline()]
    assert sorted(ready) == ["[0] ready\n", "[1] ready\n"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "[0] got SIGTERM" in out and "[1] got SIGTERM" in out


def test_two_processes_through_the_launcher_equal_one(shards, tmp_path):
    """`launch local -n 2 --devices-per-process 2 -- danlu train ...` gives the losses of one
    process with 4 devices (the same global mesh data=2 x fsdp=2)."""
    train = [sys.executable, "-m", "danlu.cli", "train", str(ROOT / "configs/train/tiny.yaml"),
             f"data.path={shards}", "model.vocab_size=512", "model.d_model=64", "model.n_layers=2",
             "data.seq_len=64", "train.global_batch_size=8", "optimizer.warmup_steps=2", "train.steps=6",
             "logging.log_every=2", "train.eval_every=6", "data.eval_batches=1", "mesh.data=2", "mesh.fsdp=2",
             "checkpoint.enabled=false", "logging.tensorboard=false"]
    pod = subprocess.run([sys.executable, "-m", "launch.local", "--processes", "2", "--devices-per-process", "2",
                          "--", *train, f"train.run_dir={tmp_path / 'pod'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # XLA_FLAGS has 8 devices: replaced
    assert pod.returncode == 0, pod.stdout[-3000:] + pod.stderr[-3000:]
    assert "[0] step      6 loss" in pod.stdout and "[1] done: 6 steps" in pod.stdout
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = subprocess.run([*train, f"train.run_dir={tmp_path / 'one'}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("pod", "one")}
    assert [r["step"] for r in rows["pod"]] == [r["step"] for r in rows["one"]] == [2, 4, 6]
    for a, b in zip(rows["pod"], rows["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert rows["pod"][-1]["eval_loss"] == pytest.approx(rows["one"][-1]["eval_loss"], rel=1e-5)
