"""Predictions from a fit.json: loss at (N, D), loss and compute-optimal N, D at a budget C,
each with the bootstrap interval stored in the fit.

    fit = load_fit("out/fit.json")
    predict(fit, params=1e9, tokens=2e10)      # {"loss", "loss_ci", ...}
    predict(fit, flops=1e21)                   # {"N_opt", "D_opt", "loss", "loss_gpt4", ... with *_ci}
"""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.scaling.fit import FitError, predict_compute, predict_point


def load_fit(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "fit.json"
    try:
        fit = json.loads(path.read_text())
    except FileNotFoundError:
        raise FitError(f"fit not found: {path} (write one with `danlu fit RUNS.csv --output DIR`)") from None
    except ValueError as e:
        raise FitError(f"{path}: not valid JSON: {e}") from None
    if "approach3" not in fit or "params" not in fit["approach3"]:
        raise FitError(f"{path}: no approach3 parameters; is this a fit.json of `danlu fit`?")
    return fit


def predict(fit: dict, *, params: float | None = None, tokens: float | None = None, flops: float | None = None,
            level: float | None = None) -> dict:
    """Loss at (params, tokens), or the compute-optimal point at `flops` (in the fit's compute
    convention, C = 6·N·D by default), with intervals; `estimator` says which fit answered."""
    if flops is not None:
        if params is not None or tokens is not None:
            raise FitError("give either --flops, or --params and --tokens")
        return predict_compute(fit, float(flops), level)
    if params is None or tokens is None:
        raise FitError("give --params and --tokens (loss at a model size and token count), or --flops (a budget)")
    return predict_point(fit, float(params), float(tokens), level)
