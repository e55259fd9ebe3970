"""The pieces of a CPU train step, each timed on its own: XLA:CPU's matmul libraries against
numpy (OpenBLAS) and torch (MKL / oneDNN), attention forward + backward against torch's flash
kernel, SwiGLU with separate and fused gate/up weights, and the optimizer update.

    .venv/bin/python bench/cpu_kernels.py                 # everything, ~4 minutes
    .venv/bin/python bench/cpu_kernels.py --parts matmul  # one part

The shapes are those of `bench/train_throughput.py` (tokens = batch x 256; d_model 256 and 512,
the LLaMA d_ff rule, vocabulary 8192, heads of 64). Every (part, backend) runs in its own process,
so XLA flags apply from the start and thread pools are never shared. Matmuls are timed in the three
forms a dense layer [tokens, in] -> [tokens, out] needs: NN (forward, x @ w), NT (input gradient,
dy @ w.T) and TN (weight gradient, x.T @ dy, contracting over the tokens). The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (tokens, d_in, d_out): the dense layers of the 256- and 512-wide benchmark models, and the
# output layer over one of 8 loss chunks (train.loss_chunks=8).
MATMULS = [(2048, 256, 256), (2048, 256, 768), (2048, 768, 256), (1024, 512, 512), (1024, 512, 1536),
           (1024, 1536, 512), (256, 256, 8192), (128, 512, 8192)]
# XLA:CPU's dot emitters in jax 0.10.2, selected with XLA_FLAGS (the default is YNNPACK fusions).
XLA_BACKENDS = {
    "xla": "",
    "xla_onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot "
                  "--xla_cpu_experimental_ynn_fusion_type=",
    "xla_xnnpack": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "xla_eigen": "--xla_cpu_experimental_ynn_fusion_type=",
    "xla_avx512": "--xla_cpu_prefer_vector_width=512",
}
ATTENTION = [(8, 256, 4, 64), (4, 256, 8, 64)]  # [B, T, heads, head_dim] of the 256x* and 512x* shapes
MLP = [(2048, 256, 768), (1024, 512, 1536)]  # tokens, d_model, d_ff


def median_s(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def operands(tokens: int, d_in: int, d_out: int, form: str, seed: int = 0):
    """The two operands of one of a dense layer's matmuls: NN x [t, in] @ w [in, out] (forward),
    NT dy [t, out] @ w [in, out].T (input gradient), TN x [t, in].T @ dy [t, out] (weight gradient)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a_shape = (tokens, d_out) if form == "NT" else (tokens, d_in)
    b_shape = {"NN": (d_in, d_out), "NT": (d_in, d_out), "TN": (tokens, d_out)}[form]
    return rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal(b_shape, dtype=np.float32)


# --- workers: each runs in its own process ----------------------------------------------------

FORMS = {"NN": lambda a, b: a @ b, "NT": lambda a, b: a @ b.T, "TN": lambda a, b: a.T @ b}


def work_matmul(backend: str, reps: int) -> dict:
    """GFLOP/s of every matmul of MATMULS in each form of FORMS."""
    if backend.startswith("xla"):
        import jax
        import jax.numpy as jnp

        fns = {form: jax.jit(f) for form, f in FORMS.items()}
        prepare, run = jnp.asarray, lambda form, a, b: fns[form](a, b).block_until_ready()
    elif backend == "torch":
        import torch

        torch.set_num_threads(os.cpu_count())
        torch.set_grad_enabled(False)
        prepare, run = torch.from_numpy, lambda form, a, b: FORMS[form](a, b)
    else:  # numpy
        prepare, run = (lambda x: x), lambda form, a, b: FORMS[form](a, b)
    out = {}
    for m, k, n in MATMULS:
        for form in FORMS:
            a, b = map(prepare, operands(m, k, n, form))
            out[f"{m}x{k}x{n} {form}"] = 2 * m * k * n / median_s(lambda: run(form, a, b), reps) / 1e9
    return out


def work_attention(backend: str, reps: int) -> dict:
    """Causal attention forward + backward (gradients of q, k, v), milliseconds."""
    import numpy as np

    out = {}
    for b, t, n, h in ATTENTION:
        rng = np.random.default_rng(0)
        q, k, v, g = (rng.standard_normal((b, t, n, h), dtype=np.float32) for _ in range(4))
        key = f"{b}x{t}x{n}x{h}"
        if backend == "torch":
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(os.cpu_count())
            tq, tk, tv, tg = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v, g))

            def step():
                (F.scaled_dot_product_attention(tq, tk, tv, is_causal=True) * tg).sum().backward()
            out[f"{key} sdpa"] = median_s(step, reps) * 1e3
            continue
        import jax
        import jax.numpy as jnp

        from pretrain.model import attention_mask, blocked_attention

        mask = attention_mask(jnp.ones((b, t), jnp.int32), t)
        variants = {f"blocked {blk}": (lambda blk: lambda q, k, v: blocked_attention(q, k, v, mask[:, 0], blk))(blk)
                    for blk in (64, 128, 256)}
        variants["dot_product_attention xla"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation="xla")
        jq, jk, jv, jg = map(jnp.asarray, (q, k, v, g))
        for name, attn in variants.items():
            grad = jax.jit(jax.grad(lambda q, k, v, attn=attn: (attn(q, k, v) * jg).sum(), argnums=(0, 1, 2)))
            out[f"{key} {name}"] = median_s(lambda: jax.block_until_ready(grad(jq, jk, jv)), reps) * 1e3
    return out


def work_mlp(backend: str, reps: int) -> dict:
    """SwiGLU forward + backward, gate and up as two weights or one fused [d, 2·d_ff], milliseconds."""
    import numpy as np

    out = {}
    for m, d, f in MLP:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((m, d), dtype=np.float32)
        wg, wu = (rng.standard_normal((d, f), dtype=np.float32) * 0.02 for _ in range(2))
        wd = rng.standard_normal((f, d), dtype=np.float32) * 0.02
        key = f"{m}x{d}x{f}"
        if backend == "torch":
            import torch
            import torch.nn.functional as F

            torch.set_num_threads(os.cpu_count())
            tx, tg, tu, td = (torch.from_numpy(a).requires_grad_(True) for a in (x, wg, wu, wd))
            tgu = torch.from_numpy(np.concatenate([wg, wu], 1)).requires_grad_(True)

            def separate():
                ((F.silu(tx @ tg) * (tx @ tu)) @ td).sum().backward()

            def fused():
                gate, up = (tx @ tgu).chunk(2, dim=1)
                ((F.silu(gate) * up) @ td).sum().backward()
            out[f"{key} separate"], out[f"{key} fused"] = median_s(separate, reps) * 1e3, median_s(fused, reps) * 1e3
            continue
        import jax
        import jax.numpy as jnp

        jx, jg, ju, jd = map(jnp.asarray, (x, wg, wu, wd))
        jgu = jnp.concatenate([jg, ju], 1)
        separate = jax.jit(jax.grad(lambda x, g, u, d: ((jax.nn.silu(x @ g) * (x @ u)) @ d).sum(), argnums=(0, 1, 2, 3)))

        def fused_loss(x, gu, d):
            h = x @ gu
            return ((jax.nn.silu(h[:, :f]) * h[:, f:]) @ d).sum()
        fused = jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2)))
        out[f"{key} separate"] = median_s(lambda: jax.block_until_ready(separate(jx, jg, ju, jd)), reps) * 1e3
        out[f"{key} fused"] = median_s(lambda: jax.block_until_ready(fused(jx, jgu, jd)), reps) * 1e3
    return out


def work_optimizer(backend: str, reps: int) -> dict:
    """Global-norm clipping + AdamW over the 512x4 model's parameter shapes (22.0M), milliseconds."""
    import numpy as np

    shapes = [(8192, 512), (512, 8192)] + [(512, 512)] * 16 + [(512, 1536)] * 8 + [(1536, 512)] * 4 + [(512,)] * 9
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    grads = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in shapes]
    key = f"{sum(p.size for p in params) / 1e6:.1f}M params"
    if backend == "torch":
        import torch

        torch.set_num_threads(os.cpu_count())
        tp = [torch.from_numpy(p.copy()).requires_grad_(True) for p in params]
        for p, g in zip(tp, grads):
            p.grad = torch.from_numpy(g)
        opt = torch.optim.AdamW(tp, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(tp, 1.0)
            opt.step()
        return {f"{key} clip + fused AdamW": median_s(step, reps) * 1e3}
    import jax
    import optax

    from pretrain.config import load_config
    from pretrain.optimizer import make_optimizer

    tx, _ = make_optimizer(load_config(None, []).optimizer, 1000)
    jp = {str(i): jax.numpy.asarray(p) for i, p in enumerate(params)}
    jg = {str(i): jax.numpy.asarray(g) for i, g in enumerate(grads)}

    @jax.jit
    def update(p, s):
        u, s = tx.update(jg, s, p)
        return optax.apply_updates(p, u), s
    state = [jp, tx.init(jp)]

    def step():
        state[0], state[1] = update(*state)
        jax.block_until_ready(state)
    return {f"{key} clip + optax AdamW": median_s(step, reps) * 1e3}


PARTS = {"matmul": (work_matmul, ["xla", *[b for b in XLA_BACKENDS if b != "xla"], "numpy", "torch"]),
         "attention": (work_attention, ["xla", "torch"]),
         "mlp": (work_mlp, ["xla", "torch"]),
         "optimizer": (work_optimizer, ["xla", "torch"])}


def run_child(part: str, backend: str, reps: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + XLA_BACKENDS.get(backend, "").split())
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--_part", part, "--_backend", backend, "--reps", str(reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{part} on {backend} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per figure (median reported)")
    p.add_argument("--_part", help=argparse.SUPPRESS)
    p.add_argument("--_backend", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._part:
        print(json.dumps(PARTS[args._part][0](args._backend, args.reps)))
        return

    sys.path.insert(0, str(REPO))
    from bench.train_throughput import machine

    info = machine()
    print(f"# {info['cpu_model']}, {info['cores']} cores; jax {info['jax']}, torch {info['torch']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for part in [s.strip() for s in args.parts.split(",") if s.strip()]:
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
        backends = PARTS[part][1]
        results[part] = {b: run_child(part, b, args.reps) for b in backends}
        unit = "GFLOP/s (higher is better)" if part == "matmul" else "ms (lower is better)"
        print(f"\n## {part}: {unit}")
        print(f"{'':>26}" + "".join(f"{b:>12}" for b in backends))
        for key in results[part][backends[0]]:
            cells = [results[part][b].get(key) for b in backends]
            print(f"{key:>26}" + "".join(f"{c:>12.1f}" if c is not None else f"{'-':>12}" for c in cells))
        if part in ("attention", "mlp", "optimizer"):  # torch's figures have other keys: list them too
            for key, v in results[part]["torch"].items():
                if key not in results[part][backends[0]]:
                    print(f"{key + ' (torch)':>26}{v:>12.1f}")
    print(json.dumps({"bench": "cpu_kernels", "machine": info, "reps": args.reps,
                      "xla_backends": XLA_BACKENDS, "load_average_end": os.getloadavg()[0], "results": results}))


if __name__ == "__main__":
    main()
