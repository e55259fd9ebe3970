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
import sys
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
    micro = cfg.train.microbatches

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
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce / n_tokens, "z_loss": z / n_tokens, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "tokens": n_tokens}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(cfg: Config, graphdef, abstract_state):
    def eval_step(params: dict, batch: dict) -> dict:
        _, ce, _, n = loss_sums(merge_model(graphdef, abstract_state, params), batch, cfg)
        return {"ce_sum": ce, "tokens": n}
    return eval_step


def build(cfg: Config, devices=None, mesh: Mesh | None = None) -> Built:
    """Validates the config, makes the mesh, creates the sharded state and jits the steps.

    State is created sharded without ever being materialised whole: ``eval_shape`` gives shapes,
    the rules table gives shardings, and ``jit(init, out_shardings=...)`` creates each shard in place.
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
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    abstract = jax.eval_shape(init_state)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract.opt_state, param_sharding,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
    state_sharding = TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding)
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


def _init_distributed() -> None:
    """Joins a multi-process job when the environment describes one (TPU pods set it themselves)."""
    if os.environ.get("DANLU_COORDINATOR") is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by CPU devices (fake pods)
    jax.distributed.initialize(coordinator_address=os.environ["DANLU_COORDINATOR"],
                               num_processes=int(os.environ["DANLU_NUM_PROCESSES"]),
                               process_id=int(os.environ["DANLU_PROCESS_ID"]))


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events; only process 0 writes."""

    def __init__(self, run_dir: Path, tensorboard: bool):
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

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def evaluate(built: Built, params: dict, batches: list[dict]) -> float:
    ce, n = 0.0, 0.0
    for local in batches:
        out = built.eval_step(params, global_batch(local, built.batch_sharding, built.cfg.train.global_batch_size))
        out = jax.device_get(out)
        ce, n = ce + float(out["ce_sum"]), n + float(out["tokens"])
    return ce / max(n, 1.0)


def train(cfg: Config, devices=None, *, log: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) training; returns a summary with the final train and eval losses."""
    # --- setup: processes, config checks, run directory -------------------------------------
    _init_distributed()
    devices = devices if devices is not None else jax.devices()
    validate(cfg, len(devices), jax.process_count())
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a directory of token shards made by `danlu tokenize`")
    run_dir = Path(cfg.train.run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # --- state: created sharded, or restored from the latest checkpoint ----------------------
    built = build(cfg, devices)
    manager = ckpt_lib.make_manager(run_dir / "checkpoints", cfg.checkpoint) if cfg.checkpoint.enabled else None
    state = built.state
    if manager is not None and manager.latest_step() is not None:
        state = ckpt_lib.restore(manager, state, built.state_sharding)
        log(f"resumed from {run_dir / 'checkpoints'} at step {int(state.step)}")
    start_step = int(state.step)

    # --- data ---------------------------------------------------------------------------------
    t = cfg.train
    pid, nproc = jax.process_index(), jax.process_count()
    train_iter = make_train_iterator(cfg.data, t.global_batch_size, seed=t.seed, process_index=pid,
                                     process_count=nproc, start_step=start_step,
                                     vocab_size=cfg.model.vocab_size)
    eval_batches = make_eval_batches(cfg.data, t.global_batch_size, cfg.data.eval_batches,
                                     process_index=pid, process_count=nproc, vocab_size=cfg.model.vocab_size
                                     ) if cfg.data.eval_batches else []

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

    # --- loop: dispatch step N, then read back step N-1's metrics ------------------------------
    last_eval: float | None = None
    eval_at: dict[int, float] = {}  # step -> eval loss, computed on that step's parameters
    last_loss = float("nan")
    pending: tuple[int, dict] | None = None
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    first_loss = None

    def report(step: int, metrics: dict, force: bool = False) -> None:
        nonlocal t_last, step_last, last_loss, first_loss
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_loss = m["loss"]
        first_loss = m["loss"] if first_loss is None else first_loss
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            raise FloatingPointError(f"non-finite loss {m['loss']} or grad norm {m['grad_norm']} at step {step}; "
                                     f"lower optimizer.lr or check the data at this step")
        if step % cfg.logging.log_every and not force and step not in eval_at:
            return
        now = time.perf_counter()
        dt = (now - t_last) / max(step - step_last, 1)
        tps = tokens_per_step / dt
        row = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"], "z_loss": m["z_loss"],
               "tokens_per_sec": tps, "step_time": dt, "mfu": tps * flops_tok / peak,
               "tokens": step * tokens_per_step, "elapsed": now - t_start}
        if step in eval_at:
            row["eval_loss"] = eval_at.pop(step)
        writer.write(row)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", eval=f"{last_eval:.3f}" if last_eval else "-", mfu=f"{row['mfu']:.1%}")
        elif pid == 0:
            extra = f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            log(f"step {step:6d} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} {tps:,.0f} tok/s mfu {row['mfu']:.1%}")
        t_last, step_last = time.perf_counter(), step

    step = start_step
    stopped_early = False
    try:
        while step < t.steps:
            batch = global_batch(next(train_iter), built.batch_sharding, t.global_batch_size)
            state, metrics = built.train_step(state, batch)
            step += 1
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            stopping = bool(t.max_seconds) and time.perf_counter() - t_start > t.max_seconds
            if eval_batches and (step == t.steps or stopping or (t.eval_every and step % t.eval_every == 0)):
                last_eval = eval_at[step] = evaluate(built, state.params, eval_batches)
            if bar is not None:
                bar.update(1)
            if manager is not None and cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                ckpt_lib.save(manager, step, state)
            if stopping:
                stopped_early = True
                break
        if pending is not None:
            report(*pending, force=True)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            if step > start_step and manager.latest_step() != step:
                ckpt_lib.save(manager, step, state, force=True)
            manager.wait_until_finished()
            manager.close()
        writer.close()

    summary = {"run_dir": str(run_dir), "steps": step, "first_loss": first_loss, "final_loss": last_loss,
               "final_eval_loss": last_eval, "stopped_early": stopped_early,
               "seconds": time.perf_counter() - t_start}
    if pid == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
