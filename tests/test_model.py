"""Model invariants: shapes, causality, document masking, remat = no remat, scan = unrolled,
chunked cross-entropy = full cross-entropy, and the analytic parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain.config import load_config
from pretrain.flops import count_params
from pretrain.loss import cross_entropy, fused_cross_entropy
from pretrain.model import Decoder, attention_mask

SMALL = ["model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=32"]


def make(overrides=(), seed=0):
    cfg = load_config(None, SMALL + list(overrides))
    return cfg, Decoder(cfg.model, rngs=nnx.Rngs(params=seed))


@nnx.jit
def logits(model, tokens, segments=None):
    h = model(tokens, None, segments)
    return jnp.einsum("btd,dv->btv", h, model.unembedding())


def tokens(b=2, t=16, seed=0, vocab=96):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


FAMILIES = {
    "llama": [],
    "gpt2": ["model.norm=layernorm", "model.position=learned", "model.mlp=gelu", "model.tie_embeddings=true",
             "model.use_bias=true", "model.n_kv_heads=4"],
    "mqa_qknorm_bf16": ["model.n_kv_heads=1", "model.qk_norm=true", "model.compute_dtype=bfloat16"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_finite_and_param_count(family):
    cfg, model = make(FAMILIES[family])
    out = logits(model, tokens())
    assert out.shape == (2, 16, 96) and bool(jnp.all(jnp.isfinite(out)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == count_params(cfg.model)["total"]


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    cfg, model = make(FAMILIES[family])
    x = tokens()
    t = 9
    y = x.at[:, t].set((x[:, t] + 1) % 96)
    a, b = logits(model, x), logits(model, y)
    tol = 1e-2 if "bf16" in family else 1e-6
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=tol)
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > tol  # the change is visible from t on


@pytest.mark.parametrize("attention", ["xla", "blocked"])
def test_packed_documents_do_not_attend_across_boundaries(attention):
    _, model = make([f"model.attention={attention}", "model.attention_block=4"])
    x = tokens(1, 16)
    seg = jnp.asarray([[1] * 6 + [2] * 10], jnp.int32)
    y = x.at[0, 2].set((x[0, 2] + 5) % 96)  # change a token in document 1
    a, b = logits(model, x, seg), logits(model, y, seg)
    np.testing.assert_allclose(a[0, 6:], b[0, 6:], atol=1e-6)  # document 2 does not see it
    assert float(jnp.max(jnp.abs(a[0, 2:6] - b[0, 2:6]))) > 1e-4
    # Without masking the same change leaks into document 2 (the test would notice a broken mask).
    _, unmasked = make(["model.segment_masking=false", f"model.attention={attention}", "model.attention_block=4"])
    c, d = logits(unmasked, x, seg), logits(unmasked, y, seg)
    assert float(jnp.max(jnp.abs(c[0, 6:] - d[0, 6:]))) > 1e-4


def test_attention_mask():
    m = attention_mask(jnp.asarray([[1, 1, 2, 2]]), 4)[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(m), expected)


@nnx.jit
def _loss_and_grads(model, x):
    def f(model):
        h = model(x[:, :-1])
        ce, _ = cross_entropy(h, model.unembedding(), x[:, 1:], jnp.ones_like(x[:, 1:]))
        return ce
    return nnx.value_and_grad(f)(model)


@pytest.mark.parametrize("variant", [["model.remat=full"], ["model.remat=save_dots"], ["model.scan_layers=false"],
                                     ["model.attention=blocked", "model.attention_block=8"],
                                     ["model.attention=blocked", "model.attention_block=5"]], ids=" ".join)
def test_remat_and_unrolled_equal_scanned(variant):
    cfg, model = make()
    x = tokens(2, 17)
    ref_loss, ref_grads = _loss_and_grads(model, x)
    other = Decoder(dataclasses.replace(cfg.model, **_kv(variant)), rngs=nnx.Rngs(params=0))
    nnx.update(other, nnx.state(model))  # identical weights
    loss, grads = _loss_and_grads(other, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def _kv(overrides):
    out = {}
    for o in overrides:
        k, v = o.split("=")
        out[k.split(".")[1]] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v, v)
    return out


def test_chunked_cross_entropy_equals_full():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 96)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 96, (2, 8)), jnp.int32)
    m = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.int32)

    def f(h, w, chunk):
        ce, z = cross_entropy(h, w, t, m, vocab_chunk=chunk)
        return ce + 1e-2 * z

    full, gfull = jax.value_and_grad(f, argnums=(0, 1))(h, w, 0)
    chunked, gchunk = jax.value_and_grad(f, argnums=(0, 1))(h, w, 32)
    np.testing.assert_allclose(chunked, full, rtol=1e-5)
    for a, b in zip(gchunk, gfull):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Golden value: plain numpy log-softmax.
    logits = np.asarray(h) @ np.asarray(w)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = ((lse - np.take_along_axis(logits, np.asarray(t)[..., None], -1)[..., 0]) * np.asarray(m)).sum()
    z = ((lse ** 2) * np.asarray(m)).sum()
    np.testing.assert_allclose(full, ce + 1e-2 * z, rtol=1e-5)


def test_rope_is_relative():
    """RoPE makes attention scores depend on position differences only."""
    from pretrain.model import rope
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    def score(pq, pk):
        return float(jnp.sum(rope(q, jnp.array([[pq]]), 1e4) * rope(k, jnp.array([[pk]]), 1e4)))
    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_gpt2_124m_parameter_count():
    cfg = load_config("configs/model/gpt2-124m.yaml")
    model = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(params=0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 124_439_808


@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
def test_fused_cross_entropy_equals_plain(z_coef):
    """Output layer + CE fused over token chunks (gradients made in the forward pass) = plain CE."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 96)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 96, (2, 8)), jnp.int32)
    m = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.int32)

    def plain(h, w):
        ce, z = cross_entropy(h, w, t, m)
        return ce + z_coef * z

    def fused(h, w):
        return fused_cross_entropy(h, w, t, m, z_coef, 4)[0]

    ref, gref = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    out, gout = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(gout, gref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    total, ce, z = fused_cross_entropy(h, w, t, m, z_coef, 4)
    plain_ce, plain_z = cross_entropy(h, w, t, m)
    np.testing.assert_allclose([ce, z], [plain_ce, plain_z], rtol=1e-5)
