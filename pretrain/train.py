"""The pure train step, sharded state creation, and the `danlu train` loop.

``build(cfg)`` returns everything needed to step: the mesh, the sharded state and the jitted
``train_step(state, batch) -> (state, metrics)``. ``train(cfg)`` is the loop, one function read
top to bottom: setup, data, state (fresh or restored), steps with lagged metric read-back,
evaluation, checkpoints, summary.
"""

from __future__ import annotations

import dataclasses
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

from pretrain import checkpoint as ckpt_lib
from pretrain.config import Config, ConfigError, validate
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
    """Validates the config, makes the mesh, creates the sharded state and jits the steps.

    State is created sharded without ever being materialised whole: ``eval_shape`` gives shapes,
    the rules table gives shardings, and ``jit(init, out_shardings=...)`` creates each shard in place.
    ``abstract=True`` allocates nothing: ``state`` is a tree of ``ShapeDtypeStruct`` carrying the
    shardings, for ``train_step.lower(state, batch).compile()`` ahead of time (devices may then be
    compile-only TPU devices of a topology, see pretrain/aot.py).
    """
    mesh = mesh or make_mesh(cfg, devices)
    validate(cfg, mesh.devices.size, jax.process_count())
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
# The loop


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


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events; only process 0 writes."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.run_dir = run_dir
        self.enabled = jax.process_index() == 0
        self.file = open(run_dir / "metrics.jsonl", "a") if self.enabled else None
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def truncate(self, step: int) -> None:
        """Forgets the rows past ``step`` (after a roll-back) and goes on appending."""
        if self.enabled:
            self.file.close()
            _truncate_metrics(self.run_dir, step)
            self.file = open(self.run_dir / "metrics.jsonl", "a")

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def evaluate(built: Built, params: dict, batches: list[dict]) -> float:
    """Mean token cross-entropy over global eval batches (dispatched together, read back once)."""
    outs = jax.device_get([built.eval_step(params, batch) for batch in batches])
    ce, n = sum(float(o["ce_sum"]) for o in outs), sum(float(o["tokens"]) for o in outs)
    return ce / max(n, 1.0)


class TrainingStopped(RuntimeError):
    """Raised when bad steps persist and train.bad_step_policy says stop (or nothing to roll back to)."""


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drops the rows past ``step`` (0 on a fresh start) that a run which died left behind, so
    that metrics.jsonl reads as one uninterrupted run. Rewritten atomically (temp file + rename)."""
    path = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in rows))
    os.replace(tmp, path)


def train(cfg: Config, devices=None, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) training; returns a summary with the final train and eval losses."""
    # --- setup: processes, config checks, run directory -------------------------------------
    _init_distributed(cfg.distributed)
    devices = devices if devices is not None else jax.devices()
    validate(cfg, len(devices), jax.process_count())
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a directory of token shards made by `danlu tokenize`")
    t = cfg.train
    pid, nproc = jax.process_index(), jax.process_count()
    run_dir = Path(t.run_dir)
    if pid == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # --- data ---------------------------------------------------------------------------------
    train_iter = make_train_iterator(cfg.data, t.global_batch_size, seed=t.seed, process_index=pid,
                                     process_count=nproc, start_step=0, vocab_size=cfg.model.vocab_size)
    eval_batches = make_eval_batches(cfg.data, t.global_batch_size, cfg.data.eval_batches,
                                     process_index=pid, process_count=nproc, vocab_size=cfg.model.vocab_size
                                     ) if cfg.data.eval_batches else []
    skip_batches: set[int] = set()  # data indices never to train on again (they led to bad steps)

    # --- state: created sharded, or restored from the newest readable checkpoint --------------
    built = build(cfg, devices)
    # The eval batches are fixed: assemble them into global arrays once, not at every evaluation.
    eval_batches = [global_batch(b, built.batch_sharding, t.global_batch_size) for b in eval_batches]
    # A URL run dir (gs://bucket/run) stays a URL for orbax (pathlib would fold its "//"): the checkpoints
    # of a TPU pod go where every host, and the next VM after a preemption, can read them.
    ckpt_dir = f"{t.run_dir.rstrip('/')}/checkpoints" if "://" in t.run_dir else run_dir / "checkpoints"
    manager = ckpt_lib.make_manager(ckpt_dir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    state = built.state

    def restore_latest() -> bool:
        nonlocal state, skip_batches
        restored = ckpt_lib.restore_latest(manager, built.state, built.state_sharding, log) if manager else None
        if restored is None:
            return False
        state, data, step = restored
        train_iter.set_state(data["iterator"])
        skip_batches |= set(data.get("skip", []))
        return True

    if restore_latest():
        log(f"resumed from {run_dir / 'checkpoints'} at step {int(state.step)}")
    start_step = int(state.step)
    _truncate_metrics(run_dir, start_step)  # also after a run that died before its first checkpoint

    def save(step: int, force: bool = False) -> float:
        data = {"iterator": train_iter.get_state(), "skip": sorted(skip_batches)}
        return ckpt_lib.save(manager, step, state, data, cfg.to_dict(), force=force)

    # --- accounting: FLOPs per token against the peak of these chips --------------------------
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    try:
        peak = peak_flops_per_device(devices[0]) * len(devices)
    except ValueError as e:  # an accelerator missing from the table: train anyway, MFU unknown
        log(f"warning: {e}; mfu is logged as NaN")
        peak = float("nan")
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard)
    bar = None
    if cfg.logging.progress_bar and sys.stdout.isatty() and pid == 0:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=start_step, unit="step", dynamic_ncols=True)

    # --- preemption: SIGTERM / SIGINT ask for a checkpoint and a clean stop --------------------
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        if stop_signal:  # a second signal: stop now
            raise KeyboardInterrupt
        stop_signal.append(signum)

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, on_signal)

    # --- loop: dispatch step N, then read back step N-1's metrics ------------------------------
    last_eval: float | None = None
    eval_at: dict[int, float] = {}  # step -> eval loss, computed on that step's parameters
    last_loss = float("nan")
    pending: tuple[int, dict] | None = None
    data_index_of: dict[int, int] = {}  # step -> index of the batch it trained on
    bad_run: list[int] = []  # data indices of the current run of skipped steps
    counts = {"skipped_steps": 0, "rollbacks": 0, "checkpoint_blocked_s": 0.0, "checkpoints": 0}
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    first_loss = None
    interval_losses: list[float] = []  # applied steps' losses since the last logged row (its loss_mean)

    def report(step: int, metrics: dict, force: bool = False) -> None:
        nonlocal t_last, step_last, last_loss, first_loss
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m["skipped"]:
            counts["skipped_steps"] += 1
            bad_run.append(data_index_of[step])
            why = f"loss {m['loss']:.4g} > {t.spike_factor:g} x median {m['loss_median']:.4g}" if m["spike"] else \
                f"non-finite loss {m['loss']} or grad norm {m['grad_norm']}"
            log(f"step {step} not applied: {why} (batch {data_index_of[step]}; {len(bad_run)} in a row)")
        else:
            bad_run.clear()
            last_loss = m["loss"]
            first_loss = m["loss"] if first_loss is None else first_loss
            interval_losses.append(m["loss"])
        if step % cfg.logging.log_every and not force and step not in eval_at:
            return
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        tps = tokens_per_step / dt
        loss_mean = sum(interval_losses) / len(interval_losses) if interval_losses else None
        interval_losses.clear()
        row = {"step": step, "loss": m["loss"], "loss_mean": loss_mean, "lr": m["lr"], "grad_norm": m["grad_norm"], "z_loss": m["z_loss"],
               "tokens_per_sec": tps, "step_time": dt, "mfu": tps * flops_tok / peak,
               "tokens": step * tokens_per_step, "elapsed": now - t_start, "skipped_steps": counts["skipped_steps"]}
        if step in eval_at:
            row["eval_loss"] = eval_at.pop(step)
        writer.write(row)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", eval=f"{last_eval:.3f}" if last_eval else "-", mfu=f"{row['mfu']:.1%}")
        elif pid == 0:
            extra = f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            log(f"step {step:6d} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} {tps:,.0f} tok/s mfu {row['mfu']:.1%}")
        t_last, step_last = time.perf_counter(), step

    def next_batch() -> tuple[int, dict]:
        while True:
            index = train_iter.step
            local = next(train_iter)
            if index in t.test_nan_batches:  # test hook: out-of-range targets make the loss NaN
                local = {**local, "targets": np.full_like(local["targets"], cfg.model.vocab_size)}
            if index not in skip_batches:
                return index, local

    step = start_step
    stopped_early = False
    try:
        while step < (t.stop_at or t.steps):
            index, local = next_batch()
            state, metrics = built.train_step(state, global_batch(local, built.batch_sharding, t.global_batch_size))
            step += 1
            data_index_of[step] = index
            data_index_of.pop(step - 4, None)
            if pending is not None:
                report(*pending)
            pending = (step, metrics)

            if len(bad_run) >= t.max_bad_steps:  # bad steps persist: roll back or stop
                culprits = sorted(bad_run)
                if t.bad_step_policy == "stop":
                    raise TrainingStopped(f"{len(culprits)} steps in a row were not applied (batches {culprits}); "
                                          f"stopping as train.bad_step_policy=stop says")
                skip_batches.update(culprits)
                pending, bad_run[:] = None, []
                if manager is not None:
                    manager.wait_until_finished()
                if not restore_latest():
                    raise TrainingStopped(f"{len(culprits)} steps in a row were not applied (batches {culprits}) and "
                                          f"there is no checkpoint to roll back to; lower optimizer.lr or enable checkpoints")
                skip_batches.update(culprits)
                counts["rollbacks"] += 1
                step = int(state.step)
                writer.truncate(step)
                log(f"rolled back to the checkpoint of step {step}; batches {culprits} will be skipped")
                continue

            stopping = bool(stop_signal) or (bool(t.max_seconds) and time.perf_counter() - t_start > t.max_seconds) \
                or (bool(t.stop_at) and step >= t.stop_at and step < t.steps)
            if eval_batches and (step == t.steps or stopping or (t.eval_every and step % t.eval_every == 0)):
                last_eval = eval_at[step] = evaluate(built, state.params, eval_batches)
            if bar is not None:
                bar.update(1)
            # No periodic checkpoint in the middle of a run of bad steps: it would be the one to roll back to.
            if manager is not None and cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not bad_run:
                counts["checkpoint_blocked_s"] += save(step)
                counts["checkpoints"] += 1
            if stopping:
                stopped_early = True
                if stop_signal:
                    log(f"received signal {signal.Signals(stop_signal[0]).name} at step {step}: "
                        f"saving a checkpoint and stopping; rerun the same command to continue")
                break
        if pending is not None:
            report(*pending, force=True)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            if step > start_step and manager.latest_step() != step:
                counts["checkpoint_blocked_s"] += save(step, force=True)
                counts["checkpoints"] += 1
            manager.wait_until_finished()
            manager.close()
        writer.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    summary = {"run_dir": str(run_dir), "steps": step, "first_loss": first_loss, "final_loss": last_loss,
               "final_eval_loss": last_eval, "stopped_early": stopped_early,
               "signal": signal.Signals(stop_signal[0]).name if stop_signal else None,
               "seconds": time.perf_counter() - t_start, **counts}
    if pid == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
