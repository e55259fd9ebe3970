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


def test_gpt4_form_fits_its_own_curve():
    C = np.logspace(18, 22, 9)
    L = 80.0 * C ** -0.1 + 1.7
    g = F.fit_gpt4(C, L, bootstrap=50)
    assert g["params"]["b"] == pytest.approx(-0.1, rel=1e-3) and g["params"]["c"] == pytest.approx(1.7, rel=1e-3)
    assert g["samples"].shape == (50, 3)


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
    from pretrain.cli import main

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
    assert line["loss"] == pytest.approx(F.loss3(fit["approach3"]["params"], 1e9, 2e10))
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
