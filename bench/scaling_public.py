"""Scaling predictions on real runs: backtests on public sweeps and loss curves, and on our own CPU sweeps.

1. Marin's IsoFLOP sweeps (three pretraining mixtures, `../shared/scaling-data/marin_isoflop_*.csv`):
   `danlu fit --backtest` with default settings (1000 bootstrap resamples, QC window 3). The
   headline row fits the budgets up to 3e19 FLOPs and predicts the best loss at 3e20 (10x);
   every other cut-off is reported too. C is the sweep's own FLOP count (`throughput/total_gflops`,
   3x the nominal budget; 6ND with total parameters is off by up to 35% for the small models).
2. Loss curves of real runs (`../shared/scaling-data/openlm_curves_dev.csv`): the final loss of
   every run predicted from the checkpoints in its first 25% (`bench/openlm_curves.py`).
3. The project's recorded CPU sweeps (`bench/data/scaling_*`): the same backtest.
4. Speed: `fit_all` (frontier, approaches 1-3, GPT-4 form) with 1000 bootstrap resamples on 250 runs.

    .venv/bin/python bench/scaling_public.py [--data ../shared/scaling-data] [--resamples 1000]

The data are read where they lie, never copied into the repository. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from pretrain.scaling import fit as F  # noqa: E402

MARIN_COLUMNS = ("params=parameter_count,tokens=throughput/total_tokens,loss=eval/paloma/macro_loss,name=Name,"
                 "budget=throughput/total_gflops*1e9")
ESTIMATORS = ("frontier", "gpt4", "approach3")


def marin(path: Path, resamples: int, fit_upto: float = 3e19, target: float = 3e20) -> dict:
    runs = F.read_runs(path, F.parse_columns(MARIN_COLUMNS))
    t = time.perf_counter()
    bt = F.backtest(runs, bootstrap=resamples)
    head = [r for r in bt["rows"] if np.isclose(r["fitted_up_to"], fit_upto, rtol=0.02)
            and np.isclose(r["C"], target, rtol=0.02)]
    if not head:
        raise SystemExit(f"{path}: no backtest row from {fit_upto:.3g} to {target:.3g}")
    r = head[0]
    return {"runs": len(runs.N), "budgets": bt["budgets"], "seconds": time.perf_counter() - t,
            "headline": {"fitted_up_to": r["fitted_up_to"], "C": r["C"], "factor": r["factor"],
                         "measured_best": r["measured_best"],
                         **{n: r[n] for n in ESTIMATORS if n in r}},
            "summary": bt["summary"], "rows": bt["rows"]}


def own_sweeps() -> dict:
    out = {}
    for name in ("cpu_bench", "cpu_demo"):
        csv = ROOT / "bench" / "data" / f"scaling_{name}" / "runs.csv"
        runs = F.read_runs(csv)
        try:
            bt = F.backtest(runs, bootstrap=1000)
        except F.FitError as e:
            out[name] = {"skipped": str(e)}
            continue
        out[name] = {"runs": len(runs.N), "budgets": bt["budgets"], "summary": bt["summary"],
                     "rows": [{k: v for k, v in r.items()} for r in bt["rows"]]}
    return out


def speed(resamples: int = 1000, n_runs: int = 250) -> dict:
    truth = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
    rng = np.random.default_rng(0)
    budgets = np.logspace(18, 21, 10)
    N, G = [], []
    for C in budgets:
        n_opt = F.optimal3(truth, C)[0]
        for n in n_opt * np.logspace(-1, 1, n_runs // len(budgets)):
            N.append(n), G.append(C)
    N, G = np.array(N), np.array(G)
    D = G / (6 * N)
    L = F.loss3(truth, N, D) * np.exp(rng.normal(0, 0.01, len(N)))
    runs = F.Runs(N, D, L, 6 * N * D, G, [f"r{i}" for i in range(len(N))], {"csv": "synthetic"})
    t = time.perf_counter()
    fit = F.fit_all(runs, bootstrap=resamples, predict_C=[1e22])
    return {"runs": len(N), "resamples": resamples, "seconds": time.perf_counter() - t,
            "frontier_bootstrap_seconds": fit["frontier"]["bootstrap"]["seconds"],
            "approach3_bootstrap_seconds": fit["approach3"]["bootstrap"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "scaling-data"))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["marin", "curves", "own", "speed"])
    args = ap.parse_args()
    data = Path(args.data)
    out: dict = {"machine": os.uname().nodename, "cores": os.cpu_count()}
    if "marin" not in args.skip:
        out["marin"] = {}
        for mix in ("comma", "dclm", "nemotron"):
            m = marin(data / f"marin_isoflop_{mix}.csv", args.resamples)
            out["marin"][mix] = m
            h = m["headline"]
            print(f"marin {mix}: best loss at {h['C']:.3g} from budgets <= {h['fitted_up_to']:.3g} "
                  f"(x{h['factor']:.1f}), measured {h['measured_best']:.4f}: " + "; ".join(
                      f"{n} {h[n]['predicted']:.4f} [{h[n]['interval'][0]:.4f}, {h[n]['interval'][1]:.4f}] "
                      f"{h[n]['rel_error']:+.2%}{'' if h[n]['covered'] else ' (outside)'}" for n in ESTIMATORS if n in h),
                  flush=True)
        for n in ESTIMATORS:
            rows = [m["headline"][n] for m in out["marin"].values() if n in m["headline"]]
            out[f"marin_10x_{n}"] = {"max_abs_rel_error": max(abs(r["rel_error"]) for r in rows),
                                     "covered": sum(r["covered"] for r in rows), "of": len(rows)}
    if "curves" not in args.skip:
        try:
            import openlm_curves
        except ImportError as e:
            out["curves"] = {"skipped": f"bench/openlm_curves.py: {e}"}
        else:
            res = openlm_curves.backtest(data / "openlm_curves_dev.csv")
            out["curves"] = res.get("summary", res)
            print("curves:", json.dumps(out["curves"]), flush=True)
    if "own" not in args.skip:
        out["own"] = own_sweeps()
        for name, o in out["own"].items():
            print(f"{name}: " + json.dumps({n: {k: s[k] for k in ("mean_abs_rel_error", "coverage", "n")}
                                            for n, s in o.get("summary", {}).items()} or o), flush=True)
    if "speed" not in args.skip:
        out["speed"] = speed(args.resamples)
        print(f"speed: fit_all of {out['speed']['runs']} runs with {args.resamples} resamples: "
              f"{out['speed']['seconds']:.1f} s", flush=True)
    print(json.dumps(F.to_jsonable(out)))


if __name__ == "__main__":
    main()
