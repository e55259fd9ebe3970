"""`danlu sample`: text from a checkpoint, with a KV cache; plus the checkpoint reader that
`danlu eval` and `danlu export-hf` share.

Generation. Prompts of different lengths are left-padded to a common length P; each row's
positions count from its first real token (so a row sees exactly what it would see alone) and
padded slots are masked as keys. The forward pass is pretrain/model.py's Decoder itself, called
with a :class:`~pretrain.model.KVCache` of ``P + max_new_tokens`` slots (keys and values
``[layers, batch, slots, kv_heads, head_dim]``): one jitted prefill writes the prompts into a new
cache and returns the last position's logits, one jitted ``lax.while_loop`` then samples a token,
runs the one-token forward pass that appends to the cache, and stops when every row has produced
EOS or ``max_new_tokens`` are out. ``tests/test_generate.py`` checks that the logits, token by
token through the cache, equal the full forward pass.

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
    `danlu import-hf` writes), else the one the training shards' manifest.json names (a gs://
    data.path through its mount, $DANLU_MOUNTS)."""
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"--tokenizer {explicit!r}: no such file")
        return explicit
    if ckpt.run_dir is not None and (ckpt.run_dir / "tokenizer.model").is_file():
        return str(ckpt.run_dir / "tokenizer.model")
    from danlu.base.fs import mounted

    data = mounted(ckpt.cfg.data.path)
    if data and os.path.isfile(os.path.join(data, "manifest.json")):
        with open(os.path.join(data, "manifest.json"), encoding="utf-8") as f:
            tok = json.load(f).get("tokenizer", {}).get("path")
        if tok and os.path.isfile(os.path.join(data, tok)):
            return os.path.join(data, tok)
    return None


# ---------------------------------------------------------------------------------------------
# Sampling


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


def next_token_logits(model, tokens_BxS, positions_BxS, cache):
    """Runs S new tokens per row through ``model`` (a Decoder) with its KV cache.

    tokens_BxS, positions_BxS: int32 [B, S]; cache: a KVCache whose ``end`` is the slot of the
    first new token. Returns (fp32 logits [B, V] of the last new token, the updated cache).
    """
    import jax.numpy as jnp

    hidden_BxSxD, cache = model(tokens_BxS, positions_BxS, cache=cache)
    last_BxD = hidden_BxSxD[:, -1]
    logits_BxV = jnp.matmul(last_BxD, model.unembedding().astype(last_BxD.dtype), preferred_element_type=jnp.float32)
    return logits_BxV, cache


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
    from flax import nnx

    from pretrain.model import KVCache, init_model
    from pretrain.train import merge_model

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0)))

    def prefill(params, tokens_BxP, positions_BxP, key_valid_BxM):
        model = merge_model(graphdef, abstract, params)
        cache = KVCache.empty(cfg, tokens_BxP.shape[0], key_valid_BxM.shape[1], key_valid_BxM)
        return next_token_logits(model, tokens_BxP, positions_BxP, cache)

    def decode(params, logits_BxV, cache, pads_B, key, eos_id):
        model = merge_model(graphdef, abstract, params)
        b = logits_BxV.shape[0]
        first = sample_logits(logits_BxV, jax.random.fold_in(key, 0), sampling)
        out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
        done_B = first == eos_id

        def cond(carry):
            t, _, _, _, done_B = carry
            return (t < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            t, out_BxN, cache, last_B, done_B = carry
            positions_Bx1 = (cache.end - pads_B)[:, None]  # the token sampled last goes to slot cache.end
            logits_BxV, cache = next_token_logits(model, last_B[:, None], positions_Bx1, cache)
            nxt_B = sample_logits(logits_BxV, jax.random.fold_in(key, t), sampling)
            nxt_B = jnp.where(done_B, 0, nxt_B)  # finished rows emit padding (0) from here on
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, nxt_B[:, None], (0, t))
            return t + 1, out_BxN, cache, nxt_B, done_B | (nxt_B == eos_id)

        t, out_BxN, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_BxN, cache, first, done_B))
        return out_BxN, t

    return jax.jit(prefill), jax.jit(decode)


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

    prefill, decode = _compiled(cfg, sampling, max_new_tokens)
    logits_BxV, cache = prefill(params, tokens_BxP, positions_BxP, key_valid_BxM)
    out_BxN, steps = decode(params, logits_BxV, cache, pads_B, jax.random.key(seed),
                            jnp.int32(-1 if eos_id is None else eos_id))
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
