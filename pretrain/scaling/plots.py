"""PNG plots of a fit (matplotlib, Agg backend): IsoFLOP curves with their parabolas, loss against
compute with the fitted laws and a prediction band, and the L(N, D) contour with the
compute-optimal frontier; and one run's loss curve with its fits (`danlu fit-curve --plot`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.scaling.fit import Runs, budget_groups, loss3, loss_gpt4, optimal3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def _samples(block: dict) -> np.ndarray | None:
    s = block.get("samples")
    return np.array(s, dtype=float) if s else None


MARKERS = {"kept": ("o", None), "off_center": ("o", "none"), "outlier": ("X", None), "too_few_points": ("s", "none")}


def plot_isoflops(runs: Runs, fit: dict, out: str | Path) -> Path:
    """Loss against N per IsoFLOP budget: each run marked by its QC flag (filled: kept; hollow:
    off_center; X: outlier; square: too_few_points), the frontier's IsoFLOP parabola per budget
    and its minimum (x), and the per-budget parabola minima the GPT-4 form is fitted to (+)."""
    from pretrain.scaling.frontier import as_array, frontier_at

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    groups = budget_groups(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.9, groups.max() + 1))
    flags = np.array([r["flag"] for r in fit.get("qc", {}).get("runs", [])] or ["kept"] * len(runs.N))
    fr = fit.get("frontier", {})
    for g in np.unique(groups):
        m = groups == g
        C = float(np.exp(np.mean(np.log(runs.C[m]))))
        for flag, (marker, face) in MARKERS.items():
            sel = m & (flags == flag)
            if sel.any():
                ax.scatter(runs.N[sel], runs.L[sel], marker=marker, s=22, color=colors[g],
                           facecolors=face if face else colors[g], label=f"C = {C:.2g}" if flag == "kept" else None)
        if "params" in fr and (m & (flags == "kept")).any():
            n = np.exp(np.linspace(np.log(runs.N[m]).min() - 0.2, np.log(runs.N[m]).max() + 0.2, 100))
            ln, n_opt = frontier_at(as_array(fr["params"]), C, n)
            top = runs.L[m & (flags == "kept")].max() * 1.03
            ax.plot(n[ln <= top], ln[ln <= top], color=colors[g], lw=1)
            lo, _ = frontier_at(as_array(fr["params"]), C)
            ax.plot(n_opt, lo, "x", color=colors[g], ms=8)
    for mnm in fit.get("gpt4", {}).get("minima", []):
        ax.plot(mnm["N_opt"], mnm["L_opt"], "+", color="C3", ms=8)
    for flag, (marker, face) in MARKERS.items():  # legend entries for the flags
        if (flags == flag).any():
            ax.scatter([], [], marker=marker, color="0.3", facecolors=face if face else "0.3", label=flag)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP curves: QC flags, frontier parabolas and minima (x), per-budget minima (+)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(plt, fig, out)


def plot_loss_vs_compute(runs: Runs, fit: dict, out: str | Path, extend: float = 30.0) -> Path:
    """Runs' loss against C; the frontier's L*(C) (the default estimator), the GPT-4 form and
    Approach 3's compute-optimal loss with bootstrap bands, drawn out to `extend` × the largest C."""
    from pretrain.scaling.frontier import as_array, frontier_at

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(runs.C, runs.L, s=14, color="0.6", label="runs")
    C = np.logspace(np.log10(runs.C.min()) - 0.2, np.log10(runs.C.max() * extend), 120)
    fr = fit.get("frontier", {})
    if "params" in fr:
        ax.plot(C, frontier_at(as_array(fr["params"]), C)[0], color="C2", lw=2, label="frontier L*(C) (default)")
        S = _samples(fr)
        if S is not None:
            with np.errstate(all="ignore"):
                ls = frontier_at(S[:, None, :6], C[None, :])[0] * np.exp(fr["sigma"] * S[:, 6:7])
            lo, hi = np.nanquantile(ls, [0.025, 0.975], axis=0)
            ax.fill_between(C, lo, hi, color="C2", alpha=0.2, label="frontier, 95% predictive band")
    a3 = fit["approach3"]
    ax.plot(C, optimal3(a3["params"], C)[2], color="C0", lw=1, label="approach 3: L(N_opt(C), D_opt(C))")
    s3 = _samples(a3)
    if s3 is not None:
        with np.errstate(all="ignore"):
            ls = optimal3(s3[:, None, :], C[None, :])[2]
        lo, hi = np.nanquantile(ls, [0.025, 0.975], axis=0)
        ax.fill_between(C, lo, hi, color="C0", alpha=0.1)
    g4 = fit.get("gpt4", {})
    if "params" in g4:
        ax.plot(C, loss_gpt4(g4["params"], C), color="C1", ls="--", label="GPT-4 form a·C^b + c on minima")
    for p in fit.get("predictions", []):
        if "C" in p and "loss" in p:
            ax.errorbar([p["C"]], [p["loss"]], yerr=None if "loss_ci" not in p else
                        [[p["loss"] - p["loss_ci"][0]], [p["loss_ci"][1] - p["loss"]]], fmt="s", color="C3",
                        label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel(f"compute C (FLOPs; {fit['data'].get('compute', '')})")
    ax.set_ylabel("final loss")
    ax.set_ylim(min(runs.L.min() * 0.85, ax.get_ylim()[0]), np.quantile(runs.L, 0.98) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def plot_backtest(bt: dict, out: str | Path) -> Path:
    """Relative error of each estimator's predicted best loss against the extrapolation factor
    (target budget / largest fitted budget), with its interval; hollow markers: not covered."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for j, (name, color) in enumerate((("frontier", "C2"), ("gpt4", "C1"), ("approach3", "C0"))):
        rows = [r for r in bt["rows"] if name in r]
        if not rows:
            continue
        f = np.array([r["factor"] for r in rows]) * (1 + 0.03 * (j - 1))  # side by side
        e = np.array([r[name]["rel_error"] for r in rows]) * 100
        lo = np.array([(r[name]["interval"] or [np.nan])[0] / r["measured_best"] - 1 for r in rows]) * 100
        hi = np.array([(r[name]["interval"] or [np.nan, np.nan])[1] / r["measured_best"] - 1 for r in rows]) * 100
        cov = np.array([r[name]["covered"] for r in rows])
        yerr = [np.maximum(np.nan_to_num(e - lo), 0), np.maximum(np.nan_to_num(hi - e), 0)]
        ax.errorbar(f, e, yerr=yerr, fmt="none", color=color, alpha=0.35)
        ax.scatter(f[cov], e[cov], color=color, s=20, label=name)
        ax.scatter(f[~cov], e[~cov], color=color, s=20, facecolors="none")
    ax.axhline(0, color="k", lw=0.8)
    for y in (-1, 1):
        ax.axhline(y, color="k", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(0.9, max(110, max((r["factor"] for r in bt["rows"]), default=1) * 1.2))
    ax.set_xlabel("extrapolation factor (budget / largest fitted budget)")
    ax.set_ylabel("predicted best loss vs measured (%)")
    ax.set_title("backtest: error of the predicted best loss (hollow: outside the interval)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def plot_contour(runs: Runs, fit: dict, out: str | Path) -> Path:
    """Approach 3's L(N, D) as contours over the runs' range (extended), the runs, IsoFLOP lines
    and the compute-optimal frontier N_opt(C)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    p = fit["approach3"]["params"]
    n = np.logspace(np.log10(runs.N.min()) - 0.5, np.log10(runs.N.max()) + 1, 160)
    d = np.logspace(np.log10(runs.D.min()) - 0.5, np.log10(runs.D.max()) + 1, 160)
    NN, DD = np.meshgrid(n, d)
    with np.errstate(all="ignore"):
        LL = loss3(p, NN, DD)
    cs = ax.contourf(NN, DD, np.log(LL), levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log L(N, D)")
    ax.scatter(runs.N, runs.D, c="w", s=12, edgecolors="k", lw=0.5, label="runs")
    C = np.logspace(np.log10(6 * n[0] * d[0]), np.log10(6 * n[-1] * d[-1]), 100)
    with np.errstate(all="ignore"):
        No, Do, _ = optimal3(p, C)
    ax.plot(No, Do, color="r", lw=1.5, label="compute-optimal frontier")
    for c in np.unique(np.round(np.log10(runs.C), 1)):
        ax.plot(n, 10 ** c / (6 * n), color="w", lw=0.5, alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n[0], n[-1])
    ax.set_ylim(d[0], d[-1])
    ax.set_xlabel("parameters N")
    ax.set_ylabel("tokens D")
    ax.set_title("L(N, D) = E + A/N^α + B/D^β (approach 3)")
    ax.legend(fontsize=7, loc="upper right")
    return _save(plt, fig, out)


def plot_all(runs: Runs, fit: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_isoflops(runs, fit, out_dir / "isoflops.png"),
            plot_loss_vs_compute(runs, fit, out_dir / "loss_vs_compute.png"),
            plot_contour(runs, fit, out_dir / "contour.png")]


def plot_curve(result: dict, out: str | Path, eta: np.ndarray | None = None) -> Path:
    """One run's logged loss, the fitted prefix, and each form's curve out to the last step (failed
    forms are left out). eta [T]: the run's per-step lr (default: rebuilt from its run directory)."""
    from pretrain.scaling.curve import curve_prediction_line, lr_per_step, read_metrics

    plt = _plt()
    if eta is None:
        eta, _, _ = lr_per_step(result["run_dir"], read_metrics(result["run_dir"]))
    T = len(eta)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(result["curve"]["step"], result["curve"]["loss"], color="0.6", lw=0.8, marker=".", ms=3,
            label=f"{result.get('target', 'train')} loss")
    s = np.arange(max(1, result["fit_steps"][0]), T + 1)
    for form, color in (("power", "C1"), ("schedule", "C0"), ("pooled", "C2")):
        f = result["forms"].get(form, {})
        if "predicted_final_loss" not in f:
            continue
        ax.plot(s, curve_prediction_line(s, f["params"], eta, result["lambda"]), color=color,
                label=f"{form} fit → {f['predicted_final_loss']:.3f}")
        if "interval" in f:
            lo, hi = f["interval"]  # a small bootstrap's interval need not contain the estimate
            ax.errorbar([T], [f["predicted_final_loss"]], yerr=[[max(0.0, f["predicted_final_loss"] - lo)],
                                                                 [max(0.0, hi - f["predicted_final_loss"])]],
                        color=color, capsize=3)
    ax.axvline(result["fit_steps"][1], color="k", ls=":", lw=0.8, label="end of fitted steps")
    lo = min(result["curve"]["loss"]) - 0.2
    ax.set_ylim(lo, np.quantile(result["curve"]["loss"], 0.95) + 0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)
