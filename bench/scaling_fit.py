"""Scaling-law benchmark: prediction errors on the recorded CPU sweeps, and fit speed against the plain method.

1. Held-out prediction: `danlu fit --holdout largest` on each recorded sweep: relative error of
   Approach 3 on the largest budget's runs, fitted without them. The benchmark's sweep is
   `configs/scaling/cpu_bench.yaml` (bench/data/scaling_cpu_bench/); the demo sweep
   `configs/scaling/cpu_demo.yaml` (bench/data/scaling_cpu_demo/, 10x smaller) also has its 10x
   run (predicted.csv), predicted from all the sweep's runs before it ran.
2. Loss curves: each run's final loss predicted from the first 25% of its steps (`fit_curve`,
   fraction 0.25), the schedule form's annealing ratio taken from the OTHER sweep runs
   (leave-one-out, as `danlu fit-curve --reference` does); against the measured final train loss
   (mean of the last 2% of steps) and the final eval loss.
3. Speed: Approach 3 + 1000 bootstrap resamples on 250 synthetic runs. danlu: grid screened,
   L-BFGS from the 64 best starts (vectorised), scipy polish, bootstrap warm-started from the optimum
   and solved all resamples at once. Peer: Epoch AI's replication of Chinchilla (Besiroglu et al.
   2024) done the plain way: scipy L-BFGS-B from all 4500 grid starts for the fit and for every
   resample (same objective and analytic gradient); timed on the full fit and --peer-resamples
   resamples, extrapolated to 1000.

    .venv/bin/python bench/scaling_fit.py            # ~5 minutes on 2 cores
    .venv/bin/python bench/scaling_fit.py --record runs/scaling/cpu_bench cpu_bench   # after `danlu sweep`
Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pretrain.scaling import fit as F  # noqa: E402
from pretrain.scaling.curve import CurveError, fit_curve, load_curve  # noqa: E402

DATA = ROOT / "bench" / "data"
SWEEPS = ("cpu_bench", "cpu_demo")  # recorded sweeps, bench/data/scaling_<name>/; the first one is the benchmark's
TRUTH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
KEEP = ("step", "loss", "loss_mean", "lr", "eval_loss")  # the metrics.jsonl columns the curve fits read


def record(output: Path, name: str) -> Path:
    """Copies a finished sweep (`danlu sweep` output dir) to bench/data/scaling_<name>/: runs.csv,
    predicted.csv and prediction.json when there, and per run config.yaml and metrics.jsonl reduced to KEEP."""
    import shutil

    dest = DATA / f"scaling_{name}"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "runs").mkdir(parents=True)
    for f in ("runs.csv", "predicted.csv", "prediction.json"):
        if (output / f).exists():
            shutil.copy(output / f, dest / f)
    names = [r["name"] for r in csv.DictReader(open(output / "runs.csv", newline=""))]
    if (output / "predicted.csv").exists():
        names.append("predicted")
    for n in names:
        (dest / "runs" / n).mkdir()
        shutil.copy(output / n / "config.yaml", dest / "runs" / n / "config.yaml")
        rows = [json.loads(x) for x in (output / n / "metrics.jsonl").read_text().splitlines() if x.strip()]
        (dest / "runs" / n / "metrics.jsonl").write_text(
            "".join(json.dumps({k: r[k] for k in KEEP if k in r}) + "\n" for r in rows))
    return dest


def heldout(data: Path) -> dict:
    runs = F.read_runs(data / "runs.csv")
    _, rep = F.holdout_largest(runs, bootstrap=1000)
    out = {"holdout_C": rep["C"], "holdout_mean_abs_rel_error": rep["mean_abs_rel_error"],
           "holdout_max_abs_rel_error": rep["max_abs_rel_error"], "holdout_runs": rep["runs"],
           "holdout_gpt4_frontier_rel_error": rep.get("gpt4_frontier", {}).get("rel_error")}
    groups = F.budget_groups(runs)
    below = runs.subset(groups != groups[np.argmax(runs.C)])
    try:  # one step back: the second-largest budget from the ones below it
        _, rep2 = F.holdout_largest(below, bootstrap=1000)
    except F.FitError:  # too few runs below it
        rep2 = None
    if rep2 is not None:
        out.update({"next_holdout_C": rep2["C"], "next_holdout_mean_abs_rel_error": rep2["mean_abs_rel_error"],
                    "next_holdout_max_abs_rel_error": rep2["max_abs_rel_error"], "next_holdout_runs": rep2["runs"]})
    if not (data / "predicted.csv").exists():
        return out
    fit = F.fit_all(runs, bootstrap=1000)
    with open(data / "predicted.csv", newline="") as f:
        big = next(csv.DictReader(f))
    pr = F.predict_point(fit, float(big["params"]), float(big["tokens"]))
    measured = float(big["loss"])
    recorded = json.loads((data / "prediction.json").read_text())
    out["big_run"] = {"C": 6 * float(big["params"]) * float(big["tokens"]), "params": int(big["params"]),
                      "tokens": int(big["tokens"]), "measured": measured, "predicted_refit": pr["loss"],
                      "estimator_refit": pr["estimator"],
                      "predicted_refit_ci": pr["loss_ci"], "rel_error_refit": (pr["loss"] - measured) / measured,
                      "predicted_before_run": recorded["predicted_loss"],
                      "predicted_before_run_ci": recorded["predicted_loss_ci"],
                      "rel_error_before_run": recorded["rel_error"]}
    return out


def curves(data: Path, fraction: float = 0.25) -> dict:
    """Per run, the final loss predicted from the first `fraction` of its steps, for each target the
    runs allow: "eval" (the eval-loss rows; needs an eval every few % of the run, as cpu_bench has)
    and "train" (loss_mean, or the single-step loss of runs logged before loss_mean existed). The
    answer is `danlu fit-curve --reference` with the OTHER sweep runs as references (leave-one-out)."""
    dirs = sorted(p for p in (data / "runs").iterdir() if p.is_dir())
    sweep = [d for d in dirs if d.name != "predicted"]
    out = {"fraction": fraction}
    for target in ("eval", "train"):
        try:
            loaded = {d.name: load_curve(d, target) for d in dirs}
            rows = []
            for d in dirs:
                refs = [loaded[r.name] for r in sweep if r.name != d.name]
                r = fit_curve(loaded[d.name], fraction=fraction, bootstrap=100, references=refs, target=target)
                row = {"run": d.name, "steps": r["total_steps"], "column": r["loss_column"],
                       "measured_final_loss": r["measured_final_loss"], "answer": r["answer"]}
                for f, e in r["forms"].items():
                    row[f"{f}_predicted"] = e.get("predicted_final_loss")
                    row[f"{f}_rel_error"] = e.get("rel_error")
                    row[f"{f}_covered"] = e.get("covered")
                rows.append(row)
        except CurveError as e:  # e.g. the demo sweep evaluates 5 times per run: too few eval rows in 25%
            out[target] = {"skipped": str(e)}
            continue
        summ = {}
        for f in ("pooled", "schedule", "power"):
            errs = [abs(x[f"{f}_rel_error"]) for x in rows if x.get(f"{f}_rel_error") is not None]
            if errs:
                summ[f"{f}_median_abs_rel_error"] = float(np.median(errs))
                summ[f"{f}_max_abs_rel_error"] = float(np.max(errs))
                summ[f"{f}_answered"] = len(errs)
                summ[f"{f}_covered"] = sum(bool(x.get(f"{f}_covered")) for x in rows)
        out[target] = {"runs": rows, **summ}
    return out


def synth(n_budgets: int = 10, k: int = 25, sigma: float = 0.01, seed: int = 0) -> F.Runs:
    rng = np.random.default_rng(seed)
    N, D, G = [], [], []
    for C in np.logspace(18, 21, n_budgets):
        n_opt = F.optimal3(TRUTH, C)[0]
        for n in n_opt * np.logspace(-0.8, 0.8, k):
            N.append(n), D.append(C / (6 * n)), G.append(C)
    N, D = np.array(N), np.array(D)
    L = F.loss3(TRUTH, N, D) * np.exp(rng.normal(0, sigma, len(N)))
    return F.Runs(N, D, L, 6 * N * D, np.array(G), [str(i) for i in range(len(N))], {})


def plain_fit(logN, logD, logL, w=None) -> np.ndarray:
    """Epoch AI's way: scipy L-BFGS-B from every start of the 4500-point grid, keep the best."""
    best = None
    for x0 in F.INIT_GRID:
        r = F._lbfgs3(x0, logN, logD, logL, w)
        if best is None or r.fun < best.fun:
            best = r
    return best.x


def speed(resamples: int, peer_resamples: int) -> dict:
    runs = synth()
    t0, c0 = time.perf_counter(), time.process_time()
    ours = F.fit_all(runs, bootstrap=resamples)
    ours_wall, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    F.bootstrap3(runs, [np.array(list(ours["approach3"]["theta_log"].values()))], resamples)
    a3_wall, a3_cpu = time.perf_counter() - t0, time.process_time() - c0

    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.L)
    t0, c0 = time.perf_counter(), time.process_time()
    theta = plain_fit(logN, logD, logL)
    fit_wall, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    rng = np.random.default_rng(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(peer_resamples):
        w = np.bincount(rng.integers(0, len(logN), len(logN)), minlength=len(logN)).astype(float)
        plain_fit(logN, logD, logL, w)
    per_wall = (time.perf_counter() - t0) / max(peer_resamples, 1)
    per_cpu = (time.process_time() - c0) / max(peer_resamples, 1)
    same = np.allclose(theta, list(ours["approach3"]["theta_log"].values()), rtol=1e-4, atol=1e-4)
    return {"runs": len(runs.N), "resamples": resamples,
            "danlu_seconds": ours_wall, "danlu_cpu_seconds": ours_cpu,
            "danlu_approach3_bootstrap_seconds": a3_wall, "danlu_approach3_bootstrap_cpu_seconds": a3_cpu,
            "peer_fit_seconds": fit_wall, "peer_fit_cpu_seconds": fit_cpu, "peer_resamples_timed": peer_resamples,
            "peer_seconds_extrapolated": fit_wall + per_wall * resamples,
            "peer_cpu_seconds_extrapolated": fit_cpu + per_cpu * resamples,
            "same_optimum_as_peer": bool(same),
            "danlu_ci_alpha": ours["approach3"]["ci"]["alpha"], "danlu_ci_beta": ours["approach3"]["ci"]["beta"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--peer-resamples", type=int, default=2)
    ap.add_argument("--record", nargs=2, metavar=("SWEEP_OUTPUT", "NAME"),
                    help="copy a finished sweep to bench/data/scaling_NAME/ (runs.csv, configs, reduced metrics) and exit")
    args = ap.parse_args()
    if args.record:
        print(f"recorded in {record(Path(args.record[0]), args.record[1])}")
        return
    out = {}
    for name in SWEEPS:
        data = DATA / f"scaling_{name}"
        h, c = heldout(data), curves(data)
        out[name] = {"heldout": h, "curves": c}
        curve = "; ".join(f"{t} loss from the first 25% of each run: pooled form median |rel error| "
                          f"{c[t].get('pooled_median_abs_rel_error', float('nan')):.2%} "
                          f"(max {c[t].get('pooled_max_abs_rel_error', float('nan')):.2%}, "
                          f"{c[t].get('pooled_covered', 0)}/{c[t].get('pooled_answered', 0)} inside the interval), "
                          f"power law {c[t].get('power_median_abs_rel_error', float('nan')):.2%}"
                          for t in ("eval", "train") if "runs" in c[t])
        nxt = (f"; the next budget (C={h['next_holdout_C']:.3g}) from the ones below it: "
               f"{h['next_holdout_mean_abs_rel_error']:.2%} (max {h['next_holdout_max_abs_rel_error']:.2%})"
               if "next_holdout_C" in h else "")
        print(f"{name}: held-out largest budget (C={h['holdout_C']:.3g}): mean |rel error| "
              f"{h['holdout_mean_abs_rel_error']:.2%} (max {h['holdout_max_abs_rel_error']:.2%}){nxt}; {curve}", flush=True)
        if "big_run" in h:
            b = h["big_run"]
            print(f"{name}: 10x run predicted before it ran {b['predicted_before_run']:.4f}, measured {b['measured']:.4f} "
                  f"({b['rel_error_before_run']:+.2%})", flush=True)
    out["speed"] = speed(args.resamples, args.peer_resamples)
    s = out["speed"]
    print(f"{s['runs']} runs, {s['resamples']} resamples: danlu {s['danlu_seconds']:.1f} s wall ({s['danlu_cpu_seconds']:.1f} s CPU, "
          f"everything incl. approaches 1/2 and GPT-4 form); plain Epoch-style fit "
          f"{s['peer_seconds_extrapolated']:.0f} s wall extrapolated from the fit + {s['peer_resamples_timed']} resamples "
          f"({s['peer_fit_seconds']:.1f} s per fit); same optimum: {s['same_optimum_as_peer']}", flush=True)
    bench, demo = out[SWEEPS[0]], out[SWEEPS[1]]
    summary = {"heldout_mean_abs_rel_error": bench["heldout"]["holdout_mean_abs_rel_error"],
               "heldout_max_abs_rel_error": bench["heldout"]["holdout_max_abs_rel_error"],
               "next_heldout_mean_abs_rel_error": bench["heldout"].get("next_holdout_mean_abs_rel_error"),
               "curve25_eval_pooled_median_abs_rel_error": bench["curves"]["eval"].get("pooled_median_abs_rel_error"),
               "curve25_eval_power_median_abs_rel_error": bench["curves"]["eval"].get("power_median_abs_rel_error"),
               "curve25_train_pooled_median_abs_rel_error": bench["curves"]["train"].get("pooled_median_abs_rel_error"),
               "big_run_rel_error_before_run": bench["heldout"].get("big_run", {}).get("rel_error_before_run"),
               "demo_heldout_mean_abs_rel_error": demo["heldout"]["holdout_mean_abs_rel_error"],
               "demo_curve25_train_pooled_median_abs_rel_error": demo["curves"]["train"].get("pooled_median_abs_rel_error"),
               "demo_big_run_rel_error_before_run": demo["heldout"]["big_run"]["rel_error_before_run"],
               "fit250_bootstrap1000_seconds": s["danlu_seconds"], "fit250_bootstrap1000_cpu_seconds": s["danlu_cpu_seconds"],
               "peer_plain_seconds_extrapolated": s["peer_seconds_extrapolated"],
               "speedup": s["peer_seconds_extrapolated"] / s["danlu_seconds"]}
    (DATA / "scaling_fit_last.json").write_text(json.dumps(F.to_jsonable(out), indent=1) + "\n")
    print(json.dumps(F.to_jsonable(summary)))


if __name__ == "__main__":
    main()
