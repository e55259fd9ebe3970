"""Training throughput on CPU: danlu's jitted train step vs Hugging Face LlamaForCausalLM + AdamW.

    .venv/bin/python bench/train_throughput.py                  # full: 4 shapes, ~10 minutes
    .venv/bin/python bench/train_throughput.py --quick          # one small shape, a smoke test

Needs the `bench` extra (torch==2.13.0, transformers). Each (side, shape) runs in its own
subprocess, so the two frameworks never share a process, thread pools or allocator. Both sides
train the same LLaMA shape (rmsnorm, rope, swiglu with the LLaMA d_ff rule, untied embeddings,
heads of 64) in fp32 on the same random tokens, forward + backward + global-norm clipping +
AdamW with the same hyper-parameters and weight-decay mask, and both are charged the same
FLOPs per token (`pretrain.flops.flops_per_token`). MFU is against this host's measured fp32
matmul peak (`pretrain.flops.cpu_peak_flops`, cached). The last line printed is one JSON object
with every figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FULL_SHAPES = "256x4,256x8,512x4,512x8"  # d_model x n_layers
# How danlu runs best on a CPU: the same model and math, expressed differently (causal attention
# by query blocks, matmul outputs saved for the backward pass, the output layer fused with the
# loss over 8 token chunks; see docs/benchmarks.md).
DANLU_CPU = "model.attention=blocked model.remat=save_dots train.loss_chunks=8"


def shape_overrides(d_model: int, n_layers: int, vocab: int, seq: int, batch: int) -> list[str]:
    """danlu config overrides for one benchmark shape (everything else: the config defaults)."""
    return [f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={d_model // 64}",
            f"model.n_kv_heads={d_model // 64}", f"model.vocab_size={vocab}", f"model.max_seq_len={seq}",
            "model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu", "model.tie_embeddings=false",
            "model.use_bias=false", "model.qk_norm=false", "model.param_dtype=float32",
            "model.compute_dtype=float32", f"data.seq_len={seq}", f"train.global_batch_size={batch}",
            "train.steps=100000", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0):
    """[batch, seq + 1] int32 tokens, identical for both sides."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)


def time_steps(step, warmup: int, steps: int) -> dict:
    """Runs `step()` (which must block until done and return the loss) warmup + steps times.

    Returns the timed step seconds, the losses, the first step's seconds (with compilation) and
    `other_cpu_cores`: how many cores other processes kept busy on average during the timed
    steps (machine busy time minus ours, over wall time). Well above 0 means the figures are
    contaminated by someone else's work and should be rerun.
    """
    from pretrain.flops import machine_busy_cpu_seconds

    t0 = time.perf_counter()
    losses = [step()]
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        losses.append(step())
    times = []
    busy0, self0, wall0 = machine_busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    busy1, wall = machine_busy_cpu_seconds(), time.perf_counter() - wall0
    other = float("nan") if busy0 is None else max(0.0, (busy1 - busy0) - (time.process_time() - self0)) / wall
    return {"times": times, "losses": losses, "first_step_s": first, "other_cpu_cores": other}


# --- danlu side --------------------------------------------------------------------------------

def danlu_step(d_model: int, n_layers: int, batch_size: int, vocab: int, seq: int, overrides: str):
    """danlu's built train step for one benchmark shape and its fixed batch, already on device."""
    import jax
    import numpy as np

    from pretrain.config import load_config
    from pretrain.train import build

    cfg = load_config(None, shape_overrides(d_model, n_layers, vocab, seq, batch_size) + overrides.split())
    built = build(cfg)
    tokens = random_tokens(batch_size, seq, vocab)
    batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch_size, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch_size, seq)).copy(),
    }
    return built, jax.device_put(batch, built.batch_sharding)


def run_danlu(args) -> dict:
    import jax

    built, batch = danlu_step(args.d_model, args.n_layers, args.batch_size, args.vocab, args.seq, args.danlu)
    state = built.state

    def step():
        nonlocal state
        state, metrics = built.train_step(state, batch)
        return float(jax.block_until_ready(metrics["loss"]))

    return {**time_steps(step, args.warmup, args.steps), "n_devices": jax.device_count()}


# --- torch side --------------------------------------------------------------------------------

def run_torch(args, compiled: bool = False) -> dict:
    """The peer: transformers' LlamaForCausalLM + fused AdamW, eager, or under `torch.compile`
    (inductor, default mode) with `compiled`; its compile falls in the untimed warmup steps."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.config import load_config

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = load_config(None, shape_overrides(args.d_model, args.n_layers, args.vocab, args.seq, args.batch_size))
    m, o = cfg.model, cfg.optimizer
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim, max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False,
        attn_implementation="sdpa", dtype="float32")
    model = LlamaForCausalLM(hf_cfg).to(torch.float32).train()
    n_params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if compiled else model

    # Same weight-decay mask as danlu's defaults: matrices decay; norms, biases and the token
    # embedding do not (optimizer.decay_norms/decay_biases/decay_embeddings = false).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or (name.endswith("embed_tokens.weight") and not o.decay_embeddings)
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, fused=True)  # fused: the HF Trainer default on torch>=2.8
    warm, total, floor = o.warmup_steps, cfg.train.steps, o.min_lr_ratio

    def lr_factor(step):  # linear warmup then cosine to min_lr_ratio, as danlu's "cosine"
        if step < warm:
            return step / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    tokens = torch.from_numpy(random_tokens(args.batch_size, args.seq, args.vocab)).long()
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = forward(input_ids=inputs).logits  # [batch, seq, vocab]
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        sched.step()
        return loss.item()

    return {**time_steps(step, args.warmup, args.steps), "n_devices": 1, "n_params": n_params,
            "threads": torch.get_num_threads()}


# --- harness -----------------------------------------------------------------------------------

def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        d, _, n = item.strip().lower().partition("x")
        if not n or int(d) % 64:
            raise SystemExit(f"--shapes: {item!r} is not D_MODLxN_LAYERS with D_MODEL a multiple of 64 (e.g. 256x4)")
        out.append((int(d), int(n)))
    return out


def auto_batch(fpt: float, seq: int, peak: float, target_s: float = 1.0, assumed_mfu: float = 0.5) -> int:
    """A power-of-two batch for a ~`target_s` step if the step ran at `assumed_mfu` of `peak`."""
    tokens = assumed_mfu * peak * target_s / fpt
    return int(min(64, max(1, 2 ** round(math.log2(max(1.0, tokens / seq))))))


def child_env() -> dict:
    env = dict(os.environ)
    # One real CPU device: drop a simulated-devices flag inherited from a test shell.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(side: str, d: int, n: int, batch: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", side, "--_d", str(d), "--_n", str(n),
           "--_b", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--danlu", args.danlu]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{side} {d}x{n} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import jax
    from importlib.metadata import version

    from pretrain.flops import cpu_description

    def v(name):
        try:
            return version(name)
        except Exception:
            return None

    return {**cpu_description(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": v("jaxlib"), "flax": v("flax"), "optax": v("optax"), "torch": v("torch"),
            "transformers": v("transformers"), "platform": platform.platform()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=FULL_SHAPES, help=f"comma-separated D_MODELxN_LAYERS (default {FULL_SHAPES})")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side and shape (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first compiles)")
    p.add_argument("--batch", type=int, default=0, help="sequences per step for every shape; 0: auto, ~1 s steps")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--sides", default="danlu,torch,torch_compile",
                   help="which sides to run: danlu, torch (eager), torch_compile (torch.compile of the same model)")
    p.add_argument("--quick", action="store_true", help="smoke test: 256x4, batch 4, 3 timed steps")
    p.add_argument("--danlu", default=DANLU_CPU,
                   help=f"danlu config overrides, space-separated; the model's math is unchanged by them "
                        f"(default: {DANLU_CPU!r}, danlu's fastest CPU settings; '' for the config defaults)")
    for hidden in ("--_worker", "--_d", "--_n", "--_b"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:  # a child: run one side on one shape, print one JSON line
        args.d_model, args.n_layers, args.batch_size = int(args._d), int(args._n), int(args._b)
        result = {"danlu": run_danlu, "torch": run_torch,
                  "torch_compile": lambda a: run_torch(a, compiled=True)}[args._worker](args)
        print(json.dumps(result))
        return

    if args.quick:
        args.shapes, args.steps, args.warmup, args.batch = "256x4", 3, 2, args.batch or 4
    from pretrain.config import load_config
    from pretrain.flops import count_params, cpu_peak_flops, flops_per_token, mfu

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    peak = cpu_peak_flops()
    info = machine()
    print(f"# {info['cpu_model']}, {info['cores']} cores; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"jax {info['jax']}, torch {info['torch']}, transformers {info['transformers']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for d, n in parse_shapes(args.shapes):
        m = load_config(None, shape_overrides(d, n, args.vocab, args.seq, 1)).model
        fpt = flops_per_token(m, args.seq)["total"]
        batch = args.batch or auto_batch(fpt, args.seq, peak)
        row = {"shape": f"{d}x{n}", "d_model": d, "n_layers": n, "n_heads": m.n_heads, "d_ff": m.d_ff,
               "vocab": args.vocab, "seq": args.seq, "batch": batch, "params": count_params(m)["total"],
               "flops_per_token": fpt}
        for side in sides:
            r = run_child(side, d, n, batch, args)
            step_s = statistics.median(r["times"])
            tps = batch * args.seq / step_s
            row[side] = {"step_s": step_s, "step_s_min": min(r["times"]), "step_s_max": max(r["times"]),
                         "tokens_per_sec": tps, "mfu": mfu(tps, fpt, r["n_devices"], peak),
                         "first_step_s": r["first_step_s"], "loss_first": r["losses"][0],
                         "loss_last": r["losses"][-1], "other_cpu_cores": r["other_cpu_cores"]}
            if side.startswith("torch") and r["n_params"] != row["params"]:
                print(f"# warning: torch model has {r['n_params']} parameters, danlu {row['params']}", flush=True)
            busy = r["other_cpu_cores"]
            print(f"# {row['shape']} {side}: {step_s:.3f} s/step, {tps:,.0f} tok/s, "
                  f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, other processes kept {busy:.2f} cores busy"
                  + ("  <-- CONTAMINATED, rerun on a quiet machine" if busy > 0.1 * info["cores"] else ""), flush=True)
        if "danlu" in row and "torch" in row:
            row["ratio"] = row["danlu"]["tokens_per_sec"] / row["torch"]["tokens_per_sec"]
        if "danlu" in row and "torch_compile" in row:
            row["ratio_compile"] = row["danlu"]["tokens_per_sec"] / row["torch_compile"]["tokens_per_sec"]
        rows.append(row)

    print()
    head = f"{'shape':>7} {'params':>7} {'batch':>5} {'GFLOP/tok':>9}"
    for side in sides:
        head += f" {side + ' tok/s':>12} {side + ' MFU':>10}"
    if "danlu" in sides and "torch" in sides:
        head += f" {'danlu/torch':>11}"
    if "danlu" in sides and "torch_compile" in sides:
        head += f" {'danlu/compiled':>14}"
    print(head + "  other busy cores")
    for row in rows:
        line = f"{row['shape']:>7} {row['params'] / 1e6:>6.1f}M {row['batch']:>5} {row['flops_per_token'] / 1e9:>9.3f}"
        for side in sides:
            line += f" {row[side]['tokens_per_sec']:>12,.0f} {row[side]['mfu']:>10.1%}"
        if "ratio" in row:
            line += f" {row['ratio']:>10.2f}x"
        if "ratio_compile" in row:
            line += f" {row['ratio_compile']:>13.2f}x"
        print(line + "  " + "/".join(f"{row[side]['other_cpu_cores']:.2f}" for side in sides))
    print(json.dumps({"bench": "train_throughput", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                      "danlu_overrides": args.danlu,
                      "machine": info, "cpu_peak_flops": peak, "steps": args.steps, "warmup": args.warmup,
                      "load_average_end": os.getloadavg()[0], "results": rows}))


if __name__ == "__main__":
    main()
