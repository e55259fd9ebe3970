"""The compute-optimal frontier of an IsoFLOP sweep, robust to the runs real sweeps contain.

Real sweeps hold many runs far from their budget's optimum (a large model on few tokens, a loss
2× the budget's best) and the odd failed run. A law fitted to all of them is pulled by them, and
a parabola per budget fitted to 3-6 points locates its minimum with an error that a 10×
extrapolation multiplies. This module:

1. **QC** (`select_runs`): per IsoFLOP budget, the runs within a factor `window` (default 3) in N
   of the budget's best run are `kept`; the rest are `off_center`. A budget with fewer than
   `min_points` (3) distinct model sizes in the window takes the 3 sizes nearest its best run; a
   budget of one size is `too_few_points`. After the joint fit below, a kept run
   whose log-loss residual is more than `outlier_sigmas` (4) robust standard deviations (1.4826 ·
   MAD) from the fit is an `outlier`, and the fit is redone without it.
2. **The joint IsoFLOP fit** (`fit_frontier`), the default estimator of the best loss at a budget:
   every budget's IsoFLOP curve is a parabola in log N whose minimum lies on the saturating law
   and whose curvature shrinks with the reducible loss, as Chinchilla's L(N, D) implies near
   its optimum:
       L(N, C) = E + A·c^(−α) · (1 + k·(ln N − m0 − m1·ln c)²),   c = C / C0,
   so L*(C) = E + A·c^(−α) and N*(C) = e^m0 · c^m1, with 0 ≤ E < the lowest fitted loss. Six
   parameters from all kept runs of all budgets (least squares on log L), instead of three from
   one minimum per budget: the budgets share the curvature and the path of the optimum, so a
   budget with few runs borrows strength from the others.
3. **Per-budget minima** (`budget_minima`): a parabola in log N per budget over its kept runs,
   the points the GPT-4 form L(C) = a·C^b + c is fitted to (Approach 2 as Hoffmann et al. do it).
4. **Stratified bootstrap** (`bootstrap_frontier`, `bootstrap_minima`): resample runs with
   replacement WITHIN each budget, so every budget keeps its number of runs and its minimum is
   re-located (re-interpolated) in every resample; each resample is refitted warm-started from
   the full fit. Predicted losses also carry the run-to-run scatter σ (the fit's residual standard
   deviation in log L): a measured loss is one run, not the smooth law.

C0 is the geometric mean of the fitted budgets (conditioning); the reported A is for raw C.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import least_squares

WINDOW = 3.0
MIN_POINTS = 3
OUTLIER_SIGMAS = 4.0
FLAGS = ("kept", "off_center", "outlier", "too_few_points")
PARAMS = ("E", "A", "alpha", "k", "m0", "m1")


# --- QC -------------------------------------------------------------------------------------------

def window_flags(N: np.ndarray, L: np.ndarray, groups: np.ndarray, window: float = WINDOW,
                 min_points: int = MIN_POINTS) -> np.ndarray:
    """Per run [n]: "kept" (within a factor `window` in N of its budget's best run, or among the
    `min_points` sizes nearest it when the window holds fewer), "off_center", or "too_few_points"
    (its budget has a single model size: nothing places its parabola but the other budgets).
    A budget of 2 sizes keeps both: the joint fit can use them, the per-budget minima cannot."""
    if window <= 1:
        raise ValueError(f"window={window}: a factor in N, must be > 1")
    flags = np.full(len(N), "off_center", dtype=object)
    x = np.log(N)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(np.unique(x[idx])) < 2:
            flags[idx] = "too_few_points"
            continue
        dist = np.abs(x[idx] - x[idx[np.argmin(L[idx])]])
        inside = dist <= math.log(window) + 1e-9
        if len(np.unique(x[idx[inside]])) < min_points:  # widen to the nearest min_points sizes
            sizes = np.unique(np.round(dist, 9))
            inside = dist <= sizes[min(min_points, len(sizes)) - 1] + 1e-9
        flags[idx[inside]] = "kept"
    return flags


# --- the joint IsoFLOP model ----------------------------------------------------------------------

def _model(theta: np.ndarray, x: np.ndarray, c: np.ndarray, emax: float):
    """theta (u, lnA, alpha, lnk, m0, m1) -> (L [n], dL/dtheta [n, 6]); x = ln N, c = ln(C/C0);
    E = emax·sigmoid(u) keeps 0 < E < emax. One row of `_model_batched`."""
    L, J = _model_batched(np.asarray(theta, float)[None, :], x, c, emax)
    return L[0], J[0]


def _model_batched(theta: np.ndarray, x: np.ndarray, c: np.ndarray, emax: float):
    """As `_model` for R thetas at once: theta [R, 6] -> (L [R, n], dL/dtheta [R, n, 6])."""
    u, la, al, lk, m0, m1 = (theta[:, j:j + 1] for j in range(6))
    sig = 1 / (1 + np.exp(-np.clip(u, -700, 700)))
    R = np.exp(la - al * c)
    q = x - m0 - m1 * c
    k = np.exp(lk)
    bowl = 1 + k * q * q
    L = emax * sig + R * bowl
    J = np.stack([np.broadcast_to(emax * sig * (1 - sig), L.shape), R * bowl, -c * R * bowl, R * k * q * q,
                  -2 * R * k * q, -2 * R * k * q * c], axis=2)
    return L, J


def batched_lm(fun, theta0: np.ndarray, maxiter: int = 200, project=None) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on R independent least-squares problems at once (the bootstrap's
    resamples). fun(theta [R, p]) -> (weighted residuals [R, n], Jacobian [R, n, p]); `project`
    maps a step back into the feasible set. Returns (theta [R, p], cost [R] = ½ Σ r²)."""
    th = theta0.astype(float).copy()
    r, J = fun(th)
    cost = 0.5 * np.sum(r * r, 1)
    lam = np.full(len(th), 1e-3)
    active = np.isfinite(cost)
    p = th.shape[1]
    for _ in range(maxiter):
        if not active.any():
            break
        A = np.einsum("rni,rnj->rij", J, J)
        g = np.einsum("rni,rn->ri", J, r)
        D = A[:, np.arange(p), np.arange(p)]
        M = A + (lam[:, None] * np.maximum(D, 1e-12))[:, :, None] * np.eye(p)
        try:
            step = -np.linalg.solve(M, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -g * 1e-3
        step[~active] = 0
        tn = th + step
        if project is not None:
            tn = project(tn)
        rn, Jn = fun(tn)
        cn = 0.5 * np.sum(rn * rn, 1)
        ok = active & np.isfinite(cn) & (cn <= cost)
        small = ok & (cost - cn <= 1e-12 * np.maximum(cost, 1e-300))
        th[ok], r[ok], J[ok] = tn[ok], rn[ok], Jn[ok]
        cost[ok] = cn[ok]
        lam = np.where(ok, lam / 3, lam * 4)
        active &= ~small & (lam < 1e12)
    return th, cost


def _theta_to_params(theta: np.ndarray, emax: float) -> np.ndarray:
    """(u, lnA, alpha, lnk, m0, m1) -> (E, A, alpha, k, m0, m1), A and m0 still for c = C/C0."""
    u, la, al, lk, m0, m1 = theta
    return np.array([emax / (1 + math.exp(-u)) if u > -700 else 0.0, math.exp(la), al, math.exp(lk), m0, m1])


def _solve(theta0, x, c, logL, emax, w=None, robust: bool = False):
    """Least squares of log-loss residuals from theta0 (weights w); `robust`: a soft-L1 loss with a
    1% scale, which an outlier cannot drag as far (QC's first pass)."""
    sw = None if w is None else np.sqrt(w)

    def res(th):
        L, _ = _model(th, x, c, emax)
        r = np.log(np.maximum(L, 1e-300)) - logL
        return r if sw is None else r * sw

    def jac(th):
        L, J = _model(th, x, c, emax)
        J = J / np.maximum(L, 1e-300)[:, None]
        return J if sw is None else J * sw[:, None]

    if robust:
        return least_squares(res, theta0, jac=jac, method="trf", loss="soft_l1", f_scale=0.01, max_nfev=2000)
    return least_squares(res, theta0, jac=jac, method="lm" if w is None or np.all(w > 0) else "trf",
                         xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)


def _starts(x, c, L, emax):
    """Initial thetas: a grid over E/emax and alpha; the optimum's path from each budget's best run."""
    cs = np.unique(c)
    best = np.array([x[c == v][np.argmin(L[c == v])] for v in cs])
    m1, m0 = np.polyfit(cs, best, 1) if len(cs) > 1 else (0.5, best[0])
    out = []
    for frac in (0.05, 0.3, 0.6, 0.9):
        for al in (0.05, 0.1, 0.2, 0.4):
            reducible = max(float(np.min(L)) - frac * emax, 1e-3)
            out.append(np.array([math.log(frac / (1 - frac)), math.log(reducible), al, math.log(0.05), m0, m1]))
    return out


def fit_frontier(N: np.ndarray, L: np.ndarray, C_group: np.ndarray, robust: bool = False) -> dict:
    """Least-squares fit of the joint IsoFLOP model to runs (N [n], L [n], their budget's C [n]).
    Returns {"theta", "params" (E, A, alpha, k, m0, m1 with A for raw C; m0 for c = C/C0),
    "C0", "emax", "sigma" (residual sd of log L), "residuals" [n], "converged"}."""
    x, logL = np.log(N), np.log(L)
    C0 = float(np.exp(np.mean(np.log(np.unique(C_group)))))
    c = np.log(C_group / C0)
    emax = float(L.min()) * (1 - 1e-6)
    best = None
    for t0 in _starts(x, c, L, emax):
        r = _solve(t0, x, c, logL, emax, robust=robust)
        if best is None or r.cost < best.cost:
            best = r
    L_fit, _ = _model(best.x, x, c, emax)
    resid = np.log(L_fit) - logL
    dof = len(L) - 6
    sigma = float(np.sqrt(np.sum(resid ** 2) / dof)) if dof > 0 else math.nan
    return {"theta": best.x, "C0": C0, "emax": emax, "sigma": sigma, "residuals": resid,
            "converged": bool(best.success), "cost": float(best.cost)}


def params_of(theta: np.ndarray, C0: float, emax: float) -> dict[str, float]:
    """Reported parameters for raw C: L*(C) = E + A·C^−alpha, N*(C) = N_coefficient·C^a."""
    E, A, al, k, m0, m1 = _theta_to_params(theta, emax)
    return {"E": float(E), "A": float(A * C0 ** al), "alpha": float(al), "k": float(k),
            "N_coefficient": float(math.exp(m0) * C0 ** (-m1)), "a": float(m1)}


def frontier_at(P: np.ndarray, C, N=None):
    """P [..., 6] = (E, A, alpha, k, N_coefficient, a) for raw C (as `params_of`) -> (L*, N*) at C,
    or the loss of size N at compute C when N is given (its IsoFLOP parabola)."""
    P = np.asarray(P, dtype=float)
    E, A, al, k, nc, a = (P[..., j] for j in range(6))
    with np.errstate(all="ignore"):
        R = A * np.power(C, -al)
        n_opt = nc * np.power(C, a)
        if N is None:
            return E + R, n_opt
        q = np.log(N) - np.log(n_opt)
        return E + R * (1 + k * q * q), n_opt


def as_array(p: dict) -> np.ndarray:
    return np.array([p["E"], p["A"], p["alpha"], p["k"], p["N_coefficient"], p["a"]])


def select_runs(N, L, groups, C_group, window: float = WINDOW, min_points: int = MIN_POINTS,
                outlier_sigmas: float = OUTLIER_SIGMAS) -> tuple[np.ndarray, dict | None, str | None]:
    """QC flags [n] and the joint fit on the kept runs (None, with the reason, when fewer than 3
    budgets are usable). Outliers: residuals of a robust (soft-L1) fit of the kept runs, beyond
    `outlier_sigmas` robust sd (1.4826 MAD); then the least-squares fit without them."""
    flags = window_flags(N, L, groups, window, min_points)
    kept = flags == "kept"
    budgets = len(np.unique(groups[kept]))
    if budgets < 3:
        return flags, None, (f"{budgets} budgets with at least 2 model sizes; the frontier needs 3 "
                             f"(E, A and alpha of the saturating law)")
    r = fit_frontier(N[kept], L[kept], C_group[kept], robust=True)["residuals"]
    mad = 1.4826 * np.median(np.abs(r - np.median(r)))
    far = np.abs(r - np.median(r)) > outlier_sigmas * max(mad, 1e-12)
    if far.any() and (~far).sum() >= 7:
        idx = np.flatnonzero(kept)[far]
        flags[idx] = "outlier"
        if len(np.unique(groups[flags == "kept"])) < 3:
            flags[idx] = "kept"
    kept = flags == "kept"
    fit = fit_frontier(N[kept], L[kept], C_group[kept])
    fit["residual_mad_sigma"] = float(mad)
    return flags, fit, None


def stratified_weights(groups: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] multinomial counts: every group's members resampled with replacement among
    themselves, so each resample keeps every budget and its number of runs."""
    W = np.zeros((resamples, len(groups)))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        picks = idx[rng.integers(0, len(idx), (resamples, len(idx)))]  # [R, |g|]
        for r in range(resamples):
            np.add.at(W[r], picks[r], 1.0)
    return W


def bootstrap_frontier(N, L, C_group, groups, fit: dict, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, 7]: (E, A, alpha, k, N_coefficient, a) refitted per stratified resample, warm-started
    from the full fit, and a standard normal z per resample (the run-to-run scatter added to a
    predicted loss as exp(sigma·z)). NaN rows where a refit failed."""
    rng = np.random.default_rng(seed)
    x, logL = np.log(N), np.log(L)
    c = np.log(C_group / fit["C0"])
    sw = np.sqrt(stratified_weights(groups, resamples, rng))
    z = rng.standard_normal(resamples)

    def fun(th):
        Lm, J = _model_batched(th, x, c, fit["emax"])
        Lm = np.maximum(Lm, 1e-300)
        return (np.log(Lm) - logL) * sw, J / Lm[:, :, None] * sw[:, :, None]

    th, _ = batched_lm(fun, np.tile(fit["theta"], (resamples, 1)))
    out = np.full((resamples, 7), np.nan)
    for i in np.flatnonzero(np.all(np.isfinite(th), 1)):
        out[i, :6] = as_array(params_of(th[i], fit["C0"], fit["emax"]))
    out[:, 6] = z
    return out


# --- per-budget minima and the GPT-4 form ---------------------------------------------------------

def budget_minima(x: np.ndarray, L: np.ndarray, groups: np.ndarray, w: np.ndarray | None = None):
    """Per group, a parabola L = p0 + p1·x + p2·x² (x = ln N, weighted by w) and its vertex.
    Returns (group ids [g], x_opt [g], L_opt [g]); NaN where the parabola has no minimum (p2 ≤ 0)
    or the resample holds fewer than 3 distinct sizes."""
    ids = np.unique(groups)
    xo, lo = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    for j, g in enumerate(ids):
        m = groups == g
        wm = np.ones(m.sum()) if w is None else w[m]
        if len(np.unique(x[m][wm > 0])) < 3:
            continue
        p2, p1, p0 = np.polyfit(x[m], L[m], 2, w=np.sqrt(wm))
        if p2 > 0:
            xo[j] = -p1 / (2 * p2)
            lo[j] = p0 + p1 * xo[j] + p2 * xo[j] ** 2
    return ids, xo, lo


def fit_saturating(C: np.ndarray, L: np.ndarray, c_max: float, x0: np.ndarray | None = None,
                   scale: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """L(C) = a·C^b + c (b ≤ 0, 0 ≤ c < c_max) to points (C [k], L [k]) by least squares on log L,
    C divided by `scale` (default: its geometric mean) inside, from x0 or a grid of starts.
    Returns ((a, b, c) for raw C, the internal theta (log a, b, u), scale)."""
    scale = scale or float(np.exp(np.mean(np.log(C))))
    lc, logL = np.log(C / scale), np.log(L)

    def res(th):
        la, b, u = th
        cc = c_max / (1 + np.exp(-u))
        return np.log(np.exp(la + b * lc) + cc) - logL

    starts = [x0] if x0 is not None else [
        np.array([math.log(max(float(np.mean(L)) - f * c_max, 1e-3)), b, math.log(f / (1 - f))])
        for f in (0.05, 0.3, 0.6, 0.9) for b in (-0.05, -0.1, -0.2, -0.4)]
    best = None
    for t0 in starts:
        r = least_squares(res, t0, bounds=([-np.inf, -5.0, -50.0], [np.inf, 0.0, 50.0]), xtol=1e-12, ftol=1e-12)
        if best is None or r.cost < best.cost:
            best = r
    la, b, u = best.x
    return np.array([math.exp(la) * scale ** (-b), b, c_max / (1 + math.exp(-u))]), best.x, scale


def _minima_batched(x, L, groups, ids, W):
    """budget_minima for R weightings at once: W [R, n] -> L_opt [R, g] (NaN where none)."""
    out = np.full((len(W), len(ids)), np.nan)
    for j, g in enumerate(ids):
        m = groups == g
        X = np.stack([np.ones(m.sum()), x[m], x[m] ** 2], 1)  # [m, 3]
        Wg = W[:, m]
        sizes = (np.unique(x[m])[None, :] == x[m][:, None]).astype(float)  # [m, distinct sizes]
        enough = ((Wg @ sizes) > 0).sum(1) >= 3
        A = np.einsum("rm,mi,mj->rij", Wg, X, X)
        b = np.einsum("rm,mi,m->ri", Wg, X, L[m])
        A[~enough] = np.eye(3)
        p = np.linalg.solve(A, b[:, :, None])[:, :, 0]  # [R, 3]: p0, p1, p2
        with np.errstate(all="ignore"):
            xo = -p[:, 1] / (2 * p[:, 2])
            lo = p[:, 0] + p[:, 1] * xo + p[:, 2] * xo * xo
        out[:, j] = np.where(enough & (p[:, 2] > 0), lo, np.nan)
    return out


def bootstrap_minima(N, L, C_group, groups, c_max: float, resamples: int, seed: int = 0):
    """[resamples, 4]: the GPT-4 form (a, b, c) refitted to the per-budget minima of each stratified
    resample (each minimum re-interpolated), and z for the run-to-run scatter. Budgets whose
    resampled parabola has no minimum drop out of that resample (NaN row if fewer than 3 remain)."""
    rng = np.random.default_rng(seed)
    x = np.log(N)
    W = stratified_weights(groups, resamples, rng)
    z = rng.standard_normal(resamples)
    ids, _, l_full = budget_minima(x, L, groups)
    Cb = np.array([np.exp(np.mean(np.log(C_group[groups == g]))) for g in ids])
    full = np.isfinite(l_full)
    _, theta, scale = fit_saturating(Cb[full], l_full[full], c_max)
    Lo = _minima_batched(x, L, groups, ids, W)  # [R, g]
    ok = np.isfinite(Lo) & (Lo > 0)
    logL, w = np.log(np.where(ok, Lo, 1.0)), ok.astype(float)
    lc = np.log(Cb / scale)

    def fun(th):
        la, b, u = th[:, :1], th[:, 1:2], th[:, 2:3]
        P = np.exp(la + b * lc)
        sig = 1 / (1 + np.exp(-u))
        M = P + c_max * sig
        J = np.stack([P / M, P * lc / M, np.broadcast_to(c_max * sig * (1 - sig), M.shape) / M], 2)
        return (np.log(M) - logL) * w, J * w[:, :, None]

    def project(th):
        return np.column_stack([th[:, 0], np.clip(th[:, 1], -5.0, 0.0), np.clip(th[:, 2], -50.0, 50.0)])

    th, _ = batched_lm(fun, np.tile(theta, (resamples, 1)), project=project)
    out = np.full((resamples, 4), np.nan)
    good = ok.sum(1) >= 3
    out[good, 0] = np.exp(th[good, 0]) * scale ** (-th[good, 1])
    out[good, 1] = th[good, 1]
    out[good, 2] = c_max / (1 + np.exp(-th[good, 2]))
    out[:, 3] = z
    return out
