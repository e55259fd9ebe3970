"""GPU check of danlu's train step: cuDNN vs XLA attention (numerics), then throughput and MFU.

    python3 bench/gpu_check.py                  # on a GPU: ~5 minutes (mostly compilation)
    JAX_PLATFORMS=cpu .venv/bin/python bench/gpu_check.py --quick    # CPU smoke test, cudnn skipped
    python3 bench/gpu_check.py --preflight      # exit 0 iff the tiny step builds and runs here

Three stages, each recorded even when a case fails (the error text is kept, the run goes on):

1. kernel: ``jax.nn.dot_product_attention`` on random bf16 q/k/v (GQA, causal), xla vs cudnn,
   output and gradients, each measured against an fp32 XLA reference at precision=highest.
   cudnn passes when its error is at most 2x the error of XLA's own bf16 path (plus 1e-3):
   both kernels round to bf16 (8 mantissa bits) in different places, so their distance to the
   exact answer should be of the same size; also with a segment mask (cudnn turns it into a
   dense [B, 1, T, T] bias).
2. model: the tiny preset (seq 256, batch 8, constant lr 1e-3), 3 train steps from the same
   weights on the same batch, xla vs cudnn, in bf16 and fp32 compute, for three masking cases:
   `causal` (model.segment_masking=false: is_causal=True), `mask1` (segment_masking=true, all
   segment ids 1: the model builds an explicit causal&same-segment mask) and `twodoc` (two
   documents per row, segment ids 1 then 2, positions restarting; mask1 in bf16 only). The
   "fp32" cases use XLA's default matmul precision (TF32 on Hopper). The figure compared is the
   loss after 3 updates (eval on the batch). Tolerance: |cudnn - xla| <= max(5e-3, 4 * gap),
   where gap = |xla bf16 - xla fp32| for that case: stage 1 checks that cudnn's bf16 error is of
   the size of XLA's own, so two bf16 paths should sit within ~2 gaps of each other; the 5e-3
   floor (0.06% of the initial loss ln(4096) = 8.3) covers a gap that happens to be tiny. One
   Adam step here lowers the loss by ~0.3, so a wrong mask or gradient cannot hide in 5e-3.
3. throughput: the 125m preset, bf16 compute, seq 2048, global batch 16, one device:
   attention {xla, cudnn} x remat {none, full} x segment_masking {true, false}, in order of
   interest, until the time budget is spent. tokens/s over `--steps` timed steps (after 2
   warm-up steps), MFU = tokens/s * flops_per_token(model, seq)["total"] / peak_flops_per_device.
   `xla_flops_per_step` is XLA's cost_analysis, kept for reference only: it counts the scanned
   layer body once and not the cuDNN custom calls (seen: 0.02x and 0.001x of the analytic figure).

The last line printed is one JSON object with every figure; with $OUT set it is also written
to $OUT/gpu_check.json.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T0 = time.perf_counter()


RESULT: dict = {}  # filled as the stages run; save_partial() writes it so a killed run leaves figures


def save_partial() -> None:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check_partial.json").write_text(json.dumps(RESULT, default=str) + "\n")


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f}s] {msg}", flush=True)


def err_text(e: BaseException, limit: int = 600) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit] + " ..."


def _import_build():
    """pretrain.train imports pretrain.data (grain). Use it when it imports; else stub the loader,
    which the step does not use, and say so."""
    try:
        import pretrain.data  # noqa: F401
        stub = None
    except ImportError as e:
        import types

        mod = types.ModuleType("pretrain.data")
        mod.make_train_iterator = None
        mod.make_eval_batches = None
        sys.modules["pretrain.data"] = mod
        stub = err_text(e)
        log(f"pretrain.data did not import ({stub}); stubbed it (the train step does not use the loader)")
    from pretrain.config import load_config
    from pretrain.train import build
    return load_config, build, stub


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "grain", "array-record", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    info = {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__}
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions is not None and d.platform == "gpu":
            info["cudnn_version"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # noqa: BLE001
        info["cudnn_version"] = err_text(e, 200)
    try:
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            info["memory_limit_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    if d.platform == "gpu":
        import subprocess
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            info["nvidia_smi"] = err_text(e, 200)
    return info


# --- stage 1: the attention kernel alone --------------------------------------------------------

def kernel_check(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    on_gpu = jax.devices()[0].platform == "gpu"
    b, t, n, k, h = (2, 1024, 12, 4, 64) if not quick else (2, 128, 4, 2, 32)
    rng = np.random.default_rng(0)
    q32, k32, v32, g32 = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                          for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)))
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    causal = np.tril(np.ones((t, t), bool))
    mask = jnp.asarray((causal[None] & (seg[:, :, None] == seg[:, None, :]))[:, None])

    def run(impl, dtype, masked):
        def f(q, kk, v):
            kw = dict(mask=mask) if masked else dict(is_causal=True)
            prec = getattr(jax, "default_matmul_precision", None)  # fp32 reference: no TF32 passes
            with prec("highest" if dtype == jnp.float32 else "default") if prec is not None else contextlib.nullcontext():
                out = jax.nn.dot_product_attention(q, kk, v, implementation=impl, **kw)
            return out, jnp.sum(out.astype(jnp.float32) * g32)

        fn = jax.jit(lambda q, kk, v: (f(q, kk, v)[0], jax.grad(lambda *a: f(*a)[1], argnums=(0, 1, 2))(q, kk, v)))
        out, grads = fn(q32.astype(dtype), k32.astype(dtype), v32.astype(dtype))
        return [np.asarray(x.astype(jnp.float32)) for x in (out, *grads)]

    res = {"shape_BTNKH": [b, t, n, k, h]}
    for masked in (False, True):
        case = "segment_mask" if masked else "causal"
        ref = run("xla", jnp.float32, masked)
        errs = {}
        impls = ["xla", "cudnn"] if on_gpu else ["xla"]
        for impl in impls:
            try:
                got = run(impl, jnp.bfloat16, masked)
                errs[impl] = [float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), 1e-30))
                              for a, r in zip(got, ref)]
            except Exception as e:  # noqa: BLE001
                errs[impl] = err_text(e)
        entry = {"max_rel_err_out_dq_dk_dv": errs}
        if isinstance(errs.get("cudnn"), list) and isinstance(errs.get("xla"), list):
            entry["pass"] = all(c <= 2 * x + 1e-3 for c, x in zip(errs["cudnn"], errs["xla"]))
        elif not on_gpu:
            entry["cudnn"] = "skipped (not a GPU)"
        res[case] = entry
        log(f"kernel {case}: {entry}")
    # fp32 inputs to the cudnn kernel (what model.compute_dtype=float32 gives it)
    if on_gpu:
        try:
            run("cudnn", jnp.float32, False)
            res["cudnn_fp32"] = "ran"
        except Exception as e:  # noqa: BLE001
            res["cudnn_fp32"] = err_text(e)
        log(f"kernel cudnn fp32: {res['cudnn_fp32']}")
    return res


# --- stage 2: the model's train step, xla vs cudnn ------------------------------------------------

def make_batch(batch: int, seq: int, vocab: int, two_docs: bool, seed: int = 0) -> dict:
    import numpy as np

    tok = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    seg = np.ones((batch, seq), np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    if two_docs:
        cut = seq // 2 - 7  # not a power of two: the boundary falls inside a block
        seg[:, cut:] = 2
        pos[:, cut:] = np.arange(seq - cut, dtype=np.int32)
    return {"inputs": tok[:, :-1].copy(), "targets": tok[:, 1:].copy(), "segment_ids": seg, "positions": pos}


def model_case(load_config, build, attention: str, dtype: str, case: str, quick: bool) -> dict:
    import jax

    seq, batch = (128, 4) if quick else (256, 8)
    overrides = [f"model.attention={attention}", f"model.compute_dtype={dtype}",
                 f"model.segment_masking={'false' if case == 'causal' else 'true'}",
                 f"data.seq_len={seq}", f"train.global_batch_size={batch}", "train.steps=100",
                 "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=1e-3",
                 "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "checkpoint.enabled=false"]
    cfg = load_config(REPO / "configs/train/tiny.yaml", overrides)
    built = build(cfg, devices=jax.devices()[:1])
    b = jax.device_put(make_batch(batch, seq, cfg.model.vocab_size, case == "twodoc"), built.batch_sharding)
    state, losses = built.state, []
    for _ in range(3):
        state, m = built.train_step(state, b)
        losses.append(float(m["loss"]))
    ev = jax.device_get(built.eval_step(state.params, b))
    return {"step_losses": losses, "loss_after_3": float(ev["ce_sum"]) / float(ev["tokens"])}


def model_check(load_config, build, quick: bool) -> dict:
    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    runs: dict = {}
    RESULT["model"] = {"runs": runs, "compare": {}}
    for dtype in ("bfloat16", "float32"):
        for case in ("causal", "mask1", "twodoc") if dtype == "bfloat16" else ("causal", "twodoc"):
            for attention in ("xla", "cudnn"):
                key = f"{attention}/{dtype}/{case}"
                if attention == "cudnn" and not on_gpu:
                    runs[key] = "skipped (not a GPU)"
                    continue
                try:
                    runs[key] = model_case(load_config, build, attention, dtype, case, quick)
                except Exception as e:  # noqa: BLE001
                    runs[key] = {"error": err_text(e)}
                log(f"model {key}: {runs[key]}")
                save_partial()
                gc.collect()
    # comparisons
    cmp = {}
    for dtype in ("bfloat16", "float32"):
        for case in ("causal", "mask1", "twodoc") if dtype == "bfloat16" else ("causal", "twodoc"):
            x, c = runs.get(f"xla/{dtype}/{case}"), runs.get(f"cudnn/{dtype}/{case}")
            ref_case = "causal" if case == "mask1" else case  # mask1 is the causal math (no fp32 run)
            xb, xf = runs.get(f"xla/bfloat16/{ref_case}"), runs.get(f"xla/float32/{ref_case}")
            gap = (abs(xb["loss_after_3"] - xf["loss_after_3"])
                   if isinstance(xb, dict) and isinstance(xf, dict) and "loss_after_3" in xb and "loss_after_3" in xf
                   else None)
            tol = max(5e-3, 4 * gap) if gap is not None else 5e-3
            entry = {"bf16_vs_fp32_gap_xla": gap, "tol": tol}
            if isinstance(x, dict) and isinstance(c, dict) and "loss_after_3" in x and "loss_after_3" in c:
                d = abs(x["loss_after_3"] - c["loss_after_3"])
                entry.update(abs_diff=d, step_abs_diffs=[abs(a - b) for a, b in zip(x["step_losses"], c["step_losses"])],
                             pass_=d <= tol)
            else:
                entry["result"] = c if not isinstance(c, dict) else c.get("error", "xla failed")
            cmp[f"{dtype}/{case}"] = entry
    # the explicit mask with all-ones segments must equal is_causal (same math, two code paths)
    for dtype in ("bfloat16", "float32"):
        a, m1 = runs.get(f"xla/{dtype}/causal"), runs.get(f"xla/{dtype}/mask1")
        if isinstance(a, dict) and isinstance(m1, dict) and "loss_after_3" in a and "loss_after_3" in m1:
            cmp[f"xla_causal_vs_mask1/{dtype}"] = abs(a["loss_after_3"] - m1["loss_after_3"])
    return {"runs": runs, "compare": cmp}


# --- stage 3: throughput -------------------------------------------------------------------------

def throughput_case(load_config, build, preset: str, attention: str, remat: str, segmask: bool,
                    seq: int, batch: int, steps: int, extra: list[str]) -> dict:
    import jax

    from pretrain.flops import flops_per_token, peak_flops_per_device

    overrides = [f"model.attention={attention}", f"model.remat={remat}", "model.compute_dtype=bfloat16",
                 f"model.segment_masking={str(segmask).lower()}", f"data.seq_len={seq}",
                 f"train.global_batch_size={batch}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
                 "checkpoint.enabled=false", *extra]
    cfg = load_config(REPO / preset, overrides)
    out: dict = {}
    t = time.perf_counter()
    built = build(cfg, devices=jax.devices()[:1])
    jax.block_until_ready(built.state)
    out["build_s"] = round(time.perf_counter() - t, 2)
    b = jax.device_put(make_batch(batch, seq, cfg.model.vocab_size, False), built.batch_sharding)
    t = time.perf_counter()
    compiled = built.train_step.lower(built.state, b).compile()
    out["compile_s"] = round(time.perf_counter() - t, 2)
    try:
        ma = compiled.memory_analysis()
        out["temp_gib"] = round(ma.temp_size_in_bytes / 2**30, 2)
        out["args_gib"] = round(ma.argument_size_in_bytes / 2**30, 2)
    except Exception as e:  # noqa: BLE001
        out["memory_analysis"] = err_text(e, 200)
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["xla_flops_per_step"] = float(ca.get("flops", float("nan")))
    except Exception as e:  # noqa: BLE001
        out["cost_analysis"] = err_text(e, 200)
    state, losses = built.state, []
    for _ in range(2):  # warm-up (first runs allocate, autotuned kernels load)
        state, m = compiled(state, b)
        losses.append(float(m["loss"]))
    t = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, b)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t) / steps
    losses.append(float(m["loss"]))
    tokens = batch * seq
    fpt = flops_per_token(cfg.model, seq)
    peak = peak_flops_per_device(jax.devices()[0])
    tps = tokens / dt
    out.update(step_ms=round(dt * 1e3, 2), tokens_per_s=round(tps, 1), mfu=round(tps * fpt["total"] / peak, 4),
               model_tflops_per_s=round(tps * fpt["total"] / 1e12, 3), flops_per_token=fpt["total"],
               losses_first2_last=[round(x, 5) for x in losses])
    if "xla_flops_per_step" in out:
        out["xla_flops_over_analytic"] = round(out["xla_flops_per_step"] / (fpt["total"] * tokens), 3)
    del state, m, compiled, built, b
    return out


def throughput(load_config, build, args) -> dict:
    import jax

    on_gpu = jax.devices()[0].platform == "gpu"
    if args.quick:
        preset, seq, batch, steps, extra = "configs/train/tiny.yaml", 128, 8, 3, []
    else:
        preset, seq, batch, steps, extra = "configs/train/125m.yaml", args.seq, args.batch, args.steps, []
    grid = [("xla", "none", True), ("cudnn", "none", True), ("cudnn", "none", False), ("xla", "full", True),
            ("cudnn", "full", False), ("xla", "none", False), ("cudnn", "full", True), ("xla", "full", False)]
    res = {"preset": preset, "seq_len": seq, "global_batch": batch, "timed_steps": steps, "runs": {}}
    RESULT["throughput"] = res
    for attention, remat, segmask in grid:
        key = f"{attention}/remat={remat}/segmask={str(segmask).lower()}"
        if attention == "cudnn" and not on_gpu:
            res["runs"][key] = "skipped (not a GPU)"
            continue
        if elapsed() > args.budget_s:
            res["runs"][key] = f"skipped (time budget {args.budget_s}s spent)"
            log(f"throughput {key}: {res['runs'][key]}")
            continue
        try:
            res["runs"][key] = throughput_case(load_config, build, preset, attention, remat, segmask,
                                               seq, batch, steps, extra)
        except Exception as e:  # noqa: BLE001
            res["runs"][key] = {"error": err_text(e)}
        log(f"throughput {key}: {res['runs'][key]}")
        save_partial()
        gc.collect()
        jax.clear_caches()
    return res


def print_table(result: dict) -> None:
    print("\n== model check: loss after 3 steps, xla vs cudnn (tiny preset) ==")
    print(f"{'case':<22}{'xla':>12}{'cudnn':>12}{'|diff|':>11}{'tol':>9}  result")
    runs = result["model"]["runs"]
    for key, c in result["model"]["compare"].items():
        if "/" not in key or key.startswith("xla_causal"):
            continue
        dtype, case = key.split("/")
        x, cu = runs.get(f"xla/{dtype}/{case}"), runs.get(f"cudnn/{dtype}/{case}")
        xs = f"{x['loss_after_3']:.5f}" if isinstance(x, dict) and "loss_after_3" in x else "err"
        cs = f"{cu['loss_after_3']:.5f}" if isinstance(cu, dict) and "loss_after_3" in cu else "-"
        ds = f"{c['abs_diff']:.2e}" if "abs_diff" in c else "-"
        verdict = ("PASS" if c["pass_"] else "FAIL") if "pass_" in c else str(c.get("result"))[:90]
        print(f"{key:<22}{xs:>12}{cs:>12}{ds:>11}{c['tol']:>9.3g}  {verdict}")
    tp = result["throughput"]
    print(f"\n== throughput: {tp['preset']}, seq {tp['seq_len']}, global batch {tp['global_batch']}, bf16 ==")
    print(f"{'config':<36}{'step ms':>9}{'tokens/s':>12}{'MFU':>8}{'compile s':>11}{'temp GiB':>10}")
    for key, r in tp["runs"].items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            print(f"{key:<36}{r['step_ms']:>9.1f}{r['tokens_per_s']:>12.0f}{r['mfu']:>8.1%}{r['compile_s']:>11.1f}"
                  f"{r.get('temp_gib', float('nan')):>10.2f}")
        else:
            print(f"{key:<36}  {str(r if not isinstance(r, dict) else r.get('error'))[:110]}")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes everywhere (CPU smoke test)")
    ap.add_argument("--preflight", action="store_true", help="only build and step the tiny model once")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per throughput config")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="start no new throughput config after this many seconds of the run")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: kernel,model,throughput")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import jax

    load_config, build, stub = _import_build()
    if args.preflight:
        try:
            r = model_case(load_config, build, "xla", "float32", "causal", True)
            print(json.dumps({"preflight": "ok", "versions": versions(), "loader_stub": stub, **r}))
            return 0
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(json.dumps({"preflight": "failed", "error": err_text(e), "versions": versions()}))
            return 3

    from pretrain.flops import peak_flops_per_device

    result = RESULT
    result.update({"device": device_info(), "versions": versions(), "loader_stub": stub, "argv": sys.argv[1:]})
    try:
        result["device"]["peak_flops_per_device"] = peak_flops_per_device(jax.devices()[0])
    except Exception as e:  # noqa: BLE001
        result["device"]["peak_flops_per_device"] = err_text(e)
    log(f"device: {result['device']}")
    log(f"versions: {result['versions']}")
    def stage(name, fn, empty):
        if name in skip:
            result[name] = empty
            return
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001  (a broken stage must not cost the others)
            traceback.print_exc()
            result[name] = {**empty, "error": err_text(e)} if isinstance(empty, dict) else err_text(e)
        save_partial()

    stage("kernel", lambda: kernel_check(args.quick), "skipped")
    stage("model", lambda: model_check(load_config, build, args.quick), {"runs": {}, "compare": {}})
    stage("throughput", lambda: throughput(load_config, build, args),
          {"preset": "-", "seq_len": 0, "global_batch": 0, "runs": {}})
    result["wall_s"] = round(elapsed(), 1)
    print_table(result)
    line = json.dumps(result, default=str)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
