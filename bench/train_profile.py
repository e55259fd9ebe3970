"""Where danlu's CPU train step spends its time: a jax.profiler trace of a few steps of one
`bench/train_throughput.py` shape, read back per XLA op.

    .venv/bin/python bench/train_profile.py --shape 512x4            # batch as train_throughput picks it
    .venv/bin/python bench/train_profile.py --shape 256x8 --batch 8 --top 20

Prints, per step: wall time; busy time of XLA:CPU's worker threads by part of the model (the
`jax.named_scope`s of pretrain/model.py and pretrain/train.py: embed, attention, mlp, norm, loss,
optimizer) and pass (forward, backward, recomputed under remat), split into matmuls and other ops;
and each matmul's in-step GFLOP/s, with the matmul time binned by it (compare with the same shapes
run alone in bench/cpu_kernels.py). Time that XLA's matmul library spends on helper threads is not
in the trace, so a matmul's time is its wall time on the thread that ran it. The last line is one
JSON object.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("embed", "attention", "mlp", "norm", "loss", "optimizer")


def op_table(hlo: str) -> dict[str, dict]:
    """HLO instruction name -> {"op_name": jax name stack, "flops": matmul FLOPs or 0}."""
    shapes = {m.group(1): [int(v) for v in m.group(2).split(",") if v]
              for m in re.finditer(r"%?([\w.\-]+)(?: =|:) \w+\[([\d,]*)\]", hlo)}
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.M | re.S)}

    def dot_flops(text: str) -> int:
        total = 0
        for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\),.*?lhs_contracting_dims=\{([\d,]*)\}", text):
            out = [int(v) for v in m.group(1).split(",") if v]
            lhs = shapes.get(m.group(2), [])
            k = math.prod(lhs[int(i)] for i in m.group(3).split(",") if i and int(i) < len(lhs))
            total += 2 * math.prod(out) * k
        return total

    table = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)$", hlo, re.M):
        name, rest = m.group(1), m.group(2)
        op = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        if " dot(" in rest:
            flops = dot_flops(m.group(0))
        elif calls and "fusion(" in rest:  # a library (YNNPACK, oneDNN) fusion around a dot, or a loop fusion
            flops = dot_flops(bodies.get(calls.group(1), ""))
        else:
            flops = 0
        table[name] = {"op_name": op.group(1) if op else "", "flops": flops}
    return table


def classify(op_name: str) -> tuple[str, str]:
    """(part, pass) of an op from its jax name stack."""
    part = next((p for p in PARTS if f"({p})" in op_name or f"/{p}/" in op_name), "other")
    if "rematted_computation" in op_name:
        step_pass = "recompute"
    elif "transpose(" in op_name:
        step_pass = "backward"
    else:
        step_pass = "forward"
    if part == "optimizer":
        step_pass = "update"
    return part, step_pass


def read_trace(trace_dir: str) -> list[dict]:
    """Leaf op events on XLA:CPU's worker threads."""
    path = glob.glob(f"{trace_dir}/plugins/profile/*/*.trace.json.gz")[0]
    events = json.load(gzip.open(path))["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X" and threads.get((e["pid"], e["tid"]), "").startswith("tf_XLAEigen")
            and not e["name"].startswith(("ThunkExecutor", "Slinky", "ThreadpoolListener", "end: "))]


RATE_BINS = (50, 110, 150)  # GFLOP/s; one core of the 2-core AMD EPYC reaches ~105 on these shapes


def rate_bins(per_op: dict, calls: dict, table: dict, steps: int) -> dict:
    """Matmul thread-ms per step by the in-step rate the op ran at (below ~one core's rate = one core)."""
    bins = collections.Counter()
    for name, ms in per_op.items():
        flops = table.get(name, {}).get("flops", 0)
        if flops:
            rate = flops * calls[name] / steps / (ms / 1e3) / 1e9
            edge = next((b for b in RATE_BINS if rate < b), None)
            bins[f"< {edge}" if edge else f">= {RATE_BINS[-1]}"] += ms
    order = [f"< {b}" for b in RATE_BINS] + [f">= {RATE_BINS[-1]}"]
    return {key: bins[key] for key in order if key in bins}


def profile(args) -> dict:
    sys.path.insert(0, str(REPO))
    import jax

    from bench.train_throughput import auto_batch, danlu_step, shape_overrides
    from pretrain.config import load_config
    from pretrain.flops import cpu_peak_flops, flops_per_token

    d, _, n = args.shape.partition("x")
    d, n = int(d), int(n)
    model_cfg = load_config(None, shape_overrides(d, n, args.vocab, args.seq, 1)).model
    batch_size = args.batch or auto_batch(flops_per_token(model_cfg, args.seq)["total"], args.seq, cpu_peak_flops())
    built, batch = danlu_step(d, n, batch_size, args.vocab, args.seq, args.danlu)
    state = built.state
    for _ in range(3):
        state, metrics = built.train_step(state, batch)
        jax.block_until_ready(metrics["loss"])
    table = op_table(built.train_step.lower(state, batch).compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, metrics = built.train_step(state, batch)
                jax.block_until_ready(metrics["loss"])
        wall = (time.perf_counter() - t0) / args.steps
        events = read_trace(trace_dir)

    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        per_op[e["name"]] += e["dur"] / 1e3 / args.steps
        calls[e["name"]] += 1
    parts = collections.Counter()
    matmul_flops = 0
    for name, ms in per_op.items():
        info = table.get(name, {"op_name": "", "flops": 0})
        part, step_pass = classify(info["op_name"])
        kind = "matmul" if info["flops"] else "other"
        parts[f"{part} {step_pass} {kind}"] += ms
        matmul_flops += info["flops"] * calls[name] / args.steps
    dots = {name for name in per_op if table.get(name, {}).get("flops")}
    dot_ms = sum(per_op[name] for name in dots)
    top = []
    for name, ms in per_op.most_common(args.top):
        info = table.get(name, {"op_name": "", "flops": 0})
        rate = info["flops"] * calls[name] / args.steps / (ms / 1e3) / 1e9 if info["flops"] else None
        top.append({"op": name, "ms": ms, "calls": calls[name] // args.steps, "gflops": rate,
                    "where": " ".join(classify(info["op_name"])), "op_name": info["op_name"][-90:]})
    return {"shape": args.shape, "batch": batch_size, "steps": args.steps, "wall_ms": wall * 1e3,
            "busy_thread_ms": sum(per_op.values()), "matmul_thread_ms": dot_ms,
            "matmul_gflop": matmul_flops / 1e9, "matmul_gflops_in_step": matmul_flops / 1e9 / (dot_ms / 1e3),
            "matmul_ms_by_gflops": rate_bins(per_op, calls, table, args.steps),
            "by_part": dict(sorted(parts.items(), key=lambda kv: -kv[1])), "top_ops": top}


def main(argv=None) -> None:
    from bench.train_throughput import DANLU_CPU

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="512x4", help="D_MODELxN_LAYERS, as in train_throughput.py")
    p.add_argument("--batch", type=int, default=0, help="sequences per step; 0: train_throughput.py's choice")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 untimed ones)")
    p.add_argument("--top", type=int, default=15, help="how many of the most expensive ops to list")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--danlu", default=DANLU_CPU, help="danlu config overrides, space-separated")
    args = p.parse_args(argv)
    r = profile(args)
    print(f"# {r['shape']}, batch {r['batch']}: {r['wall_ms']:.0f} ms/step wall; worker threads busy "
          f"{r['busy_thread_ms']:.0f} ms/step, matmuls {r['matmul_thread_ms']:.0f} ms/step "
          f"({r['matmul_gflop']:.1f} GFLOP at {r['matmul_gflops_in_step']:.0f} GFLOP/s); matmul ms/step by "
          f"in-step GFLOP/s: " + ", ".join(f"{k}: {v:.0f}" for k, v in r["matmul_ms_by_gflops"].items()))
    print(f"\n{'thread ms/step':>15}  part, pass, kind")
    for key, ms in r["by_part"].items():
        print(f"{ms:>15.1f}  {key}")
    print(f"\n{'ms/step':>8} {'calls':>5} {'GFLOP/s':>8}  op (part pass)")
    for op in r["top_ops"]:
        rate = f"{op['gflops']:.0f}" if op["gflops"] else "-"
        print(f"{op['ms']:>8.1f} {op['calls']:>5} {rate:>8}  {op['op']} ({op['where']})")
    print(json.dumps({"bench": "train_profile", **r}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # One real CPU device, as in train_throughput.py: drop a simulated-devices flag.
    os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                       if "force_host_platform_device_count" not in f)
    main()
