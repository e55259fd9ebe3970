"""Scaling-law fits on synthetic runs drawn from a known L(N, D) = E + A/N^α + B/D^β with noise."""
import csv
import json
import math

import numpy as np
import pytest

from pretrain.scaling import fit as F

# Besiroglu et al. 2024's refit of Chinchilla (their Table 1), used as the truth.
TRUTH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def synth(seed=0, budgets=np.logspace(18, 21, 7), k=8, sigma=0.01, truth=TRUTH) -> F.Runs:
    """An IsoFLOP grid: k sizes per budget around the true optimum, tokens D = C / 6N, loss with
    multiplicative log-normal noise sigma."""
    rng = np.random.default_rng(seed)
    N, D, G = [], [], []
    for C in budgets:
        n_opt = F.optimal3(truth, C)[0]
        for n in n_opt * np.logspace(-0.8, 0.8, k):
            N.append(n), D.append(C / (6 * n)), G.append(C)
    N, D = np.array(N), np.array(D)
    L = F.loss3(truth, N, D) * np.exp(rng.normal(0, sigma, len(N)))
    return F.Runs(N, D, L, 6 * N * D, np.array(G), [f"r{i}" for i in range(len(N))], {"csv": "synthetic"})


def test_approach3_recovers_parameters_inside_bootstrap_intervals():
    fit = F.fit_all(synth(seed=1), bootstrap=200)
    a3 = fit["approach3"]
    assert a3["converged"] and a3["starts"]["at_best_objective"] >= 2
    for k, v in TRUTH.items():
        lo, hi = a3["ci"][k]
        assert lo <= v <= hi, (k, v, lo, hi, a3["params"][k])
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert a3["ci"]["a"][0] <= a_true <= a3["ci"]["a"][1]
    assert abs(a3["a"] + a3["b"] - 1) < 1e-12
    assert a3["params"]["alpha"] == pytest.approx(TRUTH["alpha"], rel=0.15)
    assert a3["bootstrap"]["failed"] == 0 and a3["bootstrap"]["converged"] == 200


def test_approach3_noise_free_is_exact():
    fit = F.fit_all(synth(sigma=0.0), bootstrap=0)
    for k, v in TRUTH.items():
        assert fit["approach3"]["params"][k] == pytest.approx(v, rel=1e-3), k


def test_approach2_and_1_recover_the_exponents():
    runs = synth(sigma=0.002, k=9)
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    a2 = F.approach2(runs)
    assert len([b for b in a2["budgets"] if "N_opt" in b]) == 7
    assert a2["a"] == pytest.approx(a_true, abs=0.02) and a2["b"] == pytest.approx(1 - a_true, abs=0.02)
    assert all(b["inside"] for b in a2["budgets"])
    a1 = F.approach1(runs)
    assert a1["a"] == pytest.approx(a_true, abs=0.1)


def test_gpt4_form_fits_its_own_curve_and_keeps_c_physical():
    C = np.logspace(18, 22, 9)
    L = 80.0 * C ** -0.1 + 1.7
    g = F.fit_gpt4(C, L)
    assert g["params"]["b"] == pytest.approx(-0.1, rel=1e-3) and g["params"]["c"] == pytest.approx(1.7, rel=1e-3)
    # a curve that bends more than any a*C^b + c with c below its lowest point: c stops inside [0, min L)
    bent = 1.0 + 80.0 * C ** -0.2 + 0.3 * (np.log(C) - np.log(C[0])) ** 0.5
    g = F.fit_gpt4(C, bent)
    assert 0 <= g["params"]["c"] < bent.min()


def test_batched_bootstrap_equals_scipy_per_resample():
    runs = synth(seed=3)
    r3 = F.fit_approach3_theta(runs, top_k=16)
    xb, cb = F.bootstrap3(runs, r3["optima"][:1], 6, seed=5, method="batched")
    xs, cs = F.bootstrap3(runs, r3["optima"][:1], 6, seed=5, method="scipy")
    assert cb == cs == 6
    np.testing.assert_allclose(xb, xs, rtol=2e-4)


@pytest.mark.parametrize("seeds,resamples,min_cover", [
    pytest.param(range(5), 100, 4),
    pytest.param(range(40), 300, 34, marks=pytest.mark.slow),
])
def test_intervals_cover_the_truth_in_most_seeds(seeds, resamples, min_cover):
    cover = 0
    for s in seeds:
        a3 = F.fit_all(synth(seed=100 + s, k=6), bootstrap=resamples, seed=s)["approach3"]
        cover += a3["ci"]["alpha"][0] <= TRUTH["alpha"] <= a3["ci"]["alpha"][1] and \
            a3["ci"]["beta"][0] <= TRUTH["beta"] <= a3["ci"]["beta"][1]
    assert cover >= min_cover, cover


def test_holdout_largest_predicts_the_held_out_budget():
    fit, rep = F.holdout_largest(synth(seed=2, sigma=0.003), bootstrap=100)
    assert rep["held_out"] == 8 and rep["C"] == pytest.approx(1e21, rel=1e-6)
    assert rep["mean_abs_rel_error"] < 0.01
    assert sum(r["predicted_ci"][0] <= r["measured"] <= r["predicted_ci"][1] for r in rep["runs"]) >= 6
    assert fit["data"]["runs"] == 48
    assert abs(rep["best"]["rel_error"]) < 0.01 and rep["best"]["estimator"] == "frontier"


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_column_mapping_flops_gives_tokens_c_over_6n(tmp_path):
    runs = synth(seed=4)
    p = tmp_path / "other.csv"
    _write_csv(p, ["model_size", "compute", "xent", "note"],
               [[n, c, l, "x"] for n, c, l in zip(runs.N, runs.C, runs.L)] + [[1e9, 1e20, "", "still running"]])
    got = F.read_runs(p, F.parse_columns("params=model_size,flops=compute,loss=xent"))
    np.testing.assert_allclose(got.D, runs.C / (6 * runs.N))
    np.testing.assert_allclose(got.L, runs.L)
    assert len(got.N) == len(runs.N)  # the row without a loss is skipped
    assert got.source["tokens"] == "C / (6 N) from column compute"
    # the same table through tokens= gives the same fit
    q = tmp_path / "tokens.csv"
    _write_csv(q, ["N", "D", "loss"], list(zip(runs.N, runs.D, runs.L)))
    a = F.fit_all(got, bootstrap=0)["approach3"]["params"]
    b = F.fit_all(F.read_runs(q, F.parse_columns("params=N,tokens=D")), bootstrap=0)["approach3"]["params"]
    assert a == pytest.approx(b, rel=1e-6)


def test_bad_tables_say_what_is_wrong(tmp_path):
    p = tmp_path / "t.csv"
    _write_csv(p, ["n", "loss"], [[1, 2]] * 6)
    with pytest.raises(F.FitError, match="no column 'params' for params"):
        F.read_runs(p)
    with pytest.raises(F.FitError, match="need a tokens column or a flops column"):
        F.read_runs(p, {"params": "n"})
    _write_csv(p, ["params", "tokens", "loss"], [[1, 2, 3]] * 5 + [[1, -2, 3]])
    with pytest.raises(F.FitError, match="row 7: column 'tokens' must be positive"):
        F.read_runs(p)
    with pytest.raises(F.FitError, match="unknown role 'size'"):
        F.parse_columns("size=n")


def test_fit_cli_writes_fit_json_and_plots_and_predict_reads_it(tmp_path, capsys):
    from danlu.cli import main

    runs = synth(seed=5)
    p = tmp_path / "runs.csv"
    _write_csv(p, ["params", "tokens", "loss", "budget"], list(zip(runs.N, runs.D, runs.L, runs.group)))
    out = tmp_path / "fit"
    assert main(["fit", str(p), "--output", str(out), "--bootstrap", "50", "--holdout", "largest",
                 "--predict-flops", "1e22"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert {"approach1", "approach2", "approach3", "gpt4", "predictions", "holdout"} <= set(fit)
    assert len(fit["approach3"]["samples"]) == 50 and fit["data"]["compute"] == "6 * params * tokens"
    for png in ("isoflops.png", "loss_vs_compute.png", "contour.png"):
        assert (out / png).stat().st_size > 10_000, png
    capsys.readouterr()
    assert main(["predict", str(out), "--flops", "1e22"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["N_opt"] == pytest.approx(fit["predictions"][0]["N_opt"])
    assert line["loss_ci"][0] < line["loss"] < line["loss_ci"][1]
    assert main(["predict", str(out / "fit.json"), "--params", "1e9", "--tokens", "2e10"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["approach3"]["loss"] == pytest.approx(F.loss3(fit["approach3"]["params"], 1e9, 2e10))
    fr, C = fit["frontier"]["params"], 6 * 1e9 * 2e10  # near the optimum at C: the frontier's IsoFLOP parabola
    n_opt = fr["N_coefficient"] * C ** fr["a"]
    assert 1 / 3 < 1e9 / n_opt < 3 and line["estimator"] == "frontier"
    assert line["loss"] == pytest.approx(fr["E"] + fr["A"] * C ** -fr["alpha"] * (1 + fr["k"] * np.log(1e9 / n_opt) ** 2))
    assert main(["predict", str(out / "fit.json"), "--params", "1e11", "--tokens", "2e8"]) == 0  # far off: approach 3
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["estimator"] == "approach3" and "outside the QC window" in line["why"]
    assert main(["predict", str(out), "--params", "1e9"]) == 2
    assert "give --params and --tokens" in capsys.readouterr().err


def test_predict_needs_a_complete_question(tmp_path):
    from pretrain.scaling.predict import predict

    fit = F.fit_all(synth(seed=6), bootstrap=0)
    with pytest.raises(F.FitError, match="give --params and --tokens"):
        predict(fit, params=1e9)
    with pytest.raises(F.FitError, match="either --flops, or --params and --tokens"):
        predict(fit, params=1e9, tokens=1e10, flops=1e20)
    assert "loss_ci" not in predict(fit, flops=1e21)  # no bootstrap, no interval


# --- the robust frontier: QC, the joint IsoFLOP fit, stratified intervals, backtests --------------------

def planted(seed=0, budgets=np.logspace(18, 20, 5), sigma=0.005, outliers=2, sizes=7) -> tuple[F.Runs, np.ndarray, np.ndarray]:
    """An IsoFLOP sweep of the TRUTH law (sizes within ±0.5 decades of each budget's optimum) plus,
    per budget, three large models on few tokens (1-1.6 decades past the optimum) whose loss is 8-13%
    WORSE than the law says, as in real sweeps, and `outliers` near-optimal runs 10% too high.
    Returns (runs, indices of the far runs, indices of the outliers)."""
    rng = np.random.default_rng(seed)
    N, G, infl = [], [], []
    for C in budgets:
        n_opt = F.optimal3(TRUTH, C)[0]
        for n in n_opt * np.logspace(-0.5, 0.5, sizes):
            N.append(n), G.append(C), infl.append(1.0)
        for dec in (1.0, 1.3, 1.6):
            N.append(n_opt * 10 ** dec), G.append(C), infl.append(1 + 0.08 * dec)
    N, G, infl = np.array(N), np.array(G), np.array(infl)
    D = G / (6 * N)
    L = F.loss3(TRUTH, N, D) * infl * np.exp(rng.normal(0, sigma, len(N)))
    out = rng.choice(np.flatnonzero(infl == 1), outliers, replace=False)
    L[out] *= 1.10
    return F.Runs(N, D, L, 6 * N * D, G, [f"r{i}" for i in range(len(N))], {"csv": "synthetic"}), \
        np.flatnonzero(infl > 1), out


def test_qc_flags_off_center_runs_outliers_and_thin_budgets():
    runs, far, out = planted(seed=2)
    # a sixth budget of one size (two runs of it)
    extra = F.optimal3(TRUTH, 3e20)[0] * np.array([1.0, 1.0])
    runs = F.Runs(np.r_[runs.N, extra], np.r_[runs.D, 3e20 / (6 * extra)], np.r_[runs.L, F.loss3(TRUTH, extra, 3e20 / (6 * extra))],
                  np.r_[runs.C, [3e20, 3e20]], np.r_[runs.group, [3e20, 3e20]], runs.names + ["x1", "x2"], runs.source)
    fit = F.fit_all(runs, bootstrap=0)
    flags = np.array([r["flag"] for r in fit["qc"]["runs"]])
    assert set(flags[far]) == {"off_center"}  # every large-model-on-few-tokens run is out of the window
    assert set(flags[out]) == {"outlier"}
    assert list(flags[-2:]) == ["too_few_points"] * 2
    assert fit["qc"]["counts"] == {"kept": 25 - len(out), "off_center": 25, "outlier": len(out), "too_few_points": 2}
    # the window is a factor 3 around each budget's best run: the kept runs lie inside it
    for g in np.unique(runs.group[flags == "kept"]):
        m = runs.group == g
        best_n = runs.N[m][np.argmin(runs.L[m])]
        assert np.all(np.abs(np.log(runs.N[m & (flags == "kept")] / best_n)) <= np.log(3) + 1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frontier_recovers_the_law_where_all_runs_approach3_does_not(seed):
    runs, _, _ = planted(seed=seed)
    C = 1e21  # 10x past the largest budget
    true_best = float(F.optimal3(TRUTH, C)[2])
    al, be = TRUTH["alpha"], TRUTH["beta"]
    fit = F.fit_all(runs, bootstrap=0)
    fr = fit["frontier"]["params"]
    assert fr["E"] == pytest.approx(TRUTH["E"], abs=0.15)
    assert fr["alpha"] == pytest.approx(al * be / (al + be), abs=0.03)  # the frontier's exponent
    # A: the reducible loss at the largest budget, A C^-alpha, against the truth's
    # A through the best loss it gives at the largest fitted budget
    assert fr["E"] + fr["A"] * 1e20 ** -fr["alpha"] == pytest.approx(float(F.optimal3(TRUTH, 1e20)[2]), rel=0.005)
    new = F.predict_compute(fit, C)
    assert new["estimator"] == "frontier" and abs(new["loss"] / true_best - 1) < 0.01
    old = F.predict_compute(F.fit_all(runs, bootstrap=0, all_runs=True), C)["approach3"]
    assert old["loss"] / true_best - 1 > 0.02  # pulled up by the far runs
    assert F.fit_all(runs, bootstrap=0, all_runs=True)["approach3"]["params"]["E"] > TRUTH["E"] + 0.2


@pytest.mark.parametrize("seeds,min_cover", [
    pytest.param(range(12), 10),
    pytest.param(range(60), 54, marks=pytest.mark.slow),
])
def test_frontier_interval_covers_a_measured_run_10x_out(seeds, min_cover):
    """The 95% interval of the best loss 10x past the fitted budgets contains a run measured there
    (the law's optimum times the sweep's noise) in about 95% of sweeps."""
    from pretrain.scaling import frontier as Fr

    C, sigma = 1e21, 0.005
    cover = 0
    for s in seeds:
        runs, _, _ = planted(seed=100 + s, sigma=sigma, outliers=0)
        groups = F.budget_groups(runs)
        Cg = F.group_compute(runs, groups)
        flags, ffit, _ = Fr.select_runs(runs.N, runs.L, groups, Cg)
        k = flags == "kept"
        S = Fr.bootstrap_frontier(runs.N[k], runs.L[k], Cg[k], groups[k], ffit, 300, seed=s)
        pred = Fr.frontier_at(S[:, :6], C)[0] * np.exp(ffit["sigma"] * S[:, 6])
        lo, hi = np.nanquantile(pred, [0.025, 0.975])
        measured = float(F.optimal3(TRUTH, C)[2]) * np.exp(np.random.default_rng(s).normal(0, sigma))
        cover += lo <= measured <= hi
    assert cover >= min_cover, cover


def test_stratified_resamples_keep_every_budget_and_its_size():
    from pretrain.scaling.frontier import stratified_weights

    groups = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    W = stratified_weights(groups, 50, np.random.default_rng(0))
    for g, n in ((0, 3), (1, 4), (2, 3)):
        np.testing.assert_array_equal(W[:, groups == g].sum(1), n)
    assert W.std(0).min() > 0  # runs really are resampled


def test_backtest_rows_are_fits_of_the_budgets_below(tmp_path, capsys):
    from danlu.cli import main

    runs, _, _ = planted(seed=4, budgets=np.logspace(18, 20, 5))
    p = tmp_path / "runs.csv"
    _write_csv(p, ["params", "tokens", "loss", "budget"], list(zip(runs.N, runs.D, runs.L, runs.group)))
    out = tmp_path / "fit"
    assert main(["fit", str(p), "--output", str(out), "--bootstrap", "20", "--backtest"]) == 0
    text = capsys.readouterr().out
    bt = json.loads((out / "backtest.json").read_text())
    assert [(r["budgets_fitted"], round(r["factor"], 3)) for r in bt["rows"]] == \
        [(3, 3.162), (3, 10.0), (4, 3.162)]
    assert (out / "backtest.png").stat().st_size > 10_000 and "frontier: mean |error|" in text
    # an independent refit of the three smallest budgets gives the first rows' predictions
    sub = F.read_runs(p)
    sub = sub.subset(sub.C < 2e19)
    ref = F.predict_compute(F.fit_all(sub, bootstrap=20), float(runs.C.max()))
    assert bt["rows"][1]["frontier"]["predicted"] == pytest.approx(ref["frontier"]["loss"], rel=1e-9)
    assert bt["rows"][1]["measured_best"] == pytest.approx(runs.L[runs.group == 1e20].min())
    assert abs(bt["rows"][1]["frontier"]["rel_error"]) < 0.02


def test_columns_tokens_and_flops_without_params_and_a_budget_column(tmp_path):
    runs = synth(seed=7)
    p = tmp_path / "paper.csv"
    # a paper's table: tokens and GFLOPs per run, and the sweep's nominal budget (here 6ND / 3, as Marin's)
    _write_csv(p, ["D", "gflops", "xent", "nominal"],
               [[d, c / 1e9, l, g / 3] for d, c, l, g in zip(runs.D, runs.C, runs.L, runs.group)])
    got = F.read_runs(p, F.parse_columns("tokens=D,flops=gflops*1e9,loss=xent"))
    np.testing.assert_allclose(got.N, runs.N, rtol=1e-9)
    assert got.source["params"] == "C / (6 D) from column gflops" and got.source["compute"] == "6 * params * tokens"
    nominal = F.read_runs(p, F.parse_columns("tokens=D,flops=gflops*1e9,loss=xent,budget=nominal"))
    np.testing.assert_allclose(nominal.C, runs.group / 3)  # C is the nominal budget now
    assert nominal.source["compute"] == "column nominal (nominal budget)"
    assert "6ND / budget = 3 (median)" in nominal.source["budgets"]
    # the frontier in nominal units is the 6ND one shifted by the factor 3: the same loss at C/3
    a, b = F.fit_all(got, bootstrap=0), F.fit_all(nominal, bootstrap=0)
    assert F.predict_compute(b, 1e21 / 3)["loss"] == pytest.approx(F.predict_compute(a, 1e21)["loss"], rel=1e-4)
    with pytest.raises(F.FitError, match="compute=budget needs a budget column"):
        F.read_runs(p, F.parse_columns("tokens=D,flops=gflops,loss=xent"), compute="budget")
    with pytest.raises(F.FitError, match="or give tokens= and flops="):
        F.read_runs(p, F.parse_columns("tokens=D,loss=xent"))


def test_an_impossible_prediction_is_an_error_not_a_result():
    from pretrain.scaling.predict import predict

    fit = F.fit_all(synth(seed=8), bootstrap=0)
    fit["frontier"]["params"]["E"] = -5.0  # a corrupted fit.json
    with pytest.raises(F.FitError, match="impossible loss"):
        predict(fit, flops=1e24)
    with pytest.raises(F.FitError, match="must be positive"):
        predict(fit, flops=-1.0)
