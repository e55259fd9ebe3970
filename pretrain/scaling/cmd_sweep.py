"""`danlu sweep CONFIG [overrides]`: plan and run a scaling sweep (configs/scaling/*.yaml)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="sweep YAML (configs/scaling/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the sweep config, e.g. output=runs/x")
    p.add_argument("--dry-run", action="store_true", help="print the planned points (validated) and run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these points")
    p.add_argument("--predict-run", action="store_true",
                   help="after the sweep: fit it, write the prediction for a run of predict.budget_factor x the "
                        "largest budget to OUTPUT/prediction.json, then train that run and compare")
    p.add_argument("--verbose", action="store_true", help="print every logged training step")


def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.plan import load_sweep, plan_sweep
    from pretrain.scaling.runner import predict_and_run, run_sweep

    sweep = load_sweep(args.config, args.overrides)
    if args.dry_run:
        points = plan_sweep(sweep)
        print(f"{'name':28s} {'params':>10s} {'non-emb':>10s} {'tokens':>12s} {'steps':>7s} {'batch':>5s} "
              f"{'lr':>8s} {'flops':>10s} {'6ND':>10s}")
        for p in points:
            print(f"{p.name:28s} {p.params:10,d} {p.params_nonembed:10,d} {p.tokens:12,d} {p.steps:7d} {p.batch:5d} "
                  f"{p.lr:8.2e} {p.flops:10.3g} {p.flops_6nd:10.3g}")
        print(f"{len(points)} points, {sum(p.flops for p in points):.3g} FLOPs in all; output {sweep.output}")
        return 0
    run_sweep(sweep, verbose=args.verbose, only=args.only)
    if args.predict_run:
        predict_and_run(sweep, verbose=args.verbose)
    return 0
