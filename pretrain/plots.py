"""Loss curves from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes loss.png (train loss and eval loss against step) into the run directory or ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.4)
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss", lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"danlu: {Path(run_dir)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
