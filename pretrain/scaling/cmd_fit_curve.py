"""`danlu fit-curve RUN`: fit one run's loss curve and predict its final loss (also while it runs).
RUN is a `danlu train` run directory or a CSV / JSONL of (step, loss[, lr]) from another trainer."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.scaling import exits_2_on_fit_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="run directory of `danlu train` (metrics.jsonl, config.yaml), or a "
                                                  ".csv / .jsonl of (step, loss[, lr]) rows")
    p.add_argument("--fraction", type=float, help="fit only the first FRACTION of the steps (a backtest on a "
                                                  "finished run); default: every step logged so far")
    p.add_argument("--reference", nargs="*", default=[], metavar="RUN",
                   help="finished runs of the same family (the rest of the sweep): the curve's shape is pooled from "
                        "them and the interval calibrated on them (the `pooled` answer)")
    p.add_argument("--target", choices=["train", "eval"], default="train",
                   help="run directories: the curve to fit, the train loss (loss_mean of metrics.jsonl) or the eval "
                        "loss rows (a fixed eval set: no batch noise, but only as many points as evaluations)")
    p.add_argument("--level", type=float, default=0.9, help="coverage of the intervals")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the per-run forms' intervals")
    t = p.add_argument_group("tables (.csv / .jsonl, for RUN and each --reference)")
    t.add_argument("--columns", help="ROLE=COLUMN,... for the roles step, loss, lr, e.g. step=_step,loss=eval/loss "
                                     "(default: columns named step, loss, lr)")
    t.add_argument("--schedule", choices=["cosine", "linear", "constant", "wsd"],
                   help="the lr schedule (without it: the lr column, interpolated)")
    t.add_argument("--peak-lr", type=float, default=1.0, help="peak lr (only its shape matters unless an lr column "
                                                              "is checked against it)")
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--total-steps", type=int, help="the run's length (default: its last step, i.e. a finished run); "
                                                   "references always end at their last step")
    t.add_argument("--final-lr-ratio", type=float, default=0.1, help="final lr / peak lr (cosine, linear, wsd)")
    t.add_argument("--cooldown-fraction", type=float, default=0.2, help="wsd: share of the steps spent decaying")
    p.add_argument("--output", help="write the result JSON here (default: RUN/curve_fit.json, or "
                                    "RUN.curve_fit.json next to a table)")
    p.add_argument("--plot", help="write a PNG of the curve and the fits here")


@exits_2_on_fit_errors
def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.curve import Schedule, fit_curve, load_curve, parse_columns
    from pretrain.scaling.plots import plot_curve

    columns = parse_columns(args.columns)
    schedule = Schedule(args.schedule, args.peak_lr, args.warmup_steps, args.final_lr_ratio,
                        args.cooldown_fraction) if args.schedule else None
    curve = load_curve(args.run_dir, args.target, columns, schedule, args.total_steps)
    refs = [load_curve(r, args.target, columns, schedule) for r in args.reference]
    r = fit_curve(curve, fraction=args.fraction, bootstrap=args.bootstrap, level=args.level, target=args.target,
                  references=refs)
    src = Path(args.run_dir)
    out = Path(args.output) if args.output else (src / "curve_fit.json" if src.is_dir()
                                                 else src.with_name(src.name + ".curve_fit.json"))
    out.write_text(json.dumps(r, indent=1) + "\n")
    state = "finished" if r["finished"] else f"running (step {r['last_logged_step']} of {r['total_steps']})"
    print(f"{args.run_dir}: {state}; fitted the {r['target']} loss ({r['loss_column']}) of steps "
          f"{r['fit_steps'][0]}..{r['fit_steps'][1]} ({r['rows_fitted']} rows); lr from {r['lr_schedule']}")
    for form, f in r["forms"].items():
        mark = "*" if form == r["answer"] else " "
        if "failed" in f:
            print(f" {mark}{form:8s} FAILED: {f['failed']}")
            continue
        iv = f" [{f['interval'][0]:.4f}, {f['interval'][1]:.4f}] ({r['level']:.0%})" if "interval" in f else ""
        meas = f"; measured {r['measured_final_loss']:.4f} ({f['rel_error']:+.2%})" if "rel_error" in f else ""
        note = f" ({f['note']})" if "note" in f else ""
        print(f" {mark}{form:8s} final loss at step {r['total_steps']}: {f['predicted_final_loss']:.4f}{iv}{meas}{note}")
    if args.plot:
        plot_curve(r, args.plot, curve.eta)
    print(f"wrote {out}" + (f", {args.plot}" if args.plot else ""))
    if "failed" in r["forms"][r["answer"]]:
        print(f"danlu fit-curve: no prediction: the {r['answer']} form failed ({r['forms'][r['answer']]['failed']})",
              file=sys.stderr)
        return 2
    return 0
