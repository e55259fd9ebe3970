"""`danlu sample`: text from a checkpoint, with a KV cache; plus the checkpoint reader that
`danlu eval` and `danlu export-hf` share.

Generation. Prompts of different lengths are left-padded to a common length P; each row's
positions count from its first real token (so a row sees exactly what it would see alone) and
padded slots are masked as keys. The KV cache is preallocated, ``[layers, batch, P + new, kv_heads,
head_dim]`` for keys and for values; one jitted prefill writes the prompts into it and returns the
last position's logits, one jitted ``lax.while_loop`` then samples a token, runs the one-token
forward pass that appends to the cache, and stops when every row has produced EOS or
``max_new_tokens`` are out. The forward pass here is a functional copy of pretrain/model.py's
Decoder that reads the same parameter dict; ``tests/test_generate.py`` checks that its logits,
token by token through the cache, equal the Decoder's full forward pass.

Sampling: greedy (argmax), or temperature, then top-k, then top-p (nucleus) on the logits, in
that order (as Hugging Face's ``generate``), then a categorical draw; the random stream is
``jax.random.key(seed)`` folded with the step, so the same seed gives the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

from pretrain.config import Config, ConfigError, ModelConfig, config_from_dict

EOS_ID_DEFAULT = 3
PROMPT_BUCKET = 16  # data_pipeline/tokenize.py fixes pad=0, unk=1, bos=2, eos=3


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's parameters and resolved config, ready for inference."""
    cfg: Config
    params: dict  # pure dict in the nnx.state(Decoder) layout; layer weights stacked on axis 0
    step: int
    directory: Path  # the orbax step directory, e.g. RUN/checkpoints/1200
    run_dir: Path | None  # the run directory when the checkpoint lives in RUN/checkpoints


def _resolve_checkpoint_dir(path: str | os.PathLike, step: int | None) -> tuple[Path, Path | None, int | None]:
    """(directory of step directories, run dir or None, step or None) from a run dir, a
    checkpoints dir or one step directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", p, step
    if p.name.isdigit() and (p / "state").exists():
        if step is not None and step != int(p.name):
            raise ValueError(f"{p} is the checkpoint of step {p.name}, but --step {step} was asked for")
        ck = p.parent
        return ck, ck.parent if ck.name == "checkpoints" else None, int(p.name)
    return p, p.parent if p.name == "checkpoints" else None, step


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Reads the parameters (not the optimizer state) and config of a `danlu train` checkpoint.

    ``path``: a run directory (RUN/checkpoints/* inside), a checkpoints directory, or one step
    directory (RUN/checkpoints/N). ``step``: None for the newest. Parameters come back on the
    first local device, whatever mesh the run was saved from.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from pretrain.model import init_model

    ckdir, run_dir, step = _resolve_checkpoint_dir(path, step)
    manager = ocp.CheckpointManager(ckdir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckdir} (expected numbered step directories written by `danlu train`)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{ckdir} has no checkpoint of step {step}; it has steps {steps}")
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    cfg = config_from_dict(config)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(cfg.model, 0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)}
    # Only the params subtree of the saved TrainState: the optimizer state is never read.
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    state = manager.restore(step, args=ocp.args.Composite(state=restore)).state
    manager.close()
    return Checkpoint(cfg, state["params"], int(step), ckdir / str(step), run_dir)


def find_tokenizer(ckpt: Checkpoint, explicit: str | None = None) -> str | None:
    """The sentencepiece model of a checkpoint: ``explicit``, else RUN/tokenizer.model (what
    `danlu import-hf` writes), else the one the training shards' manifest.json names."""
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"--tokenizer {explicit!r}: no such file")
        return explicit
    if ckpt.run_dir is not None and (ckpt.run_dir / "tokenizer.model").is_file():
        return str(ckpt.run_dir / "tokenizer.model")
    data = ckpt.cfg.data.path
    if data and os.path.isfile(os.path.join(data, "manifest.json")):
        with open(os.path.join(data, "manifest.json"), encoding="utf-8") as f:
            tok = json.load(f).get("tokenizer", {}).get("path")
        if tok and os.path.isfile(os.path.join(data, tok)):
            return os.path.join(data, tok)
    return None


# ---------------------------------------------------------------------------------------------
# The forward pass with a KV cache (a functional copy of pretrain/model.py's Decoder)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (or use greedy decoding)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 disables it)")


def _norm(x, p: dict, cfg: ModelConfig):
    import jax
    import jax.numpy as jnp

    dtype = x.dtype
    x = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    x = x * p["scale"].astype(jnp.float32)
    if "bias" in p:
        x = x + p["bias"].astype(jnp.float32)
    return x.astype(dtype)


def forward_cached(params: dict, cfg: ModelConfig, tokens_BxS, positions_BxS, cache_k, cache_v, start,
                   key_valid_BxM, all_logits: bool = False):
    """Runs S new tokens per row through the decoder, appending their keys and values to the cache.

    tokens_BxS, positions_BxS: int32 [B, S]; cache_k, cache_v: [L, B, M, K, H]; start: int32
    scalar, the cache slot of the first new token; key_valid_BxM: bool [B, M], False for padded
    slots. A new token at slot start+s attends to the valid slots <= start+s.
    Returns (fp32 logits [B, S, V] if all_logits else [B, V] of the last token, cache_k, cache_v).
    """
    import jax
    import jax.numpy as jnp

    from pretrain.model import dense, rope

    cdt = jnp.dtype(cfg.compute_dtype)
    b, s = tokens_BxS.shape
    n, k_heads, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = n // k_heads
    m = cache_k.shape[2]
    x_BxSxD = jnp.take(params["embed"], tokens_BxS, axis=0).astype(cdt)
    if cfg.position == "learned":
        x_BxSxD = x_BxSxD + jnp.take(params["pos_embed"], positions_BxS, axis=0).astype(cdt)
    slots_M = jnp.arange(m)
    causal_SxM = slots_M[None, :] <= (start + jnp.arange(s))[:, None]
    allowed_Bx1x1xSxM = (causal_SxM[None] & key_valid_BxM[:, None, :])[:, None, None]

    def layer(carry, lp):
        x_BxSxD, ck, cv, i = carry
        a = lp["attn"]
        h_BxSxD = _norm(x_BxSxD, lp["attn_norm"], cfg)
        q_BxSxNxH = dense(h_BxSxD, a["q"].astype(cdt))
        k_BxSxKxH = dense(h_BxSxD, a["k"].astype(cdt))
        v_BxSxKxH = dense(h_BxSxD, a["v"].astype(cdt))
        if cfg.use_bias:
            q_BxSxNxH += a["q_bias"].astype(cdt)
            k_BxSxKxH += a["k_bias"].astype(cdt)
            v_BxSxKxH += a["v_bias"].astype(cdt)
        if cfg.qk_norm:
            q_BxSxNxH, k_BxSxKxH = _norm(q_BxSxNxH, a["q_norm"], cfg), _norm(k_BxSxKxH, a["k_norm"], cfg)
        if cfg.position == "rope":
            q_BxSxNxH = rope(q_BxSxNxH, positions_BxS, cfg.rope_theta)
            k_BxSxKxH = rope(k_BxSxKxH, positions_BxS, cfg.rope_theta)
        # Write this layer's new keys/values in place, then attend over the whole cache row.
        ck = jax.lax.dynamic_update_slice(ck, k_BxSxKxH[None].astype(ck.dtype), (i, 0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v_BxSxKxH[None].astype(cv.dtype), (i, 0, start, 0, 0))
        keys_BxMxKxH = jax.lax.dynamic_index_in_dim(ck, i, keepdims=False)
        values_BxMxKxH = jax.lax.dynamic_index_in_dim(cv, i, keepdims=False)
        q_BxKxGxSxH = q_BxSxNxH.reshape(b, s, k_heads, g, h).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum("bkgsh,bmkh->bkgsm", q_BxKxGxSxH, keys_BxMxKxH,
                            preferred_element_type=jnp.float32) * (h ** -0.5)
        scores = jnp.where(allowed_Bx1x1xSxM, scores, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(scores, axis=-1).astype(cdt)
        out_BxKxGxSxH = jnp.einsum("bkgsm,bmkh->bkgsh", p, values_BxMxKxH)
        out_BxSxNxH = out_BxKxGxSxH.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)
        y_BxSxD = dense(out_BxSxNxH, a["o"].astype(cdt), in_dims=2)
        if cfg.use_bias:
            y_BxSxD += a["o_bias"].astype(cdt)
        x_BxSxD = x_BxSxD + y_BxSxD
        mp = lp["mlp"]
        h_BxSxD = _norm(x_BxSxD, lp["mlp_norm"], cfg)
        up_BxSxF = dense(h_BxSxD, mp["up"].astype(cdt))
        if cfg.use_bias:
            up_BxSxF += mp["up_bias"].astype(cdt)
        if cfg.mlp == "swiglu":
            gate_BxSxF = dense(h_BxSxD, mp["gate"].astype(cdt))
            if cfg.use_bias:
                gate_BxSxF += mp["gate_bias"].astype(cdt)
            act_BxSxF = jax.nn.silu(gate_BxSxF) * up_BxSxF
        else:
            act_BxSxF = jax.nn.gelu(up_BxSxF, approximate=True)
        y_BxSxD = dense(act_BxSxF, mp["down"].astype(cdt))
        if cfg.use_bias:
            y_BxSxD += mp["down_bias"].astype(cdt)
        return (x_BxSxD + y_BxSxD, ck, cv, i + 1), None

    (x_BxSxD, cache_k, cache_v, _), _ = jax.lax.scan(layer, (x_BxSxD, cache_k, cache_v, 0), params["blocks"])
    if not all_logits:
        x_BxSxD = x_BxSxD[:, -1:]
    x_BxSxD = _norm(x_BxSxD, params["final_norm"], cfg)
    w_DxV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
    logits = jnp.einsum("bsd,dv->bsv", x_BxSxD, w_DxV.astype(cdt), preferred_element_type=jnp.float32)
    return (logits if all_logits else logits[:, 0]), cache_k, cache_v


def sample_logits(logits_BxV, key, sampling: Sampling):
    """Next tokens int32 [B] from fp32 logits [B, V]: argmax, or temperature -> top-k -> top-p -> draw."""
    import jax
    import jax.numpy as jnp

    if sampling.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / sampling.temperature
    b, v = logits.shape
    if not (sampling.top_k and sampling.top_k < v) and sampling.top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if sampling.top_k and sampling.top_k < v:
        # Only the k best survive: do the rest on [B, k] (already sorted), not on [B, V].
        # Ties at the k-th value are broken by index (lax.top_k), so exactly k tokens remain.
        sorted_BxC, index_BxC = jax.lax.top_k(logits, sampling.top_k)
    else:
        index_BxC = jnp.broadcast_to(jnp.argsort(-logits, axis=-1), (b, v))
        sorted_BxC = jnp.take_along_axis(logits, index_BxC, axis=-1)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (the most
        # likely token always stays): a token is kept if the mass before it is below top_p.
        probs_BxC = jax.nn.softmax(sorted_BxC, axis=-1)
        before_BxC = jnp.cumsum(probs_BxC, axis=-1) - probs_BxC
        sorted_BxC = jnp.where(before_BxC < sampling.top_p, sorted_BxC, -jnp.inf)
    choice_B = jax.random.categorical(key, sorted_BxC, axis=-1)
    return jnp.take_along_axis(index_BxC, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, sampling: Sampling, max_new_tokens: int):
    """(prefill, decode) jitted for one model config and sampling setting."""
    import jax
    import jax.numpy as jnp

    def prefill(params, tokens_BxP, positions_BxP, cache_k, cache_v, key_valid_BxM):
        return forward_cached(params, cfg, tokens_BxP, positions_BxP, cache_k, cache_v, 0, key_valid_BxM)

    def decode(params, logits_BxV, cache_k, cache_v, key_valid_BxM, pads_B, prompt_len, key, eos_id):
        b = logits_BxV.shape[0]
        first = sample_logits(logits_BxV, jax.random.fold_in(key, 0), sampling)
        out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done_B = first == eos_id

        def cond(carry):
            t, _, _, _, _, done_B = carry
            return (t < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            t, out_BxN, ck, cv, last_B, done_B = carry
            slot = prompt_len + t - 1  # the cache slot of the token sampled last
            positions_Bx1 = (slot - pads_B)[:, None]
            logits_BxV, ck, cv = forward_cached(params, cfg, last_B[:, None], positions_Bx1, ck, cv, slot, key_valid_BxM)
            nxt_B = sample_logits(logits_BxV, jax.random.fold_in(key, t), sampling)
            nxt_B = jnp.where(done_B, 0, nxt_B)  # finished rows emit padding (0) from here on
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, nxt_B[:, None], (0, t))
            return t + 1, out_BxN, ck, cv, nxt_B, done_B | (nxt_B == eos_id)

        t, out_BxN, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_BxN, cache_k, cache_v, first, done_B))
        return out_BxN, t

    return jax.jit(prefill, donate_argnums=(3, 4)), jax.jit(decode)


def generate(params: dict, cfg: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(greedy=True), eos_id: int | None = EOS_ID_DEFAULT,
             seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt (a list of token id lists, lengths may differ).

    Each row stops after its first EOS (included in its output) or after ``max_new_tokens``.
    """
    import jax
    import jax.numpy as jnp

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
    b, longest = len(prompts), max(len(p) for p in prompts)
    if cfg.position == "learned" and longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} "
                         f"exceeds the learned position table (model.max_seq_len={cfg.max_seq_len}); shorten one of them")
    # Prompt length rounded up to a multiple of 16 (more left padding, which is masked and takes
    # no positions), so that prompts of similar lengths share one compilation.
    plen = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    total = plen + max_new_tokens
    pads_B = np.array([plen - len(p) for p in prompts], np.int32)
    tokens_BxP = np.zeros((b, plen), np.int32)
    for i, p in enumerate(prompts):
        tokens_BxP[i, pads_B[i]:] = p
    positions_BxP = np.maximum(np.arange(plen)[None, :] - pads_B[:, None], 0).astype(np.int32)
    key_valid_BxM = np.arange(total)[None, :] >= pads_B[:, None]
    cdt = jnp.dtype(cfg.compute_dtype)
    shape = (cfg.n_layers, b, total, cfg.n_kv_heads, cfg.head_dim)
    cache_k, cache_v = jnp.zeros(shape, cdt), jnp.zeros(shape, cdt)

    prefill, decode = _compiled(cfg, sampling, max_new_tokens)
    logits_BxV, cache_k, cache_v = prefill(params, tokens_BxP, positions_BxP, cache_k, cache_v, key_valid_BxM)
    out_BxN, steps = decode(params, logits_BxV, cache_k, cache_v, key_valid_BxM, pads_B, jnp.int32(plen),
                            jax.random.key(seed), jnp.int32(-1 if eos_id is None else eos_id))
    out_BxN, steps = np.asarray(out_BxN), int(steps)
    result = []
    for row in out_BxN[:, :steps].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or one checkpoints/STEP directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature, top-k, top-p)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece model (default: RUN/tokenizer.model, else the one the run's data manifest names)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")


def main(args: argparse.Namespace) -> int:
    import sys

    import sentencepiece as spm

    try:
        sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        ckpt = load_checkpoint(args.checkpoint, args.step)
        tok_path = find_tokenizer(ckpt, args.tokenizer)
        if tok_path is None:
            raise FileNotFoundError(f"no tokenizer found for {args.checkpoint} (no RUN/tokenizer.model, and data.path="
                                    f"{ckpt.cfg.data.path!r} has no manifest.json naming one); pass --tokenizer MODEL")
        sp = spm.SentencePieceProcessor(model_file=tok_path)
        prompts = [sp.encode(p) for p in args.prompt]
        outs = generate(ckpt.params, ckpt.cfg.model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                        eos_id=sp.eos_id() if sp.eos_id() >= 0 else None, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        print(f"danlu sample: {e}", file=sys.stderr)
        return 2
    for text, ids in zip(args.prompt, outs):
        completion = sp.decode([t for t in ids if t != sp.eos_id()])
        if args.json:
            print(json.dumps({"prompt": text, "completion": completion, "tokens": ids,
                              "stopped_at_eos": bool(ids) and ids[-1] == sp.eos_id()}, ensure_ascii=False))
        else:
            print(f"{text}{completion}\n---")
    return 0
