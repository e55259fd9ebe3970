"""`danlu fit RUNS.csv`: fit scaling laws (Chinchilla approaches 1-3, GPT-4 form) with bootstrap intervals."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.scaling import exits_2_on_fit_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="CSV runs table (runs.csv of `danlu sweep`, or any CSV with --columns)")
    p.add_argument("--output", help="directory for fit.json and the plots (default: RUNS_DIR/fit)")
    p.add_argument("--columns", help="role=column pairs: params=...,tokens=...,loss=... (or flops=... instead of "
                                     "tokens, D = C/6N; budget=... groups IsoFLOP runs)")
    p.add_argument("--compute", choices=["6nd", "column"], default="6nd",
                   help="C for approaches 1, 2 and the GPT-4 form: 6*N*D (default) or the flops column")
    p.add_argument("--holdout", choices=["largest"], help="fit without the largest budget and predict it")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000; 0: none)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--warm-starts", type=int, default=1,
                   help="distinct full-data optima each bootstrap resample starts from (default 1, the best); more "
                        "guards intervals against a resample that belongs to another basin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predict-flops", type=float, nargs="*", default=[], metavar="C",
                   help="also predict the compute-optimal N, D and loss at these budgets")
    p.add_argument("--no-plots", action="store_true")


@exits_2_on_fit_errors
def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.fit import fit_all, holdout_largest, parse_columns, read_runs
    from pretrain.scaling.plots import plot_all

    runs = read_runs(args.runs, parse_columns(args.columns), compute=args.compute)
    out = Path(args.output) if args.output else Path(args.runs).resolve().parent / "fit"
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(bootstrap=args.bootstrap, level=args.level, seed=args.seed, predict_C=args.predict_flops,
              warm_starts=args.warm_starts)
    fit = fit_all(runs, **kw)
    if args.holdout:
        _, report = holdout_largest(runs, **kw)
        fit["holdout"] = report
    (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    pngs = [] if args.no_plots else plot_all(runs, fit, out)
    print(summary(fit))
    print(f"wrote {out / 'fit.json'}" + "".join(f", {p.name}" for p in pngs))
    return 0


def summary(fit: dict) -> str:
    a3, d = fit["approach3"], fit["data"]
    ci = a3.get("ci", {})

    def v(name, val):
        return f"{name} {val:.6g}" + (f" [{ci[name][0]:.4g}, {ci[name][1]:.4g}]" if name in ci and ci[name][0] is not None else "")

    lines = [f"{d['runs']} runs from {d['csv']}; N = column {d['columns']['params']}, D = {d['tokens']}, C = {d['compute']}",
             "approach 3: L = E + A/N^alpha + B/D^beta: " + ", ".join(v(k, a3["params"][k]) for k in ("E", "A", "B", "alpha", "beta")),
             f"  {'converged' if a3['converged'] else 'NOT converged'} (scipy: {a3['message'] or 'no message'}; gradient norm "
             f"{a3['grad_norm']:.2g}), objective {a3['objective']:.6g}, "
             f"{a3['starts']['at_best_objective']}/{a3['starts']['optimized']} starts at the best objective",
             "  N_opt ~ C^a, D_opt ~ C^b: " + v("a", a3["a"]) + ", " + v("b", a3["b"]),
             f"approach 1: a {fit['approach1']['a']:.4g}, b {fit['approach1']['b']:.4g}; "
             f"approach 2: a {fit['approach2']['a']:.4g}, b {fit['approach2']['b']:.4g}"]
    if "params" in fit["gpt4"]:
        g = fit["gpt4"]["params"]
        lines.append(f"GPT-4 form L(C) = a C^b + c: a {g['a']:.4g}, b {g['b']:.4g}, c {g['c']:.4g} ({fit['gpt4']['fitted_to']})")
    for p in fit.get("predictions", []):
        if "N_opt" in p:
            lines.append(f"at C={p['C']:.3g}: N_opt {p['N_opt']:.4g}, D_opt {p['D_opt']:.4g}, loss {p['loss']:.4f}"
                         + (f" [{p['loss_ci'][0]:.4f}, {p['loss_ci'][1]:.4f}]" if "loss_ci" in p else ""))
    if "holdout" in fit:
        h = fit["holdout"]
        lines.append(f"holdout (largest budget, C={h['C']:.3g}, {h['held_out']} runs): mean |relative error| "
                     f"{h['mean_abs_rel_error']:.2%}, max {h['max_abs_rel_error']:.2%}")
    return "\n".join(lines)
