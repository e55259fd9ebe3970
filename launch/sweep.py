"""`danlu sweep CONFIG --launch LAUNCH.yaml`: a scaling sweep's points trained on Cloud TPU, one after another.

    danlu sweep configs/scaling/tpu_isoflop.yaml --launch configs/scaling/launch-sweep-v5e-16.yaml --project P
    danlu sweep configs/scaling/tpu_isoflop.yaml --launch ... --project P --dry-run   # every gcloud command

Each unfinished point (its name not yet in the local `<output>/runs.csv`) becomes the training
config `danlu sweep --dry-run` plans, plus the launcher's (`distributed.auto=true`, the launch
config's `overrides`, `train.run_dir=<launch run_dir>/<point name>`), validated for the slice's chip
count before any TPU is touched. The TPU VM (or queued resource) is created once, danlu installed
once, and every point is run by `danlu launch tpu watch`'s loop (recreated and resumed after a
preemption); when a point's `danlu train` has exited 0, its `summary.json` is read from worker 0
and its row appended to runs.csv, so an interrupted sweep resumes at the next point. The points'
shards must be where the TPUs can read them (`data.path=gs://...`): `demo_data` is refused.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Callable

from launch import tpu
from launch.gcloud import LaunchError, Runner


def point_job(job: tpu.TpuJob, s, p) -> tpu.TpuJob:
    """The launch job of one sweep point: the sweep's base config with the point's overrides, and a
    run directory of its own under the launch config's run_dir."""
    from pretrain.scaling.plan import point_overrides

    return dataclasses.replace(job, config=s.base, overrides=(*point_overrides(s, p), *job.overrides),
                               run_dir=f"{job.run_dir.rstrip('/')}/{p.name}")


def summary_command(job: tpu.TpuJob) -> list[str]:
    """Prints the point's summary.json from worker 0. danlu train sends only checkpoints to a gs://
    run_dir; config.yaml, metrics.jsonl and summary.json stay on worker 0 under the same path taken
    as a local one (relative to the login directory, where the run command starts it)."""
    return tpu.ssh_command(job, job.nodes[0], f"cat {shlex.quote(str(Path(job.run_dir) / 'summary.json'))}", worker="0")


def run_sweep_on_tpu(s, job: tpu.TpuJob, runner: Runner, *, only: list[str] | None = None, interval: float = 60.0,
                     sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print,
                     delete_when_done: bool = False) -> list[dict]:
    """Trains the sweep's unfinished points on the job's TPUs; returns the rows appended to runs.csv
    (none in a dry run, which prints every command instead)."""
    from pretrain.scaling.plan import plan_sweep
    from pretrain.scaling.runner import append_row, make_row, read_rows

    if s.demo_data.enabled:
        raise LaunchError("demo_data builds token shards on this machine, out of the TPUs' reach: set "
                          "demo_data.enabled=false and data.path=gs://BUCKET/shards (a sweep override)")
    if not job.run_dir.startswith("gs://"):
        raise LaunchError(f"run_dir={job.run_dir!r}: a TPU sweep needs a gs:// run_dir (each point's run directory "
                          f"and summary.json live under it)")
    points = plan_sweep(s)
    if only:
        unknown = sorted(set(only) - {p.name for p in points})
        if unknown:
            raise LaunchError(f"--only: no sweep points named {unknown}")
        points = [p for p in points if p.name in only]
    out = Path(s.output)
    csv_path = out / "runs.csv"
    done = {r["name"] for r in read_rows(csv_path)}
    todo = [p for p in points if p.name not in done]
    jobs = {p.name: point_job(job, s, p) for p in todo}
    configs = {name: tpu.config_text(tpu.resolved_config(j)) for name, j in jobs.items()}  # all validated first
    if not runner.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    rows, install = [], True
    for i, p in enumerate(todo):
        j = jobs[p.name]
        log(f"[{i + 1}/{len(todo)}] {p.name}: N={p.params:,} D={p.tokens:,} steps={p.steps} on {job.name} "
            f"({job.accelerator_type}), run_dir {j.run_dir}")
        code = tpu.watch(j, runner, configs[p.name], interval=interval, sleep=sleep, log=log, install=install)
        install = False
        if code != 0:
            raise LaunchError(f"sweep point {p.name}: danlu train exited with {code} on {job.name}; "
                              f"see `danlu launch tpu logs`; rerunning the sweep resumes this point")
        text = runner.run(summary_command(j), capture=True)
        if runner.dry_run:
            continue
        try:
            summary = json.loads(text)
        except ValueError:
            raise LaunchError(f"sweep point {p.name}: its summary.json on worker 0 is not JSON: {text[:200]!r}") from None
        row = make_row(p, summary, j.run_dir)
        append_row(csv_path, row)
        rows.append(row)
        log(f"{p.name}: loss {float(row['loss']):.4f}")
    if delete_when_done and todo:
        for cmd in tpu.delete_commands(job):
            runner.run(cmd)
    return rows
