"""Loss-curve fits of one run (`danlu fit-curve RUN_DIR`): predict the final loss from a prefix.

Two forms, fitted to the train loss logged in metrics.jsonl against step s (the `loss_mean`
column, the mean loss of the steps since the previous logged row, compared with the form's mean
over the same steps; runs logged without it fall back to the single-step `loss` at the row's step):
  - power law with an irreducible term: L(s) = E + A · s^(-α);
  - schedule-aware (Tissue et al. 2024, "Scaling Law with Learning Rate Annealing"):
    L(s) = L0 + A · S1(s)^(-α) − C · S2(s), with S1(s) = Σ_{k≤s} η_k the forward area (the area
    under the learning-rate schedule) and S2(s) = Σ_{k≤s} m_k the annealing area, where
    m_k = λ · m_{k−1} + (η_{k−1} − η_k) carries the lr decreases with momentum λ (0.999 as in the
    paper). The warmup's increases are not annealing: S2 counts from the peak on.
The per-step schedule η_k is the run's own: rebuilt from its config.yaml (pretrain.optimizer,
the resolved config `danlu train` writes), so a run still going gets the rest of its schedule
too, and checked against the `lr` column of metrics.jsonl. Without config.yaml the logged `lr`
column is interpolated and only finished runs can be fitted.

Prediction of the final loss from the first `fraction` of the steps: both forms are fitted
(least squares) on the logged rows up to fraction·T (after the first 2% of the run,
where neither form holds), evaluated at T; the interval comes from a moving-block bootstrap
of the fit's residuals. "Measured" final loss = mean of the train loss logged over the last 2%
of steps (at least 3 rows), when the run has finished; the eval-loss prediction adds the mean
gap between eval and fitted train loss seen in the prefix.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

LAMBDA = 0.999


class CurveError(ValueError):
    pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of metrics.jsonl; a half-written last line (a run still going) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise CurveError(f"{path}: no such file (is {run_dir} a `danlu train` run directory?)")
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                continue  # being written
            raise CurveError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def lr_per_step(run_dir: str | Path, rows: list[dict]) -> tuple[np.ndarray, int, str]:
    """η_k for k = 1..T (the lr of the k-th update; metrics row `step` s logs η_s) [T], T, and where
    it came from."""
    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.exists():
        from pretrain.config import load_config
        from pretrain.optimizer import make_schedule

        cfg = load_config(cfg_path)
        T = cfg.train.steps
        sched = make_schedule(cfg.optimizer, T)
        eta = np.asarray([float(v) for v in np.asarray(sched(np.arange(T)))], dtype=float)
        logged = [(r["step"], r["lr"]) for r in rows if "lr" in r and 1 <= r["step"] <= T]
        for s, lr in logged[:: max(1, len(logged) // 20)]:
            if not math.isclose(eta[s - 1], lr, rel_tol=1e-3, abs_tol=1e-12):
                raise CurveError(f"{cfg_path}: its schedule gives lr {eta[s - 1]:.6g} at step {s} but metrics.jsonl "
                                 f"logged {lr:.6g}; the config does not describe this run")
        return eta, T, "config.yaml"
    steps = np.array([r["step"] for r in rows if "lr" in r], float)
    lrs = np.array([r["lr"] for r in rows if "lr" in r], float)
    if len(steps) < 2:
        raise CurveError(f"{run_dir}: no config.yaml and fewer than 2 logged lr values")
    T = int(steps[-1])
    return np.interp(np.arange(1, T + 1), steps, lrs), T, "metrics.jsonl lr column (interpolated)"


def areas(eta: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """S1 [T] (forward area) and S2 [T] (annealing area with momentum lam) after each step."""
    S1 = np.cumsum(eta)
    peak = int(np.argmax(eta))
    m, S2 = 0.0, np.zeros_like(eta)
    acc = 0.0
    for k in range(len(eta)):
        if k > peak:
            m = lam * m + (eta[k - 1] - eta[k])
            acc += m
        S2[k] = acc
    return S1, S2


def _rows_x(s_lo: np.ndarray, s_hi: np.ndarray, S1: np.ndarray, S2: np.ndarray) -> dict:
    """What _fit needs for rows that average the steps s_lo..s_hi (1-based, inclusive): the steps
    from the first s_lo to the last s_hi with their areas, and where each row's steps start."""
    lo, hi = int(s_lo[0]), int(s_hi[-1])
    steps = np.arange(lo, hi + 1)
    return {"s": steps.astype(float), "S1": S1[steps - 1], "S2": S2[steps - 1], "start": (s_lo - lo).astype(int),
            "len": (s_hi - s_lo + 1).astype(float), "S1T": S1[-1], "S2T": S2[-1]}


def _row_means(x: dict, per_step: np.ndarray) -> np.ndarray:
    if np.all(x["len"] == 1):
        return per_step[x["start"]]
    # rows tile their steps (each starts after the previous one ends), so reduceat sums exactly each row's steps
    return np.add.reduceat(per_step, x["start"])[: len(x["start"])] / x["len"]


def _fit(form: str, x: dict, y: np.ndarray, kappa: float | None = None) -> np.ndarray:
    """Least-squares fit of one form to row means y; x from _rows_x, with the final S1T, S2T.
    The schedule form is fitted as (L0, A, alpha, kappa) with C = kappa·A·S1T^-alpha / S2T, kappa in
    [0, 1]: the annealing bonus at the end is that share of the reducible term still left there
    (it cannot remove more). `kappa` given: held fixed. Returns (E, A, alpha) or (L0, A, alpha, C)."""
    S2T = max(x["S2T"], 1e-30)

    def sched(p):
        L0, A, al = p[:3]
        k = kappa if kappa is not None else p[3]
        C = k * A * x["S1T"] ** (-al) / S2T if x["S2T"] > 0 else 0.0
        return L0, A, al, C

    if form == "power":
        def res(p):
            E, A, al = p
            return _row_means(x, E + A * x["s"] ** (-al)) - y
        starts = [[y.min() * 0.8, (y.max() - y.min()) * x["s"].min() ** a, a] for a in (0.3, 0.6, 1.0)]
        bounds = ([0, 0, 0.01], [np.inf, np.inf, 3])
    else:
        def res(p):
            L0, A, al, C = sched(p)
            return _row_means(x, L0 + A * x["S1"] ** (-al) - C * x["S2"]) - y
        starts = [[y.min() * 0.8, (y.max() - y.min()) * x["S1"].min() ** a, a] + ([] if kappa is not None else [k])
                  for a in (0.3, 0.6, 1.0) for k in ((0.0,) if kappa is not None else (0.1, 0.5))]
        bounds = ([0, 0, 0.01] + ([] if kappa is not None else [0.0]), [np.inf, np.inf, 3] + ([] if kappa is not None else [1.0]))
    best = None
    for p0 in starts:
        p0 = np.clip(p0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        r = least_squares(res, p0, bounds=bounds, x_scale="jac", max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    return best.x if form == "power" else np.array(sched(best.x))


def kappa_of(p: np.ndarray, S1T: float, S2T: float) -> float:
    """The annealing ratio C·S2T / (A·S1T^-alpha) of schedule-form params (L0, A, alpha, C)."""
    return float(p[3] * S2T / (p[1] * S1T ** (-p[2]))) if p[1] > 0 and S2T > 0 else 0.0


def reference_anneal_ratio(run_dirs: list[str | Path], target: str = "train") -> float:
    """Median annealing ratio kappa of the schedule form fitted to whole finished runs."""
    ks = []
    for d in run_dirs:
        r = fit_curve(d, fraction=None, bootstrap=0, target=target)
        if not r["finished"]:
            raise CurveError(f"--reference {d}: the run has not finished")
        ks.append(r["forms"]["schedule"]["kappa"])
    return float(np.median(ks))


def _eval(form: str, p: np.ndarray, s, S1, S2):
    if form == "power":
        return p[0] + p[1] * np.asarray(s, float) ** (-p[2])
    return p[0] + p[1] * np.asarray(S1) ** (-p[2]) - p[3] * np.asarray(S2)


def fit_curve(run_dir: str | Path, fraction: float | None = None, bootstrap: int = 200, level: float = 0.9,
              seed: int = 0, lam: float = LAMBDA, anneal_ratio: float | None = None, skip: float = 0.02,
              target: str = "train") -> dict:
    """Fits both forms to the run's train loss (`target="train"`) or eval loss (`"eval"`: the eval
    rows, each a point at its step; on a fixed eval set they carry no batch-to-batch noise) up to
    fraction·T (all logged rows when None) and predicts that loss at the last step T with
    intervals; rows of the first `skip`·T steps are left out. `anneal_ratio`: kappa from reference runs
    (`reference_anneal_ratio`), used when the fitted steps hold under half of the run's annealing
    area (kappa is not identifiable from them). JSON-able dict."""
    rows = read_metrics(run_dir)
    eta, T, lr_source = lr_per_step(run_dir, rows)
    S1, S2 = areas(eta, lam)
    if target not in ("train", "eval"):
        raise CurveError(f"target={target!r} is not one of train, eval")
    key = "loss" if target == "train" else "eval_loss"
    train = [r for r in rows if key in r and math.isfinite(r[key]) and 1 <= r["step"] <= T]
    if not train:
        raise CurveError(f"{run_dir}: metrics.jsonl has no {key} rows yet")
    # loss_mean: the mean over the steps since the previous logged row (older runs: the step's own loss)
    column = "loss_mean" if target == "train" and all(r.get("loss_mean") is not None for r in train) else key
    prev = [0] + [r["step"] for r in train[:-1]]
    lo_all = np.array([p + 1 for p in prev] if column == "loss_mean" else [r["step"] for r in train])
    lval = np.array([r[column] for r in train], float)
    last_step = train[-1]["step"]
    finished = last_step >= T
    cut = T * fraction if fraction else last_step
    skip = max(1, int(skip * T))  # the first steps (warmup, the unigram plateau) follow neither form
    sel = (lo_all > skip) & np.array([r["step"] <= cut for r in train])  # rows whose steps all lie in (skip, cut]
    use = [r for r, u in zip(train, sel) if u]
    if len(use) < 6:
        raise CurveError(f"{run_dir}: {len(use)} logged {key} rows in steps ({skip}, {cut:.0f}]; need at least 6 "
                         f"({'log' if target == 'train' else 'evaluate'} more often, or wait for more steps)")
    s = np.array([r["step"] for r in use], float)
    y = lval[sel]
    x = _rows_x(lo_all[sel], s.astype(int), S1, S2)
    seen = float(S2[int(s[-1]) - 1] / S2[-1]) if S2[-1] > 0 else 1.0  # share of the annealing area in the fitted steps
    kappa = anneal_ratio if anneal_ratio is not None and seen < 0.5 else None
    out = {"run_dir": str(run_dir), "total_steps": T, "last_logged_step": last_step, "finished": finished,
           "fit_steps": [int(s[0]), int(s[-1])], "fraction": fraction, "rows_fitted": len(use),
           "target": target, "loss_column": column, "lr_schedule": lr_source, "lambda": lam, "level": level,
           "annealing_seen": seen, "forms": {}}
    if finished and target == "eval":
        out["measured_final_loss"] = float(lval[-1])
    elif finished:
        tail = np.array([r["step"] > T - max(1, int(0.02 * T)) for r in train])
        if tail.sum() < 3:
            tail[-3:] = True
        weight = np.array([r["step"] for r in train]) - lo_all + 1  # steps each row averages
        out["measured_final_loss"] = float(np.sum(lval[tail] * weight[tail]) / np.sum(weight[tail]))
        evals = [r for r in rows if "eval_loss" in r]
        if evals and evals[-1]["step"] >= T:
            out["measured_final_eval_loss"] = float(evals[-1]["eval_loss"])
    rng = np.random.default_rng(seed)
    for form in ("power", "schedule"):
        k = kappa if form == "schedule" else None
        p = _fit(form, x, y, k)
        fitted = _row_means(x, _eval(form, p, x["s"], x["S1"], x["S2"]))
        resid = y - fitted
        final = float(_eval(form, p, T, S1[-1], S2[-1]))
        # moving-block bootstrap of the residuals (neighbouring steps' noise is correlated)
        B = max(2, len(resid) // 10)
        preds = []
        for _ in range(bootstrap):
            starts = rng.integers(0, len(resid) - B + 1, math.ceil(len(resid) / B))
            e = np.concatenate([resid[i:i + B] for i in starts])[: len(resid)]
            try:
                pb = _fit(form, x, fitted + e, k)
            except (ValueError, np.linalg.LinAlgError):
                continue
            preds.append(float(_eval(form, pb, T, S1[-1], S2[-1])))
        q = (1 - level) / 2
        names = ["E", "A", "alpha"] if form == "power" else ["L0", "A", "alpha", "C"]
        entry = {"params": dict(zip(names, map(float, p))), "predicted_final_loss": final,
                 "rmse": float(np.sqrt(np.mean(resid ** 2)))}
        if form == "schedule":
            entry["kappa"] = kappa_of(p, S1[-1], S2[-1])
            if k is not None:
                entry["note"] = f"kappa fixed at {k:.3g} from reference runs ({seen:.0%} of the annealing area seen)"
            elif seen < 0.5:
                entry["note"] = f"only {seen:.0%} of the annealing area seen: C is barely identified (see --reference)"
        if preds:
            entry["interval"] = [float(np.quantile(preds, q)), float(np.quantile(preds, 1 - q))]
        evals = [r for r in rows if "eval_loss" in r and skip < r["step"] <= cut]
        if evals and target == "train":
            gap = np.mean([r["eval_loss"] - _eval(form, p, r["step"], S1[r["step"] - 1], S2[r["step"] - 1])
                           for r in evals])
            entry["predicted_final_eval_loss"] = final + float(gap)
        if "measured_final_loss" in out:
            entry["rel_error"] = (final - out["measured_final_loss"]) / out["measured_final_loss"]
        if "measured_final_eval_loss" in out and "predicted_final_eval_loss" in entry:
            entry["eval_rel_error"] = (entry["predicted_final_eval_loss"] - out["measured_final_eval_loss"]) \
                / out["measured_final_eval_loss"]
        out["forms"][form] = entry
    out["curve"] = {"step": [int(r["step"]) for r in train], "loss": [float(v) for v in lval]}
    return out


def curve_prediction_line(s: np.ndarray, form: str, params: dict, S1: np.ndarray, S2: np.ndarray) -> np.ndarray:
    p = np.array(list(params.values()))
    return _eval(form, p, s, S1[s.astype(int) - 1], S2[s.astype(int) - 1])
