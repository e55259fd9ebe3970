"""optax AdamW with masked weight decay, global-norm clipping and the learning-rate schedules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from pretrain.config import OptimizerConfig


def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """warmup + cosine, warmup-stable-decay (WSD) or warmup + constant; all start at 0 and reach ``opt.lr``."""
    peak, floor, warm = opt.lr, opt.lr * opt.min_lr_ratio, opt.warmup_steps
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1)) if warm else optax.constant_schedule(peak)
    if opt.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total_steps - warm, 1), alpha=opt.min_lr_ratio)
    else:  # wsd: hold the peak, then cool down over the last cooldown_fraction of the run
        cool = max(1, int(round(total_steps * opt.cooldown_fraction)))
        stable = max(total_steps - warm - cool, 0)
        shape = opt.cooldown_shape

        def cooldown(step):
            frac = jnp.clip(step / cool, 0.0, 1.0)
            if shape == "linear":
                w = 1.0 - frac
            elif shape == "cosine":
                w = 0.5 * (1.0 + jnp.cos(math.pi * frac))
            else:  # "1 - sqrt", from Hägele et al. 2024
                w = 1.0 - jnp.sqrt(frac)
            return floor + (peak - floor) * w

        main = optax.join_schedules([optax.constant_schedule(peak), cooldown], [stable])
    return optax.join_schedules([warmup, main], [warm]) if warm else main


def decay_mask(params: dict, opt: OptimizerConfig) -> dict:
    """True where weight decay applies: matrices always; norms, embeddings and biases as configured."""
    def decays(path, _) -> bool:
        name = str(path[-1].key)
        if name in ("embed", "pos_embed"):
            return opt.decay_embeddings
        if name.endswith("bias"):
            return opt.decay_biases
        if name == "scale":
            return opt.decay_norms
        return True
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(opt, total_steps)
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=lambda params: decay_mask(params, opt)))
    return optax.chain(*parts), schedule
