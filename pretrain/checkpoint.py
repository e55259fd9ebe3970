"""orbax-checkpoint: asynchronous saves of the train state, the data position and the resolved
config; restore onto any mesh; damaged checkpoints set aside instead of crash-looping.

A checkpoint is an orbax Composite with three items:
  ``state``  the TrainState (step, params, optimizer state), restored onto the current shardings;
  ``data``   JSON: the loader's iterator state (grain ``get_state()``) and the data batches
             skipped after loss spikes;
  ``config`` JSON: the resolved config, for inspection (a run restores with its own config).
Local paths and gs:// URLs alike (orbax writes through tensorstore/etils); not other fsspec
schemes such as memory:// (`can_write`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath

from pretrain.config import CheckpointConfig

# URL schemes orbax writes to natively (tensorstore's gcs driver); others (memory://, ...) it cannot.
URL_SCHEMES = ("gs",)


def can_write(directory: str) -> bool:
    """Whether orbax can write checkpoints under ``directory``: a local path or a gs:// URL."""
    return "://" not in directory or directory.split("://", 1)[0] in URL_SCHEMES


def make_manager(directory: str | Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """Keeps the last ``cfg.keep`` checkpoints plus every ``cfg.keep_period``-th step (if > 0)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.keep_period or None,
        enable_async_checkpointing=cfg.async_save, create=True)
    path = str(directory) if "://" in str(directory) else Path(directory).absolute()
    return ocp.CheckpointManager(path, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data: dict, config: dict, force: bool = False) -> float:
    """Starts an (asynchronous) save; returns the seconds the caller was blocked."""
    t0 = time.perf_counter()
    manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), config=ocp.args.JsonSave(config)),
        force=force)
    return time.perf_counter() - t0


def restore(manager: ocp.CheckpointManager, step: int, state, state_sharding) -> tuple:
    """Restores ``step`` onto the shardings of ``state_sharding`` (any mesh). Returns (state, data)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    out = manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out.state, out.data


def restore_latest(manager: ocp.CheckpointManager, state, state_sharding,
                   log: Callable[[str], None] = print) -> tuple | None:
    """Restores the newest readable checkpoint; returns (state, data, step) or None if there is none.

    A checkpoint that fails to restore (truncated or half-written files) is reported and renamed
    to ``<step>.damaged`` so the next attempt does not trip over it again, and the previous one
    is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored_state, data = restore(manager, step, state, state_sharding)
            return restored_state, data, step
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            where = epath.Path(manager.directory) / str(step)
            log(f"checkpoint {where} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"setting it aside as {where.name}.damaged and trying the previous one")
            if jax.process_index() == 0:
                aside = where.parent / f"{where.name}.damaged"
                n = 1
                while aside.exists():
                    aside, n = where.parent / f"{where.name}.damaged{n}", n + 1
                where.rename(aside)
            _sync("danlu_checkpoint_set_aside")
            manager.reload()
    return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
