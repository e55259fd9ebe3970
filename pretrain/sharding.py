"""Device mesh and logical-axis sharding.

Parameters carry logical axis names in their ``logical_axes`` metadata (``embed``, ``mlp``,
``heads``, ...), activations are annotated with :func:`shard`; the ``rules`` table of the config
maps logical names to the mesh axes ``data``, ``fsdp``, ``tensor``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pretrain.config import Config, ConfigError, validate

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, tuple[str, ...]], ...]

_CONTEXT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("danlu_axis_rules", default=None)


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; with ``mesh.dcn_data`` > 1 the data axis spans slices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = validate(cfg, len(devices), jax.process_count())
    ici = (shape["data"] // cfg.mesh.dcn_data, shape["fsdp"], shape["tensor"])
    if cfg.mesh.dcn_data > 1 and hasattr(devices[0], "slice_index"):
        arr = mesh_utils.create_hybrid_device_mesh(ici, (cfg.mesh.dcn_data, 1, 1), devices)
    elif devices[0].platform == "tpu":
        arr = mesh_utils.create_device_mesh((shape["data"], shape["fsdp"], shape["tensor"]), devices)
    else:
        arr = np.asarray(devices).reshape(shape["data"], shape["fsdp"], shape["tensor"])
    return Mesh(arr, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules | dict) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ConfigError(f"rules: no rule for logical axis {name!r}; add `rules.{name}=[]` (replicated) or mesh axes")
        axes = tuple(a for a in table[name] if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
    """While active (in particular while a step is traced), :func:`shard` constrains activations."""
    token = _CONTEXT.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def shard(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Annotates an activation with logical axes; a no-op outside :func:`axis_rules`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State, rules: Rules) -> nnx.State:
    """A tree like ``state`` with a PartitionSpec per variable, from its ``logical_axes`` metadata."""
    def spec(v: nnx.Variable):
        axes = v.get_metadata().get("logical_axes")
        if axes is None:
            return P()
        if len(axes) != len(v.get_value().shape):
            raise ValueError(f"logical_axes {axes} do not match shape {v.get_value().shape}")
        return logical_to_spec(axes, rules)
    return jax.tree.map(spec, state, is_leaf=_is_var)


def check_divisible(abstract_state: nnx.State, specs: nnx.State, mesh: Mesh) -> None:
    """Raises a ConfigError naming the parameter whose dimension its mesh axes do not divide."""
    flat_a = dict(nnx.to_flat_state(abstract_state))
    flat_s = dict(nnx.to_flat_state(specs))
    for path, var in flat_a.items():
        spec = flat_s[path]
        spec = spec.get_value() if _is_var(spec) else spec
        shape = var.get_value().shape
        for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            n = math.prod(mesh.shape[a] for a in axes)
            if size % n:
                name = "/".join(str(p) for p in path)
                logical = var.get_metadata().get("logical_axes")
                raise ConfigError(
                    f"parameter {name} {tuple(shape)} dim {dim} ({logical[dim]}={size}) is not divisible by mesh "
                    f"axes {axes} of size {n}; change the rule for {logical[dim]!r} or the mesh")
