"""Equivalences of the train step on 8 simulated CPU devices: sharded = unsharded, k microbatches
= one full batch; schedules and the weight-decay mask."""

import functools

import jax
import numpy as np
import optax
import pytest

from pretrain.config import load_config
from pretrain.optimizer import decay_mask, make_schedule
from pretrain.train import build

BASE = ["model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=32", "train.global_batch_size=8", "train.steps=10",
        "optimizer.warmup_steps=2", "optimizer.lr=1e-2"]


def batch(b=8, t=32, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2  # two packed documents per row
    seg[0, -3:] = 0  # and some padding
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
    return {"inputs": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),
            "segment_ids": seg, "positions": np.tile(pos, (b, 1)).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _built(overrides: tuple, n_devices):
    cfg = load_config(None, BASE + list(overrides))
    n = n_devices or cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    return build(cfg, devices=jax.devices()[:n])


def run(overrides, steps=3, n_devices=None, batches=None):
    """Trains ``steps`` steps from the initial state (compiled once per config, state copied).

    Returns (losses, params, built, state); the grad norms are in ``GRAD_NORMS[overrides]``.
    """
    built = _built(tuple(overrides), n_devices)
    state, losses, norms = jax.tree.map(lambda x: x.copy(), built.state), [], []  # the step donates its input
    for i in range(steps):
        b = batches[i] if batches else batch(seed=i)
        state, m = built.train_step(state, jax.device_put(b, built.batch_sharding))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    GRAD_NORMS[tuple(overrides)] = norms
    return losses, jax.device_get(state.params), built, state


GRAD_NORMS: dict[tuple, list[float]] = {}


def assert_same_training(overrides, ref_overrides, state, ref_state):
    """Grad norms and optimizer states equal too, not only losses and parameters: a gradient scaled
    uniformly by a wrong factor leaves the parameters almost unchanged under clipping and Adam
    (both normalise it away), but not the grad norm or Adam's moments."""
    np.testing.assert_allclose(GRAD_NORMS[tuple(overrides)], GRAD_NORMS[tuple(ref_overrides)], rtol=1e-5)
    opt, ref_opt = jax.device_get(state.opt_state), jax.device_get(ref_state.opt_state)
    assert jax.tree.structure(opt) == jax.tree.structure(ref_opt)
    for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(ref_opt)):
        # Adam's second moments are squares of ~1e-4 gradients: the summation order of a sharded
        # reduction moves their small entries by a few 1e-3 relative; a scale bug moves all by ~100%.
        scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]


UNSHARDED = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


@pytest.fixture(scope="module")
def unsharded():
    return run(UNSHARDED)


@pytest.mark.parametrize("mesh", MESHES[1:], ids=str)
def test_sharded_equals_unsharded(mesh, unsharded):
    ref_losses, ref_params, _, ref_state = unsharded
    d, f, t = mesh
    overrides = [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]
    losses, params, built, state = run(overrides)
    # The mesh really is what the test says, and the parameters really are sharded on it.
    assert dict(built.mesh.shape) == {"data": d, "fsdp": f, "tensor": t}
    q = state.params["blocks"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    if f * t > 1:
        assert q.addressable_shards[0].data.size == q.size // (f * t)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert_same_training(overrides, UNSHARDED, state, ref_state)


def test_training_changes_the_parameters(unsharded):
    losses, params, built, _ = unsharded
    fresh = jax.device_get(built.state.params)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)))
    assert diff > 1e-3  # so the equivalences above compare something that moved


@pytest.mark.parametrize("micro,mesh", [(4, (1, 1, 1)), (2, (2, 2, 2))], ids=["k4-1dev", "k2-2x2x2"])
def test_accumulated_microbatches_equal_full_batch(micro, mesh):
    d, f, t = mesh
    m = [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]
    full_losses, full_params, _, full_state = run(m, steps=2)
    acc_losses, acc_params, _, acc_state = run(m + [f"train.microbatches={micro}"], steps=2)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    assert_same_training(m + [f"train.microbatches={micro}"], m, acc_state, full_state)


def test_padding_is_ignored_by_the_loss():
    b = batch()
    b2 = {k: v.copy() for k, v in b.items()}
    b2["targets"][0, -3:] = (b2["targets"][0, -3:] + 7) % 128  # padded positions: segment id 0
    l1, _, _, _ = run(["mesh.fsdp=1"], steps=1, batches=[b])
    l2, _, _, _ = run(["mesh.fsdp=1"], steps=1, batches=[b2])
    assert l1 == l2
    b2["targets"][1, 0] = (b2["targets"][1, 0] + 7) % 128  # a real position: the loss moves
    l3, _, _, _ = run(["mesh.fsdp=1"], steps=1, batches=[b2])
    assert l3 != l1


def test_schedules():
    cfg = load_config(None, ["optimizer.lr=1.0", "optimizer.warmup_steps=10", "optimizer.min_lr_ratio=0.1",
                             "train.steps=110", "optimizer.schedule=cosine"])
    s = make_schedule(cfg.optimizer, cfg.train.steps)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # half-way through the cosine: (1 + 0.1) / 2
    assert float(s(110)) == pytest.approx(0.1)
    w = make_schedule(load_config(None, ["optimizer.lr=1.0", "optimizer.warmup_steps=10", "optimizer.schedule=wsd",
                                         "optimizer.cooldown_fraction=0.2", "optimizer.min_lr_ratio=0.0",
                                         "train.steps=110"]).optimizer, 110)
    assert float(w(50)) == pytest.approx(1.0) and float(w(88)) == pytest.approx(1.0)  # stable until 110-22
    assert float(w(99)) == pytest.approx(0.5) and float(w(110)) == pytest.approx(0.0)
    sq = make_schedule(load_config(None, ["optimizer.lr=1.0", "optimizer.warmup_steps=0", "optimizer.schedule=wsd",
                                          "optimizer.cooldown_fraction=0.5", "optimizer.min_lr_ratio=0.0",
                                          "optimizer.cooldown_shape=sqrt", "train.steps=100"]).optimizer, 100)
    assert float(sq(75)) == pytest.approx(1 - np.sqrt(0.5), rel=1e-5)


def test_weight_decay_mask_and_clipping():
    _, _, built, _ = run([], steps=0, n_devices=1)
    mask = decay_mask(jax.device_get(built.state.params), built.cfg.optimizer)
    assert mask["embed"] is False and mask["final_norm"]["scale"] is False
    assert mask["blocks"]["attn"]["q"] is True and mask["unembed"] is True
    # With zero gradients AdamW leaves only the decay term: decayed weights shrink, masked ones do not.
    params = jax.device_get(built.state.params)
    zeros = jax.tree.map(np.zeros_like, params)
    opt_state = built.optimizer.init(params)
    for _ in range(3):  # past warmup step 0 where lr = 0
        updates, opt_state = built.optimizer.update(zeros, opt_state, params)
    assert float(np.abs(updates["embed"]).max()) == 0.0
    assert float(np.abs(updates["blocks"]["attn"]["q"]).max()) > 0.0
    assert optax.tree.norm(optax.clip_by_global_norm(1.0).update({"g": np.full(4, 10.0)}, None)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("variant", [["model.attention=splash"], ["model.attention=blocked", "model.attention_block=32"],
                                     ["train.loss_chunks=8"]], ids=" ".join)
def test_kernels_and_fused_loss_equal_the_plain_path_under_a_mesh(variant):
    """The TPU Pallas kernel (interpret mode on CPU, in shard_map), blocked attention and the fused
    loss train like the plain XLA path on a (2, 2, 2) mesh."""
    common = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.max_seq_len=128", "data.seq_len=128"]
    batches = [batch(t=128, seed=i) for i in range(2)]
    xla, xla_params, _, _ = run(common, steps=2, batches=batches)
    other, other_params, _, _ = run(common + variant, steps=2, batches=batches)
    np.testing.assert_allclose(other, xla, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other_params), jax.tree.leaves(xla_params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("variant", [[], ["train.loss_chunks=4", "model.attention=blocked", "model.remat=save_dots"]],
                         ids=["plain", "cpu-settings"])
def test_profiles_name_the_parts_of_the_step(variant):
    """Every part of the model and the update carries its jax.named_scope into the compiled step's op
    names, forward and backward, so a profile (and bench/train_profile.py) can say where time goes."""
    import re

    built = _built(tuple(["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"] + variant), 1)
    state = jax.tree.map(lambda x: x.copy(), built.state)
    hlo = built.train_step.lower(state, jax.device_put(batch(), built.batch_sharding)).compile().as_text()
    names = re.findall(r'op_name="([^"]*)"', hlo)
    for part in ("embed", "attention", "mlp", "norm", "loss", "optimizer"):
        assert any(f"({part})" in n or f"/{part}/" in n for n in names), part
    assert any("transpose(" in n and "attention" in n for n in names)  # the backward pass keeps the names
    assert any("transpose(" in n and "mlp" in n for n in names)
