"""Loss-curve fits of one run (`danlu fit-curve RUN`): predict the final loss from a prefix.

A curve is rows (step s, loss) plus the run's per-step learning rate η_k, k = 1..T. It comes from a
`danlu train` run directory (metrics.jsonl; the schedule rebuilt from config.yaml and checked against
the logged `lr`) or from a CSV/JSONL table of another trainer (a W&B export), with the schedule given
as options (`Schedule`) or as an lr column.

The schedule-aware form (Tissue et al. 2024, with the warmup offset of Luo et al. 2025):
    L(s) = L0 + A · [ (S1(s) + s_w)^(-α) − c · S2(s) / 1000 ]
with S1(s) = Σ_{k≤s} η_k / η_peak the forward area in peak-lr steps and S2 the annealing area (the lr
decreases carried with momentum λ = 0.999, also in peak-lr units). Measuring the areas in peak-lr
steps makes the shape (α, s_w, c) comparable between runs of different peak lr; the level L0 and the
scale A are each run's own.

Two ways to fit it:
  - pooled (with reference runs, `--reference`: finished runs of the same family, e.g. the rest of a
    sweep): each reference is cut where the run's prefix ends (the same checkpoint steps; a shorter
    reference at the same fraction of its own run) and weighted by how like the run it is (a Gaussian
    kernel over log total steps, log rows fitted, log peak lr); the shape θ = (α, s_w, c) is the one
    under which these reference prefixes best predict their measured final losses (weighted). The
    run's (L0, A) are then a linear least squares on its prefix, so 2 checkpoints suffice. The interval
    is split-conformal on the references nearest the run: their prediction errors, each made with θ
    fitted the same way without that reference's fold (cross-conformal), give the relative half-width.
  - own (no references): all five parameters from the run's prefix, with a bootstrap interval that
    only reflects the noise around the fitted form (marked uncalibrated: on real curves the form's
    misfit dominates; see docs/curves.md).
A power law in steps, L(s) = E + A·s^(-α), is fitted alongside as a baseline.

No impossible value is reported as a prediction: a fit whose final loss is not finite or not
positive, whose level L0 is negative, whose scale A is negative (loss rising with training), or that
predicts a final loss above the last fitted loss while the lr only decays, is marked failed with the
reason and carries no number.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.signal import lfilter

LAMBDA = 0.999
SKIP = 0.02  # the first 2% of the steps (warmup, the unigram plateau) follow no form: left out
SCHEDULES = ("cosine", "linear", "constant", "wsd")


class CurveError(ValueError):
    pass


# ---------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule given as options (curves from other trainers). Same conventions as
    `pretrain.optimizer.make_schedule`: linear warmup from 0 over `warmup_steps` (update k, 0-based,
    uses peak·k/warmup), then cosine / linear decay to final_lr_ratio·peak at total_steps, a constant
    peak, or WSD (hold, then a linear cooldown over the last cooldown_fraction of the steps)."""
    kind: str = "cosine"
    peak_lr: float = 1.0
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1
    cooldown_fraction: float = 0.2

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise CurveError(f"schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if not self.peak_lr > 0 or self.warmup_steps < 0 or not 0 <= self.final_lr_ratio <= 1:
            raise CurveError(f"schedule {self}: needs peak_lr > 0, warmup_steps >= 0, 0 <= final_lr_ratio <= 1")

    def per_step(self, total_steps: int) -> np.ndarray:
        """η_k for updates k = 0..T-1 [T] (float64)."""
        T, W, peak = int(total_steps), int(self.warmup_steps), self.peak_lr
        if T <= W:
            raise CurveError(f"total steps {T} must exceed warmup steps {W}")
        k = np.arange(T, dtype=float)
        floor = peak * self.final_lr_ratio
        t = np.clip((k - W) / max(T - W, 1), 0.0, 1.0)  # progress through the part after warmup
        if self.kind == "cosine":
            main = floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * t))
        elif self.kind == "linear":
            main = floor + (peak - floor) * (1 - t)
        elif self.kind == "constant":
            main = np.full(T, peak)
        else:
            cool = max(1, int(round(T * self.cooldown_fraction)))
            stable = max(T - W - cool, 0)
            main = floor + (peak - floor) * (1 - np.clip((k - W - stable) / cool, 0.0, 1.0))
        return np.where(k < W, peak * k / max(W, 1), main)


def check_schedule(eta: np.ndarray, logged: list[tuple[int, float]], where: str) -> None:
    """Refuses a schedule η [T] that disagrees with logged (step, lr) pairs (step s logs η_s, 1-based).
    The tolerance is relative to the peak lr (1e-3 of it): near the end of a decay to zero a float32
    lr cannot be matched relative to its own tiny value."""
    tol = 1e-3 * float(np.max(eta)) + 1e-12
    for s, lr in logged:
        if 1 <= s <= len(eta) and abs(eta[s - 1] - lr) > tol:
            raise CurveError(f"{where}: the schedule gives lr {eta[s - 1]:.6g} at step {s} but the log has {lr:.6g} "
                             f"(peak {np.max(eta):.4g}); the schedule does not describe this run")


def areas(eta: np.ndarray, lam: float = LAMBDA) -> tuple[np.ndarray, np.ndarray]:
    """S1 [T] (forward area Σ η) and S2 [T] (annealing area: Σ m_k, m_k = λ·m_{k-1} + (η_{k-1} − η_k),
    counted from the peak on) after each step, in the units of eta."""
    eta = np.asarray(eta, float)
    peak = int(np.argmax(eta))
    drops = np.zeros_like(eta)
    drops[peak + 1:] = eta[peak:-1] - eta[peak + 1:]
    return np.cumsum(eta), np.cumsum(lfilter([1.0], [1.0, -lam], drops))


# ---------------------------------------------------------------- curves


@dataclasses.dataclass
class Curve:
    """One run's loss rows and schedule. Row i averages the steps lo[i]..step[i] (1-based, inclusive;
    lo == step for a point such as an eval). eta [T] is the lr of each update."""
    name: str
    step: np.ndarray  # [n] int
    lo: np.ndarray  # [n] int
    loss: np.ndarray  # [n]
    eta: np.ndarray  # [T]
    column: str
    lr_source: str
    measured: float | None = None  # the final loss, when the run has finished
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def T(self) -> int:
        return len(self.eta)

    @property
    def finished(self) -> bool:
        return int(self.step[-1]) >= self.T


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
    """η_k for k = 1..T (metrics row `step` s logs η_s) [T], T, and where it came from."""
    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.exists():
        from pretrain.config import load_config
        from pretrain.optimizer import make_schedule

        cfg = load_config(cfg_path)
        T = cfg.train.steps
        eta = np.asarray(make_schedule(cfg.optimizer, T)(np.arange(T)), dtype=float)
        logged = [(r["step"], r["lr"]) for r in rows if "lr" in r and 1 <= r["step"] <= T]
        check_schedule(eta, logged[:: max(1, len(logged) // 20)], str(cfg_path))
        return eta, T, "config.yaml"
    steps = np.array([r["step"] for r in rows if "lr" in r], float)
    lrs = np.array([r["lr"] for r in rows if "lr" in r], float)
    if len(steps) < 2:
        raise CurveError(f"{run_dir}: no config.yaml and fewer than 2 logged lr values")
    T = int(steps[-1])
    return np.interp(np.arange(1, T + 1), steps, lrs), T, "metrics.jsonl lr column (interpolated)"


def load_run(run_dir: str | Path, target: str = "train") -> Curve:
    """A `danlu train` run directory as a Curve: the train loss (`loss_mean` rows, the mean of the
    steps since the previous row; older runs: the row's own `loss`) or the eval loss rows."""
    if target not in ("train", "eval"):
        raise CurveError(f"target={target!r} is not one of train, eval")
    rows = read_metrics(run_dir)
    eta, T, lr_source = lr_per_step(run_dir, rows)
    key = "loss" if target == "train" else "eval_loss"
    use = [r for r in rows if key in r and math.isfinite(r[key]) and 1 <= r["step"] <= T]
    if not use:
        raise CurveError(f"{run_dir}: metrics.jsonl has no {key} rows yet")
    column = "loss_mean" if target == "train" and all(r.get("loss_mean") is not None for r in use) else key
    step = np.array([r["step"] for r in use])
    lo = np.concatenate([[1], step[:-1] + 1]) if column == "loss_mean" else step.copy()
    loss = np.array([r[column] for r in use], float)
    curve = Curve(str(run_dir), step, lo, loss, eta, column, lr_source)
    if curve.finished and target == "eval":
        curve.measured = float(loss[-1])
    elif curve.finished:
        # the train loss is noisy: the mean over the last 2% of the steps (at least 3 rows)
        tail = step > T - max(1, int(0.02 * T))
        if tail.sum() < 3:
            tail[-3:] = True
        w = step - lo + 1
        curve.measured = float(np.sum(loss[tail] * w[tail]) / np.sum(w[tail]))
        evals = [r for r in rows if "eval_loss" in r]
        if evals and evals[-1]["step"] >= T:
            curve.extra["measured_final_eval_loss"] = float(evals[-1]["eval_loss"])
    if target == "train":
        curve.extra["evals"] = [(int(r["step"]), float(r["eval_loss"])) for r in rows
                                if "eval_loss" in r and 1 <= r["step"] <= T]
    return curve


def parse_columns(spec: str | None) -> dict:
    """`step=_step,loss=eval/loss,lr=lr` -> {"step": "_step", ...}; unnamed roles keep their own name."""
    cols = {"step": "step", "loss": "loss", "lr": "lr"}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        role, sep, name = part.partition("=")
        if not sep or role.strip() not in cols or not name.strip():
            raise CurveError(f"--columns {spec!r}: each part is ROLE=COLUMN with ROLE one of step, loss, lr")
        cols[role.strip()] = name.strip()
    return cols


def _table_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row) pairs of a CSV or JSONL file."""
    if not path.exists():
        raise CurveError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except ValueError:
                    raise CurveError(f"{path}: line {i} is not JSON") from None
        header = sorted({k for _, r in rows for k in r})
        return header, rows
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [(i + 2, r) for i, r in enumerate(reader)]  # line 1 is the header
        return list(reader.fieldnames or []), rows


def _number(path: Path, line: int, column: str, value) -> float | None:
    """A cell as a float; empty (W&B leaves a metric blank at steps that did not log it) is None."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "NaN", "nan")):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CurveError(f"{path}: line {line}, column {column!r}: {value!r} is not a number") from None
    if not math.isfinite(v):
        return None
    return v


def load_table(path: str | Path, columns: dict | None = None, schedule: Schedule | None = None,
               total_steps: int | None = None) -> Curve:
    """A CSV or JSONL of (step, loss[, lr]) rows as a Curve of points. The per-step lr comes from
    `schedule` (checked against an lr column when there is one) or, without it, from the lr column
    interpolated. total_steps defaults to the last step (a finished run). Rows with an empty loss
    are skipped; anything else that is not a number, or steps that do not increase, is an error
    naming the file, line and column."""
    path = Path(path)
    cols = columns or parse_columns(None)
    header, rows = _table_rows(path)
    for role in ("step", "loss"):
        if cols[role] not in header:
            raise CurveError(f"{path}: no column {cols[role]!r} for the {role} (columns: {', '.join(header)}); "
                             f"map it with --columns {role}=NAME")
    has_lr = cols["lr"] in header
    step, loss, logged = [], [], []
    for line, r in rows:
        s = _number(path, line, cols["step"], r.get(cols["step"]))
        v = _number(path, line, cols["loss"], r.get(cols["loss"]))
        lr = _number(path, line, cols["lr"], r.get(cols["lr"])) if has_lr else None
        if s is None or v is None:
            continue
        if s != int(s) or s < 1:
            raise CurveError(f"{path}: line {line}, column {cols['step']!r}: step {s:g} is not a positive integer")
        if step and s <= step[-1]:
            raise CurveError(f"{path}: line {line}, column {cols['step']!r}: step {int(s)} does not increase "
                             f"(previous {step[-1]}); drop repeated or restarted segments first")
        if v <= 0:
            raise CurveError(f"{path}: line {line}, column {cols['loss']!r}: loss {v:g} is not positive")
        step.append(int(s))
        loss.append(v)
        if lr is not None:
            logged.append((int(s), lr))
    if not step:
        raise CurveError(f"{path}: no rows with both {cols['step']!r} and {cols['loss']!r}")
    T = int(total_steps or step[-1])
    if step[-1] > T:
        raise CurveError(f"{path}: step {step[-1]} is past --total-steps {T}")
    if schedule is not None:
        eta = schedule.per_step(T)
        check_schedule(eta, logged, str(path))
        source = f"{schedule.kind} schedule (options)"
    elif len(logged) >= 2 and logged[-1][0] >= T:
        eta = np.interp(np.arange(1, T + 1), [s for s, _ in logged], [v for _, v in logged])
        source = f"column {cols['lr']!r} (interpolated)"
    else:
        raise CurveError(f"{path}: give the schedule (--schedule, --peak-lr, --warmup-steps, --total-steps) or an lr "
                         f"column up to the last step")
    step_a = np.array(step)
    curve = Curve(str(path), step_a, step_a.copy(), np.array(loss), eta, cols["loss"], source)
    if curve.finished:
        curve.measured = float(loss[-1])
    return curve


def load_curve(source: str | Path, target: str = "train", columns: dict | None = None,
               schedule: Schedule | None = None, total_steps: int | None = None) -> Curve:
    """A run directory, or a .csv / .jsonl table."""
    p = Path(source)
    if p.is_dir():
        return load_run(p, target)
    if p.suffix in (".csv", ".jsonl", ".json"):
        return load_table(p, columns, schedule, total_steps)
    raise CurveError(f"{p}: neither a run directory nor a .csv / .jsonl file")


# ---------------------------------------------------------------- the forms


@dataclasses.dataclass
class Prefix:
    """The rows of a curve fitted for a prediction (steps in (SKIP·T, fraction·T]) and what the
    forms need: the steps the rows cover with their areas in peak-lr units."""
    curve: Curve
    sel: np.ndarray  # [n] bool, rows of the curve used
    x: dict

    @property
    def y(self) -> np.ndarray:
        return self.curve.loss[self.sel]

    @property
    def n(self) -> int:
        return int(self.sel.sum())


def make_prefix(curve: Curve, fraction: float | None, lam: float = LAMBDA) -> Prefix:
    """The prefix of `curve` up to fraction·T (all rows when None), without the rows reaching into the first SKIP·T steps."""
    T = curve.T
    peak = float(np.max(curve.eta))
    S1, S2 = areas(curve.eta / peak, lam)
    cut = T * fraction if fraction else curve.step[-1]
    skip = max(1, int(SKIP * T))
    sel = (curve.lo > skip) & (curve.step <= cut)
    lo, hi = curve.lo[sel], curve.step[sel]
    if not sel.any():
        return Prefix(curve, sel, {})
    steps = np.arange(int(lo[0]), int(hi[-1]) + 1)
    x = {"s": steps.astype(float), "S1": S1[steps - 1], "S2": S2[steps - 1], "start": (lo - lo[0]).astype(int),
         "len": (hi - lo + 1).astype(float), "S1T": S1[-1], "S2T": S2[-1], "skip": skip, "cut": cut,
         "decaying": bool(curve.eta[-1] < curve.eta[int(hi[-1]) - 1] * (1 - 1e-9))}
    return Prefix(curve, sel, x)


def _row_means(x: dict, per_step: np.ndarray) -> np.ndarray:
    """Each row's mean of a per-step quantity (rows tile their steps, so reduceat sums exactly a row)."""
    if np.all(x["len"] == 1):
        return per_step[x["start"]]
    return np.add.reduceat(per_step, x["start"])[: len(x["start"])] / x["len"]


def shape_term(theta, S1, S2) -> np.ndarray:
    """(S1 + s_w)^(-α) − c·S2/1000 for the shape θ = (α, s_w, c); areas in peak-lr steps."""
    al, sw, c = theta
    return (np.asarray(S1) + sw) ** (-al) - c * 1e-3 * np.asarray(S2)


def level_scale(p: Prefix, theta) -> tuple[float, float]:
    """The run's (L0, A) under shape θ: linear least squares of its prefix rows."""
    f = _row_means(p.x, shape_term(theta, p.x["S1"], p.x["S2"]))
    X = np.stack([np.ones_like(f), f], 1)  # [n, 2]
    (L0, A), *_ = np.linalg.lstsq(X, p.y, rcond=None)
    return float(L0), float(A)


def predict_pooled(p: Prefix, theta) -> tuple[float, float, float]:
    """(final loss at T, L0, A) of the run under the shared shape θ."""
    L0, A = level_scale(p, theta)
    return L0 + A * float(shape_term(theta, p.x["S1T"], p.x["S2T"])), L0, A


def _power(params, s):
    E, A, al = params
    return E + A * np.asarray(s, float) ** (-al)


def _own(params, S1, S2):
    L0, A = params[:2]
    return L0 + A * shape_term(params[2:], S1, S2)


def fit_own(form: str, p: Prefix, y: np.ndarray | None = None, x0: np.ndarray | None = None) -> np.ndarray:
    """Least squares of one form to the prefix rows (y: other values for the same rows, for the
    bootstrap). power: (E, A, α) in steps; schedule: (L0, A, α, s_w, c) with the areas. x0: start
    from these parameters only (the bootstrap's refits, warm-started from the full fit)."""
    y = p.y if y is None else y
    x = p.x
    if form == "power":
        def res(q):
            return _row_means(x, _power(q, x["s"])) - y
        starts = [[y.min() * 0.8, (y.max() - y.min()) * x["s"].min() ** a, a] for a in (0.3, 0.6, 1.0)]
        bounds = ([0, 0, 0.01], [np.inf, np.inf, 3])
    else:
        def res(q):
            return _row_means(x, _own(q, x["S1"], x["S2"])) - y
        starts = [[y.min() * 0.8, (y.max() - y.min()) * (x["S1"].min() + sw) ** a, a, sw, 0.5]
                  for a in (0.3, 0.6, 1.2) for sw in (0.0, 100.0)]
        bounds = ([0, 0, 0.01, 0, 0], [np.inf, np.inf, 3, 1e4, 100])
    if x0 is not None:
        starts = [x0]
    best = None
    for q0 in starts:
        q0 = np.clip(q0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        r = least_squares(res, q0, bounds=bounds, x_scale="jac", max_nfev=2000)
        if best is None or r.cost < best.cost:
            best = r
    return best.x


def _final_own(form: str, params, p: Prefix) -> float:
    if form == "power":
        return float(_power(params, p.curve.T))
    return float(_own(params, p.x["S1T"], p.x["S2T"]))


def physical_failure(final: float, level: float, first: float, p: Prefix) -> str | None:
    """Why a fitted prediction is impossible, or None. `level`: the asymptote (E or L0); `first`: the
    fitted loss at the first fitted row."""
    if not math.isfinite(final):
        return "the predicted final loss is not finite"
    if final <= 0:
        return f"the predicted final loss {final:.4g} is not positive"
    if level < 0:
        return f"the fitted asymptote {level:.4g} is negative (no loss goes below zero)"
    if first - final <= 1e-6 * abs(final):  # the fits bound A at 0: a flat line stands for a rising loss
        return "the fitted loss does not fall with training"
    last = float(p.y[-1])
    if p.x["decaying"] and final > last:
        return (f"the predicted final loss {final:.4f} is above the last fitted loss {last:.4f} although the lr "
                f"only decays from there")
    return None


# ---------------------------------------------------------------- pooling over reference runs


MIN_ROWS = 2  # the run's own parameters under a shared shape: L0 and A
BANDWIDTH = 0.35  # kernel width over the features (natural logs): a factor 2 in one of them weighs e^-2 ≈ 0.14
NEIGHBOURS = 1  # the kernel widens for a run in a sparse region until its nearest reference lies within it
CALIBRATION = 19  # the nearest references whose errors set the interval (rank 18 of 19 at level 0.9)


def features(p: Prefix) -> np.ndarray:
    """What makes two prefixes predict alike [3]: log total steps, log rows fitted, log peak lr."""
    return np.log([p.curve.T, max(p.n, 1), float(np.max(p.curve.eta))])


def similarity(target: Prefix, prefixes: list[Prefix]) -> tuple[np.ndarray, np.ndarray]:
    """Distances of the references' prefixes to the target's in `features` [n] and their Gaussian kernel
    weights [n]; the width is BANDWIDTH, or the distance to the NEIGHBOURS-th nearest when that is larger."""
    d = np.linalg.norm(np.stack([features(q) for q in prefixes]) - features(target), axis=1)
    h = max(BANDWIDTH, float(np.sort(d)[min(NEIGHBOURS, len(d)) - 1]))
    return d, np.exp(-0.5 * (d / h) ** 2)


def fit_shape(prefixes: list[Prefix], weights: np.ndarray | None = None, theta0=None) -> np.ndarray:
    """The shape θ = (α, s_w, c) under which the references' prefixes best predict their own measured
    final losses (weighted least squares of the relative errors). prefixes: finished references with
    at least MIN_ROWS rows; weights [n]: how much each reference is like the target (default equal)."""
    w = np.ones(len(prefixes)) if weights is None else np.asarray(weights, float)
    sw = np.sqrt(w / w.sum())

    def res(theta):
        return sw * np.array([(predict_pooled(p, theta)[0] - p.curve.measured) / p.curve.measured for p in prefixes])

    bounds = ([0.05, 0.0, 0.0], [3.0, 1e4, 100.0])
    if theta0 is None:  # a coarse grid first: the relative errors are far from quadratic in (α, s_w)
        grid = [(a, sw_, c) for a in (0.3, 0.6, 1.0, 1.5, 2.2) for sw_ in (0.0, 30.0, 100.0, 300.0) for c in (0.0, 1.0)]
        theta0 = min(grid, key=lambda t: float(np.sum(res(t) ** 2)))
    t0 = np.clip(theta0, np.array(bounds[0]) + 1e-6, np.array(bounds[1]) - 1e-6)
    best = least_squares(res, t0, bounds=bounds, x_scale=[0.3, 100.0, 1.0], max_nfev=200)
    return best.x


def cross_errors(prefixes: list[Prefix], weights: np.ndarray, theta: np.ndarray, held: np.ndarray,
                 folds: int = 5) -> np.ndarray:
    """Relative errors [len(held)] of the references `held` (indices into prefixes), each predicted with
    θ fitted (same weights) without its fold: an error measured on a run the shape was not fitted to,
    made exactly as the target's prediction is."""
    folds = min(folds, len(held))
    errs = np.empty(len(held))
    for f in range(folds):
        out = set(held[f::folds].tolist())
        keep = [i for i in range(len(prefixes)) if i not in out]
        th = fit_shape([prefixes[i] for i in keep], weights[keep], theta) if len(keep) >= 4 else theta
        for k in range(f, len(held), folds):
            p = prefixes[held[k]]
            errs[k] = (predict_pooled(p, th)[0] - p.curve.measured) / p.curve.measured
    return errs


def conformal_halfwidth(errs: np.ndarray, level: float) -> float | None:
    """The ⌈(n+1)·level⌉-th smallest |relative error| (split-conformal); None when n is too small
    for that rank to exist."""
    k = math.ceil((len(errs) + 1) * level)
    if k > len(errs):
        return None
    return float(np.sort(np.abs(errs))[k - 1])


@dataclasses.dataclass
class Pool:
    """What the references give one target's prediction: the shape, the cross-validated errors of the
    references nearest the target, who was used and with what weight."""
    theta: np.ndarray
    errors: np.ndarray
    used: list[str]
    weights: np.ndarray
    skipped: dict  # name -> why not used


def reference_prefix(ref: Curve, target: Prefix, lam: float = LAMBDA) -> Prefix:
    """A reference's prefix as the target's is: up to the step of the target's last fitted row (the
    same checkpoint positions), and never past the target's fraction of its own run (so a shorter
    reference's final loss stays outside)."""
    return make_prefix(ref, reference_cut(ref, target) / ref.T, lam)


def reference_cut(ref: Curve, target: Prefix) -> float:
    return min(float(target.curve.step[target.sel][-1]), target.x["cut"] / target.curve.T * ref.T)


def make_pool(references: list[Curve], target: Prefix, lam: float = LAMBDA) -> Pool:
    """Fits the shape for `target` on the references' prefixes (`reference_prefix`; each a finished run
    with at least MIN_ROWS rows there), weighted by their `similarity` to the target, and measures the
    cross-validated errors of the CALIBRATION nearest."""
    used, skipped = [], {}
    for c in references:
        p = reference_prefix(c, target, lam)
        if c.measured is None:
            skipped[c.name] = "not finished"
        elif p.n < MIN_ROWS:
            skipped[c.name] = f"{p.n} rows up to step {reference_cut(c, target):.0f}"
        else:
            used.append(p)
    if len(used) < 4:
        raise CurveError(f"{len(used)} usable reference runs; the shared shape (3 parameters) needs at least 4 finished "
                         f"runs with {MIN_ROWS}+ rows in the part of their curve matching the run's prefix"
                         + (f" (skipped: {skipped})" if skipped else ""))
    d, w = similarity(target, used)
    theta = fit_shape(used, w)
    near = np.argsort(d, kind="stable")[:CALIBRATION]
    return Pool(theta, cross_errors(used, w, theta, near), [p.curve.name for p in used], w, skipped)


# ---------------------------------------------------------------- the prediction


def fit_curve(run: str | Path | Curve, fraction: float | None = None, bootstrap: int = 200, level: float = 0.9,
              seed: int = 0, lam: float = LAMBDA, target: str = "train", references: list | None = None,
              pool: Pool | None = None) -> dict:
    """Fits the run's curve (a run directory, a table or a Curve) up to fraction·T (every row when
    None) and predicts its loss at the last step T with intervals at `level`.

    references: Curves (or paths) of finished runs of the same family; with them the `pooled` form
    (shared shape, calibrated interval) is the answer. pool: a Pool already made from references
    (the backtest reuses it). Returns a JSON-able dict; forms that fail carry `failed` and no number."""
    curve = run if isinstance(run, Curve) else load_curve(run, target)
    if fraction is not None and not 0 < fraction <= 1:
        raise CurveError(f"fraction {fraction} is not in (0, 1]")
    p = make_prefix(curve, fraction, lam)
    what = "evaluations" if curve.column == "eval_loss" else "rows"
    out = {"run_dir": curve.name, "total_steps": curve.T, "last_logged_step": int(curve.step[-1]),
           "finished": curve.finished, "fraction": fraction, "rows_fitted": p.n, "target": target,
           "loss_column": curve.column, "lr_schedule": curve.lr_source, "lambda": lam, "level": level, "forms": {}}
    if p.n < MIN_ROWS:
        raise CurveError(f"{curve.name}: {p.n} {what} of the loss in steps ({max(1, int(SKIP * curve.T))}, "
                         f"{(fraction or 1) * curve.T:.0f}]; a prediction needs at least {MIN_ROWS} (the run's own level "
                         f"and scale; the shape from --reference runs), 6 without references "
                         f"({'log' if what == 'rows' else 'evaluate'} more often, or fit a larger fraction)")
    out["fit_steps"] = [int(curve.step[p.sel][0]), int(curve.step[p.sel][-1])]
    if curve.measured is not None:
        out["measured_final_loss"] = curve.measured
    if "measured_final_eval_loss" in curve.extra:
        out["measured_final_eval_loss"] = curve.extra["measured_final_eval_loss"]
    rng = np.random.default_rng(seed)
    if pool is None and references:
        refs = [r if isinstance(r, Curve) else load_curve(r, target) for r in references]
        pool = make_pool(refs, p, lam)
    if pool is not None:
        out["forms"]["pooled"] = _pooled_entry(p, pool, level)
    for form, nparams in (("power", 3), ("schedule", 5)):
        if p.n < nparams + 1:
            out["forms"][form] = {"failed": f"{p.n} {what} fitted; its {nparams} parameters need at least {nparams + 1}"}
            continue
        out["forms"][form] = _own_entry(form, p, bootstrap, level, rng)
    for entry in out["forms"].values():
        _add_comparisons(entry, out, p)
    answer = "pooled" if "pooled" in out["forms"] else "schedule"
    out["answer"] = answer
    out["curve"] = {"step": [int(v) for v in curve.step], "loss": [float(v) for v in curve.loss]}
    return out


def _pooled_entry(p: Prefix, pool: Pool, level: float) -> dict:
    final, L0, A = predict_pooled(p, pool.theta)
    first = L0 + A * float(_row_means(p.x, shape_term(pool.theta, p.x["S1"], p.x["S2"]))[0])
    entry = {"params": {"L0": L0, "A": A, "alpha": float(pool.theta[0]), "s_w": float(pool.theta[1]),
                        "c": float(pool.theta[2])},
             "references": len(pool.used), "effective_references": float(pool.weights.sum() ** 2 / np.sum(pool.weights ** 2)),
             "calibration_references": len(pool.errors),
             "calibration_rmse": float(np.sqrt(np.mean(pool.errors ** 2)))}
    why = physical_failure(final, L0, first, p)
    if why:
        entry["failed"] = why
        return entry
    entry["predicted_final_loss"] = final
    half = conformal_halfwidth(pool.errors, level)
    if half is None:
        entry["note"] = (f"no interval: {len(pool.errors)} references are too few for a {level:.0%} conformal interval "
                         f"(needs {math.ceil(level / (1 - level))})")
    else:
        # relative errors of the references, so the interval is a relative band around the prediction
        entry["interval"] = [final * (1 - half), final * (1 + half)]
        entry["interval_kind"] = f"cross-conformal on the {len(pool.errors)} reference runs nearest this one"
    return entry


def _own_entry(form: str, p: Prefix, bootstrap: int, level: float, rng) -> dict:
    params = fit_own(form, p)
    names = ["E", "A", "alpha"] if form == "power" else ["L0", "A", "alpha", "s_w", "c"]
    entry = {"params": dict(zip(names, map(float, params)))}
    fitted = _row_means(p.x, _power(params, p.x["s"]) if form == "power" else _own(params, p.x["S1"], p.x["S2"]))
    resid = p.y - fitted
    entry["rmse"] = float(np.sqrt(np.mean(resid ** 2)))
    final = _final_own(form, params, p)
    why = physical_failure(final, params[0], float(fitted[0]), p)
    if why:
        entry["failed"] = why
        return entry
    entry["predicted_final_loss"] = final
    # moving-block bootstrap of the residuals (neighbouring rows' noise is correlated)
    B = max(2, len(resid) // 10)
    preds = []
    for _ in range(bootstrap):
        starts = rng.integers(0, len(resid) - B + 1, math.ceil(len(resid) / B))
        e = np.concatenate([resid[i:i + B] for i in starts])[: len(resid)]
        q = _final_own(form, fit_own(form, p, fitted + e, x0=params), p)
        if math.isfinite(q):
            preds.append(q)
    if preds:
        q = (1 - level) / 2
        entry["interval"] = [float(np.quantile(preds, q)), float(np.quantile(preds, 1 - q))]
        entry["interval_kind"] = "bootstrap of residuals (uncalibrated: the form's misfit is not in it)"
    return entry


def _add_comparisons(entry: dict, out: dict, p: Prefix) -> None:
    """rel_error against the measured final loss; for the train loss, the eval prediction (train
    prediction + the mean eval−train gap over the fitted steps)."""
    if "predicted_final_loss" not in entry:
        return
    final = entry["predicted_final_loss"]
    if "measured_final_loss" in out:
        entry["rel_error"] = (final - out["measured_final_loss"]) / out["measured_final_loss"]
        if "interval" in entry:
            entry["covered"] = entry["interval"][0] <= out["measured_final_loss"] <= entry["interval"][1]
    evals = [(s, v) for s, v in p.curve.extra.get("evals", []) if p.x["skip"] < s <= p.x["cut"]]
    if evals:
        s = np.array([s for s, _ in evals])
        line = curve_prediction_line(s, entry["params"], p.curve.eta, out["lambda"])
        entry["predicted_final_eval_loss"] = final + float(np.mean([v for _, v in evals] - line))
        if "measured_final_eval_loss" in out:
            m = out["measured_final_eval_loss"]
            entry["eval_rel_error"] = (entry["predicted_final_eval_loss"] - m) / m


def curve_prediction_line(s: np.ndarray, params: dict, eta: np.ndarray, lam: float = LAMBDA) -> np.ndarray:
    """A fitted form's loss at steps s [m] (1-based), from its params dict."""
    s = np.asarray(s, int)
    if "E" in params:
        return _power([params["E"], params["A"], params["alpha"]], s)
    S1, S2 = areas(eta / np.max(eta), lam)
    return params["L0"] + params["A"] * shape_term([params["alpha"], params["s_w"], params["c"]],
                                                   S1[s - 1], S2[s - 1])
