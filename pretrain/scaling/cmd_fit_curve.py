"""`danlu fit-curve RUN_DIR`: fit one run's loss curve and predict its final loss (also while it runs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.scaling import exits_2_on_fit_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory of `danlu train` (metrics.jsonl, config.yaml)")
    p.add_argument("--fraction", type=float, help="fit only the first FRACTION of the steps (a backtest on a "
                                                  "finished run); default: every step logged so far")
    p.add_argument("--reference", nargs="*", default=[], metavar="RUN_DIR",
                   help="finished runs with the same schedule shape: their annealing ratio pins the schedule "
                        "form's C when the fitted steps have seen too little annealing to identify it")
    p.add_argument("--target", choices=["train", "eval"], default="train",
                   help="the curve to fit: the train loss (loss_mean of metrics.jsonl) or the eval loss rows (a fixed "
                        "eval set: no batch noise, but only as many points as evaluations)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--output", help="write the result JSON here (default: RUN_DIR/curve_fit.json)")
    p.add_argument("--plot", help="write a PNG of the curve and both fits here")


@exits_2_on_fit_errors
def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.curve import fit_curve, reference_anneal_ratio
    from pretrain.scaling.plots import plot_curve

    ratio = reference_anneal_ratio(args.reference, args.target) if args.reference else None
    r = fit_curve(args.run_dir, fraction=args.fraction, bootstrap=args.bootstrap, anneal_ratio=ratio, target=args.target)
    out = Path(args.output) if args.output else Path(args.run_dir) / "curve_fit.json"
    out.write_text(json.dumps(r, indent=1) + "\n")
    state = "finished" if r["finished"] else f"running (step {r['last_logged_step']} of {r['total_steps']})"
    print(f"{args.run_dir}: {state}; fitted the {r['target']} loss ({r['loss_column']}) of steps "
          f"{r['fit_steps'][0]}..{r['fit_steps'][1]}")
    for form, f in r["forms"].items():
        iv = f" [{f['interval'][0]:.4f}, {f['interval'][1]:.4f}] ({r['level']:.0%})" if "interval" in f else ""
        meas = f"; measured {r['measured_final_loss']:.4f} ({f['rel_error']:+.2%})" if "rel_error" in f else ""
        note = f" ({f['note']})" if "note" in f else ""
        print(f"  {form:8s} final loss at step {r['total_steps']}: {f['predicted_final_loss']:.4f}{iv}{meas}{note}")
    if args.plot:
        plot_curve(r, args.plot)
    print(f"wrote {out}" + (f", {args.plot}" if args.plot else ""))
    return 0
