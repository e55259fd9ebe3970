"""orbax-checkpoint: asynchronous saves of the train state, restore onto the current shardings.

The data position needs no separate state: the loader is index-addressable, so restoring
``step`` restarts the data exactly where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from pretrain.config import CheckpointConfig


def make_manager(directory: Path, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                           create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
    manager.save(int(step), args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, state, state_sharding, step: int | None = None):
    """Restores the latest (or given) step with the shardings of ``state_sharding`` (any mesh)."""
    step = manager.latest_step() if step is None else step
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    return manager.restore(step, args=ocp.args.StandardRestore(target))
