"""Sweep runner: trains every point of a sweep, one after another in this process, skipping
finished points, and appends one row per run to `<output>/runs.csv`.

runs.csv columns (the runs-table contract of docs/design.md first, then details):
    params, params_nonembed, tokens, flops (exact count, pretrain.flops.flops_per_token × tokens),
    flops_6nd (6·N·D with N total), loss (final eval loss), name, budget, train_loss, d_model,
    n_layers, n_heads, d_ff, batch, seq_len, steps, lr, seconds, run_dir, config
A point is finished when runs.csv has its name; a run that finished without its row (killed
between the two) gets its row from its summary.json instead of being trained again.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from pretrain.config import ConfigError
from pretrain.scaling.plan import Point, SweepConfig, demo_shards_dir, plan_sweep, point_config

COLUMNS = ["params", "params_nonembed", "tokens", "flops", "flops_6nd", "loss", "name", "budget", "train_loss",
           "d_model", "n_layers", "n_heads", "d_ff", "batch", "seq_len", "steps", "lr", "seconds", "run_dir", "config"]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Appends one row; writes the header for a new file; refuses a file with other columns."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise ConfigError(f"{path}: its columns {header} are not the runs-table columns {COLUMNS}; "
                              f"use another sweep output directory")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in COLUMNS})


def make_row(p: Point, summary: dict, run_dir: Path | str) -> dict:
    if summary.get("final_eval_loss") is None:
        raise RuntimeError(f"sweep point {p.name}: the run ended without an eval loss ({run_dir}/summary.json)")
    return {"params": p.params, "params_nonembed": p.params_nonembed, "tokens": p.tokens, "flops": f"{p.flops:.6g}",
            "flops_6nd": f"{p.flops_6nd:.6g}", "loss": f"{summary['final_eval_loss']:.6f}", "name": p.name,
            "budget": f"{p.budget:.6g}", "train_loss": f"{summary['final_loss']:.6f}", "d_model": p.d_model,
            "n_layers": p.n_layers, "n_heads": p.n_heads, "d_ff": p.d_ff, "batch": p.batch, "seq_len": p.seq_len,
            "steps": p.steps, "lr": f"{p.lr:.6g}", "seconds": f"{summary.get('seconds', 0):.1f}",
            "run_dir": str(run_dir), "config": f"{str(run_dir).rstrip('/')}/config.yaml"}


def _finished_summary(run_dir: Path, p: Point) -> dict | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("steps") == p.steps and not summary.get("stopped_early") and summary.get("final_eval_loss") is not None:
        return summary
    return None


def run_point(s: SweepConfig, p: Point, csv_path: Path, log: Callable[[str], None] = print,
              verbose: bool = False) -> dict:
    """Trains one point (or reuses its finished run) and appends its row; returns the row."""
    from pretrain.train import train

    cfg = point_config(s, p)
    run_dir = Path(cfg.train.run_dir)
    summary = _finished_summary(run_dir, p)
    if summary is None:
        summary = train(cfg, log=log if verbose else (lambda _msg: None))
        if summary.get("signal") or summary.get("stopped_early"):
            raise RuntimeError(f"sweep point {p.name} stopped early ({summary.get('signal') or 'time limit'}); "
                               f"rerun the sweep to continue it")
    row = make_row(p, summary, run_dir)
    append_row(csv_path, row)
    return row


def branch_checkpoint(s: SweepConfig, p: Point, main: Point, log: Callable[[str], None] = print,
                      verbose: bool = False) -> Path:
    """The checkpoint of `main` (the point p branches off) at p.branch_step, copied into p's run
    directory (where `train` resumes from it). The main run is trained up to that step first when
    it has not got there (`train.stop_at`; it resumes from its own latest checkpoint)."""
    import shutil

    from pretrain.config import load_config
    from pretrain.scaling.plan import point_overrides
    from pretrain.train import train

    main_dir = Path(s.output) / p.branch_of
    src = main_dir / "checkpoints" / str(p.branch_step)
    if not src.exists():
        cfg = load_config(s.base, point_overrides(s, main) + [f"train.stop_at={p.branch_step}"])
        summary = train(cfg, log=log if verbose else (lambda _msg: None))
        if summary.get("signal") or summary["steps"] != p.branch_step or not src.exists():
            raise RuntimeError(f"sweep point {p.name}: the main run {p.branch_of} did not stop with a checkpoint at "
                               f"step {p.branch_step} (it is at step {summary['steps']}; {src} "
                               f"{'exists' if src.exists() else 'is missing'}); rerun the sweep to continue, or delete "
                               f"{main_dir} to train it again when it went past the branch point")
    dest = Path(s.output) / p.name / "checkpoints" / str(p.branch_step)
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(dest)
    return dest


def run_sweep(s: SweepConfig, *, log: Callable[[str], None] = print, verbose: bool = False,
              only: list[str] | None = None) -> list[dict]:
    """Plans (validating every point first), then trains each unfinished point; returns all rows
    of runs.csv. `only`: names of the points to run (default all)."""
    if s.demo_data.enabled and not (demo_shards_dir(s) / "manifest.json").exists():
        raise ConfigError(f"demo_data.enabled: no token shards in {demo_shards_dir(s)}; `danlu sweep` builds them "
                          f"(danlu.sweep.prepare_demo_data)")
    points = plan_sweep(s)
    by_name = {p.name: p for p in points}
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps([dataclasses.asdict(p) for p in points], indent=1) + "\n")
    if only:
        unknown = sorted(set(only) - {p.name for p in points})
        if unknown:
            raise ConfigError(f"--only: no sweep points named {unknown}; the points are {[p.name for p in points]}")
        points = [p for p in points if p.name in only]
    csv_path = out / "runs.csv"
    done = {r["name"] for r in read_rows(csv_path)}
    t0 = time.perf_counter()
    for i, p in enumerate(points):
        tag = f"[{i + 1}/{len(points)}] {p.name}: N={p.params:,} (non-emb {p.params_nonembed:,}) D={p.tokens:,} " \
              f"steps={p.steps} lr={p.lr:.3g}"
        if p.name in done:
            log(f"{tag}: done already, skipped")
            continue
        t1 = time.perf_counter()
        if p.branch_of:
            branch_checkpoint(s, p, by_name[p.branch_of], log, verbose)
            tag += f" (cooldown branch of {p.branch_of} at step {p.branch_step})"
        row = run_point(s, p, csv_path, log, verbose)
        log(f"{tag}: loss {float(row['loss']):.4f} ({time.perf_counter() - t1:.0f} s)")
    log(f"sweep done in {time.perf_counter() - t0:.0f} s: {csv_path}")
    return read_rows(csv_path)


def predict_and_run(s: SweepConfig, *, log: Callable[[str], None] = print, verbose: bool = False,
                    run: bool = True) -> dict:
    """The predictable-scaling demo on a finished sweep: fit its runs.csv (Approach 3 with
    bootstrap), pick the compute-optimal model for budget_factor × the largest sweep budget, write
    the predicted loss to `<output>/prediction.json` BEFORE training it, then train it (run dir
    `<output>/predicted`) and add the measured loss and the relative error to the same file."""
    from pretrain.scaling.fit import fit_all, predict_point, read_runs
    from pretrain.scaling.plan import plan_big_run
    from pretrain.scaling.plots import plot_all

    import numpy as np

    out = Path(s.output)
    runs = read_runs(out / "runs.csv")
    # the largest planned budget (an explicit grid has none: the largest run's 6ND)
    budget = s.predict.budget_factor * max(float(r["budget"]) or float(r["flops_6nd"]) for r in read_rows(out / "runs.csv"))
    fit = fit_all(runs, bootstrap=s.predict.bootstrap, predict_C=[budget])
    fit_dir = out / "fit"
    fit_dir.mkdir(parents=True, exist_ok=True)
    (fit_dir / "fit.json").write_text(json.dumps(fit, indent=1) + "\n")
    plot_all(runs, fit, fit_dir)
    at_c = fit["predictions"][0]
    if not at_c.get("N_opt") or not np.isfinite(at_c["N_opt"]):
        raise RuntimeError(f"the fit gives no compute-optimal N at C={budget:.3g} ({fit_dir / 'fit.json'})")
    p = plan_big_run(s, at_c["N_opt"], budget, params_kind="total")
    pred = predict_point(fit, p.params, p.tokens)
    record = {"written_before_training": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget": budget,
              "budget_factor": s.predict.budget_factor, "fit": str(fit_dir / "fit.json"),
              "compute_optimal_at_budget": at_c, "point": dataclasses.asdict(p),
              "predicted_loss": pred["loss"], "predicted_loss_ci": pred.get("loss_ci"),
              "estimator": pred["estimator"], "fitted_params": fit[pred["estimator"]]["params"]}
    (out / "prediction.json").write_text(json.dumps(record, indent=1) + "\n")
    ci = pred.get("loss_ci")
    log(f"prediction for C={budget:.3g} (×{s.predict.budget_factor:g} the largest sweep budget): "
        f"N={p.params:,} D={p.tokens:,} loss {pred['loss']:.4f}"
        + (f" [{ci[0]:.4f}, {ci[1]:.4f}] (95%)" if ci else "") + f", written to {out / 'prediction.json'}")
    if not run:
        return record
    t0 = time.perf_counter()
    row = run_point(s, p, out / "predicted.csv", log, verbose)
    measured = float(row["loss"])
    record.update({"measured_loss": measured, "rel_error": (pred["loss"] - measured) / measured,
                   "inside_interval": bool(ci and ci[0] <= measured <= ci[1]),
                   "train_seconds": time.perf_counter() - t0})
    (out / "prediction.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"measured loss {measured:.4f}: predicted {pred['loss']:.4f}, relative error {record['rel_error']:+.2%}"
        + (f", {'inside' if record['inside_interval'] else 'outside'} the interval" if ci else ""))
    return record
