"""`danlu sweep CONFIG [overrides]`: plan and run a scaling sweep (configs/scaling/*.yaml)."""
from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (configs/scaling/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sweep config, e.g. output=runs/x")
    p.add_argument("--dry-run", action="store_true", help="print the planned points (validated) and run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these points")
    p.add_argument("--predict-run", action="store_true",
                   help="after the sweep: fit it, write the prediction for a run of predict.budget_factor x the "
                        "largest budget to OUTPUT/prediction.json, then train that run and compare")
    p.add_argument("--verbose", action="store_true", help="print every logged training step")
    g = p.add_argument_group("on Cloud TPU (launch/sweep.py): the points run one after another on one TPU slice")
    g.add_argument("--launch", metavar="YAML", help="launch config (keys of `danlu launch tpu`; `config:` is "
                                                   "not needed, the sweep gives each point's); with --dry-run: "
                                                   "print every gcloud command instead of the points")
    g.add_argument("--project")
    g.add_argument("--zone")
    g.add_argument("--interval", type=float, default=60.0, help="seconds between polls of a running point")
    g.add_argument("--delete-when-done", action="store_true", help="delete the TPUs after the last point")


def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.plan import load_sweep, plan_sweep
    from pretrain.scaling.runner import predict_and_run, run_sweep

    sweep = load_sweep(args.config, args.overrides)
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
    run_sweep(sweep, verbose=args.verbose, only=args.only)
    if args.predict_run:
        predict_and_run(sweep, verbose=args.verbose)
    return 0


def _on_tpu(sweep, args: argparse.Namespace) -> int:
    import sys

    from launch import tpu
    from launch.gcloud import LaunchError, Runner
    from launch.sweep import run_sweep_on_tpu

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
