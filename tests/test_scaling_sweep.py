"""Sweep planning (golden grid, shape rule, rules, config errors) and one real sweep point through train()."""
import json
import math
from pathlib import Path

import pytest
import yaml

from pretrain.config import ConfigError, load_config
from pretrain.flops import count_params
from pretrain.scaling import plan as P

ROOT = Path(__file__).resolve().parent.parent


def write_sweep(tmp_path, **sections) -> Path:
    doc = {"base": str(ROOT / "configs/train/tiny.yaml"), "output": str(tmp_path / "out"),
           "overrides": ["checkpoint.enabled=false", "logging.tensorboard=false", "data.seq_len=64",
                         "model.max_seq_len=64", "model.vocab_size=512", "model.tie_embeddings=true"],
           "shape": {"aspect_ratio": 32, "head_dim": 8, "ff_mult": 2.6667, "ff_multiple": 8, "params": "total"},
           "grid": {"kind": "isoflop", "budgets": [1e10, 1e11], "sizes_per_budget": 3, "tokens_per_param": [8, 80]},
           "lr": {"base": 4e-3, "at_params": 1e5, "exponent": -0.3}, "batch": {"base": 8, "multiple": 8}}
    for k, v in sections.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_isoflop_plan_golden(tmp_path):
    s = P.load_sweep(write_sweep(tmp_path))
    points = P.plan_sweep(s)
    assert [(p.name, p.params, p.tokens, p.steps) for p in points] == [
        ("C1.00e10_d16_L1", 11184, 148992, 291),  # all 3 sizes of 1e10 snap to the smallest shape: kept once
        ("C1.00e11_d16_L1", 11184, 1490432, 2911),
        ("C1.00e11_d32_L1", 29024, 574464, 1122),
        ("C1.00e11_d32_L2", 41632, 400384, 782),
    ]
    for p in points:
        assert abs(6 * p.params * p.tokens / p.budget - 1) < 0.01  # D = C / 6N up to whole steps
        assert 16 <= p.d_model / p.n_layers <= 64 and p.d_model == 8 * p.n_heads
        assert p.lr == pytest.approx(4e-3 * (p.params / 1e5) ** -0.3)
        assert p.params == count_params(P.point_config(s, p).model)["total"]
        assert p.warmup == round(0.05 * p.steps)
    cfg = P.point_config(s, points[-1])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.steps, cfg.train.global_batch_size) == (32, 2, 782, 8)
    assert (cfg.model.n_heads, cfg.model.head_dim, cfg.model.d_ff, cfg.optimizer.warmup_steps) == (4, 8, 88, 39)
    assert cfg.train.run_dir == str(tmp_path / "out" / "C1.00e11_d32_L2")


def test_exact_flops_rule_and_explicit_grid(tmp_path):
    s = P.load_sweep(write_sweep(tmp_path, grid={"flops": "exact"}))
    for p in P.plan_sweep(s):
        assert abs(p.flops / p.budget - 1) < 0.01  # the exact count is what meets the budget now
    s = P.load_sweep(write_sweep(tmp_path, grid={"kind": "explicit", "params": [2e4, 4e4], "tokens": [1e5, 3e5]}))
    pts = P.plan_sweep(s)
    assert len(pts) == 4 and {p.budget for p in pts} == {0.0}
    assert sorted({p.tokens // (8 * 64) for p in pts}) == [195, 586]


def test_shape_rule_hits_the_target_count():
    model = load_config(ROOT / "configs/train/125m.yaml").model
    rule = P.ShapeRule(aspect_ratio=64, head_dim=64, ff_multiple=256, params="nonembed")
    for target in (2e7, 1e8, 1e9):
        shape = P.shape_for_params(target, model, rule)
        n = count_params(load_config(ROOT / "configs/train/125m.yaml", [f"model.{k}={v}" for k, v in shape.items()]).model)
        assert abs(math.log(n["nonembed"] / target)) < 0.15, (target, shape, n)
        assert 32 <= shape["d_model"] / shape["n_layers"] <= 128


@pytest.mark.parametrize("change,message", [
    ({"grid": {"kind": "random"}}, "grid.kind='random' is not one of isoflop, explicit"),
    ({"grid": {"budgets": []}}, "grid.budgets: an isoflop grid needs positive FLOP budgets"),
    ({"grid": {"tokens_per_param": [80, 8]}}, r"grid.tokens_per_param=\[80.0, 8.0\]: give \[min, max\]"),
    ({"shape": {"head_dim": 7}}, "shape: need an even head_dim"),
    ({"lr": {"bas": 1e-3}}, "unknown config key 'lr.bas'"),
    ({"overrides": ["data.eval_batches=0"]}, "data.eval_batches must be >= 1"),
    ({"overrides": ["data.seq_len=4096"]}, "exceeds model.max_seq_len"),
    ({"demo_data": {"enabled": True, "eval_split": "file"}}, "demo_data.eval_split='file' is not one of document"),
    ({"demo_data": {"enabled": True, "packages": ["no_such_pkg_x"]}},
     "demo_data.packages: demo corpus: package 'no_such_pkg_x' is not installed"),
    ({"demo_data": {"enabled": True, "eval_fraction": 0}}, r"demo_data.eval_fraction=0.0 must be in \(0, 1\)"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, change, message):
    from danlu.sweep import check_demo_data

    def plan(s):  # what `danlu sweep` checks before its first point
        check_demo_data(s)
        return P.plan_sweep(s)

    path = write_sweep(tmp_path, **change)
    if message is None:
        plan(P.load_sweep(path))
        return
    with pytest.raises(ConfigError, match=message):
        plan(P.load_sweep(path))


def test_shipped_sweep_configs_plan():
    paths = sorted(p for p in (ROOT / "configs/scaling").glob("*.yaml") if not p.name.startswith("launch-"))
    assert {p.name for p in paths} >= {"cpu_demo.yaml", "cpu_bench.yaml", "tpu_isoflop.yaml"}
    for path in paths:
        assert path.read_text().startswith("#"), f"{path.name}: starts with a header comment"
        s = P.load_sweep(path)
        points = P.plan_sweep(s)
        if s.grid.kind == "explicit":  # e.g. cpu_wsd.yaml: sizes x token counts
            assert len({p.params for p in points}) >= 2 and len({p.tokens for p in points}) >= 3, path.name
            continue
        budgets = sorted({p.budget for p in points})
        # demo.yaml is danlu demo's 2-minute cut (10x); the sweeps for predictions span 30x and more
        assert budgets[-1] / budgets[0] >= (10 if path.name == "demo.yaml" else 30), path.name
        assert len(points) >= 3 * len(budgets) - 3
    # the launch configs of TPU sweeps (`danlu sweep CONFIG --launch launch-CONFIG.yaml`) load as launch jobs
    from launch.tpu import load_job

    for path in sorted((ROOT / "configs/scaling").glob("launch-*.yaml")):
        assert (ROOT / "configs/scaling" / path.name.removeprefix("launch-")).exists(), path.name
        s = P.load_sweep(ROOT / "configs/scaling" / path.name.removeprefix("launch-"))
        assert load_job(str(path), {"config": s.base}).run_dir.startswith("gs://"), path.name


def test_one_real_point_runs_is_recorded_and_then_skipped(tmp_path, shards, capsys):
    from danlu.cli import main
    from pretrain.scaling.curve import fit_curve
    from pretrain.scaling.runner import COLUMNS, read_rows, run_sweep

    path = write_sweep(tmp_path, grid={"kind": "explicit", "params": [6000], "tokens": [12288]},
                       overrides=["checkpoint.enabled=false", "logging.tensorboard=false", "data.seq_len=32",
                                  "model.max_seq_len=32", "model.vocab_size=512", "data.eval_batches=2",
                                  f"data.path={shards}"], batch={"base": 8})
    s = P.load_sweep(path)
    rows = run_sweep(s, log=lambda m: None)
    assert len(rows) == 1 and list(rows[0]) == COLUMNS
    r = rows[0]
    run_dir = Path(r["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(r["loss"]) == pytest.approx(summary["final_eval_loss"], abs=1e-6)
    assert int(r["steps"]) == 48 and int(r["tokens"]) == 48 * 8 * 32
    assert float(r["flops_6nd"]) == pytest.approx(6 * int(r["params"]) * int(r["tokens"]), rel=1e-5)
    from pretrain.flops import flops_per_token
    cfg = load_config(run_dir / "config.yaml")
    assert float(r["flops"]) == pytest.approx(flops_per_token(cfg.model, 32)["total"] * int(r["tokens"]), rel=1e-5)
    assert float(r["flops"]) < float(r["flops_6nd"])  # untied: the embedding lookup is no matmul
    mtime = (run_dir / "summary.json").stat().st_mtime
    assert main(["sweep", str(path)]) == 0
    assert "done already, skipped" in capsys.readouterr().out
    assert (run_dir / "summary.json").stat().st_mtime == mtime and len(read_rows(Path(s.output) / "runs.csv")) == 1
    curve = fit_curve(run_dir, bootstrap=5)
    assert curve["finished"] and curve["lr_schedule"] == "config.yaml" and curve["rows_fitted"] >= 40


def test_wsd_cooldown_branch_equals_a_run_from_scratch(tmp_path, shards):
    """grid.wsd_branches: one WSD main run per size, checkpointed at the other points' cooldown
    starts; each of those points is a cooldown branch restored from the checkpoint, and ends where a
    WSD run of its own length from scratch ends (same warmup, same data order): the same losses."""
    from pretrain.scaling.runner import read_rows, run_sweep
    from pretrain.train import train

    over = ["checkpoint.enabled=false", "logging.tensorboard=false", "data.seq_len=32", "model.max_seq_len=32",
            "model.vocab_size=512", "data.eval_batches=2", f"data.path={shards}"]
    path = write_sweep(tmp_path, grid={"kind": "explicit", "params": [6000], "tokens": [8192, 20480],
                                       "wsd_branches": True, "cooldown_fraction": 0.25},
                       overrides=over, batch={"base": 8}, warmup_fraction=0.1)
    s = P.load_sweep(path)
    branch, main = P.plan_sweep(s)
    assert (branch.steps, main.steps) == (32, 80) and branch.branch_of == main.name and not main.branch_of
    assert branch.branch_step == 32 - 8 and branch.warmup == main.warmup == 8
    rows = {r["name"]: r for r in run_sweep(s, log=lambda m: None)}
    assert set(rows) == {branch.name, main.name}
    b_summary = json.loads((Path(s.output) / branch.name / "summary.json").read_text())
    assert b_summary["steps"] == 32 and not b_summary["stopped_early"]
    logged = [json.loads(x)["step"] for x in (Path(s.output) / branch.name / "metrics.jsonl").read_text().splitlines()]
    assert min(logged) == 25 and max(logged) == 32  # it trained the cooldown only, from the main run's step 24
    assert (Path(s.output) / main.name / "checkpoints" / "24").is_dir()  # the branch point, kept

    scratch = load_config(s.base, P.point_overrides(s, branch) + [f"train.run_dir={tmp_path / 'scratch'}"])
    ref = train(scratch, log=lambda m: None)
    assert float(rows[branch.name]["loss"]) == pytest.approx(ref["final_eval_loss"], rel=1e-6)
    assert b_summary["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    assert len(read_rows(Path(s.output) / "runs.csv")) == 2

    with pytest.raises(ConfigError, match="inside the main run's warmup"):
        P.plan_sweep(P.load_sweep(write_sweep(tmp_path, grid={"kind": "explicit", "params": [6000],
                                                               "tokens": [2048, 20480], "wsd_branches": True},
                                              overrides=over, batch={"base": 8}, warmup_fraction=0.1)))
    with pytest.raises(ConfigError, match="wsd_branches needs kind: explicit"):
        P.load_sweep(write_sweep(tmp_path, grid={"wsd_branches": True}))
