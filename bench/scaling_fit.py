"""Scaling-law benchmark: prediction errors on the CPU demo sweep, and fit speed against the plain method.

1. Held-out prediction: `danlu fit --holdout largest` on the committed CPU sweep
   (bench/data/scaling_cpu_demo/runs.csv, measured by `danlu sweep configs/scaling/cpu_demo.yaml
   --predict-run`): relative error of Approach 3 on the largest budget's runs, fitted without them;
   and the 10x run (predicted.csv), predicted from all the sweep's runs before it ran.
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

    .venv/bin/python bench/scaling_fit.py            # ~3-5 minutes on 2 cores
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
from pretrain.scaling.curve import fit_curve  # noqa: E402

DATA = ROOT / "bench" / "data" / "scaling_cpu_demo"
TRUTH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def heldout() -> dict:
    runs = F.read_runs(DATA / "runs.csv")
    _, rep = F.holdout_largest(runs, bootstrap=1000)
    fit = F.fit_all(runs, bootstrap=1000)
    with open(DATA / "predicted.csv", newline="") as f:
        big = next(csv.DictReader(f))
    samples = np.array(fit["approach3"]["samples"], dtype=float)
    pr = F.predict_at(fit["approach3"]["params"], samples, float(big["params"]), float(big["tokens"]))
    measured = float(big["loss"])
    recorded = json.loads((DATA / "prediction.json").read_text())
    return {"holdout_mean_abs_rel_error": rep["mean_abs_rel_error"], "holdout_max_abs_rel_error": rep["max_abs_rel_error"],
            "holdout_runs": rep["runs"], "holdout_gpt4_frontier_rel_error": rep.get("gpt4_frontier", {}).get("rel_error"),
            "big_run": {"C": 6 * float(big["params"]) * float(big["tokens"]), "params": int(big["params"]),
                        "tokens": int(big["tokens"]), "measured": measured, "predicted_refit": pr["loss"],
                        "predicted_refit_ci": pr["loss_ci"], "rel_error_refit": (pr["loss"] - measured) / measured,
                        "predicted_before_run": recorded["predicted_loss"],
                        "predicted_before_run_ci": recorded["predicted_loss_ci"],
                        "rel_error_before_run": recorded["rel_error"]}}


def curves(fraction: float = 0.25) -> dict:
    dirs = sorted(p for p in (DATA / "runs").iterdir() if p.is_dir())
    sweep = [d for d in dirs if d.name != "predicted"]
    kappa = {d.name: fit_curve(d, bootstrap=0)["forms"]["schedule"]["kappa"] for d in sweep}
    rows = []
    for d in dirs:
        ref = float(np.median([k for n, k in kappa.items() if n != d.name]))
        r = fit_curve(d, fraction=fraction, bootstrap=100, anneal_ratio=ref)
        rows.append({"run": d.name, "steps": r["total_steps"], "measured_final_loss": r["measured_final_loss"],
                     "measured_final_eval_loss": r.get("measured_final_eval_loss"),
                     **{f"{f}_rel_error": r["forms"][f]["rel_error"] for f in r["forms"]},
                     **{f"{f}_eval_rel_error": r["forms"][f].get("eval_rel_error") for f in r["forms"]},
                     "schedule_inside_interval": bool(r["forms"]["schedule"]["interval"][0] <= r["measured_final_loss"]
                                                      <= r["forms"]["schedule"]["interval"][1])})
    mean = lambda key: float(np.mean([abs(x[key]) for x in rows if x[key] is not None]))  # noqa: E731
    return {"fraction": fraction, "runs": rows,
            "schedule_mean_abs_rel_error": mean("schedule_rel_error"), "power_mean_abs_rel_error": mean("power_rel_error"),
            "schedule_eval_mean_abs_rel_error": mean("schedule_eval_rel_error"),
            "power_eval_mean_abs_rel_error": mean("power_eval_rel_error")}


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
    args = ap.parse_args()
    out = {"heldout": heldout()}
    h = out["heldout"]
    print(f"held-out largest budget: mean |rel error| {h['holdout_mean_abs_rel_error']:.2%} "
          f"(max {h['holdout_max_abs_rel_error']:.2%}); 10x run: predicted before it ran "
          f"{h['big_run']['predicted_before_run']:.4f}, measured {h['big_run']['measured']:.4f} "
          f"({h['big_run']['rel_error_before_run']:+.2%})", flush=True)
    out["curves"] = curves()
    c = out["curves"]
    print(f"final loss from the first 25% of each run ({len(c['runs'])} runs): schedule form mean |rel error| "
          f"{c['schedule_mean_abs_rel_error']:.2%}, power law {c['power_mean_abs_rel_error']:.2%} "
          f"(eval loss: {c['schedule_eval_mean_abs_rel_error']:.2%}, {c['power_eval_mean_abs_rel_error']:.2%})", flush=True)
    out["speed"] = speed(args.resamples, args.peer_resamples)
    s = out["speed"]
    print(f"{s['runs']} runs, {s['resamples']} resamples: danlu {s['danlu_seconds']:.1f} s wall ({s['danlu_cpu_seconds']:.1f} s CPU, "
          f"everything incl. approaches 1/2 and GPT-4 form); plain Epoch-style fit "
          f"{s['peer_seconds_extrapolated']:.0f} s wall extrapolated from the fit + {s['peer_resamples_timed']} resamples "
          f"({s['peer_fit_seconds']:.1f} s per fit); same optimum: {s['same_optimum_as_peer']}", flush=True)
    summary = {"heldout_mean_abs_rel_error": h["holdout_mean_abs_rel_error"],
               "big_run_rel_error_before_run": h["big_run"]["rel_error_before_run"],
               "curve25_schedule_mean_abs_rel_error": c["schedule_mean_abs_rel_error"],
               "curve25_power_mean_abs_rel_error": c["power_mean_abs_rel_error"],
               "fit250_bootstrap1000_seconds": s["danlu_seconds"], "fit250_bootstrap1000_cpu_seconds": s["danlu_cpu_seconds"],
               "peer_plain_seconds_extrapolated": s["peer_seconds_extrapolated"],
               "speedup": s["peer_seconds_extrapolated"] / s["danlu_seconds"]}
    (ROOT / "bench" / "data" / "scaling_fit_last.json").write_text(json.dumps(F.to_jsonable(out), indent=1) + "\n")
    print(json.dumps(F.to_jsonable(summary)))


if __name__ == "__main__":
    main()
