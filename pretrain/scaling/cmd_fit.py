"""`danlu fit RUNS.csv`: fit scaling laws (the robust frontier, Chinchilla approaches 1-3, GPT-4 form) with
bootstrap intervals; `--holdout largest` and `--backtest` check them on budgets held out of the fit."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.scaling import exits_2_on_fit_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", help="CSV runs table (runs.csv of `danlu sweep`, or any CSV with --columns)")
    p.add_argument("--output", help="directory for fit.json and the plots (default: RUNS_DIR/fit)")
    p.add_argument("--columns", help="role=column pairs: params=...,tokens=...,loss=... (two of params, tokens, flops: "
                                     "D = C/6N or N = C/6D; budget=... groups IsoFLOP runs; name=...)")
    p.add_argument("--compute", choices=["6nd", "column", "budget"],
                   help="C of the frontier, approaches 1, 2 and the GPT-4 form: 6*N*D, the flops column, or the budget "
                        "column (a sweep's nominal budgets); default: budget when --columns maps budget=, else 6nd")
    p.add_argument("--holdout", choices=["largest"], help="fit without the largest budget and predict it")
    p.add_argument("--backtest", action="store_true",
                   help="fit on the budgets up to each cut-off in turn and predict every larger budget's best loss: "
                        "backtest.json, backtest.png and a table of error against extrapolation factor")
    p.add_argument("--all-runs", action="store_true",
                   help="fit approaches 2 and 3 to every run instead of the QC-kept near-optimal ones")
    p.add_argument("--window", type=float, default=3.0,
                   help="QC: keep runs within this factor in N of their budget's best run (default 3)")
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
    from pretrain.scaling.fit import backtest, fit_all, holdout_largest, parse_columns, read_runs
    from pretrain.scaling.plots import plot_all, plot_backtest

    runs = read_runs(args.runs, parse_columns(args.columns), compute=args.compute)
    out = Path(args.output) if args.output else Path(args.runs).resolve().parent / "fit"
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(bootstrap=args.bootstrap, level=args.level, seed=args.seed, predict_C=args.predict_flops,
              warm_starts=args.warm_starts, all_runs=args.all_runs, window=args.window)
    fit = fit_all(runs, **kw)
    if args.holdout:
        _, report = holdout_largest(runs, **kw)
        fit["holdout"] = report
    (out / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    pngs = [] if args.no_plots else plot_all(runs, fit, out)
    print(summary(fit))
    if args.backtest:
        bt = backtest(runs, **{**kw, "predict_C": ()})
        (out / "backtest.json").write_text(json.dumps(bt, indent=1) + "\n")
        if not args.no_plots:
            pngs.append(plot_backtest(bt, out / "backtest.png"))
        print(backtest_table(bt))
        pngs.insert(0, out / "backtest.json")
    print(f"wrote {out / 'fit.json'}" + "".join(f", {p.name}" for p in pngs))
    return 0


def summary(fit: dict) -> str:
    a3, d, fr, qc = fit["approach3"], fit["data"], fit.get("frontier", {}), fit["qc"]

    def v(block, name, val):
        ci = block.get("ci", {})
        return f"{name} {val:.6g}" + (f" [{ci[name][0]:.4g}, {ci[name][1]:.4g}]" if name in ci and ci[name][0] is not None else "")

    lines = [f"{d['runs']} runs from {d['csv']}; N = {d.get('params', 'column ' + d['columns'].get('params', 'params'))}, "
             f"D = {d['tokens']}, C = {d['compute']}; budgets: {d.get('budgets', '')}",
             "QC: " + ", ".join(f"{n} {k}" for k, n in qc["counts"].items() if n) + f" ({qc['rule']['text']})"]
    if "params" in fr:
        p = fr["params"]
        lines += ["frontier (joint IsoFLOP fit, default): L*(C) = E + A C^-alpha: "
                  + ", ".join(v(fr, k, p[k]) for k in ("E", "A", "alpha")) + f"; N_opt ~ C^{p['a']:.4g}; "
                  f"run-to-run sd {fr['sigma']:.2%}" + (" (E at its bound)" if fr.get("E_at_bound") else "")]
    else:
        lines.append(f"frontier: skipped ({fr.get('skipped')})")
    lines += [f"approach 3 ({a3.get('runs', 'all')} runs): L = E + A/N^alpha + B/D^beta: "
              + ", ".join(v(a3, k, a3["params"][k]) for k in ("E", "A", "B", "alpha", "beta")),
              f"  {'converged' if a3['converged'] else 'NOT converged'} (scipy: {a3['message'] or 'no message'}; gradient norm "
              f"{a3['grad_norm']:.2g}), objective {a3['objective']:.6g}, "
              f"{a3['starts']['at_best_objective']}/{a3['starts']['optimized']} starts at the best objective",
              "  N_opt ~ C^a, D_opt ~ C^b: " + v(a3, "a", a3["a"]) + ", " + v(a3, "b", a3["b"]),
              f"approach 1: a {fit['approach1']['a']:.4g}, b {fit['approach1']['b']:.4g}; "
              f"approach 2: a {fit['approach2']['a']:.4g}, b {fit['approach2']['b']:.4g}"]
    if "params" in fit["gpt4"]:
        g = fit["gpt4"]["params"]
        lines.append(f"GPT-4 form L(C) = a C^b + c: a {g['a']:.4g}, b {g['b']:.4g}, c {g['c']:.4g} ({fit['gpt4']['fitted_to']})")
    for p in fit.get("predictions", []):
        if "N_opt" in p:
            lines.append(f"at C={p['C']:.3g} ({p['estimator']}): N_opt {p['N_opt']:.4g}, D_opt {p['D_opt']:.4g}, "
                         f"loss {p['loss']:.4f}" + (f" [{p['loss_ci'][0]:.4f}, {p['loss_ci'][1]:.4f}]" if "loss_ci" in p else ""))
    if "holdout" in fit:
        h = fit["holdout"]
        lines.append(f"holdout (largest budget, C={h['C']:.3g}, {h['held_out']} runs): mean |relative error| "
                     f"{h['mean_abs_rel_error']:.2%}, max {h['max_abs_rel_error']:.2%}; best loss {h['best']['measured']:.4f}, "
                     f"predicted {h['best']['predicted']:.4f} ({h['best']['estimator']}, {h['best']['rel_error']:+.2%})")
    return "\n".join(lines)


def backtest_table(bt: dict) -> str:
    """One line per (cut-off, target budget): the factor, the measured best loss, each estimator's error."""
    names = [n for n in ("frontier", "gpt4", "approach3") if n in bt["summary"]]
    lines = [f"backtest: best loss at each larger budget, fitted on the budgets up to each cut-off ({bt['level']:.0%} intervals)",
             f"{'fitted up to':>12} {'C':>9} {'factor':>7} {'measured':>9} " + " ".join(f"{n:>20}" for n in names)]
    for r in bt["rows"]:
        cells = []
        for n in names:
            e = r.get(n)
            cells.append(f"{e['predicted']:8.4f} {e['rel_error']:+6.2%}{'' if e['covered'] else '!':1}" if e else "")
        lines.append(f"{r['fitted_up_to']:12.3g} {r['C']:9.3g} {r['factor']:6.1f}x {r['measured_best']:9.4f} "
                     + " ".join(f"{c:>20}" for c in cells))
    lines.append("('!': measured outside the interval)")
    for n in names:
        s = bt["summary"][n]
        lines.append(f"{n}: mean |error| {s['mean_abs_rel_error']:.2%}, coverage {s['coverage']:.0%} over {s['n']}; "
                     + ", ".join(f"{k}: {b['mean_abs_rel_error']:.2%} ({b['n']})" for k, b in s["by_factor"].items()))
    return "\n".join(lines)
