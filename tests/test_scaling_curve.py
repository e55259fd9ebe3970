"""Loss-curve fits (danlu fit-curve) on synthetic metrics.jsonl drawn from the schedule-aware law."""
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import load_config
from pretrain.optimizer import make_schedule
from pretrain.scaling.curve import CurveError, areas, fit_curve

ROOT = Path(__file__).resolve().parent.parent
L0, A, ALPHA, KAPPA = 2.0, 0.8, 0.5, 0.3


def synthetic_run(tmp_path, schedule: str, steps: int = 2000, sigma: float = 0.004, seed: int = 0,
                  upto: int | None = None, every: int = 10, mean: bool = False,
                  eval_every: int = 200) -> tuple[Path, float]:
    """A run directory whose config.yaml has `schedule` and whose metrics.jsonl follows
    L(s) = L0 + A·S1^-α − C·S2 (C from KAPPA) plus noise per step, logged every `every` steps, eval
    (the law + 0.1, no noise) every `eval_every`; `mean`: rows also carry loss_mean, the mean of the steps since the previous row."""
    run = tmp_path / schedule
    run.mkdir()
    cfg = load_config(ROOT / "configs/train/tiny.yaml", [f"optimizer.schedule={schedule}", f"train.steps={steps}",
                                                        "optimizer.warmup_steps=40", "optimizer.lr=1e-3"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    eta = np.asarray(make_schedule(cfg.optimizer, steps)(np.arange(steps)), float)
    S1, S2 = areas(eta)
    C = KAPPA * A * S1[-1] ** -ALPHA / S2[-1]
    with np.errstate(divide="ignore"):  # S1 = 0 at the first step of the warmup
        law = L0 + A * S1 ** -ALPHA - C * S2
    rng = np.random.default_rng(seed)
    noisy = law + rng.normal(0, sigma, steps) if mean else None
    lines = []
    for s in range(every, (upto or steps) + 1, every):
        row = {"step": s, "loss": float(noisy[s - 1] if mean else law[s - 1] + rng.normal(0, sigma)),
               "lr": float(eta[s - 1])}
        if mean:
            row["loss_mean"] = float(noisy[s - every:s].mean())
        if s % eval_every == 0:
            row["eval_loss"] = float(law[s - 1] + 0.1)
        lines.append(json.dumps(row))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run, float(law[-1])


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_whole_curve_recovers_the_final_loss(tmp_path, schedule):
    run, final = synthetic_run(tmp_path, schedule)
    r = fit_curve(run, bootstrap=100, level=0.99)
    sched = r["forms"]["schedule"]
    assert r["finished"] and r["lr_schedule"] == "config.yaml"
    assert sched["predicted_final_loss"] == pytest.approx(final, rel=2e-3)
    assert sched["interval"][0] <= final <= sched["interval"][1]
    assert sched["kappa"] == pytest.approx(KAPPA, abs=0.05)
    assert sched["predicted_final_eval_loss"] == pytest.approx(final + 0.1, rel=3e-3)
    assert abs(sched["rel_error"]) < 5e-3 and "eval_rel_error" in sched


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_quarter_of_the_curve_predicts_the_end_with_a_reference_ratio(tmp_path, schedule):
    """From 25% of the steps (little or no annealing seen), with the annealing ratio of a finished
    reference run of the same schedule (the sweep's other runs in practice)."""
    run, final = synthetic_run(tmp_path, schedule, seed=1)
    ref = fit_curve(run, bootstrap=0)["forms"]["schedule"]["kappa"]
    r = fit_curve(run, fraction=0.25, bootstrap=30, anneal_ratio=ref)
    sched = r["forms"]["schedule"]
    assert r["fit_steps"][1] == 500 and r["annealing_seen"] < 0.5 and "fixed" in sched["note"]
    assert sched["predicted_final_loss"] == pytest.approx(final, rel=0.01)
    # without it the annealing bonus is not identifiable from a WSD prefix: the fit says so
    if schedule == "wsd":
        assert "barely identified" in fit_curve(run, fraction=0.25, bootstrap=0)["forms"]["schedule"]["note"]


def test_a_run_still_going(tmp_path):
    run, final = synthetic_run(tmp_path, "cosine", upto=700)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 710, "lo')  # the line being written
    r = fit_curve(run, bootstrap=10, anneal_ratio=KAPPA)
    assert not r["finished"] and r["last_logged_step"] == 700 and "measured_final_loss" not in r
    assert r["forms"]["schedule"]["predicted_final_loss"] == pytest.approx(final, rel=0.01)


def test_fit_curve_cli_and_errors(tmp_path, capsys):
    from pretrain.cli import main

    run, _ = synthetic_run(tmp_path, "cosine")
    assert main(["fit-curve", str(run), "--fraction", "0.3", "--bootstrap", "5", "--plot", str(tmp_path / "c.png"),
                 "--reference", str(run)]) == 0
    out = capsys.readouterr().out
    assert "schedule final loss at step 2000" in out and (tmp_path / "c.png").stat().st_size > 10_000
    assert json.loads((run / "curve_fit.json").read_text())["fraction"] == 0.3
    # a config.yaml that does not describe the run is refused
    cfg = load_config(run / "config.yaml", ["optimizer.lr=2e-3"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    with pytest.raises(CurveError, match="does not describe this run"):
        fit_curve(run)
    assert main(["fit-curve", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_interval_means_are_fitted_as_means(tmp_path):
    """Rows logged every 50 steps with loss_mean (the mean of 50 steps of per-step noise 0.05): the
    fit compares each row with the form's mean over its steps, so neither the noise nor the
    curvature inside an interval biases the prediction; the measured final loss is the mean of the
    last 2% of steps."""
    run, final = synthetic_run(tmp_path, "cosine", sigma=0.05, every=50, mean=True, seed=3)
    r = fit_curve(run, bootstrap=0)
    assert r["loss_column"] == "loss_mean"
    sched = r["forms"]["schedule"]
    assert sched["predicted_final_loss"] == pytest.approx(final, rel=2e-3)
    assert r["measured_final_loss"] == pytest.approx(final, abs=0.05 / np.sqrt(40) * 4)
    # the single-step column of the same run is 7x noisier: the fit of it is worse
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in x.items() if k != "loss_mean"}) + "\n"
                                               for x in lines))
    single = fit_curve(run, bootstrap=0)
    assert single["loss_column"] == "loss"
    assert abs(single["forms"]["schedule"]["predicted_final_loss"] - final) > abs(sched["predicted_final_loss"] - final)


def test_eval_loss_curve(tmp_path):
    """target="eval" fits the eval rows (points at their steps): from the first 25% of a cosine run
    evaluated every 50 steps, with the annealing ratio of the whole curve, the final eval loss;
    too few eval rows are refused, naming the cure."""
    run, final = synthetic_run(tmp_path, "cosine", eval_every=50, seed=4)
    whole = fit_curve(run, bootstrap=0, target="eval")
    assert whole["loss_column"] == "eval_loss" and whole["measured_final_loss"] == pytest.approx(final + 0.1, rel=1e-9)
    r = fit_curve(run, fraction=0.25, bootstrap=20, target="eval",
                  anneal_ratio=whole["forms"]["schedule"]["kappa"])
    assert r["rows_fitted"] == 10 and "predicted_final_eval_loss" not in r["forms"]["schedule"]
    assert r["forms"]["schedule"]["predicted_final_loss"] == pytest.approx(final + 0.1, rel=2e-3)
    (tmp_path / "sparse").mkdir()
    sparse, _ = synthetic_run(tmp_path / "sparse", "cosine", eval_every=400)
    with pytest.raises(CurveError, match="evaluate more often"):
        fit_curve(sparse, fraction=0.25, target="eval")
