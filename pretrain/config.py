"""One typed, frozen config root, loaded from YAML presets plus dotted ``key=value`` overrides.

A YAML file may start with ``include: [other.yaml, ...]`` (paths relative to the file); included
files are merged first, the including file on top, then the command-line overrides. Unknown keys
are rejected with the list of known ones; impossible combinations are rejected by
:func:`validate` before anything is compiled, each with a message naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from danlu.base.config import ConfigError, apply_override, build, read_yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (multi-head); 1: multi-query; else grouped-query
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: LLaMA rule for swiglu (8/3·d rounded up to 256), 4·d for gelu
    max_seq_len: int = 2048  # RoPE table / learned position table size
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    mlp: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = False
    qk_norm: bool = False
    use_bias: bool = False
    init_std: float = 0.02  # output projections get init_std / sqrt(2 * n_layers) (GPT-2 scaled init)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # float32 | bfloat16
    remat: str = "none"  # none | full | save_dots
    scan_layers: bool = True  # False: a Python loop over layers (same parameters), for debugging
    # xla: jax.nn.dot_product_attention; blocked: causal query blocks as plain matmuls (fastest on CPU);
    # cudnn: NVIDIA GPUs, bf16; splash: TPU Pallas kernel (interpret mode elsewhere, for tests)
    attention: str = "xla"
    attention_block: int = 128  # query block of model.attention=blocked
    segment_masking: bool = True  # packed documents do not attend to each other

    def __post_init__(self):
        # Resolve derived sizes once so every consumer sees concrete ints.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff is None:
            if self.mlp == "swiglu":
                d_ff = int(8 * self.d_model / 3)
                object.__setattr__(self, "d_ff", 256 * math.ceil(d_ff / 256))
            else:
                object.__setattr__(self, "d_ff", 4 * self.d_model)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # -1: the rest of the devices
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # number of slices; the data axis is split across them over DCN


# Logical axis -> mesh axes. Parameters and activations name their axes logically; this table
# decides the physical layout, so changing the parallelism is a config change, not a code change.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("norm", ()),
    ("act_embed", ()),
    ("act_mlp", ("tensor",)),
    ("act_heads", ("tensor",)),
    ("act_vocab", ("tensor",)),
)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False  # weight decay on norm scales
    decay_embeddings: bool = False  # weight decay on token/position embeddings
    decay_biases: bool = False
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    cooldown_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    cooldown_shape: str = "linear"  # wsd: linear | cosine | sqrt (1 - sqrt)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # directory of token shards with manifest.json (see `danlu tokenize`)
    seq_len: int = 256
    shuffle: bool = True
    worker_count: int = 0  # grain worker processes; 0 = in-process
    eval_batches: int = 4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    global_batch_size: int = 32  # sequences per optimizer step, across all devices
    microbatches: int = 1  # gradient accumulation inside the jitted step
    seed: int = 0
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM uses 1e-4)
    vocab_chunk: int = 0  # >0: cross-entropy over vocabulary chunks of this size; full logits never materialised
    loss_chunks: int = 0  # >0: output layer + cross-entropy fused over this many token chunks (see pretrain/loss.py)
    eval_every: int = 100  # 0: only at the end
    run_dir: str = "runs/default"
    max_seconds: float = 0.0  # >0: stop (cleanly, with a final eval) after this many seconds
    stop_at: int = 0  # >0: stop (checkpoint, eval) after this step; the schedule still spans `steps` (WSD branches)
    spike_factor: float = 0.0  # >0: a step whose loss exceeds this x the running median is not applied
    spike_window: int = 32  # steps in the running median
    max_bad_steps: int = 5  # this many skipped (non-finite or spiking) steps in a row trigger bad_step_policy
    bad_step_policy: str = "rollback"  # rollback: to the last checkpoint, skipping those batches | stop


def _build_train(raw: Any, key: str) -> TrainConfig:
    # The config.yaml of older run directories has `test_nan_batches: []`, a test hook now passed to
    # train() (batch_hook): an empty one is dropped so that they still load; a set one is unknown.
    if isinstance(raw, dict) and "test_nan_batches" in raw and not raw["test_nan_batches"]:
        raw = {k: v for k, v in raw.items() if k != "test_nan_batches"}
    return build(TrainConfig, raw, key)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 0  # steps between saves; 0: only at the end
    keep: int = 3  # the latest K checkpoints are kept
    keep_period: int = 0  # >0: also keep every checkpoint whose step is a multiple of this
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True  # only drawn when stdout is a terminal
    # >0: a jax.profiler trace of this many steps, on process 0, into RUN/profile/ (TensorBoard's
    # profile plugin, Perfetto); it starts after step profile_start, and never before this
    # process's first step is done (that step compiles)
    profile_steps: int = 0
    profile_start: int = 3


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-host job find each other; the DANLU_* environment wins."""
    coordinator: str = ""  # host:port of process 0; empty: single process (or `auto`)
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False  # jax.distributed.initialize() with no arguments (TPU pods, SLURM)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    rules: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(default=DEFAULT_RULES,
                                                                       metadata={"build": lambda raw, key: _build_rules(raw)})
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = dataclasses.field(default=TrainConfig(), metadata={"build": _build_train})
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rules"] = {name: list(axes) for name, axes in self.rules}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def _build_rules(raw: Any, key: str = "rules") -> tuple[tuple[str, tuple[str, ...]], ...]:
    if isinstance(raw, (list, tuple)) and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in raw):
        raw = {name: axes for name, axes in raw}
    if not isinstance(raw, dict):
        raise ConfigError("rules: expected a mapping logical axis -> mesh axes, e.g. {embed: [fsdp], mlp: [tensor]}")
    out = []
    for name, axes in raw.items():
        if axes is None:
            axes = []
        if isinstance(axes, str):
            axes = [axes]
        for a in axes:
            if a not in ("data", "fsdp", "tensor"):
                raise ConfigError(f"rules.{name}: unknown mesh axis {a!r}; mesh axes are data, fsdp, tensor")
        out.append((str(name), tuple(axes)))
    return tuple(out)


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML preset (or the defaults when ``path`` is None) and applies ``key=value`` overrides.

    Rejects unknown keys and values of the wrong type; call :func:`validate` for the checks that
    depend on the devices.
    """
    tree = read_yaml(path, includes=True) if path is not None else {}
    for item in overrides:
        apply_override(tree, item)
    cfg = build(Config, tree)
    check_static(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = build(Config, tree)
    check_static(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def check_static(cfg: Config) -> None:
    """Checks that need no devices: choices, positivity, divisibility within the model."""
    m, o, t, d = cfg.model, cfg.optimizer, cfg.train, cfg.data
    _choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    _choice("model.position", m.position, ("rope", "learned"))
    _choice("model.mlp", m.mlp, ("swiglu", "gelu"))
    _choice("model.remat", m.remat, ("none", "full", "save_dots"))
    _choice("model.attention", m.attention, ("xla", "blocked", "cudnn", "splash"))
    _choice("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))
    _choice("model.compute_dtype", m.compute_dtype, ("float32", "bfloat16"))
    _choice("optimizer.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _choice("optimizer.cooldown_shape", o.cooldown_shape, ("linear", "cosine", "sqrt"))
    for key, v in [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model), ("model.n_layers", m.n_layers),
                   ("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads), ("model.head_dim", m.head_dim),
                   ("model.d_ff", m.d_ff), ("model.attention_block", m.attention_block), ("data.seq_len", d.seq_len), ("train.steps", t.steps),
                   ("train.global_batch_size", t.global_batch_size), ("train.microbatches", t.microbatches)]:
        if v is None or v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v}")
    if m.attention == "cudnn" and m.compute_dtype != "bfloat16":
        raise ConfigError("model.attention=cudnn needs model.compute_dtype=bfloat16 (cuDNN flash attention has no fp32 "
                          "kernel); set it, or use model.attention=xla")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (grouped-query attention "
            f"shares each kv head among n_heads/n_kv_heads query heads); choose a divisor of {m.n_heads}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for rotary position embeddings (model.position=rope)")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len or shorten data.seq_len")
    if t.global_batch_size % t.microbatches:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.microbatches={t.microbatches}")
    if t.vocab_chunk < 0 or (t.vocab_chunk and m.vocab_size % t.vocab_chunk):
        raise ConfigError(f"train.vocab_chunk={t.vocab_chunk} must divide model.vocab_size={m.vocab_size} (or be 0 to disable chunking)")
    _choice("train.bad_step_policy", t.bad_step_policy, ("rollback", "stop"))
    if t.spike_factor < 0 or t.spike_window < 2 or t.max_bad_steps < 1:
        raise ConfigError("train: need spike_factor >= 0 (0 disables), spike_window >= 2, max_bad_steps >= 1")
    if t.loss_chunks < 0 or (t.loss_chunks and t.vocab_chunk):
        raise ConfigError("train.loss_chunks and train.vocab_chunk are two ways of chunking the loss: set at most one")
    if t.loss_chunks and ((t.global_batch_size // t.microbatches) * d.seq_len) % t.loss_chunks:
        raise ConfigError(f"train.loss_chunks={t.loss_chunks} must divide the tokens of a microbatch "
                          f"({t.global_batch_size // t.microbatches} x {d.seq_len})")
    if o.lr <= 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or not 0 < o.cooldown_fraction <= 1:
        raise ConfigError("optimizer: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, 0 < cooldown_fraction <= 1")
    if not 0 <= t.stop_at <= t.steps:
        raise ConfigError(f"train.stop_at={t.stop_at} must be in [0, train.steps={t.steps}] (0: run to the end)")
    if o.warmup_steps >= t.steps and o.schedule != "constant":
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be smaller than train.steps={t.steps}")
    for key, v in [("mesh.data", cfg.mesh.data), ("mesh.fsdp", cfg.mesh.fsdp), ("mesh.tensor", cfg.mesh.tensor)]:
        if v == 0 or v < -1:
            raise ConfigError(f"{key}={v}: use a positive size, or -1 for the rest of the devices")
    if sum(v == -1 for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if cfg.mesh.dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data={cfg.mesh.dcn_data} must be >= 1 (number of slices)")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1")
    if cfg.logging.profile_steps < 0 or cfg.logging.profile_start < 1:
        raise ConfigError(f"logging: need profile_steps >= 0 (0: no trace) and profile_start >= 1 (the first step "
                          f"compiles), got {cfg.logging.profile_steps} and {cfg.logging.profile_start}")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Returns concrete {data, fsdp, tensor} sizes; ``data`` includes the DCN (slice) factor."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    if num_devices % mesh.dcn_data:
        raise ConfigError(f"mesh.dcn_data={mesh.dcn_data} slices do not divide the {num_devices} devices")
    per_slice = num_devices // mesh.dcn_data
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if per_slice % fixed:
            raise ConfigError(
                f"mesh: the fixed axes ({' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed}) "
                f"do not divide the {per_slice} devices per slice; -1 cannot fill the rest")
        rest = per_slice // fixed
        sizes = {k: (rest if v == -1 else v) for k, v in sizes.items()}
    total = math.prod(sizes.values())
    if total > per_slice:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {total} is larger than the "
            f"{per_slice} devices available (per slice); shrink an axis or set one to -1")
    if total < per_slice:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {total} uses only {total} of {per_slice} devices per slice; "
            f"set one axis to -1 to use them all")
    sizes["data"] *= mesh.dcn_data
    return sizes


def validate(cfg: Config, num_devices: int, process_count: int = 1) -> dict[str, int]:
    """Checks that depend on the devices; returns the resolved mesh shape. Call before compiling."""
    check_static(cfg)
    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    m, t = cfg.model, cfg.train
    tp = shape["tensor"]
    if m.n_heads % tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tp}; choose mesh.tensor dividing {m.n_heads}")
    if m.n_kv_heads % tp:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} is not divisible by mesh.tensor={tp}; the kv heads are sharded over "
            f"the tensor axis: choose mesh.tensor dividing {m.n_kv_heads} or raise model.n_kv_heads")
    if m.d_ff % tp:
        raise ConfigError(f"model.d_ff={m.d_ff} is not divisible by mesh.tensor={tp}")
    if m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by mesh.tensor={tp}; pad the vocabulary to a multiple of {tp}")
    batch_shards = shape["data"] * shape["fsdp"]
    micro = t.global_batch_size // t.microbatches
    if t.global_batch_size % batch_shards:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by mesh data*fsdp={batch_shards}; "
            f"use a multiple of {batch_shards}")
    if micro % batch_shards:
        raise ConfigError(
            f"the microbatch size train.global_batch_size/train.microbatches={micro} is not divisible by mesh "
            f"data*fsdp={batch_shards}; lower train.microbatches or raise train.global_batch_size")
    if t.global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by the {process_count} processes")
    fsdp = shape["fsdp"]
    if m.d_model % fsdp:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}; parameters are sharded on the embed axis")
    return shape
