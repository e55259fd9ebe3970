"""fp32 cross-entropy with z-loss, optionally over vocabulary chunks so that the [B, T, V] logits
are never materialised (only [B, T, C] per chunk, recomputed in the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pretrain.sharding import shard


def cross_entropy(hidden_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                  *, vocab_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Returns (sum of weighted token cross-entropies, sum of weighted log(Z)^2), both fp32 scalars.

    Sums, not means, so that microbatches add up exactly to the full batch; divide by the token
    count outside. ``vocab_chunk`` > 0 scans over V / vocab_chunk slices of the output matrix with
    an online log-sum-exp.
    """
    cdt = hidden_BxTxD.dtype
    w_DxV = w_DxV.astype(cdt)
    if not vocab_chunk or vocab_chunk >= w_DxV.shape[1]:
        logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
        logits_BxTxV = shard(logits_BxTxV, ("batch", "length", "act_vocab"))
        lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
        target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    else:
        lse_BxT, target_logit_BxT = _chunked_lse(hidden_BxTxD, w_DxV, targets_BxT, vocab_chunk)
    weights_BxT = weights_BxT.astype(jnp.float32)
    ce = jnp.sum((lse_BxT - target_logit_BxT) * weights_BxT)
    z = jnp.sum(jnp.square(lse_BxT) * weights_BxT)
    return ce, z


def _chunked_lse(hidden_BxTxD, w_DxV, targets_BxT, chunk):
    d, v = w_DxV.shape
    n_chunks = v // chunk
    w_CxDxc = w_DxV.reshape(d, n_chunks, chunk).transpose(1, 0, 2)
    b, t = targets_BxT.shape

    @jax.checkpoint  # keep only the [B, T] carries per chunk; recompute chunk logits when differentiating
    def body(carry, xs):
        m_BxT, s_BxT, tgt_BxT = carry
        w_Dxc, start = xs
        logits_BxTxc = jnp.einsum("btd,dc->btc", hidden_BxTxD, w_Dxc, preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m_BxT, jnp.max(logits_BxTxc, axis=-1))
        s_BxT = s_BxT * jnp.exp(m_BxT - m_new) + jnp.sum(jnp.exp(logits_BxTxc - m_new[..., None]), axis=-1)
        local = targets_BxT - start
        inside = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits_BxTxc, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        tgt_BxT = jnp.where(inside, picked, tgt_BxT)
        return (m_new, s_BxT, tgt_BxT), None

    init = (jnp.full((b, t), -jnp.inf, jnp.float32), jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.float32))
    starts = jnp.arange(n_chunks, dtype=targets_BxT.dtype) * chunk
    (m_BxT, s_BxT, tgt_BxT), _ = jax.lax.scan(body, init, (w_CxDxc, starts))
    return m_BxT + jnp.log(s_BxT), tgt_BxT
