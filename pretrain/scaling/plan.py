"""Sweep planning: a sweep config (configs/scaling/*.yaml) becomes a list of full training configs.

    sweep = load_sweep("configs/scaling/cpu_demo.yaml")
    points = plan_sweep(sweep)            # [Point], every one validated as a pretrain Config
    cfg = point_config(sweep, points[0])  # the pretrain.config.Config that trains it

Grids:
  - `isoflop`: for each compute budget C, `sizes_per_budget` model sizes N log-spaced between
    sqrt(C / (6·tpp_max)) and sqrt(C / (6·tpp_min)) (tpp = tokens per parameter), and tokens
    D = C / (6·N) (`flops: 6nd`, N the total parameter count) or D = C / FLOPs-per-token
    (`flops: exact`, pretrain.flops.flops_per_token); or the listed `params` at every budget.
  - `explicit`: every (N, D) of `params` × `tokens`. With `wsd_branches: true`, each size trains
    once: a warmup-stable-decay run to the largest D (the main run) whose stable phase is checkpointed
    at every other point's cooldown start T − round(`cooldown_fraction`·T); each such point is a
    cooldown branch restored from that checkpoint (pretrain/scaling/runner.py), the same run as a
    WSD run of its own T steps from scratch (same warmup, same data order), for f·T steps instead of T.

Shape rule (`shape:`): the model of target size N is the (d_model, n_layers) whose parameter
count (`shape.params`: non-embedding or total, pretrain.flops.count_params) is closest to N in
log space, with d_model a multiple of head_dim·kv_ratio and d_model / n_layers within a factor 2
of `aspect_ratio` (ties go to the closer aspect ratio); n_heads = d_model / head_dim,
n_kv_heads = n_heads / kv_ratio, d_ff = ff_mult·d_model rounded to `ff_multiple`. Everything
else (vocabulary, norm, MLP type, ...) comes from the base train config.

Rules per size (`lr:`, `batch:`): value = base · (N / at_params)^exponent, clipped to
[min, max], batch rounded to a multiple of `multiple`. Steps = round(D / (batch · seq_len));
the tokens actually trained (steps · batch · seq_len) are what the runs table records.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


from danlu.base.config import ConfigError, apply_override, build, read_yaml_mapping
from pretrain.config import Config, load_config
from pretrain.flops import count_params, flops_per_token, training_flops


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    aspect_ratio: float = 64.0  # d_model / n_layers (Kaplan et al.: loss is flat over 20..200)
    head_dim: int = 64
    kv_ratio: int = 1  # n_heads / n_kv_heads (1: multi-head attention)
    ff_mult: float = 8 / 3  # d_ff / d_model (SwiGLU at the FLOPs of a 4·d GELU MLP)
    ff_multiple: int = 64
    min_layers: int = 1
    max_layers: int = 96
    params: str = "nonembed"  # which count a target N means: nonembed | total


@dataclasses.dataclass(frozen=True)
class PowerRule:
    """value = base · (N / at_params)^exponent, clipped to [min, max]; rounded to `multiple` when > 0."""
    base: float = 1.0
    at_params: float = 1e6
    exponent: float = 0.0
    min: float = 0.0
    max: float = math.inf
    multiple: int = 0

    def __call__(self, n: float) -> float:
        v = min(max(self.base * (n / self.at_params) ** self.exponent, self.min), self.max)
        if self.multiple:
            v = max(self.multiple, self.multiple * round(v / self.multiple))
        return v


@dataclasses.dataclass(frozen=True)
class GridConfig:
    kind: str = "isoflop"  # isoflop | explicit
    budgets: tuple[float, ...] = ()  # FLOPs (isoflop)
    sizes_per_budget: int = 4
    tokens_per_param: tuple[float, ...] = (5.0, 80.0)  # (min, max) D/N of the sizes at each budget
    params: tuple[float, ...] = ()  # isoflop: these sizes at every budget instead; explicit: N values
    tokens: tuple[float, ...] = ()  # explicit: D values (crossed with params)
    flops: str = "6nd"  # how a budget becomes tokens: 6nd (C = 6·N·D) | exact (C = FLOPs/token · D)
    wsd_branches: bool = False  # explicit grid: per size one WSD run to the largest D, cooldown branches for the rest
    cooldown_fraction: float = 0.2  # wsd_branches: the share of each point's steps spent cooling down


@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
    """Token shards built from the embedded demo corpus (danlu/demo.py's sources; built by `danlu sweep`), nothing downloaded."""
    enabled: bool = False
    vocab_size: int = 1024
    max_bytes: int = 8 * 1024 * 1024
    packages: tuple[str, ...] = ()  # installed packages whose .py files join the code (more than the stdlib's ~15 MB)
    eval_split: str = "document"  # or "module": a module's code and its rendered docs on the same side of the split
    eval_fraction: float = 0.02  # share of documents (modules) held out for eval


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """The big run the sweep's fit predicts before it runs (`danlu sweep --predict-run`)."""
    budget_factor: float = 10.0  # × the largest sweep budget
    bootstrap: int = 200


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    base: str = ""  # train config every point starts from (relative to the sweep file)
    overrides: tuple[str, ...] = ()  # dotted key=value applied to every point
    output: str = "runs/scaling"  # runs.csv and one run directory per point
    shape: ShapeRule = ShapeRule()
    grid: GridConfig = GridConfig()
    lr: PowerRule = PowerRule(base=3e-3)
    batch: PowerRule = PowerRule(base=32, multiple=8, min=8)
    warmup_fraction: float = 0.05  # of each run's steps
    eval_points: int = 5  # evaluations per run (the last one is the run's loss)
    log_points: int = 100  # logged steps per run (the loss curve that `danlu fit-curve` reads)
    demo_data: DemoDataConfig = DemoDataConfig()
    predict: PredictConfig = PredictConfig()


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: its shape, size, data and hyperparameters."""
    name: str
    budget: float  # FLOPs the point was planned for (isoflop), 0 for an explicit grid
    target_params: float
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    params: int  # total
    params_nonembed: int
    batch: int
    seq_len: int
    steps: int
    tokens: int
    lr: float
    warmup: int
    flops: float  # exact count (pretrain.flops.flops_per_token × tokens)
    flops_6nd: float
    branch_of: str = ""  # wsd_branches: the point whose stable phase this one branches off ("" for a main run)
    branch_step: int = 0  # wsd_branches: the step where this point's cooldown starts (its branch point)


def load_sweep(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> SweepConfig:
    """Reads a sweep YAML (plus dotted key=value overrides); `base` and `output` stay as written,
    `base` is resolved against the file's directory. Raises ConfigError naming the key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config")
    for item in overrides:
        apply_override(raw, item, "train.steps=200")
    try:
        sweep = build(SweepConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not sweep.base:
        raise ConfigError(f"{path}: `base` (the train config every point starts from) is missing")
    base = Path(sweep.base)
    if not base.is_absolute():
        base = path.parent / base
    sweep = dataclasses.replace(sweep, base=str(base.resolve()))
    check_sweep(sweep)
    return sweep


def check_sweep(s: SweepConfig) -> None:
    """Static checks of a sweep config; each message names the key."""
    g, sh = s.grid, s.shape
    if g.kind not in ("isoflop", "explicit"):
        raise ConfigError(f"grid.kind={g.kind!r} is not one of isoflop, explicit")
    if g.flops not in ("6nd", "exact"):
        raise ConfigError(f"grid.flops={g.flops!r} is not one of 6nd, exact")
    if sh.params not in ("nonembed", "total"):
        raise ConfigError(f"shape.params={sh.params!r} is not one of nonembed, total")
    if g.kind == "isoflop":
        if len(g.budgets) < 1 or any(b <= 0 for b in g.budgets):
            raise ConfigError("grid.budgets: an isoflop grid needs positive FLOP budgets, e.g. [1e12, 3e12, 1e13]")
        if not g.params and (len(g.tokens_per_param) != 2 or not 0 < g.tokens_per_param[0] < g.tokens_per_param[1]):
            raise ConfigError(f"grid.tokens_per_param={list(g.tokens_per_param)}: give [min, max] with 0 < min < max")
        if not g.params and g.sizes_per_budget < 1:
            raise ConfigError("grid.sizes_per_budget must be >= 1 (3 or more for an IsoFLOP parabola)")
    else:
        if not g.params or not g.tokens:
            raise ConfigError("grid: an explicit grid needs both grid.params and grid.tokens lists")
    if g.wsd_branches and (g.kind != "explicit" or len(g.tokens) < 2):
        raise ConfigError("grid.wsd_branches needs kind: explicit and two or more grid.tokens (the largest is the "
                          "main run, the others its cooldown branches)")
    if not 0 < g.cooldown_fraction < 1:
        raise ConfigError(f"grid.cooldown_fraction={g.cooldown_fraction} must be in (0, 1)")
    if any(n <= 0 for n in g.params) or any(d <= 0 for d in g.tokens):
        raise ConfigError("grid.params and grid.tokens must be positive")
    if sh.head_dim <= 0 or sh.head_dim % 2 or sh.kv_ratio < 1 or sh.aspect_ratio <= 0 or sh.ff_multiple <= 0:
        raise ConfigError("shape: need an even head_dim > 0, kv_ratio >= 1, aspect_ratio > 0, ff_multiple > 0")
    if not 1 <= sh.min_layers <= sh.max_layers:
        raise ConfigError(f"shape: need 1 <= min_layers ({sh.min_layers}) <= max_layers ({sh.max_layers})")
    if not 0 <= s.warmup_fraction < 1:
        raise ConfigError(f"warmup_fraction={s.warmup_fraction} must be in [0, 1)")
    if s.eval_points < 1 or s.log_points < 1:
        raise ConfigError("eval_points and log_points must be >= 1")
    if s.demo_data.eval_split not in ("document", "module"):
        raise ConfigError(f"demo_data.eval_split={s.demo_data.eval_split!r} is not one of document, module")
    if not 0 < s.demo_data.eval_fraction < 1:
        raise ConfigError(f"demo_data.eval_fraction={s.demo_data.eval_fraction} must be in (0, 1)")
    if s.predict.budget_factor <= 0 or s.predict.bootstrap < 0:
        raise ConfigError("predict: need budget_factor > 0 and bootstrap >= 0")


def base_config(s: SweepConfig) -> Config:
    """The base train config with the sweep's overrides (and the demo shards' path when built)."""
    return load_config(s.base, list(_data_overrides(s)) + list(s.overrides))


def _data_overrides(s: SweepConfig) -> tuple[str, ...]:
    if not s.demo_data.enabled:
        return ()
    return (f"data.path={demo_shards_dir(s)}", f"model.vocab_size={s.demo_data.vocab_size}")


def demo_shards_dir(s: SweepConfig) -> Path:
    return Path(s.output) / "data" / "shards"


# --- the shape rule ---------------------------------------------------------------------------

def shape_for_params(target: float, model: Any, rule: ShapeRule) -> dict[str, int]:
    """The (d_model, n_layers, n_heads, n_kv_heads, d_ff) whose count (rule.params) is closest to
    `target` in log space among shapes with d_model/n_layers within 2× of rule.aspect_ratio.
    `model` is the base ModelConfig (vocabulary, MLP type, ... are kept)."""
    step = rule.head_dim * rule.kv_ratio
    best, best_score = None, math.inf
    for n_layers in range(rule.min_layers, rule.max_layers + 1):
        lo = max(step, step * math.floor(rule.aspect_ratio * n_layers / 2 / step))
        hi = step * math.ceil(rule.aspect_ratio * n_layers * 2 / step)
        for d in range(lo, hi + 1, step):
            aspect = d / n_layers
            if not rule.aspect_ratio / 2 <= aspect <= rule.aspect_ratio * 2:
                continue
            shape = _shape(d, n_layers, rule)
            n = count_params(dataclasses.replace(model, **shape))[rule.params]
            score = abs(math.log(n / target)) + 0.05 * abs(math.log(aspect / rule.aspect_ratio))
            if score < best_score:
                best, best_score = shape, score
    if best is None:
        raise ConfigError(f"shape: no (d_model, n_layers) for N={target:.3g} within layers "
                          f"[{rule.min_layers}, {rule.max_layers}] and aspect ratio {rule.aspect_ratio}")
    return best


def _shape(d: int, n_layers: int, rule: ShapeRule) -> dict[str, int]:
    n_heads = d // rule.head_dim
    d_ff = max(rule.ff_multiple, rule.ff_multiple * round(rule.ff_mult * d / rule.ff_multiple))
    return {"d_model": d, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads // rule.kv_ratio,
            "head_dim": rule.head_dim, "d_ff": d_ff}


# --- the grid -----------------------------------------------------------------------------------

def _targets(s: SweepConfig) -> list[tuple[float, float, float | None]]:
    """(budget, target N, tokens or None) for every point of the grid."""
    g = s.grid
    out = []
    if g.kind == "explicit":
        for n in g.params:
            for d in g.tokens:
                out.append((0.0, n, d))
        return out
    for c in g.budgets:
        if g.params:
            sizes = list(g.params)
        else:
            lo, hi = (math.sqrt(c / (6 * t)) for t in (g.tokens_per_param[1], g.tokens_per_param[0]))
            k = g.sizes_per_budget
            sizes = [lo * (hi / lo) ** (i / (k - 1)) for i in range(k)] if k > 1 else [math.sqrt(lo * hi)]
        out += [(c, n, None) for n in sizes]
    return out


def plan_sweep(s: SweepConfig) -> list[Point]:
    """Every point of the sweep, each with its shape, tokens, steps and hyperparameters, and each
    validated as a full training config (`point_config`) before any runs. Points of one budget
    that snap to the same shape are kept once."""
    base = base_config(s)
    points, seen = [], set()
    for budget, target, tokens in _targets(s):
        shape = shape_for_params(target, base.model, s.shape)
        key = (budget, tokens, shape["d_model"], shape["n_layers"])
        if key in seen:
            continue
        seen.add(key)
        points.append(_make_point(s, base, budget, target, tokens, shape))
    if s.grid.wsd_branches:
        points = _wsd_branches(s, points)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: two points share a name ({sorted(n for n in names if names.count(n) > 1)}); "
                          f"make the grid's tokens or budgets distinct")
    for p in points:
        point_config(s, p)  # reject the whole sweep before anything runs
    return points


def _wsd_branches(s: SweepConfig, points: list[Point]) -> list[Point]:
    """Per model shape, the point with most steps is the main run; every other point of that shape
    branches off its stable phase at its own cooldown start T − round(f·T), with the main run's
    warmup (so the two schedules agree up to the branch point). Branches come before their main run,
    shortest first: the runner trains the main run up to each branch point in turn."""
    f = s.grid.cooldown_fraction
    out = []
    for shape in dict.fromkeys((p.d_model, p.n_layers) for p in points):
        group = sorted((p for p in points if (p.d_model, p.n_layers) == shape), key=lambda p: p.steps)
        main = group[-1]
        for p in group[:-1]:
            b = p.steps - max(1, round(p.steps * f))
            if b <= main.warmup:
                raise ConfigError(f"sweep point {p.name}: its cooldown would start at step {b}, inside the main run's "
                                  f"warmup ({main.warmup} steps); raise its tokens or lower warmup_fraction")
            out.append(dataclasses.replace(p, warmup=main.warmup, branch_of=main.name, branch_step=b))
        out.append(main)
    return out


def _make_point(s: SweepConfig, base: Config, budget: float, target: float, tokens: float | None,
                shape: dict[str, int], name: str | None = None) -> Point:
    seq = base.data.seq_len
    model = dataclasses.replace(base.model, **shape)
    counts = count_params(model)
    n_rule = counts[s.shape.params]
    batch = int(s.batch(n_rule))
    if tokens is None:  # isoflop: the budget fixes the tokens
        per_token = 6 * counts["total"] if s.grid.flops == "6nd" else flops_per_token(model, seq)["total"]
        tokens = budget / per_token
    steps = max(1, round(tokens / (batch * seq)))
    real_tokens = steps * batch * seq
    if name is None:
        name = (f"C{budget:.2e}_" if budget else f"D{real_tokens:.2e}_") + f"d{shape['d_model']}_L{shape['n_layers']}"
    f = training_flops(model, seq, real_tokens)
    return Point(
        name=name.replace("+", ""), budget=float(budget), target_params=float(target),
        d_model=shape["d_model"], n_layers=shape["n_layers"], n_heads=shape["n_heads"],
        n_kv_heads=shape["n_kv_heads"], d_ff=shape["d_ff"], params=counts["total"],
        params_nonembed=counts["nonembed"], batch=batch, seq_len=seq, steps=steps, tokens=real_tokens,
        lr=float(s.lr(n_rule)), warmup=min(round(s.warmup_fraction * steps), steps - 1),
        flops=f["flops"], flops_6nd=f["flops_6nd"])


def point_overrides(s: SweepConfig, p: Point) -> list[str]:
    """The dotted overrides that turn the base train config into this point's config."""
    every = max(1, p.steps // s.eval_points)
    wsd = []
    if s.grid.wsd_branches:  # checkpoints: a main run keeps one per branch point, a branch restores one
        wsd = ["optimizer.schedule=wsd", f"optimizer.cooldown_fraction={s.grid.cooldown_fraction}",
               "checkpoint.enabled=true", "checkpoint.every=0", f"checkpoint.keep={len(s.grid.tokens) + 1}"]
    return list(_data_overrides(s)) + list(s.overrides) + wsd + [
        f"model.d_model={p.d_model}", f"model.n_layers={p.n_layers}", f"model.n_heads={p.n_heads}",
        f"model.n_kv_heads={p.n_kv_heads}", f"model.head_dim={s.shape.head_dim}", f"model.d_ff={p.d_ff}",
        f"train.global_batch_size={p.batch}", f"train.steps={p.steps}", f"optimizer.lr={p.lr:.6g}",
        f"optimizer.warmup_steps={p.warmup}", f"train.eval_every={every}",
        f"logging.log_every={max(1, p.steps // s.log_points)}", f"train.run_dir={Path(s.output) / p.name}",
        "train.max_seconds=0"]


def point_config(s: SweepConfig, p: Point) -> Config:
    """The full training config of one point; raises ConfigError naming the point."""
    try:
        cfg = load_config(s.base, point_overrides(s, p))
    except ConfigError as e:
        raise ConfigError(f"sweep point {p.name}: {e}") from None
    if cfg.data.eval_batches < 1:
        raise ConfigError(f"sweep point {p.name}: data.eval_batches must be >= 1 (a run's loss is its final eval loss)")
    return cfg


def plan_big_run(s: SweepConfig, n_opt: float, budget: float, params_kind: str, name: str = "predicted") -> Point:
    """The run with `budget` FLOPs at the shape whose parameter count (`params_kind`, the count the
    fit used: total | nonembed) is closest to `n_opt`; tokens from the budget as the grid makes
    them, learning rate and batch from the sweep's rules. Validated like a sweep point."""
    base = base_config(s)
    shape = shape_for_params(n_opt, base.model, dataclasses.replace(s.shape, params=params_kind))
    p = _make_point(s, base, budget, n_opt, None, shape, name=name)
    point_config(s, p)
    return p
