"""TPU Pallas splash attention (block-sparse flash attention) behind ``model.attention=splash``.

On a TPU the kernel is compiled for the chip; on any other backend it runs in Pallas interpret
mode (slow, for tests: it checks the same kernel code against the XLA path on CPU). The kernel
is per device, so under a mesh it is wrapped in ``shard_map``: batch over (data, fsdp) as the
rules say, heads over tensor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from pretrain import sharding


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, t: int, interpret: bool, head_shards: int):
    block = min(512, t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=head_shards, q_seq_shards=1, interpret=interpret)


def _local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, interpret: bool):
    b, t, n, h = q_BxTxNxH.shape
    groups = n // k_BxTxKxH.shape[2]
    # The kernel wants [heads, T, H] per example and equal q/kv head counts: repeat kv heads (GQA).
    q_BxNxTxH = (q_BxTxNxH * (h ** -0.5)).transpose(0, 2, 1, 3)
    k_BxNxTxH = jnp.repeat(k_BxTxKxH, groups, axis=2).transpose(0, 2, 1, 3)
    v_BxNxTxH = jnp.repeat(v_BxTxKxH, groups, axis=2).transpose(0, 2, 1, 3)
    kernel = _kernel(n, t, interpret, 1)
    if segment_ids_BxT is None:
        out = jax.vmap(kernel)(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH)
    else:
        seg = segment_ids_BxT.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s)))(
            q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, seg)
    return out.transpose(0, 2, 1, 3)  # [B, T, N, H]


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None):
    """Causal attention, within segments when ``segment_ids_BxT`` is given. Returns [B, T, N, H]."""
    ctx = sharding._CONTEXT.get()
    if ctx is None:
        interpret = jax.devices()[0].platform != "tpu"
        return _local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, interpret)
    mesh, rules = ctx
    # The mesh's devices, not the default backend's: `danlu compile` lowers for TPU devices that
    # libtpu describes while this process runs on CPU.
    interpret = mesh.devices.flat[0].platform != "tpu"
    qkv = sharding.logical_to_spec(("batch", None, "act_heads", None), rules)
    seg = sharding.logical_to_spec(("batch", None), rules)
    fn = functools.partial(_local, interpret=interpret)
    if segment_ids_BxT is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qkv, qkv, qkv),
                             out_specs=qkv, check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False)(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
