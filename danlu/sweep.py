"""`danlu sweep CONFIG [overrides]`: plan and run a scaling sweep (configs/scaling/*.yaml), here or on
Cloud TPU. The top layer: it composes the planner and runner (pretrain/scaling), the demo data
(data_pipeline) and the launcher (launch/tpu.py).

Here, the points train one after another in this process (`pretrain.scaling.runner.run_sweep`);
a sweep with `demo_data.enabled` first builds its token shards from the embedded corpus.

On Cloud TPU (`--launch LAUNCH.yaml`)::

    danlu sweep configs/scaling/tpu_isoflop.yaml --launch configs/scaling/launch-tpu_isoflop.yaml --project P
    danlu sweep configs/scaling/tpu_isoflop.yaml --launch ... --project P --dry-run   # every gcloud command

each unfinished point (its name not yet in the local `<output>/runs.csv`) becomes the training
config `danlu sweep --dry-run` plans, plus the launcher's (`distributed.auto=true`, the launch
config's `overrides`, `train.run_dir=<launch run_dir>/<point name>`), validated for the slice's chip
count before any TPU is touched. The TPU VM (or queued resource) is created once, danlu installed
once, and every point is run by `danlu launch tpu watch`'s loop (recreated and resumed after a
preemption); when a point's `danlu train` has exited 0, its `summary.json` is read from its gs://
run directory and its row appended to runs.csv, so an interrupted sweep resumes at the next point.
The points' shards must be where the TPUs can read them (`data.path=gs://...`): `demo_data` is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (configs/scaling/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sweep config, e.g. output=runs/x")
    p.add_argument("--dry-run", action="store_true", help="print the planned points (validated) and run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these points")
    p.add_argument("--predict-run", action="store_true",
                   help="after the sweep: fit it, write the prediction for a run of predict.budget_factor x the "
                        "largest budget to OUTPUT/prediction.json, then train that run and compare")
    p.add_argument("--verbose", action="store_true", help="print every logged training step")
    g = p.add_argument_group("on Cloud TPU: the points run one after another on one TPU slice")
    g.add_argument("--launch", metavar="YAML", help="launch config (keys of `danlu launch tpu`; `config:` is "
                                                   "not needed, the sweep gives each point's); with --dry-run: "
                                                   "print every gcloud command instead of the points")
    g.add_argument("--project")
    g.add_argument("--zone")
    g.add_argument("--interval", type=float, default=60.0, help="seconds between polls of a running point")
    g.add_argument("--delete-when-done", action="store_true", help="delete the TPUs after the last point")


def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.plan import load_sweep, plan_sweep
    from pretrain.scaling.runner import predict_and_run

    sweep = load_sweep(args.config, args.overrides)
    check_demo_data(sweep)
    if args.launch:
        return _on_tpu(sweep, args)
    if sweep.demo_data.enabled:  # a CPU sweep of the README (as `danlu demo`): no TPU probe with libtpu installed
        import os
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.dry_run:
        points = plan_sweep(sweep)
        print(f"{'name':28s} {'params':>10s} {'non-emb':>10s} {'tokens':>12s} {'steps':>7s} {'batch':>5s} "
              f"{'lr':>8s} {'flops':>10s} {'6ND':>10s}")
        for p in points:
            branch = f"  cooldown branch of {p.branch_of} from step {p.branch_step}" if p.branch_of else ""
            print(f"{p.name:28s} {p.params:10,d} {p.params_nonembed:10,d} {p.tokens:12,d} {p.steps:7d} {p.batch:5d} "
                  f"{p.lr:8.2e} {p.flops:10.3g} {p.flops_6nd:10.3g}{branch}")
        total = sum(p.flops for p in points)
        trained = sum(p.flops * (1 - p.branch_step / p.steps) if p.branch_of else p.flops for p in points)
        spent = f" ({trained:.3g} trained: the branches share their main run's stable phase)" if trained < total else ""
        print(f"{len(points)} points, {total:.3g} FLOPs in all{spent}; output {sweep.output}")
        return 0
    run_here(sweep, verbose=args.verbose, only=args.only)
    if args.predict_run:
        predict_and_run(sweep, verbose=args.verbose)
    return 0


def _on_tpu(sweep, args: argparse.Namespace) -> int:
    import sys

    from launch import tpu
    from launch.gcloud import LaunchError, Runner

    if args.predict_run:
        print("danlu sweep: --predict-run is not available with --launch yet; fit runs.csv, then launch the "
              "predicted run with `danlu launch tpu watch`", file=sys.stderr)
        return 2
    try:
        job = tpu.load_job(args.launch, {"config": sweep.base, "project": args.project, "zone": args.zone})
        job = tpu.resolve_location(job)
        run_sweep_on_tpu(sweep, job, Runner(dry_run=args.dry_run), only=args.only, interval=args.interval,
                         delete_when_done=args.delete_when_done,
                         log=lambda m: print(f"[sweep {time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    except LaunchError as e:
        print(f"danlu sweep: {e}", file=sys.stderr)
        return 2
    return 0


def check_demo_data(s) -> None:
    """The demo data's packages exist (before any point is planned or trained)."""
    from danlu.base.config import ConfigError
    from data_pipeline.demo_corpus import package_py_files

    if not s.demo_data.enabled:
        return
    for package in s.demo_data.packages:
        try:
            package_py_files(package)
        except ValueError as e:
            raise ConfigError(f"demo_data.packages: {e}") from None


def run_here(s, *, log: Callable[[str], None] = print, verbose: bool = False, only: list[str] | None = None) -> list[dict]:
    """Builds the demo shards when the sweep asks for them, then trains its unfinished points in this
    process (`pretrain.scaling.runner.run_sweep`); returns all rows of runs.csv."""
    from pretrain.scaling.runner import run_sweep

    check_demo_data(s)
    if s.demo_data.enabled:
        prepare_demo_data(s, log)
    return run_sweep(s, log=log, verbose=verbose, only=only)


def prepare_demo_data(s, log: Callable[[str], None] = print) -> Path:
    """Builds the demo corpus, a sentencepiece tokenizer and token shards under `<output>/data`
    (once; reused when manifest.json is there). Nothing is downloaded."""
    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer

    from pretrain.scaling.plan import demo_shards_dir

    shards = demo_shards_dir(s)
    work = shards.parent
    stamp = work / "demo_data.json"  # the settings the shards were built with; other settings rebuild them
    settings = json.loads(json.dumps(dataclasses.asdict(s.demo_data)))  # tuples as the JSON lists read back
    if (shards / "manifest.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        return shards
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    build_demo_corpus(str(corpus), max_bytes=s.demo_data.max_bytes, packages=s.demo_data.packages)
    model = train_tokenizer([str(corpus)], str(work / "tokenizer"), vocab_size=s.demo_data.vocab_size)
    split_by = "group" if s.demo_data.eval_split == "module" else "id"  # the corpus's `group` is the module
    manifest = encode_to_shards([str(corpus)], str(shards), model, num_shards=4,
                                eval_fraction=s.demo_data.eval_fraction, split_by=split_by)
    stamp.write_text(json.dumps(settings) + "\n")
    log(f"demo data: {sum(x['tokens'] for x in manifest['shards']):,} tokens in {shards}")
    return shards



def point_job(job, s, p):
    """The launch job of one sweep point: the sweep's base config with the point's overrides, and a
    run directory of its own under the launch config's run_dir."""
    from pretrain.scaling.plan import point_overrides

    return dataclasses.replace(job, config=s.base, overrides=(*point_overrides(s, p), *job.overrides),
                               run_dir=f"{job.run_dir.rstrip('/')}/{p.name}")


def summary_command(job) -> list[str]:
    """Prints the point's summary.json, which danlu train writes into its gs:// run directory."""
    return ["gcloud", "storage", "cat", f"{job.run_dir.rstrip('/')}/summary.json", f"--project={job.project}"]


def run_sweep_on_tpu(s, job, runner, *, only: list[str] | None = None, interval: float = 60.0,
                     sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print,
                     delete_when_done: bool = False) -> list[dict]:
    """Trains the sweep's unfinished points on the job's TPUs; returns the rows appended to runs.csv
    (none in a dry run, which prints every command instead)."""
    from danlu.tpu import prepare
    from launch import tpu
    from launch.gcloud import LaunchError
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
    # Each point's config resolved and validated first; its job mounts the point's data bucket.
    prepared = {p.name: prepare(point_job(job, s, p)) for p in todo}
    jobs = {name: j for name, (j, _) in prepared.items()}
    configs = {name: text for name, (_, text) in prepared.items()}
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
            raise LaunchError(f"sweep point {p.name}: its summary.json is not JSON: {text[:200]!r}") from None
        row = make_row(p, summary, j.run_dir)
        append_row(csv_path, row)
        rows.append(row)
        log(f"{p.name}: loss {float(row['loss']):.4f}")
    if delete_when_done and todo:
        for cmd in tpu.delete_commands(job):
            runner.run(cmd)
    return rows
