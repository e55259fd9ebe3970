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


def plot_isoflops(runs: Runs, fit: dict, out: str | Path) -> Path:
    """Loss against N per IsoFLOP budget, with Approach 2's parabola and its minimum."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    groups = budget_groups(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.9, groups.max() + 1))
    budgets = {round(np.log10(b["C"]), 3): b for b in fit["approach2"]["budgets"]}
    for g in np.unique(groups):
        m = groups == g
        C = float(np.exp(np.mean(np.log(runs.C[m]))))
        ax.scatter(runs.N[m], runs.L[m], color=colors[g], s=18, label=f"C = {C:.2g}")
        b = budgets.get(round(np.log10(C), 3))
        if b and "parabola" in b:
            x = np.linspace(np.log(runs.N[m]).min() - 0.2, np.log(runs.N[m]).max() + 0.2, 100)
            p0, p1, p2 = b["parabola"]
            ax.plot(np.exp(x), p0 + p1 * x + p2 * x * x, color=colors[g], lw=1)
            if "N_opt" in b:
                ax.plot(b["N_opt"], b["L_opt"], "x", color=colors[g], ms=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP curves (approach 2: parabola in log N per budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def plot_loss_vs_compute(runs: Runs, fit: dict, out: str | Path, extend: float = 30.0) -> Path:
    """Runs' loss against C; Approach 3's compute-optimal loss and the GPT-4 form with bootstrap
    bands, drawn out to `extend` × the largest C (the prediction range)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter(runs.C, runs.L, s=14, color="0.5", label="runs")
    C = np.logspace(np.log10(runs.C.min()) - 0.2, np.log10(runs.C.max() * extend), 120)
    a3 = fit["approach3"]
    ax.plot(C, optimal3(a3["params"], C)[2], color="C0", label="approach 3: L(N_opt(C), D_opt(C))")
    s3 = _samples(a3)
    if s3 is not None:
        with np.errstate(all="ignore"):
            ls = optimal3(s3[:, None, :], C[None, :])[2]
        lo, hi = np.nanquantile(ls, [0.025, 0.975], axis=0)
        ax.fill_between(C, lo, hi, color="C0", alpha=0.2, label="approach 3, 95% bootstrap band")
    g4 = fit.get("gpt4", {})
    if "params" in g4:
        ax.plot(C, loss_gpt4(g4["params"], C), color="C1", ls="--", label="GPT-4 form a·C^b + c")
        s4 = _samples(g4)
        if s4 is not None:
            with np.errstate(all="ignore"):
                lo, hi = np.nanquantile(loss_gpt4(s4[:, None, :], C[None, :]), [0.025, 0.975], axis=0)
            ax.fill_between(C, lo, hi, color="C1", alpha=0.15)
    for p in fit.get("predictions", []):
        if "C" in p and "loss" in p:
            ax.errorbar([p["C"]], [p["loss"]], yerr=None if "loss_ci" not in p else
                        [[p["loss"] - p["loss_ci"][0]], [p["loss_ci"][1] - p["loss"]]], fmt="s", color="C3",
                        label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel(f"compute C (FLOPs; {fit['data'].get('compute', '')})")
    ax.set_ylabel("final loss")
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


def plot_curve(result: dict, out: str | Path) -> Path:
    """One run's logged loss, the fitted prefix, and both forms' curves out to the last step."""
    from pretrain.scaling.curve import areas, lr_per_step, read_metrics

    plt = _plt()
    run_dir = result["run_dir"]
    eta, T, _ = lr_per_step(run_dir, read_metrics(run_dir))
    S1, S2 = areas(eta, result["lambda"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(result["curve"]["step"], result["curve"]["loss"], color="0.6", lw=0.8,
            label=f"{result.get('target', 'train')} loss")
    s = np.arange(max(1, result["fit_steps"][0]), T + 1)
    for form, color in (("power", "C1"), ("schedule", "C0")):
        f = result["forms"][form]
        p = list(f["params"].values())
        y = p[0] + p[1] * s ** (-p[2]) if form == "power" else p[0] + p[1] * S1[s - 1] ** (-p[2]) - p[3] * S2[s - 1]
        ax.plot(s, y, color=color, label=f"{form} fit → {f['predicted_final_loss']:.3f}")
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
