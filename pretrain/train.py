"""The pure train step, sharded state creation, and the `danlu train` loop.

``build(cfg)`` returns everything needed to step: the mesh, the sharded state and the jitted
``train_step(state, batch) -> (state, metrics)``. ``train(cfg)`` is the loop, read top to bottom:
`_setup` (mesh, data, state fresh or restored, checkpoint manager, writers), then per step `_step`
(dispatch, lagged metric read-back), `_roll_back` when bad steps persist, `_evaluate`,
`_checkpoint`; `_close` and the summary. The loop's changing state is one `LoopState`.

Everything the loop writes goes through `danlu.base.fs` (local paths and fsspec URLs alike),
checkpoints through orbax (local paths and gs://).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from danlu.base import fs
from pretrain import checkpoint as ckpt_lib
from pretrain.config import Config, ConfigError
from pretrain.data import make_eval_batches, make_train_iterator
from pretrain.flops import flops_per_token, peak_flops_per_device
from pretrain.loss import cross_entropy, fused_cross_entropy
from pretrain.model import Decoder, init_model
from pretrain.optimizer import make_optimizer
from pretrain.sharding import axis_rules, check_divisible, logical_to_spec, make_mesh, param_specs, shard

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # pure dict of arrays, the structure of nnx.state(Decoder)
    opt_state: Any
    loss_history: jax.Array  # [train.spike_window] fp32: losses of the latest applied steps (NaN: empty)


@dataclasses.dataclass
class Built:
    cfg: Config
    mesh: Mesh
    graphdef: Any
    abstract_state: nnx.State  # the model's variables as ShapeDtypeStructs, with metadata
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    state_sharding: TrainState
    batch_sharding: NamedSharding
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[dict, dict], dict]


def merge_model(graphdef, abstract_state: nnx.State, params: dict) -> Decoder:
    """Rebuilds the NNX module from a pure params dict (inside jit: a functional view, no copies)."""
    state = jax.tree.map(lambda v: v, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _nest(flat: list[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for path, value in flat:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def loss_sums(model: Decoder, batch: dict, cfg: Config) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(objective = ce + z_loss·z, ce, z, number of target tokens) for one batch, all sums."""
    batch = {k: shard(v, ("batch", "length")) for k, v in batch.items()}
    hidden_BxTxD = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    weights_BxT = batch["segment_ids"] > 0  # segment 0 is padding
    n = jnp.sum(weights_BxT).astype(jnp.float32)
    with jax.named_scope("loss"):  # the output layer and cross-entropy, by this name in profiles
        if cfg.train.loss_chunks:
            total, ce, z = fused_cross_entropy(hidden_BxTxD, model.unembedding(), batch["targets"], weights_BxT,
                                               cfg.train.z_loss, cfg.train.loss_chunks)
            return total, ce, z, n
        ce, z = cross_entropy(hidden_BxTxD, model.unembedding(), batch["targets"], weights_BxT,
                              vocab_chunk=cfg.train.vocab_chunk)
        return ce + cfg.train.z_loss * z, ce, z, n


def make_train_step(cfg: Config, graphdef, abstract_state, optimizer, schedule, param_sharding=None):
    """The pure step: microbatched gradients (summed, then divided by the batch's token count, so k
    microbatches equal one full batch), global-norm clipping and AdamW inside the optimizer."""
    micro, t = cfg.train.microbatches, cfg.train

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        n_tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32), 1.0)

        def loss_fn(params, mb):
            total, ce, z, _ = loss_sums(merge_model(graphdef, abstract_state, params), mb, cfg)
            return total / n_tokens, (ce, z)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if micro == 1:
            (_, (ce, z)), grads = grad_fn(state.params, batch)
        else:
            # Microbatch i takes rows i, i+k, i+2k, ...: every device keeps working on its own rows.
            mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, mb):
                g_acc, ce_acc, z_acc = carry
                (_, (ce, z)), g = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            if param_sharding is not None:
                zeros = jax.lax.with_sharding_constraint(zeros, param_sharding)
            (grads, ce, z), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), mbs)
        with jax.named_scope("optimizer"):
            loss, grad_norm = ce / n_tokens, optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)

            # Guard rail: a non-finite step, or a loss above spike_factor x the running median, is
            # not applied (parameters and optimizer state stay as they were) and is reported.
            history = state.loss_history
            median = jnp.nanmedian(history)
            filled = jnp.sum(~jnp.isnan(history))
            spike = (t.spike_factor > 0) & (filled >= history.shape[0] // 2) & (loss > t.spike_factor * median)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~spike
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            history = jnp.where(ok, jnp.roll(history, 1).at[0].set(loss), history)
            metrics = {"loss": loss, "z_loss": z / n_tokens, "grad_norm": grad_norm, "lr": schedule(state.step),
                       "tokens": n_tokens, "skipped": (~ok).astype(jnp.float32), "spike": spike.astype(jnp.float32),
                       "loss_median": median}
            new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                                   opt_state=keep(opt_state, state.opt_state), loss_history=history)
        return new_state, metrics

    return train_step


def make_eval_step(cfg: Config, graphdef, abstract_state):
    def eval_step(params: dict, batch: dict) -> dict:
        _, ce, _, n = loss_sums(merge_model(graphdef, abstract_state, params), batch, cfg)
        return {"ce_sum": ce, "tokens": n}
    return eval_step


def build(cfg: Config, devices=None, mesh: Mesh | None = None, *, abstract: bool = False) -> Built:
    """Validates the config and makes the mesh (`make_mesh`; or takes ``mesh``, made by
    ``make_mesh(cfg, ...)``, which validated ``cfg`` for it), creates the sharded state and jits the steps.

    State is created sharded without ever being materialised whole: ``eval_shape`` gives shapes,
    the rules table gives shardings, and ``jit(init, out_shardings=...)`` creates each shard in place.
    ``abstract=True`` allocates nothing: ``state`` is a tree of ``ShapeDtypeStruct`` carrying the
    shardings, for ``train_step.lower(state, batch).compile()`` ahead of time (devices may then be
    compile-only TPU devices of a topology, see pretrain/aot.py).
    """
    mesh = mesh or make_mesh(cfg, devices)  # validates the config for these devices
    platform = mesh.devices.flat[0].platform
    if cfg.model.attention == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention=cudnn needs NVIDIA GPUs, these devices are {platform}; use model.attention=xla")
    rules = cfg.rules

    abstract_model = nnx.eval_shape(lambda: init_model(cfg.model, cfg.train.seed))
    graphdef, abstract_state = nnx.split(abstract_model)
    specs = param_specs(abstract_state, rules)
    check_divisible(abstract_state, specs, mesh)
    spec_flat = [(path, spec) for path, spec in nnx.to_flat_state(specs)]
    param_sharding = _nest([(path, NamedSharding(mesh, spec)) for path, spec in spec_flat])

    optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    replicated = NamedSharding(mesh, P())

    def init_state() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(init_model(cfg.model, cfg.train.seed)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          loss_history=jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32))

    shapes = jax.eval_shape(init_state)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, s: s, shapes.opt_state, param_sharding,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
    state_sharding = TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding, loss_history=replicated)
    if abstract:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sharding)
    else:
        with axis_rules(mesh, rules):
            state = jax.jit(init_state, out_shardings=state_sharding)()

    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))
    step_fn = make_train_step(cfg, graphdef, abstract_state, optimizer, schedule, param_sharding)
    eval_fn = make_eval_step(cfg, graphdef, abstract_state)

    def traced(fn):  # the rules must be active while jit traces the step
        @functools.wraps(fn)  # its name, train_step / eval_step, is the executable's in profiles and HLO dumps
        def wrapped(*args):
            with axis_rules(mesh, rules):
                return fn(*args)
        return wrapped

    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    train_step = jax.jit(traced(step_fn), in_shardings=(state_sharding, batch_shardings),
                         out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(traced(eval_fn), in_shardings=(param_sharding, batch_shardings), out_shardings=replicated)
    return Built(cfg, mesh, graphdef, abstract_state, optimizer, schedule, state, state_sharding,
                 batch_sharding, train_step, eval_step)


def global_batch(local: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
    """Assembles this process's rows [B / processes, T] into global arrays [B, T] (explicit transfer)."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local[k], dtype=np.int32)
        out[k] = jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:])
    return out


# ---------------------------------------------------------------------------------------------
# The loop. `train` reads top to bottom; setup, one step, evaluation, checkpoint and roll-back are
# small functions of the run (set up once) and the loop state (what changes from step to step).


def _init_distributed(dist) -> None:
    """Joins a multi-process job described by the environment (DANLU_COORDINATOR,
    DANLU_NUM_PROCESSES, DANLU_PROCESS_ID, as `danlu launch local` sets them) or by the config's
    ``distributed`` section; ``distributed.auto`` lets JAX discover the job (TPU pods, SLURM)."""
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("DANLU_COORDINATOR") or dist.coordinator
    if coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices (fake pods)
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ.get("DANLU_NUM_PROCESSES", dist.num_processes)),
            process_id=int(os.environ.get("DANLU_PROCESS_ID", dist.process_id)))
    elif dist.auto:
        jax.distributed.initialize()


def _in_run(run_dir: str, name: str) -> str:
    """``run_dir/name`` for a local path and a URL alike (pathlib would fold a URL's ``//``)."""
    return f"{run_dir.rstrip('/')}/{name}"


def _resolve_run_dir(cfg: Config, run_dir: str) -> str:
    """The run directory as a local path (as pathlib writes it) or a URL. Refuses a URL that the
    checkpoints cannot go to, before anything is compiled."""
    local = fs.local_path(run_dir)
    if local is not None:
        return str(Path(local))
    if cfg.checkpoint.enabled and not ckpt_lib.can_write(run_dir):
        raise ConfigError(
            f"train.run_dir={cfg.train.run_dir}: checkpoints are written by orbax, which writes local directories "
            f"and gs:// URLs only; use one of those (or a bucket mounted as a local directory through "
            f"${fs.MOUNTS_ENV}), or set checkpoint.enabled=false")
    return run_dir.rstrip("/")


class _EventFileAtURL:
    """A TensorBoard event file at a URL: object stores have no append, so the records are kept and
    the object is rewritten whole at each of tensorboardX's flushes (every 120 s and at close), as
    tensorboardX's own GCSRecordWriter does."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        fs.rewrite(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFilesAtURLs:
    """tensorboardX's writer factory for a URL scheme (``record_writer.register_writer_factory``)."""

    def open(self, path: str) -> _EventFileAtURL:
        return _EventFileAtURL(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def _truncate_metrics(run_dir: str, step: int) -> list[str]:
    """Drops the rows past ``step`` (0 on a fresh start) that a run which died left behind, so that
    metrics.jsonl reads as one uninterrupted run; returns the rows kept, each with its newline.
    Rewritten at once (`fs.rewrite`: a temporary file renamed over it, or one object upload)."""
    path = _in_run(run_dir, "metrics.jsonl")
    if jax.process_index() != 0:
        return []
    try:
        with fs.open_input(path) as f:
            text = f.read().decode()
    except FileNotFoundError:
        return []
    rows = [line + "\n" for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= step]
    fs.rewrite(path, "".join(rows).encode())
    return rows


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events in the run directory; only process 0 writes.

    Opening drops the rows past ``resume_step`` (`_truncate_metrics`). A local metrics.jsonl is
    appended to and flushed row by row. An object store has no append: at a URL the rows are kept
    here and the object is rewritten whole, as rows come but at most every ``REWRITE_EVERY_S``
    seconds, and at every `flush` (the loop flushes before each checkpoint) and at `close`; a reader
    sees a complete earlier version, never half a row. TensorBoard event files at a URL are kept
    and rewritten the same way (`_EventFileAtURL`).
    """

    REWRITE_EVERY_S = 5.0  # object stores take about one update of an object per second (GCS)

    def __init__(self, run_dir: str, tensorboard: bool, resume_step: int):
        self.run_dir, self.path = run_dir, _in_run(run_dir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.file = None  # a local metrics.jsonl, open for appending
        self.rows: list[str] = []  # a URL's rows, each with its newline
        self.unwritten, self.written_at = False, -math.inf  # a URL's rows not yet in its object; when they last were
        self.tb = None
        if not self.enabled:
            return
        kept = _truncate_metrics(run_dir, resume_step)
        local = fs.local_path(run_dir) is not None
        if local:
            self.file = open(self.path, "a")
        else:
            self.rows = kept
        if tensorboard:
            from tensorboardX import SummaryWriter, record_writer
            if not local:  # tensorboardX picks the writer by the URL's scheme
                record_writer.register_writer_factory(run_dir.split("://")[0], _EventFilesAtURLs())
            self.tb = SummaryWriter(_in_run(run_dir, "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:
            self.rows.append(line)
            self.unwritten = True
            if time.monotonic() - self.written_at >= self.REWRITE_EVERY_S:
                self.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        """Brings a URL's metrics.jsonl up to date (a local one always is)."""
        if self.unwritten:
            fs.rewrite(self.path, "".join(self.rows).encode())
            self.unwritten, self.written_at = False, time.monotonic()

    def truncate(self, step: int) -> None:
        """Forgets the rows past ``step`` (after a roll-back) and goes on."""
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
            _truncate_metrics(self.run_dir, step)
            self.file = open(self.path, "a")
        else:
            self.rows = [line for line in self.rows if json.loads(line)["step"] <= step]
            self.unwritten = True
            self.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        self.flush()
        if self.tb is not None:
            self.tb.close()


def evaluate(built: Built, params: dict, batches: list[dict]) -> float:
    """Mean token cross-entropy over global eval batches (dispatched together, read back once)."""
    outs = jax.device_get([built.eval_step(params, batch) for batch in batches])
    ce, n = sum(float(o["ce_sum"]) for o in outs), sum(float(o["tokens"]) for o in outs)
    return ce / max(n, 1.0)


class TrainingStopped(RuntimeError):
    """Raised when bad steps persist and train.bad_step_policy says stop (or nothing to roll back to)."""


class StepTrace:
    """A jax.profiler trace of steps (begin, begin + n] on process 0, written to RUN/profile/
    (plugins/profile/<time>/*.xplane.pb and *.trace.json.gz). begin is logging.profile_start,
    or this process's first step when it started past that: the trace never holds the compile. A
    run directory at a URL gets the trace copied there when it stops."""

    def __init__(self, cfg: Config, run_dir: str, start_step: int, log: Callable[[str], None]):
        self.steps = cfg.logging.profile_steps if jax.process_index() == 0 else 0
        self.begin = max(cfg.logging.profile_start, start_step + 1)
        self.run_dir, self.log, self.local, self.active, self.done = run_dir, log, None, False, False

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched."""
        if self.steps and step == self.begin + 1 and not (self.active or self.done):
            self.local = fs.local_path(_in_run(self.run_dir, "profile"))
            if self.local is None:
                import tempfile
                self.local = tempfile.mkdtemp(prefix="danlu-profile-")
            jax.profiler.start_trace(self.local)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        """Called after step `step` is dispatched: the trace stops once it has run."""
        if self.active and step >= self.begin + self.steps:
            self.stop(state)

    def stop(self, state: Any) -> None:
        if not self.active:
            return
        jax.block_until_ready(state)  # the traced steps have run, not only been dispatched
        jax.profiler.stop_trace()
        self.active, self.done = False, True
        target = _in_run(self.run_dir, "profile")
        if fs.local_path(target) is None:
            fs.put_dir(self.local, target)
        self.log(f"profile of steps {self.begin + 1}-{self.begin + self.steps} written to {target}")


@dataclasses.dataclass
class Run:
    """What `train` sets up once: the loop reads it, and writes through its writers."""
    cfg: Config
    built: Built
    run_dir: str  # a local path, or a URL (gs://, memory://) that no $DANLU_MOUNTS entry covers
    train_iter: Any  # this process's rows of every batch (pretrain.data.TrainIterator); its position is checkpointed
    eval_batches: list[dict]  # global arrays [B, T], assembled once
    manager: Any  # orbax CheckpointManager; None with checkpoint.enabled=false
    writer: MetricsWriter
    trace: StepTrace  # logging.profile_steps
    bar: Any  # tqdm progress bar, or None
    log: Callable[[str], None]
    batch_hook: Callable[[int, dict], dict] | None
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float  # of all the devices; NaN when unknown (mfu is then NaN)


@dataclasses.dataclass
class LoopState:
    """What changes from step to step; ``state`` is the device state, donated to every step."""
    state: TrainState
    step: int  # steps taken (state.step without reading the device)
    start_step: int = 0  # where this process started (0, or the restored checkpoint's step)
    # data indices never to train on again (they led to bad steps)
    skip_batches: set[int] = dataclasses.field(default_factory=set)
    pending: tuple[int, dict] | None = None  # (step, metrics) dispatched, not yet read back
    data_index_of: dict[int, int] = dataclasses.field(default_factory=dict)  # step -> index of the batch it trained on
    bad_run: list[int] = dataclasses.field(default_factory=list)  # data indices of the current run of skipped steps
    eval_at: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> eval loss of its params, until logged
    last_eval: float | None = None
    first_loss: float | None = None
    last_loss: float = float("nan")
    # the losses of the steps applied since the last logged row (its loss_mean)
    interval_losses: list[float] = dataclasses.field(default_factory=list)
    counts: dict = dataclasses.field(default_factory=lambda: {
        "skipped_steps": 0, "rollbacks": 0, "checkpoint_blocked_s": 0.0, "checkpoints": 0})
    t_start: float = 0.0
    t_last: float = 0.0  # time and step of the last logged row (its step_time spans the steps since)
    step_last: int = 0
    stopped_early: bool = False


def _setup(cfg: Config, run_dir: str, devices, log: Callable[[str], None],
           batch_hook: Callable[[int, dict], dict] | None) -> tuple[Run, LoopState]:
    """Processes, config checks, mesh, run directory, data, sharded state (fresh, or the newest
    readable checkpoint), checkpoint manager, writers."""
    _init_distributed(cfg.distributed)
    devices = devices if devices is not None else jax.devices()
    mesh = make_mesh(cfg, devices)  # validates the config for these devices
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a directory of token shards made by `danlu tokenize`")
    run_dir = _resolve_run_dir(cfg, run_dir)
    t = cfg.train
    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0:
        fs.write_text(_in_run(run_dir, "config.yaml"), cfg.to_yaml())

    # Data: this process's rows of every global batch, and the fixed eval batches.
    train_iter = make_train_iterator(cfg.data, t.global_batch_size, seed=t.seed, process_index=pid,
                                     process_count=nproc, start_step=0, vocab_size=cfg.model.vocab_size)
    eval_local = make_eval_batches(cfg.data, t.global_batch_size, cfg.data.eval_batches,
                                   process_index=pid, process_count=nproc, vocab_size=cfg.model.vocab_size
                                   ) if cfg.data.eval_batches else []

    # State: created sharded, then replaced by the newest readable checkpoint, if there is one.
    built = build(cfg, mesh=mesh)
    eval_batches = [global_batch(b, built.batch_sharding, t.global_batch_size) for b in eval_local]
    ckpt_dir = _in_run(run_dir, "checkpoints")
    manager = ckpt_lib.make_manager(ckpt_dir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    loop = LoopState(state=built.state, step=0)
    if _restore(loop, manager, built, train_iter, log):
        log(f"resumed from {ckpt_dir} at step {loop.step}")
    loop.start_step = loop.step

    # Outputs: metrics (rows past the start step, left by a run that died, dropped), FLOPs for mfu.
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, resume_step=loop.start_step)
    try:
        peak = peak_flops_per_device(devices[0]) * len(devices)
    except ValueError as e:  # an accelerator missing from the table: train anyway, mfu unknown
        log(f"warning: {e}; mfu is logged as NaN")
        peak = float("nan")
    bar = None
    if cfg.logging.progress_bar and sys.stdout.isatty() and pid == 0:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=loop.start_step, unit="step", dynamic_ncols=True)
    trace = StepTrace(cfg, run_dir, loop.start_step, log)
    run = Run(cfg, built, run_dir, train_iter, eval_batches, manager, writer, trace, bar, log, batch_hook,
              tokens_per_step=t.global_batch_size * cfg.data.seq_len,
              flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["total"], peak_flops=peak)
    loop.t_start = loop.t_last = time.perf_counter()
    loop.step_last = loop.start_step
    return run, loop


def _restore(loop: LoopState, manager, built: Built, train_iter, log: Callable[[str], None]) -> bool:
    """Puts the newest readable checkpoint's state, data position and skipped batches into the loop;
    False if there is none (or checkpoints are disabled)."""
    restored = ckpt_lib.restore_latest(manager, built.state, built.state_sharding, log) if manager else None
    if restored is None:
        return False
    loop.state, data, _ = restored
    loop.step = int(loop.state.step)
    train_iter.set_state(data["iterator"])
    loop.skip_batches |= set(data.get("skip", []))
    return True


def _next_batch(run: Run, loop: LoopState) -> tuple[int, dict]:
    """(data index, global batch [B, T]) of the next batch not to be skipped."""
    while True:
        index = run.train_iter.step
        local = next(run.train_iter)
        if run.batch_hook is not None:
            local = run.batch_hook(index, local)
        if index not in loop.skip_batches:
            return index, global_batch(local, run.built.batch_sharding, run.cfg.train.global_batch_size)


def _step(run: Run, loop: LoopState) -> None:
    """One step: dispatches step N, then reads back step N-1's metrics, which are ready by now
    (reading them first would leave the device idle)."""
    index, batch = _next_batch(run, loop)
    run.trace.before(loop.step + 1)
    loop.state, metrics = run.built.train_step(loop.state, batch)
    loop.step += 1
    run.trace.after(loop.step, loop.state)
    loop.data_index_of[loop.step] = index
    loop.data_index_of.pop(loop.step - 4, None)
    if loop.pending is not None:
        _report(run, loop, *loop.pending)
    loop.pending = (loop.step, metrics)


def _report(run: Run, loop: LoopState, step: int, metrics: dict, force: bool = False) -> None:
    """Reads back one step's metrics: a skipped step is counted and said; at log_every (or forced,
    or with an eval loss to log) a row goes to metrics.jsonl and TensorBoard, and a line to the log."""
    t = run.cfg.train
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if m["skipped"]:
        loop.counts["skipped_steps"] += 1
        index = loop.data_index_of[step]
        loop.bad_run.append(index)
        why = f"loss {m['loss']:.4g} > {t.spike_factor:g} x median {m['loss_median']:.4g}" if m["spike"] else \
            f"non-finite loss {m['loss']} or grad norm {m['grad_norm']}"
        run.log(f"step {step} not applied: {why} (batch {index}; {len(loop.bad_run)} in a row)")
    else:
        loop.bad_run.clear()
        loop.last_loss = m["loss"]
        loop.first_loss = m["loss"] if loop.first_loss is None else loop.first_loss
        loop.interval_losses.append(m["loss"])
    if step % run.cfg.logging.log_every and not force and step not in loop.eval_at:
        return
    now = time.perf_counter()
    dt = (now - loop.t_last) / max(step - loop.step_last, 1)
    tps = run.tokens_per_step / dt
    loss_mean = sum(loop.interval_losses) / len(loop.interval_losses) if loop.interval_losses else None
    loop.interval_losses.clear()
    row = {"step": step, "loss": m["loss"], "loss_mean": loss_mean, "lr": m["lr"], "grad_norm": m["grad_norm"],
           "z_loss": m["z_loss"], "tokens_per_sec": tps, "step_time": dt,
           "mfu": tps * run.flops_per_token / run.peak_flops, "tokens": step * run.tokens_per_step,
           "elapsed": now - loop.t_start, "skipped_steps": loop.counts["skipped_steps"]}
    if step in loop.eval_at:
        row["eval_loss"] = loop.eval_at.pop(step)
    run.writer.write(row)
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{m['loss']:.3f}", eval=f"{loop.last_eval:.3f}" if loop.last_eval else "-",
                            mfu=f"{row['mfu']:.1%}")
    elif jax.process_index() == 0:
        extra = f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
        run.log(f"step {step:6d} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} {tps:,.0f} tok/s mfu {row['mfu']:.1%}")
    loop.t_last, loop.step_last = time.perf_counter(), step


def _roll_back(run: Run, loop: LoopState) -> None:
    """Bad steps persist: stops (train.bad_step_policy=stop), or goes back to the newest checkpoint
    and never trains on the culprit batches again. Raises TrainingStopped when it cannot go on."""
    culprits = sorted(loop.bad_run)
    if run.cfg.train.bad_step_policy == "stop":
        raise TrainingStopped(f"{len(culprits)} steps in a row were not applied (batches {culprits}); "
                              f"stopping as train.bad_step_policy=stop says")
    loop.skip_batches.update(culprits)
    loop.pending, loop.bad_run = None, []
    if run.manager is not None:
        run.manager.wait_until_finished()
    if not _restore(loop, run.manager, run.built, run.train_iter, run.log):
        raise TrainingStopped(f"{len(culprits)} steps in a row were not applied (batches {culprits}) and "
                              f"there is no checkpoint to roll back to; lower optimizer.lr or enable checkpoints")
    loop.counts["rollbacks"] += 1
    run.writer.truncate(loop.step)
    run.log(f"rolled back to the checkpoint of step {loop.step}; batches {culprits} will be skipped")


def _evaluate(run: Run, loop: LoopState, stopping: bool) -> None:
    """Every train.eval_every steps, at the last step and when stopping early: the eval loss of this
    step's parameters, logged with this step's row."""
    t = run.cfg.train
    if run.eval_batches and (loop.step == t.steps or stopping or (t.eval_every and loop.step % t.eval_every == 0)):
        loop.last_eval = loop.eval_at[loop.step] = evaluate(run.built, loop.state.params, run.eval_batches)


def _save(run: Run, loop: LoopState, force: bool = False) -> None:
    """Starts an (asynchronous) checkpoint of this step: the state, the data position and the
    batches to skip. The metrics logged so far reach the run directory first."""
    run.writer.flush()
    data = {"iterator": run.train_iter.get_state(), "skip": sorted(loop.skip_batches)}
    loop.counts["checkpoint_blocked_s"] += ckpt_lib.save(run.manager, loop.step, loop.state, data,
                                                         run.cfg.to_dict(), force=force)
    loop.counts["checkpoints"] += 1


def _checkpoint(run: Run, loop: LoopState) -> None:
    """Every checkpoint.every steps, except in the middle of a run of bad steps: that checkpoint
    would be the one to roll back to."""
    every = run.cfg.checkpoint.every
    if run.manager is not None and every and loop.step % every == 0 and not loop.bad_run:
        _save(run, loop)


def _close(run: Run, loop: LoopState) -> None:
    """Runs however the loop ended: a checkpoint of the last step (unless it has one), the
    saves in flight finished, the writers closed."""
    if run.bar is not None:
        run.bar.close()
    run.trace.stop(loop.state)
    if run.manager is not None:
        if loop.step > loop.start_step and run.manager.latest_step() != loop.step:
            _save(run, loop, force=True)
        run.manager.wait_until_finished()
        run.manager.close()
    run.writer.close()


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask for a checkpoint and a clean stop: yields the list
    the signals are appended to; a second signal stops at once (KeyboardInterrupt)."""
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        if stop_signal:
            raise KeyboardInterrupt
        stop_signal.append(signum)

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, on_signal)
    try:
        yield stop_signal
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def train(cfg: Config, devices=None, *, log: Callable[[str], None] = print,
          batch_hook: Callable[[int, dict], dict] | None = None) -> dict:
    """Runs (or resumes) training; returns a summary with the final train and eval losses.

    Everything goes to ``train.run_dir``: a local directory, a URL under a bucket mounted through
    $DANLU_MOUNTS (written as local files), or another URL (gs://, written through fsspec;
    checkpoints through orbax). ``batch_hook(index, batch) -> batch``, for tests, rewrites this
    process's rows [B / processes, T] of data batch ``index`` before it is trained on
    (tests/test_resume.py makes NaN losses with it).
    """
    run_dir = fs.mounted(cfg.train.run_dir)  # a URL under a mounted bucket is written as local files
    # --- setup: mesh, data, state (fresh or restored), checkpoint manager, writers ------------
    run, loop = _setup(cfg, run_dir, devices, log, batch_hook)
    t = cfg.train

    # --- loop: dispatch step N, read back step N-1; SIGTERM / SIGINT stop with a checkpoint ---
    with _stop_requests() as stop_signal:
        try:
            while loop.step < (t.stop_at or t.steps):
                _step(run, loop)
                if len(loop.bad_run) >= t.max_bad_steps:  # bad steps persist: roll back or stop
                    _roll_back(run, loop)
                    continue
                stopping = bool(stop_signal) \
                    or (bool(t.max_seconds) and time.perf_counter() - loop.t_start > t.max_seconds) \
                    or (bool(t.stop_at) and t.stop_at <= loop.step < t.steps)
                _evaluate(run, loop, stopping)
                if run.bar is not None:
                    run.bar.update(1)
                _checkpoint(run, loop)
                if stopping:
                    loop.stopped_early = True
                    if stop_signal:
                        log(f"received signal {signal.Signals(stop_signal[0]).name} at step {loop.step}: "
                            f"saving a checkpoint and stopping; rerun the same command to continue")
                    break
            if loop.pending is not None:
                _report(run, loop, *loop.pending, force=True)
        finally:
            _close(run, loop)

    # --- summary --------------------------------------------------------------------------------
    summary = {"run_dir": run.run_dir, "steps": loop.step, "first_loss": loop.first_loss,
               "final_loss": loop.last_loss, "final_eval_loss": loop.last_eval, "stopped_early": loop.stopped_early,
               "signal": signal.Signals(stop_signal[0]).name if stop_signal else None,
               "seconds": time.perf_counter() - loop.t_start, **loop.counts}
    if jax.process_index() == 0:
        fs.write_text(_in_run(run.run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
