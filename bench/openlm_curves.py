"""Backtest of `danlu fit-curve` on real loss curves: open_lm decoders with the C4 eval loss at every
checkpoint (shared/scaling-data/openlm_curves_dev.csv, described in its README).

For every run: predict the final checkpoint's loss from the checkpoints in the first `fraction` of its
steps, with the other runs of the file as references (leave-one-out: the run itself and any other
grouping of the same training run — same model, peak lr and total steps — are left out), exactly as
`danlu fit-curve RUN --fraction F --reference OTHERS...` would with the schedule given as options.

    .venv/bin/python bench/openlm_curves.py [CSV] [--fraction 0.25] [--level 0.9]

The last line printed is one JSON object (the summary).
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.scaling.curve import Curve, CurveError, Schedule, fit_curve, make_pool, make_prefix, MIN_ROWS  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared/scaling-data/openlm_curves_dev.csv"
# the open_lm runs' schedule (README of the data): 50 warmup steps, cosine to 0.1 x peak
WARMUP, FINAL_RATIO = 50, 0.1


def read_runs(csv_path: str | Path) -> tuple[list[Curve], dict]:
    """The file's runs as Curves (eval-loss points, schedule from the options) and the groups dropped
    because their steps repeat. A run is (model, peak_lr, sweep, total_steps, total_epochs)."""
    groups = collections.defaultdict(list)
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            key = (r["model"], r["peak_lr"], r["sweep"], r["total_steps"], r["total_epochs"])
            groups[key].append((int(r["current_steps"]), float(r["loss"])))
    runs, dropped = [], {}
    for key, rows in sorted(groups.items()):
        name = "/".join(key)
        steps = [s for s, _ in rows]
        if len(set(steps)) < len(steps):
            dropped[name] = "steps repeat"
            continue
        rows.sort()
        step = np.array([s for s, _ in rows])
        loss = np.array([v for _, v in rows])
        T = int(key[3])
        eta = Schedule("cosine", float(key[1]), WARMUP, FINAL_RATIO).per_step(T)
        c = Curve(name, step, step.copy(), loss, eta, "loss", "cosine schedule (options)")
        c.measured = float(loss[-1]) if step[-1] >= T else None
        c.extra["config"] = (key[0], key[1], key[3])  # the training run, whatever its logging
        runs.append(c)
    return runs, dropped


def backtest(csv_path: str | Path = DEFAULT_CSV, fraction: float = 0.25, level: float = 0.9) -> dict:
    """Per-run predicted / measured / rel_error / interval / covered and a summary (runs, answered,
    refused with reasons, median and 90th-percentile |error|, interval coverage)."""
    runs, dropped = read_runs(csv_path)
    per_run, refused = [], collections.Counter()
    for c in runs:
        row = {"run": c.name, "total_steps": c.T, "measured": c.measured}
        n = make_prefix(c, fraction).n
        if c.measured is None:
            row["refused"] = "not finished"
        elif n < MIN_ROWS:
            row["refused"] = f"{n} checkpoints in the first {fraction:.0%} (needs {MIN_ROWS})"
        else:
            refs = [r for r in runs if r.extra["config"] != c.extra["config"]]
            try:
                r = fit_curve(c, fraction=fraction, level=level, bootstrap=0, pool=make_pool(refs, make_prefix(c, fraction)))
                f = r["forms"]["pooled"]
                if "failed" in f:
                    row["refused"] = f"failed: {f['failed']}"
                else:
                    row.update(predicted=f["predicted_final_loss"], rel_error=f["rel_error"],
                               interval=f.get("interval"), covered=f.get("covered"), checkpoints=n)
            except CurveError as e:
                row["refused"] = str(e)
        if "refused" in row:
            refused[row["refused"]] += 1
        per_run.append(row)
    answered = [r for r in per_run if "predicted" in r]
    err = np.abs([r["rel_error"] for r in answered])
    covered = [r["covered"] for r in answered if r.get("covered") is not None]
    summary = {"csv": str(csv_path), "fraction": fraction, "level": level, "runs": len(runs),
               "dropped_groups": len(dropped), "answered": len(answered), "refused": len(runs) - len(answered),
               "refused_reasons": dict(refused),
               "median_abs_rel_error": float(np.median(err)) if len(err) else None,
               "p90_abs_rel_error": float(np.quantile(err, 0.9)) if len(err) else None,
               "coverage": float(np.mean(covered)) if covered else None}
    return {"runs": per_run, "summary": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="?", default=str(DEFAULT_CSV))
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--level", type=float, default=0.9)
    args = ap.parse_args(argv)
    result = backtest(args.csv, args.fraction, args.level)
    for r in result["runs"]:
        if "predicted" in r:
            iv = r["interval"]
            print(f"{r['run']:70s} {r['predicted']:.4f} measured {r['measured']:.4f} ({r['rel_error']:+.2%}) "
                  f"[{iv[0]:.4f}, {iv[1]:.4f}] {'in' if r['covered'] else 'OUT'}")
        else:
            print(f"{r['run']:70s} refused: {r['refused']}")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
