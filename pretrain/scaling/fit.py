"""Scaling-law fits to a runs table: Chinchilla's Approaches 1, 2 and 3, the GPT-4 form, bootstrap.

    runs = read_runs("runs.csv", columns={"params": "params", "tokens": "tokens", "loss": "loss"})
    result = fit_all(runs, bootstrap=1000)          # a JSON-able dict: fit.json
    result["approach3"]["params"]                   # {"E", "A", "B", "alpha", "beta"}, unrounded

Approach 1 (Hoffmann et al. 2022, §3.1): the lower envelope of loss against compute C (the runs
no cheaper run beats) → power laws N_opt ∝ C^a, D_opt ∝ C^b by least squares in log space.
Approach 2 (§3.2): per IsoFLOP budget a parabola of loss in log N → its minimum (N_opt, D_opt,
L_opt) → power laws over the budgets.
Approach 3 (§3.3, as Besiroglu et al. 2024 replicated it): L(N, D) = E + A/N^α + B/D^β in the
log-sum-exp parametrisation log L = LSE(a − α log N, b − β log D, e), A = e^a, B = e^b, E = e^e,
minimising the SUMMED Huber loss (δ = 1e-3) of log L − log L_obs with L-BFGS-B from a grid of
initialisations (α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4500
starts). The grid is screened by its objective in one vectorised pass and L-BFGS-B runs from
the best `top_k` starts (all when top_k=None), with the analytic gradient and tight tolerances;
the report says how many starts converged and how many reached the best objective.
Compute-optimal frontier: N_opt(C) = G (C/6)^a, D_opt(C) = G^-1 (C/6)^b, a = β/(α+β),
b = α/(α+β), G = (αA / (βB))^(1/(α+β)).
GPT-4 form: L(C) = a·C^b + c (b < 0) on the compute-optimal frontier points (Approach 2's
parabola minima, else the Approach 1 envelope), fitted the same way (log-space Huber).
Bootstrap: resample the runs with replacement (as multinomial weights on the summed objective);
each resample is warm-started from the full-data optimum, which is what makes 1000 resamples
fast. Intervals are percentile intervals of every parameter, derived quantity and prediction.

C is 6·N·D by default (the compute of Approach 3's closed form); `compute="column"` uses the
table's FLOP column instead for Approaches 1, 2 and the GPT-4 form. fit.json says which.
"""
from __future__ import annotations

import csv
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

DELTA = 1e-3
# Hoffmann et al. / Besiroglu et al. initialisation grid, in the order (a, b, e, alpha, beta).
INIT_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))
# scipy's defaults (ftol 2.2e-9, gtol 1e-5) stop early on this flat, small objective (Besiroglu et al.
# found the same of the original fit); these tolerances reach the optimum to ~1e-6 in the parameters.
LBFGS_OPTIONS = {"maxiter": 5_000, "ftol": 1e-13, "gtol": 1e-9}


class FitError(ValueError):
    """Bad input to a fit (missing column, too few runs, non-positive values); the message says which."""


@dataclass(frozen=True)
class Runs:
    """A runs table as arrays [n]: N, D, L, C (compute used by Approaches 1, 2, GPT-4), group
    (IsoFLOP budget label or NaN), plus where they came from."""
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray
    group: np.ndarray
    names: list[str]
    source: dict[str, Any]

    def subset(self, mask: np.ndarray) -> "Runs":
        return Runs(self.N[mask], self.D[mask], self.L[mask], self.C[mask], self.group[mask],
                    [n for n, m in zip(self.names, mask) if m], self.source)


# --- reading --------------------------------------------------------------------------------------

def parse_columns(spec: str | None) -> dict[str, str]:
    """'params=P,tokens=T,loss=L' (or flops=F instead of tokens; budget=B) -> {role: column}."""
    roles = {"params", "tokens", "flops", "loss", "budget"}
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise FitError(f"--columns: {item!r} is not role=column (roles: {', '.join(sorted(roles))})")
        role, col = (x.strip() for x in item.split("=", 1))
        if role not in roles:
            raise FitError(f"--columns: unknown role {role!r}; roles are {', '.join(sorted(roles))}")
        out[role] = col
    return out


def read_runs(path: str | Path, columns: dict[str, str] | None = None, compute: str = "6nd") -> Runs:
    """Reads a CSV runs table. `columns` maps roles (params, tokens | flops, loss, budget) to
    column names; defaults: params, tokens, loss, flops, budget. Without a tokens column,
    D = C / (6·N) from the flops column. `compute`: "6nd" (C = 6·N·D) or "column" (the flops
    column). Rows with an empty loss are skipped (runs still going); other bad values raise."""
    path = Path(path)
    columns = dict(columns or {})
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
            header = list(rows[0].keys()) if rows else []
    except FileNotFoundError:
        raise FitError(f"runs table not found: {path}") from None
    if not rows:
        raise FitError(f"{path}: no rows")
    if compute not in ("6nd", "column"):
        raise FitError(f"compute={compute!r}: expected 6nd or column")
    col = {"params": columns.get("params", "params"), "loss": columns.get("loss", "loss"),
           "tokens": columns.get("tokens", "tokens" if "flops" not in columns else None),
           "flops": columns.get("flops", "flops"), "budget": columns.get("budget", "budget")}
    for role in ("params", "loss"):
        if col[role] not in header:
            raise FitError(f"{path}: no column {col[role]!r} for {role} (columns: {header}); map it with "
                           f"--columns {role}=NAME")
    has_tokens = col["tokens"] is not None and col["tokens"] in header
    has_flops = col["flops"] in header
    if not has_tokens and not has_flops:
        raise FitError(f"{path}: need a tokens column or a flops column (columns: {header}); "
                       f"map one with --columns tokens=NAME or flops=NAME")
    if compute == "column" and not has_flops:
        raise FitError(f"{path}: compute=column needs a flops column ({col['flops']!r} is not one of {header})")

    def num(row: dict, key: str, i: int) -> float:
        try:
            v = float(row[key])
        except (TypeError, ValueError):
            raise FitError(f"{path}: row {i + 2}: column {key!r} is not a number: {row[key]!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise FitError(f"{path}: row {i + 2}: column {key!r} must be positive and finite, got {row[key]!r}")
        return v

    N, D, L, C, G, names = [], [], [], [], [], []
    for i, row in enumerate(rows):
        if row.get(col["loss"], "") in ("", None):
            continue
        n, loss = num(row, col["params"], i), num(row, col["loss"], i)
        c_col = num(row, col["flops"], i) if has_flops else None
        d = num(row, col["tokens"], i) if has_tokens else c_col / (6 * n)
        N.append(n), D.append(d), L.append(loss)
        C.append(c_col if compute == "column" else 6 * n * d)
        g = row.get(col["budget"], "")
        G.append(float(g) if g not in ("", None) and float(g) > 0 else math.nan)
        names.append(row.get("name") or f"row {i + 2}")
    if len(N) < 3:
        raise FitError(f"{path}: {len(N)} runs with a loss; a fit needs at least 3 (Approach 3 has 5 parameters: 5+)")
    source = {"csv": str(path), "columns": {k: v for k, v in col.items() if v is not None},
              "tokens": "column " + col["tokens"] if has_tokens else f"C / (6 N) from column {col['flops']}",
              "compute": "6 * params * tokens" if compute == "6nd" else "column " + col["flops"]}
    return Runs(np.array(N), np.array(D), np.array(L), np.array(C), np.array(G), names, source)


def budget_groups(runs: Runs, rel_tol: float = 0.1) -> np.ndarray:
    """An integer IsoFLOP group per run: the `budget` column when present, else runs whose C is
    within rel_tol of each other (sorted, chained). [n] ints."""
    key = np.where(np.isfinite(runs.group), runs.group, runs.C)
    order = np.argsort(key)
    out = np.empty(len(key), int)
    g, prev = 0, None
    for i in order:
        if prev is not None and not (np.isfinite(runs.group[i]) and key[i] == prev) and \
                abs(math.log(key[i] / prev)) > math.log1p(rel_tol):
            g += 1
        out[i], prev = g, key[i]
    return out


# --- Approach 3 ---------------------------------------------------------------------------------

def _lse3(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """theta [..., 5] = (a, b, e, alpha, beta) -> (log L [..., n], softmax weights [..., 3, n])."""
    a, b, e, al, be = (theta[..., k, None] for k in range(5))
    t = np.stack(np.broadcast_arrays(a - al * logN, b - be * logD, e + 0 * logN), axis=-2)  # [..., 3, n]
    m = t.max(axis=-2, keepdims=True)
    ex = np.exp(t - m)
    s = ex.sum(axis=-2, keepdims=True)
    return (m + np.log(s))[..., 0, :], ex / s


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def objective3(theta: np.ndarray, logN, logD, logL, w=None, delta: float = DELTA) -> np.ndarray:
    """Summed (weighted) Huber loss of log-loss residuals; theta [..., 5] -> [...]."""
    pred, _ = _lse3(theta, logN, logD)
    h = huber(pred - logL, delta)
    return (h if w is None else h * w).sum(axis=-1)


def _obj_grad3(theta, logN, logD, logL, w, delta=DELTA):
    """Objective and gradient for one theta (a, b, e, alpha, beta); written out by hand because
    it runs ~10^5 times in a bootstrap."""
    a, b, e, al, be = theta
    t1, t2 = a - al * logN, b - be * logD
    m = np.maximum(np.maximum(t1, t2), e)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = e1 + e2 + e3
    r = m + np.log(s) - logL
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    dr = np.clip(r, -delta, delta)
    if w is not None:
        h, dr = h * w, dr * w
    q = dr / s
    g1, g2 = q * e1, q * e2
    return h.sum(), np.array([g1.sum(), g2.sum(), (q * e3).sum(), -(g1 @ logN), -(g2 @ logD)])


def _lbfgs3(x0, logN, logD, logL, w=None):
    return minimize(_obj_grad3, x0, args=(logN, logD, logL, w), jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)


def fit_approach3_theta(runs: Runs, top_k: int | None = 64, polish: int = 4) -> dict:
    """Fits Approach 3 on all runs: screen the initialisation grid by its objective, run L-BFGS
    from the best `top_k` starts (all 4500 when None) together (`batched_lbfgs`), then scipy's
    L-BFGS-B from the `polish` best distinct results; the best of those is the fit. Returns theta
    (a, b, e, alpha, beta), objective, scipy's convergence verdict, counts, and the distinct optima
    (warm starts for the bootstrap)."""
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.L)
    screen = objective3(INIT_GRID, logN, logD, logL)
    order = np.argsort(screen, kind="stable")
    starts = INIT_GRID[order[:top_k]] if top_k else INIT_GRID
    W = np.ones((len(starts), len(logN)))
    xb, fb, cb = batched_lbfgs(lambda th: _obj_grad3_batched(th, logN, logD, logL, W), starts)
    fb = np.where(np.isfinite(fb) & np.all(np.isfinite(xb), 1), fb, np.inf)
    distinct: list[int] = []
    for i in np.argsort(fb, kind="stable"):
        if np.isfinite(fb[i]) and all(np.max(np.abs(xb[i] - xb[j])) > 1e-3 for j in distinct):
            distinct.append(int(i))
        if len(distinct) == polish:
            break
    results = [_lbfgs3(xb[i], logN, logD, logL) for i in distinct]
    best = int(np.argmin([r.fun for r in results]))
    res = results[best]
    _, grad = _obj_grad3(res.x, logN, logD, logL, None)
    optima = [r.x for r in sorted(results, key=lambda r: r.fun)]
    gnorm = float(np.linalg.norm(grad))
    # scipy started at an optimum reports ABNORMAL (its line search finds no decrease): a vanishing
    # gradient (components are O(1) away from an optimum) is convergence too.
    return {"theta": res.x, "objective": float(res.fun), "converged": bool(res.success or gnorm < 1e-6),
            "message": str(res.message), "grad_norm": gnorm, "iterations": int(res.nit),
            "starts": {"grid": len(INIT_GRID), "optimized": len(starts), "converged": int(cb.sum()),
                       "at_best_objective": int(np.sum(fb <= res.fun * (1 + 1e-6) + 1e-12)),
                       "polished_with_scipy": len(results)},
            "optima": optima}


def theta_to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, al, be = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": al, "beta": be}


def derived3(p: dict[str, float]) -> dict[str, float]:
    """Exponents and the frontier coefficient: a = β/(α+β), b = α/(α+β), G = (αA/(βB))^(1/(α+β))."""
    al, be = p["alpha"], p["beta"]
    s = al + be
    with np.errstate(all="ignore"):
        G = (al * p["A"] / (be * p["B"])) ** (1 / s) if al > 0 and be > 0 else math.nan
    return {"a": be / s if s else math.nan, "b": al / s if s else math.nan, "G": float(G)}


def loss3(p: dict[str, float] | np.ndarray, N, D):
    """L(N, D) = E + A/N^α + B/D^β; p a params dict or an array [..., 5] of (E, A, B, alpha, beta)."""
    if isinstance(p, dict):
        return p["E"] + p["A"] / np.power(N, p["alpha"]) + p["B"] / np.power(D, p["beta"])
    E, A, B, al, be = (p[..., k] for k in range(5))
    return E + A / np.power(N, al) + B / np.power(D, be)


def optimal3(p: dict[str, float] | np.ndarray, C):
    """(N_opt, D_opt, L_opt) at compute C = 6 N D for params dict or array [..., 5]."""
    if isinstance(p, dict):
        p = np.array([p["E"], p["A"], p["B"], p["alpha"], p["beta"]])
    E, A, B, al, be = (p[..., k] for k in range(5))
    with np.errstate(all="ignore"):
        G = (al * A / (be * B)) ** (1 / (al + be))
        n = G * (np.asarray(C) / 6) ** (be / (al + be))
        d = np.asarray(C) / (6 * n)
    return n, d, loss3(p, n, d)


def _obj_grad3_batched(theta, logN, logD, logL, W, delta=DELTA):
    """theta [R, 5], weights W [R, n] -> (objective [R], gradient [R, 5]): R fits evaluated at once."""
    a, b, e, al, be = (theta[:, k:k + 1] for k in range(5))
    t1, t2 = a - al * logN, b - be * logD  # [R, n]
    m = np.maximum(np.maximum(t1, t2), e)
    e1, e2, e3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = e1 + e2 + e3
    r = m + np.log(s) - logL
    ar = np.abs(r)
    h = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)) * W
    q = np.clip(r, -delta, delta) * W / s
    g1, g2 = q * e1, q * e2
    grad = np.stack([g1.sum(1), g2.sum(1), (q * e3).sum(1), -(g1 @ logN), -(g2 @ logD)], axis=1)
    return h.sum(1), grad


def batched_lbfgs(fg, x0: np.ndarray, memory: int = 10, maxiter: int = 1000, ftol: float = 1e-13,
                  first_step: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS (two-loop recursion, backtracking Armijo line search) on R independent problems at
    once. fg(x [R, k]) -> (f [R], g [R, k]). Each problem stops when a step lowers its f by less
    than ftol·|f| or the line search finds no decrease. Returns (x [R, k], f [R], converged [R])."""
    x = x0.astype(float).copy()
    f, g = fg(x)
    R, k = x.shape
    S, Y, rho = np.zeros((memory, R, k)), np.zeros((memory, R, k)), np.zeros((memory, R))
    stored = np.zeros(R, int)  # pairs stored per problem (<= memory), newest at slot (count - 1) % memory
    count = np.zeros(R, int)
    active = np.ones(R, bool)
    converged = np.zeros(R, bool)
    for _ in range(maxiter):
        if not active.any():
            break
        # direction d = -H g by the two-loop recursion, per problem over its own stored pairs
        q = g.copy()
        alphas = []
        for j in range(memory):
            slot = (count - 1 - j) % memory
            use = (j < stored)[:, None]
            sj, yj, rj = S[slot, np.arange(R)], Y[slot, np.arange(R)], rho[slot, np.arange(R)]
            aj = np.where(use[:, 0], rj * np.sum(sj * q, 1), 0.0)
            q -= aj[:, None] * yj * use
            alphas.append((slot, aj, use))
        last = (count - 1) % memory
        sl, yl = S[last, np.arange(R)], Y[last, np.arange(R)]
        gamma = np.where(stored > 0, np.sum(sl * yl, 1) / np.maximum(np.sum(yl * yl, 1), 1e-300),
                         first_step / np.maximum(np.linalg.norm(g, axis=1), 1e-300))
        r = gamma[:, None] * q
        for slot, aj, use in reversed(alphas):
            sj, yj, rj = S[slot, np.arange(R)], Y[slot, np.arange(R)], rho[slot, np.arange(R)]
            bj = rj * np.sum(yj * r, 1)
            r += sj * (aj - bj)[:, None] * use
        d = -r
        slope = np.sum(d * g, 1)
        bad = slope >= 0  # not a descent direction: forget the history, go down the gradient
        d[bad] = -g[bad] * (first_step / np.maximum(np.linalg.norm(g[bad], axis=1), 1e-300))[:, None]
        stored[bad] = 0
        slope = np.sum(d * g, 1)
        # backtracking line search, all problems together
        t = np.ones(R)
        pending = active.copy()
        xn, fn, gn = x.copy(), f.copy(), g.copy()
        for _ls in range(40):
            xt = x + t[:, None] * d
            ft, gt = fg(xt)
            ok = pending & np.isfinite(ft) & (ft <= f + 1e-4 * t * slope)
            xn[ok], fn[ok], gn[ok] = xt[ok], ft[ok], gt[ok]
            pending &= ~ok
            if not pending.any():
                break
            t[pending] *= 0.5
        failed = pending  # no decrease found: this problem is at its optimum (to the precision available)
        moved = active & ~failed
        sn, yn = xn - x, gn - g
        curv = np.sum(sn * yn, 1)
        keep = moved & (curv > 1e-300)
        slot = count % memory
        idx = np.flatnonzero(keep)
        S[slot[idx], idx], Y[slot[idx], idx], rho[slot[idx], idx] = sn[idx], yn[idx], 1.0 / curv[idx]
        count[idx] += 1
        stored[idx] = np.minimum(stored[idx] + 1, memory)
        small = moved & (f - fn <= ftol * np.maximum(np.maximum(np.abs(f), np.abs(fn)), 1e-300))
        x[moved], f[moved], g[moved] = xn[moved], fn[moved], gn[moved]
        done = failed | small
        converged |= done & active
        active &= ~done
    return x, f, converged


def bootstrap3(runs: Runs, optima: list[np.ndarray], resamples: int, seed: int = 0,
               method: str = "batched") -> tuple[np.ndarray, int]:
    """Approach 3 refitted on `resamples` bootstrap resamples of the runs (multinomial weights on
    the summed objective), each warm-started from the full-data optima given (the best one, or
    a few distinct ones). method "batched": all resamples at once (`batched_lbfgs`, vectorised
    numpy); "scipy": one scipy L-BFGS-B per resample and start. Returns ([resamples, 5] params
    (E, A, B, alpha, beta), NaN rows where no start reached a finite optimum; the number of
    resamples whose fit converged)."""
    rng = np.random.default_rng(seed)
    logN, logD, logL = np.log(runs.N), np.log(runs.D), np.log(runs.L)
    n = len(runs.N)
    W = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(float)
    best_x = np.full((resamples, 5), np.nan)
    best_f = np.full(resamples, np.inf)
    conv = np.zeros(resamples, bool)
    for x0 in optima:
        if method == "batched":
            x, f, c = batched_lbfgs(lambda th: _obj_grad3_batched(th, logN, logD, logL, W),
                                    np.tile(x0, (resamples, 1)))
        elif method == "scipy":
            rs = [_lbfgs3(x0, logN, logD, logL, W[i]) for i in range(resamples)]
            x, f, c = np.array([r.x for r in rs]), np.array([r.fun for r in rs]), np.array([r.success for r in rs])
        else:
            raise ValueError(f"method={method!r}: expected batched or scipy")
        better = np.isfinite(f) & np.all(np.isfinite(x), 1) & (f < best_f)
        best_x[better], best_f[better], conv[better] = x[better], f[better], c[better]
    a, b, e, al, be = best_x.T
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.stack([np.exp(np.minimum(e, 700)), np.exp(np.minimum(a, 700)), np.exp(np.minimum(b, 700)), al, be], 1)
    return out, int(conv.sum())


# --- GPT-4 form: L(C) = a C^b + c -------------------------------------------------------------

GPT4_GRID = np.array(list(itertools.product(np.arange(0, 30, 5.0), np.arange(-0.6, 0.0, 0.1), np.arange(-1, 1.5, 0.5))))


def _gpt4_obj_grad(theta, logC, logL, w=None, delta=DELTA):
    """theta = (log a, b, log c): log L = LSE(log a + b log C, log c); summed Huber."""
    la, b, lc = theta
    t1, t2 = la + b * logC, lc + 0 * logC
    m = np.maximum(t1, t2)
    e1, e2 = np.exp(t1 - m), np.exp(t2 - m)
    pred = m + np.log(e1 + e2)
    s1 = e1 / (e1 + e2)
    r = pred - logL
    h, dr = huber(r, delta), np.clip(r, -delta, delta)
    if w is not None:
        h, dr = h * w, dr * w
    return h.sum(), np.array([(dr * s1).sum(), (dr * s1 * logC).sum(), (dr * (1 - s1)).sum()])


def _gpt4_obj_grad_batched(theta, logC, logL, W, delta=DELTA):
    """theta [R, 3], weights W [R, k] -> (objective [R], gradient [R, 3])."""
    la, b, lc = theta[:, :1], theta[:, 1:2], theta[:, 2:3]
    t1, t2 = la + b * logC, lc + 0 * logC
    m = np.maximum(t1, t2)
    e1, e2 = np.exp(t1 - m), np.exp(t2 - m)
    s1 = e1 / (e1 + e2)
    r = m + np.log(e1 + e2) - logL
    h, dr = huber(r, delta) * W, np.clip(r, -delta, delta) * W
    return h.sum(1), np.stack([(dr * s1).sum(1), (dr * s1 * logC).sum(1), (dr * (1 - s1)).sum(1)], 1)


def fit_gpt4(C: np.ndarray, L: np.ndarray, bootstrap: int = 0, seed: int = 0) -> dict:
    """L(C) = a·C^b + c on frontier points (C [k], L [k]); log-space Huber from a grid of starts.
    C is rescaled by its geometric mean inside the fit for conditioning; a is reported for raw C."""
    if len(C) < 3:
        return {"skipped": f"{len(C)} frontier points; the GPT-4 form needs at least 3"}
    scale = float(np.exp(np.mean(np.log(C))))
    logC, logL = np.log(C / scale), np.log(L)

    def run(w, starts):
        best = None
        for x0 in starts:
            r = minimize(_gpt4_obj_grad, x0, args=(logC, logL, w), jac=True, method="L-BFGS-B",
                         options=LBFGS_OPTIONS, bounds=[(None, None), (-5.0, 0.0), (None, None)])
            if best is None or r.fun < best.fun:
                best = r
        return best

    screen = np.array([_gpt4_obj_grad(x, logC, logL)[0] for x in GPT4_GRID])
    res = run(None, GPT4_GRID[np.argsort(screen, kind="stable")[:8]])  # the 8 best starts of the grid

    def params(x):
        la, b, lc = x
        return {"a": math.exp(la) * scale ** (-b), "b": float(b), "c": math.exp(lc)}

    out = {"params": params(res.x), "objective": float(res.fun), "converged": bool(res.success),
           "points": len(C), "C_scale": scale}
    if bootstrap:  # all resamples at once, warm-started from the full fit
        rng = np.random.default_rng(seed)
        W = np.stack([np.bincount(rng.integers(0, len(C), len(C)), minlength=len(C))
                      for _ in range(bootstrap)]).astype(float)
        x, _, _ = batched_lbfgs(lambda th: _gpt4_obj_grad_batched(th, logC, logL, W), np.tile(res.x, (bootstrap, 1)))
        with np.errstate(over="ignore", invalid="ignore"):
            out["samples"] = np.stack([np.exp(x[:, 0]) * scale ** (-x[:, 1]), x[:, 1], np.exp(x[:, 2])], 1)
    return out


def loss_gpt4(p: dict | np.ndarray, C):
    if isinstance(p, dict):
        return p["a"] * np.power(C, p["b"]) + p["c"]
    return p[..., 0] * np.power(C, p[..., 1]) + p[..., 2]


# --- Approaches 1 and 2 ---------------------------------------------------------------------------

def _powerlaw(C: np.ndarray, Y: np.ndarray) -> dict:
    """log Y = log k + e log C by least squares: {"exponent", "coefficient"} (Y = k C^e)."""
    if len(C) < 2 or np.ptp(np.log(C)) == 0:
        return {"exponent": math.nan, "coefficient": math.nan}
    e, lk = np.polyfit(np.log(C), np.log(Y), 1)
    with np.errstate(over="ignore"):  # a degenerate bootstrap resample can give absurd laws: inf, not a crash
        return {"exponent": float(e), "coefficient": float(np.exp(lk))}


def approach1(runs: Runs) -> dict:
    """Lower envelope: runs whose loss is below every run of lower compute; power laws of N and D in C."""
    order = np.argsort(runs.C, kind="stable")
    env, best = [], math.inf
    for i in order:
        if runs.L[i] < best:
            env.append(i)
            best = runs.L[i]
    env = np.array(env)
    n_law, d_law = _powerlaw(runs.C[env], runs.N[env]), _powerlaw(runs.C[env], runs.D[env])
    return {"a": n_law["exponent"], "b": d_law["exponent"], "N_coefficient": n_law["coefficient"],
            "D_coefficient": d_law["coefficient"],
            "envelope": [{"C": float(runs.C[i]), "N": float(runs.N[i]), "D": float(runs.D[i]), "loss": float(runs.L[i]),
                          "name": runs.names[i]} for i in env]}


def approach2(runs: Runs) -> dict:
    """Per IsoFLOP group with >= 3 distinct N: loss = p0 + p1 x + p2 x², x = log N; its minimum
    gives N_opt (D_opt from log D linear in log N within the group); power laws across groups."""
    groups = budget_groups(runs)
    budgets = []
    for g in np.unique(groups):
        m = groups == g
        x, y = np.log(runs.N[m]), runs.L[m]
        if len(np.unique(x)) < 3:
            continue
        p2, p1, p0 = np.polyfit(x, y, 2)
        C = float(np.exp(np.mean(np.log(runs.C[m]))))
        entry = {"C": C, "runs": int(m.sum()), "parabola": [float(p0), float(p1), float(p2)]}
        if p2 <= 0:
            entry["skipped"] = "parabola opens downward (no minimum): widen the sizes of this budget"
            budgets.append(entry)
            continue
        xs = -p1 / (2 * p2)
        q1, q0 = np.polyfit(x, np.log(runs.D[m]), 1)
        entry.update({"N_opt": float(np.exp(xs)), "D_opt": float(np.exp(q0 + q1 * xs)),
                      "L_opt": float(p0 + p1 * xs + p2 * xs * xs),
                      "inside": bool(x.min() <= xs <= x.max())})
        budgets.append(entry)
    ok = [b for b in budgets if "N_opt" in b]
    C = np.array([b["C"] for b in ok])
    n_law = _powerlaw(C, np.array([b["N_opt"] for b in ok])) if ok else _powerlaw(C, C)
    d_law = _powerlaw(C, np.array([b["D_opt"] for b in ok])) if ok else _powerlaw(C, C)
    return {"a": n_law["exponent"], "b": d_law["exponent"], "N_coefficient": n_law["coefficient"],
            "D_coefficient": d_law["coefficient"], "budgets": budgets}


# --- everything -----------------------------------------------------------------------------------

def _interval(x: np.ndarray, level: float) -> list[float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return [math.nan, math.nan]
    q = (1 - level) / 2
    return [float(np.quantile(x, q)), float(np.quantile(x, 1 - q))]


def _frontier(runs: Runs, a1: dict, a2: dict) -> tuple[np.ndarray, np.ndarray, str]:
    ok = [b for b in a2["budgets"] if "L_opt" in b]
    if len(ok) >= 3:
        return np.array([b["C"] for b in ok]), np.array([b["L_opt"] for b in ok]), "approach 2 parabola minima"
    env = a1["envelope"]
    return np.array([e["C"] for e in env]), np.array([e["loss"] for e in env]), "approach 1 envelope"


def fit_all(runs: Runs, bootstrap: int = 1000, level: float = 0.95, seed: int = 0, top_k: int | None = 64,
            warm_starts: int = 1,
            predict_C: list[float] | tuple = (), predict_ND: list[tuple[float, float]] | tuple = ()) -> dict:
    """Every fit, with bootstrap intervals and predictions (compute-optimal N, D, L at each C of
    `predict_C`; L at each (N, D) of `predict_ND`). A JSON-able dict (numpy arrays as lists)."""
    if len(runs.N) < 5:
        raise FitError(f"{len(runs.N)} runs: Approach 3 has 5 parameters; give at least 5 runs")
    t0 = time.perf_counter()
    a1, a2 = approach1(runs), approach2(runs)
    r3 = fit_approach3_theta(runs, top_k=top_k)
    p3 = theta_to_params(r3["theta"])
    a3 = {"params": p3, **derived3(p3), "objective": r3["objective"], "converged": r3["converged"],
          "message": r3["message"], "grad_norm": r3["grad_norm"], "iterations": r3["iterations"],
          "starts": r3["starts"], "delta": DELTA, "loss": "summed Huber of log-loss residuals",
          "theta_log": dict(zip(["a", "b", "e", "alpha", "beta"], map(float, r3["theta"])))}
    fC, fL, fsrc = _frontier(runs, a1, a2)
    g4 = fit_gpt4(fC, fL, bootstrap=bootstrap, seed=seed + 1)
    g4["fitted_to"] = fsrc
    t_fit = time.perf_counter() - t0

    samples = None
    if bootstrap:
        t1 = time.perf_counter()
        samples, conv = bootstrap3(runs, r3["optima"][:warm_starts], bootstrap, seed)
        E, A, B, al, be = samples.T
        s = al + be
        with np.errstate(all="ignore"):
            derived = {"a": be / s, "b": al / s, "G": (al * A / (be * B)) ** (1 / s)}
        a3["ci"] = {k: _interval(v, level) for k, v in
                    {"E": E, "A": A, "B": B, "alpha": al, "beta": be, **derived}.items()}
        a3["bootstrap"] = {"resamples": bootstrap, "failed": int(np.sum(~np.isfinite(samples).all(1))),
                           "converged": conv, "seconds": time.perf_counter() - t1,
                           "warm_starts": min(warm_starts, len(r3["optima"])), "level": level}
        # Approaches 1 and 2 and the GPT-4 form: percentile intervals of their exponents/params too.
        rng = np.random.default_rng(seed + 2)
        keys = ["a", "b", "N_coefficient", "D_coefficient"]
        a12 = np.full((bootstrap, 2, len(keys)), np.nan)
        for i in range(bootstrap):
            idx = rng.integers(0, len(runs.N), len(runs.N))
            sub = Runs(runs.N[idx], runs.D[idx], runs.L[idx], runs.C[idx], runs.group[idx],
                       [runs.names[j] for j in idx], runs.source)
            a12[i] = [[b[k] for k in keys] for b in (approach1(sub), approach2(sub))]
        a1["ci"] = {k: _interval(a12[:, 0, j], level) for j, k in enumerate(keys)}
        a2["ci"] = {k: _interval(a12[:, 1, j], level) for j, k in enumerate(keys)}
        if "samples" in g4:
            g4["ci"] = {k: _interval(g4["samples"][:, j], level) for j, k in enumerate(["a", "b", "c"])}

    preds = []
    for C in predict_C:
        preds.append(predict_at_compute(p3, samples, g4, float(C), level))
    for N, D in predict_ND:
        preds.append(predict_at(p3, samples, float(N), float(D), level))
    out = {"data": {**runs.source, "runs": len(runs.N), "names": runs.names,
                    "N_range": [float(runs.N.min()), float(runs.N.max())],
                    "D_range": [float(runs.D.min()), float(runs.D.max())],
                    "C_range": [float(runs.C.min()), float(runs.C.max())]},
           "approach1": a1, "approach2": a2, "approach3": a3, "gpt4": g4, "predictions": preds,
           "seconds": {"fit": t_fit, "total": time.perf_counter() - t0}}
    if samples is not None:
        out["approach3"]["samples"] = samples
    return to_jsonable(out)


def predict_at(p3: dict, samples: np.ndarray | None, N: float, D: float, level: float = 0.95) -> dict:
    """Approach 3's loss at (N, D) with its bootstrap interval."""
    out = {"N": N, "D": D, "C_6nd": 6 * N * D, "loss": float(loss3(p3, N, D))}
    if samples is not None and len(samples):
        out["loss_ci"] = _interval(loss3(np.asarray(samples), N, D), level)
    return out


def predict_at_compute(p3: dict, samples: np.ndarray | None, g4: dict, C: float, level: float = 0.95) -> dict:
    """Compute-optimal N, D and loss at C by Approach 3, and the GPT-4 form's L(C), with intervals."""
    n, d, l = optimal3(p3, C)
    out = {"C": C, "N_opt": float(n), "D_opt": float(d), "loss": float(l)}
    if samples is not None and len(samples):
        ns, ds, ls = optimal3(np.asarray(samples), C)
        out.update({"N_opt_ci": _interval(ns, level), "D_opt_ci": _interval(ds, level), "loss_ci": _interval(ls, level)})
    if "params" in g4:
        out["loss_gpt4"] = float(loss_gpt4(g4["params"], C))
        if "samples" in g4:
            out["loss_gpt4_ci"] = _interval(loss_gpt4(np.asarray(g4["samples"]), C), level)
    return out


def holdout_largest(runs: Runs, **kw) -> tuple[dict, dict]:
    """Fits without the largest compute group and predicts its runs. Returns (fit, report) where
    the report has per-run predicted vs measured loss and the mean absolute relative error."""
    groups = budget_groups(runs)
    last = groups[np.argmax(runs.C)]
    test = groups == last
    if test.all() or (~test).sum() < 5:
        raise FitError("--holdout largest: fewer than 5 runs left after holding out the largest budget")
    fit = fit_all(runs.subset(~test), **kw)
    p3 = fit["approach3"]["params"]
    samples = np.array(fit["approach3"]["samples"], dtype=float) if "samples" in fit["approach3"] else None
    level = kw.get("level", 0.95)
    rows = []
    for i in np.flatnonzero(test):
        pr = predict_at(p3, samples, runs.N[i], runs.D[i], level)
        rows.append({"name": runs.names[i], "N": float(runs.N[i]), "D": float(runs.D[i]), "C": float(runs.C[i]),
                     "measured": float(runs.L[i]), "predicted": pr["loss"], "predicted_ci": pr.get("loss_ci"),
                     "rel_error": (pr["loss"] - float(runs.L[i])) / float(runs.L[i])})
    best = int(np.argmin(runs.L[test]))
    report = {"held_out": int(test.sum()), "C": float(np.exp(np.mean(np.log(runs.C[test])))), "runs": rows,
              "mean_abs_rel_error": float(np.mean([abs(r["rel_error"]) for r in rows])),
              "max_abs_rel_error": float(np.max([abs(r["rel_error"]) for r in rows]))}
    if "params" in fit["gpt4"]:  # the GPT-4 form predicts the frontier: compare with the best held-out run
        Cb = float(runs.C[test][best])
        pg = float(loss_gpt4(fit["gpt4"]["params"], Cb))
        report["gpt4_frontier"] = {"C": Cb, "measured_best": float(runs.L[test][best]), "predicted": pg,
                                   "rel_error": (pg - float(runs.L[test][best])) / float(runs.L[test][best])}
    return fit, report


def to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
