"""fp32 cross-entropy with z-loss. Two ways to never materialise the [B, T, V] logits:
over vocabulary chunks (``train.vocab_chunk``: [B, T, C] at a time, recomputed in the backward
pass) or fused with the output layer over token chunks (``train.loss_chunks``: [B·T/k, V] at a
time, gradients made on the way forward, nothing recomputed)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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
        logits_BxTxV = _logits(hidden_BxTxD, w_DxV)
        logits_BxTxV = shard(logits_BxTxV, ("batch", "length", "act_vocab"))
        lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
        target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    else:
        lse_BxT, target_logit_BxT = _chunked_lse(hidden_BxTxD, w_DxV, targets_BxT, vocab_chunk)
    weights_BxT = weights_BxT.astype(jnp.float32)
    ce = jnp.sum((lse_BxT - target_logit_BxT) * weights_BxT)
    z = jnp.sum(jnp.square(lse_BxT) * weights_BxT)
    return ce, z


def _logits(hidden_BxTxD, w_DxV):
    """fp32 logits via one 2-D matmul on [B*T, D] (see pretrain.model.dense for why 2-D)."""
    b, t, d = hidden_BxTxD.shape
    logits = jnp.matmul(hidden_BxTxD.reshape(b * t, d), w_DxV, preferred_element_type=jnp.float32)
    return logits.reshape(b, t, w_DxV.shape[1])


def _chunked_lse(hidden_BxTxD, w_DxV, targets_BxT, chunk):
    d, v = w_DxV.shape
    n_chunks = v // chunk
    w_CxDxc = w_DxV.reshape(d, n_chunks, chunk).transpose(1, 0, 2)
    b, t = targets_BxT.shape

    @jax.checkpoint  # keep only the [B, T] carries per chunk; recompute chunk logits when differentiating
    def body(carry, xs):
        m_BxT, s_BxT, tgt_BxT = carry
        w_Dxc, start = xs
        logits_BxTxc = _logits(hidden_BxTxD, w_Dxc)
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


def fused_cross_entropy(hidden_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array,
                        weights_BxT: jax.Array, z_coef: float, token_chunks: int):
    """Output layer and cross-entropy fused over token chunks; gradients are made in the forward pass.

    Returns (ce + z_coef * z, ce, z) as fp32 sums. Only the first output is differentiable (with
    respect to ``hidden`` and ``w``): the backward pass scales the gradients computed chunk by
    chunk on the way forward, so the [B·T, V] logits exist only [B·T / token_chunks, V] at a time
    and are never recomputed. Chunk i holds tokens i, i+k, i+2k, ... so that every device of a
    batch-sharded mesh works on every chunk.
    """
    b, t, d = hidden_BxTxD.shape
    if (b * t) % token_chunks:
        raise ValueError(f"train.loss_chunks={token_chunks} must divide the {b * t} tokens of a (micro)batch")
    w_DxV = w_DxV.astype(hidden_BxTxD.dtype)
    total, ce, z, _ = _fused_ce(hidden_BxTxD.reshape(b * t, d), w_DxV, targets_BxT.reshape(-1),
                                weights_BxT.reshape(-1).astype(jnp.float32), z_coef, token_chunks)
    return total, ce, z


def _fused_ce_forward(h_NxD, w_DxV, targets_N, weights_N, z_coef, chunks):
    n, d = h_NxD.shape
    r = n // chunks
    to_chunks = lambda x: x.reshape(r, chunks, *x.shape[1:]).swapaxes(0, 1)  # [chunks, r, ...]

    def body(dw_DxV, xs):
        h_RxD, tgt_R, wt_R = xs
        logits_RxV = jnp.matmul(h_RxD, w_DxV, preferred_element_type=jnp.float32)
        m_R = jnp.max(logits_RxV, axis=-1)
        e_RxV = jnp.exp(logits_RxV - m_R[:, None])
        s_R = jnp.sum(e_RxV, axis=-1)
        lse_R = m_R + jnp.log(s_R)
        tgt_logit_R = jnp.take_along_axis(logits_RxV, tgt_R[:, None], axis=-1)[:, 0]
        ce, z = jnp.sum((lse_R - tgt_logit_R) * wt_R), jnp.sum(jnp.square(lse_R) * wt_R)
        # d(ce + c·lse²)/dlogits = softmax · (1 + 2c·lse) - onehot(target), per weighted token.
        coef_R = wt_R * (1.0 + 2.0 * z_coef * lse_R)
        g_RxV = e_RxV * (coef_R / s_R)[:, None] - jax.nn.one_hot(tgt_R, logits_RxV.shape[1], dtype=jnp.float32) * wt_R[:, None]
        g_RxV = g_RxV.astype(h_RxD.dtype)
        dh_RxD = jnp.matmul(g_RxV, w_DxV.T, preferred_element_type=jnp.float32).astype(h_RxD.dtype)
        dw_DxV = dw_DxV + jnp.matmul(h_RxD.T, g_RxV, preferred_element_type=jnp.float32)
        return dw_DxV, (ce, z, dh_RxD)

    dw_DxV, (ce, z, dh) = jax.lax.scan(body, jnp.zeros(w_DxV.shape, jnp.float32),
                                       (to_chunks(h_NxD), to_chunks(targets_N), to_chunks(weights_N)))
    dh_NxD = dh.swapaxes(0, 1).reshape(n, d)
    ce, z = jnp.sum(ce), jnp.sum(z)
    return ce + z_coef * z, ce, z, (dh_NxD, dw_DxV.astype(w_DxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_ce(h_NxD, w_DxV, targets_N, weights_N, z_coef, chunks):
    return _fused_ce_forward(h_NxD, w_DxV, targets_N, weights_N, z_coef, chunks)


def _fused_ce_fwd(h_NxD, w_DxV, targets_N, weights_N, z_coef, chunks):
    out = _fused_ce_forward(h_NxD, w_DxV, targets_N, weights_N, z_coef, chunks)
    return out, (out[3], targets_N, weights_N)


def _fused_ce_bwd(z_coef, chunks, residuals, cotangents):
    (dh_NxD, dw_DxV), targets_N, weights_N = residuals
    g = cotangents[0]  # only the total is differentiable; see fused_cross_entropy
    return (g * dh_NxD).astype(dh_NxD.dtype), (g * dw_DxV).astype(dw_DxV.dtype), \
        np.zeros(targets_N.shape, jax.dtypes.float0), jnp.zeros_like(weights_N)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
