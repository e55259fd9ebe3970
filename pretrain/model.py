"""Decoder-only transformer in Flax NNX, expressive enough for the GPT-2 and LLaMA families.

Shape letters: B batch, T sequence, D d_model, N query heads, K kv heads, H head_dim, F d_ff,
V vocabulary, L layers. Every parameter carries ``logical_axes`` metadata; the config's rules map
them to mesh axes (pretrain/sharding.py).

Layer parameters are stacked along a leading ``layers`` axis whether or not the forward pass
scans, so ``model.scan_layers`` only changes how the computation is expressed, not the
parameters (scan and unrolled are compared on identical weights in the tests).

Inference runs the same modules with a :class:`KVCache`: ``model(tokens, positions, cache=cache)``
writes the new tokens' keys and values into the cache and attends over it, so prefill and
one-token decode steps share every projection, norm, RoPE and MLP with training.

The embedding, attention, MLP and norms run under ``jax.named_scope``s of those names, so their
XLA ops say where they come from in a profile (docs/training.md, "Profiling").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.config import ModelConfig
from pretrain.sharding import shard

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """``x [..., *in] @ w [*in, *out] -> [..., *out]`` as one 2-D matmul on [tokens, features].

    Written on [B, T, D] operands, the weight gradient contracts two axes and XLA:CPU then
    copies a transposed activation gradient before every such matmul (a third of the step in
    bench/train_throughput.py); the 2-D form avoids that and costs nothing on TPU.
    """
    lead, k = x.shape[: x.ndim - in_dims], math.prod(w.shape[:in_dims])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *w.shape[in_dims:])


def _const(shape, axes, value: float, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in fp32."""

    def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "norm"):
        dtype = _DTYPES[cfg.param_dtype]
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _const((dim,), (axis_name,), 1.0, dtype)
        # GPT-2's LayerNorm has a bias; with use_bias off LayerNorm is scale-only (as in OLMo).
        self.bias = _const((dim,), (axis_name,), 0.0, dtype) if cfg.norm == "layernorm" and cfg.use_bias else None

    @jax.named_scope("norm")
    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (LLaMA / HF "rotate half" convention), computed in fp32."""
    h = x_BxTxNxH.shape[-1]
    freq_H2 = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * freq_H2
    sin, cos = jnp.sin(angle_BxTxH2)[:, :, None, :], jnp.cos(angle_BxTxH2)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def attention_mask(segment_ids_BxT: jax.Array | None, t: int) -> jax.Array:
    """Causal mask, restricted to the same packed document when segment ids are given. [B|1, 1, T, T]."""
    causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
    if segment_ids_BxT is None:
        return causal_TxT[None, None]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxT[None] & same_BxTxT)[:, None]


class KVCache(NamedTuple):
    """Keys and values of every layer for M token slots, filled left to right (a pytree).

    keys, values: [L, B, M, K, H] in the compute dtype, after RoPE / qk-norm, as attention reads them.
    valid: bool [B, M], False for slots no token may attend to (the left padding of a short prompt).
    end: int32 [], the slot of the next token; slots >= end are empty.
    The caller sizes the cache: ``end`` is traced, so writing past slot M - 1 cannot be refused
    under jit (dynamic_update_slice would clamp and overwrite the last slots).
    """
    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    end: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, valid_BxM: jax.Array | None = None) -> KVCache:
        """A zero cache of ``slots`` slots per row; every slot valid unless ``valid_BxM`` says otherwise."""
        shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
        dtype = _DTYPES[cfg.compute_dtype]
        valid_BxM = jnp.ones((batch, slots), bool) if valid_BxM is None else jnp.asarray(valid_BxM, bool)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), valid_BxM, jnp.zeros((), jnp.int32))

    def write(self, layer, k_BxTxKxH, v_BxTxKxH) -> tuple[KVCache, jax.Array, jax.Array]:
        """Puts T new keys/values of ``layer`` at slots [end, end + T) (in place under jit); returns
        the cache and that layer's keys and values [B, M, K, H]. ``end`` stays: the Decoder moves it
        once every layer has written."""
        at = (layer, 0, self.end, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys, k_BxTxKxH[None].astype(self.keys.dtype), at)
        values = jax.lax.dynamic_update_slice(self.values, v_BxTxKxH[None].astype(self.values.dtype), at)
        cache = self._replace(keys=keys, values=values)
        return (cache, jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(values, layer, keepdims=False))

    def mask(self, t: int) -> jax.Array:
        """[B, 1, T, M]: the new token at slot end + i sees the valid slots <= end + i."""
        slots_M = jnp.arange(self.valid.shape[1])
        causal_TxM = slots_M[None, :] <= (self.end + jnp.arange(t))[:, None]
        return (causal_TxM[None] & self.valid[:, None, :])[:, None]


def blocked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxT, block: int):
    """Causal attention by query blocks: block i attends to keys [0, (i+1)·block) only, so the
    masked upper triangle is mostly never computed (~(n+1)/2n of the work for n blocks).

    Plain matmuls on [B·K, G·block, H] operands (G = query heads per kv head): on CPU this is
    about 2x faster than the XLA path of jax.nn.dot_product_attention, forward and backward.
    """
    b, t, n, h = q_BxTxNxH.shape
    k_heads = k_BxTxKxH.shape[2]
    g = n // k_heads
    q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, k_heads, g, h).transpose(0, 2, 3, 1, 4) * (h ** -0.5)
    k_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3)
    v_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        q_blk = q_BxKxGxTxH[:, :, :, start:end].reshape(b * k_heads, g * (end - start), h)
        k_blk = k_BxKxTxH[:, :, :end].reshape(b * k_heads, end, h)
        v_blk = v_BxKxTxH[:, :, :end].reshape(b * k_heads, end, h)
        s = jnp.matmul(q_blk, k_blk.transpose(0, 2, 1), preferred_element_type=jnp.float32)
        # Mask in the 5-D view so that the [B, T, T] mask broadcasts inside the fusion instead
        # of being materialised for every head.
        s = s.reshape(b, k_heads, g, end - start, end)
        s = jnp.where(mask_BxTxT[:, None, None, start:end, :end], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v_blk.dtype).reshape(b * k_heads, g * (end - start), end)
        outs.append(jnp.matmul(p, v_blk).reshape(b, k_heads, g, end - start, h))
    out_BxKxGxTxH = jnp.concatenate(outs, axis=3)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        dtype = _DTYPES[cfg.param_dtype]
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.cfg = cfg
        self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, dtype)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, dtype)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std, dtype)
        self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, dtype)
        if cfg.use_bias:
            self.q_bias = _const((n, h), ("heads", "head_dim"), 0.0, dtype)
            self.k_bias = _const((k, h), ("kv_heads", "head_dim"), 0.0, dtype)
            self.v_bias = _const((k, h), ("kv_heads", "head_dim"), 0.0, dtype)
            self.o_bias = _const((d,), ("norm",), 0.0, dtype)
        if cfg.qk_norm:
            self.q_norm = Norm(h, cfg)
            self.k_norm = Norm(h, cfg)

    @jax.named_scope("attention")
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache: KVCache | None = None, layer=None):
        """[B, T, D] -> ([B, T, D], cache). With a cache (inference) the new keys and values go into
        slots [cache.end, cache.end + T) of layer ``layer`` and the queries attend over the cache with
        XLA attention, whatever ``cfg.attention`` says; ``segment_ids_BxT`` is then unused."""
        cfg = self.cfg
        cdt = x_BxTxD.dtype
        q_BxTxNxH = dense(x_BxTxD, self.q[...].astype(cdt))
        k_BxTxKxH = dense(x_BxTxD, self.k[...].astype(cdt))
        v_BxTxKxH = dense(x_BxTxD, self.v[...].astype(cdt))
        if cfg.use_bias:
            q_BxTxNxH += self.q_bias[...].astype(cdt)
            k_BxTxKxH += self.k_bias[...].astype(cdt)
            v_BxTxKxH += self.v_bias[...].astype(cdt)
        if cfg.qk_norm:
            q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
        if cfg.position == "rope":
            q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
            k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        q_BxTxNxH = shard(q_BxTxNxH, ("batch", "length", "act_heads", None))
        k_BxTxKxH = shard(k_BxTxKxH, ("batch", "length", "act_heads", None))
        v_BxTxKxH = shard(v_BxTxKxH, ("batch", "length", "act_heads", None))
        segments = segment_ids_BxT if cfg.segment_masking else None
        if cache is not None:
            cache, k_BxMxKxH, v_BxMxKxH = cache.write(layer, k_BxTxKxH, v_BxTxKxH)
            out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxMxKxH, v_BxMxKxH,
                                                       mask=cache.mask(x_BxTxD.shape[1]), implementation="xla")
        elif cfg.attention == "splash":
            from pretrain.splash import splash_attention  # TPU only; imported lazily

            out_BxTxNxH = splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments)
        elif cfg.attention == "blocked":
            mask_BxTxT = attention_mask(segments, x_BxTxD.shape[1])[:, 0]
            out_BxTxNxH = blocked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxT, cfg.attention_block)
        elif segments is None:
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                implementation=None if cfg.attention == "xla" else "cudnn")
        else:
            mask = attention_mask(segments, x_BxTxD.shape[1])
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask,
                implementation=None if cfg.attention == "xla" else "cudnn")
        out_BxTxNxH = shard(out_BxTxNxH, ("batch", "length", "act_heads", None))
        y_BxTxD = dense(out_BxTxNxH, self.o[...].astype(cdt), in_dims=2)
        if cfg.use_bias:
            y_BxTxD += self.o_bias[...].astype(cdt)
        return y_BxTxD, cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        dtype = _DTYPES[cfg.param_dtype]
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.kind, self.use_bias = cfg.mlp, cfg.use_bias
        if cfg.mlp == "swiglu":
            self.gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, dtype)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, dtype)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), out_std, dtype)
        if cfg.use_bias:
            if cfg.mlp == "swiglu":
                self.gate_bias = _const((f,), ("mlp",), 0.0, dtype)
            self.up_bias = _const((f,), ("mlp",), 0.0, dtype)
            self.down_bias = _const((d,), ("norm",), 0.0, dtype)

    @jax.named_scope("mlp")
    def __call__(self, x_BxTxD):
        cdt = x_BxTxD.dtype
        up_BxTxF = dense(x_BxTxD, self.up[...].astype(cdt))
        if self.use_bias:
            up_BxTxF += self.up_bias[...].astype(cdt)
        if self.kind == "swiglu":
            gate_BxTxF = dense(x_BxTxD, self.gate[...].astype(cdt))
            if self.use_bias:
                gate_BxTxF += self.gate_bias[...].astype(cdt)
            h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
        else:
            h_BxTxF = jax.nn.gelu(up_BxTxF, approximate=True)  # GPT-2's tanh approximation
        h_BxTxF = shard(h_BxTxF, ("batch", "length", "act_mlp"))
        y_BxTxD = dense(h_BxTxF, self.down[...].astype(cdt))
        if self.use_bias:
            y_BxTxD += self.down_bias[...].astype(cdt)
        return y_BxTxD


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.d_model, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache: KVCache | None = None, layer=None):
        y_BxTxD, cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, segment_ids_BxT, cache, layer)
        x_BxTxD = x_BxTxD + y_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return shard(x_BxTxD, ("batch", "length", "act_embed")), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Token ids [B, T] -> final hidden states [B, T, D]; :meth:`unembedding` gives the [D, V] output matrix."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = _DTYPES[cfg.param_dtype]
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, dtype)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, (cfg.max_seq_len, cfg.d_model), ("length", "embed"), cfg.init_std, dtype)
        # Stacked layers: build one Block per layer key under vmap, then name the new leading axis.
        layer_keys = jax.random.split(rngs.params(), cfg.n_layers)
        block_state = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(params=key))))(layer_keys)
        block_def = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(params=0))))
        self.blocks = nnx.merge(block_def, block_state)
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Variable):
                var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
        self.final_norm = Norm(cfg.d_model, cfg)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, dtype)

    def unembedding(self) -> jax.Array:
        """The output projection [D, V] (the transposed token embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]

    def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, cache: KVCache | None = None):
        """Final hidden states [B, T, D] (compute dtype) of the token ids ``inputs_BxT``.

        positions_BxT: int [B, T], default 0..T-1 (with a cache: cache.end onwards); segment_ids_BxT:
        packed-document ids for the attention mask (training; ignored with a cache).
        With a cache, returns (hidden states, cache): the T tokens take slots [cache.end, cache.end + T)
        and attend to the valid slots before them and to each other causally; ``end`` moves by T.
        """
        cfg = self.cfg
        cdt = _DTYPES[cfg.compute_dtype]
        t = inputs_BxT.shape[1]
        if cache is not None and t > cache.keys.shape[2]:
            raise ValueError(f"{t} tokens do not fit in a KV cache of {cache.keys.shape[2]} slots")
        if positions_BxT is None:
            start = 0 if cache is None else cache.end
            positions_BxT = jnp.broadcast_to(start + jnp.arange(t), inputs_BxT.shape)
        # Gather from the whole table (an explicit all-gather, as FSDP does for every weight):
        # XLA cannot partition a gather on a sharded table efficiently.
        with jax.named_scope("embed"):
            table_VxD = shard(self.embed[...], (None, None))
            x_BxTxD = jnp.take(table_VxD, inputs_BxT, axis=0).astype(cdt)
            if cfg.position == "learned":
                x_BxTxD = x_BxTxD + jnp.take(self.pos_embed[...], positions_BxT, axis=0).astype(cdt)
        x_BxTxD = shard(x_BxTxD, ("batch", "length", "act_embed"))

        block_def, block_state = nnx.split(self.blocks)
        # The cache (None in training) rides in the carry, so that each layer updates it in place.
        layer_ids = None if cache is None else jnp.arange(cfg.n_layers)

        def layer(carry, layer_xs):
            x_BxTxD, cache = carry
            layer_state, i = layer_xs
            block = nnx.merge(block_def, layer_state)
            return block(x_BxTxD, positions_BxT, segment_ids_BxT, cache, i), None

        if cfg.remat != "none" and cache is None:  # decoding takes no gradients: nothing to rematerialise
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        carry = (x_BxTxD, cache)
        if cfg.scan_layers:
            carry, _ = jax.lax.scan(layer, carry, (block_state, layer_ids))
        else:
            for i in range(cfg.n_layers):
                carry, _ = layer(carry, jax.tree.map(lambda a: a[i], (block_state, layer_ids)))
        x_BxTxD, cache = carry
        hidden_BxTxD = self.final_norm(x_BxTxD)
        return hidden_BxTxD if cache is None else (hidden_BxTxD, cache._replace(end=cache.end + t))


def init_model(cfg: ModelConfig, seed: int) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))
