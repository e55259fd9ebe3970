"""Tokens/s of `danlu sample`'s generation (jitted prefill + while_loop decode over a KV cache)
against Hugging Face `transformers` `generate` (torch CPU, KV cache) on the same weights (a random
LLaMA-shaped danlu model exported with `danlu export-hf`), the same prompts and max_new_tokens.

    .venv/bin/python bench/sample_throughput.py            # d 256, 4 layers, vocab 4096, 64 new tokens
    .venv/bin/python bench/sample_throughput.py --quick    # smaller, for a smoke test

Rows: greedy and sampling (temperature 0.8, top-k 50, top-p 0.95), batch 1 and batch 8 (prompts of
16..48 tokens, left-padded on both sides). Generation runs to max_new_tokens (no EOS) on both.
Times are the median of --repeats runs after one warm-up (danlu's compile time is reported
apart). Figures count generated tokens only. Greedy batch-1 outputs are compared token for token.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="d 128, 2 layers, 32 new tokens, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.new_tokens, args.repeats = 128, 2, 4, 2, 32, 2

    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from pretrain.config import load_config
    from pretrain.generate import Sampling, generate
    from pretrain.hf import export_hf, write_run
    from pretrain.model import init_model

    torch.set_num_threads(os.cpu_count())
    overrides = [f"model.vocab_size={args.vocab}", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                 f"model.n_heads={args.heads}", f"model.n_kv_heads={args.kv_heads}", "model.max_seq_len=512",
                 "model.init_std=0.05", "data.seq_len=128"]
    cfg = load_config(None, overrides)
    m = cfg.model
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(init_model(m, 0))))()
    work = tempfile.mkdtemp(prefix="danlu-sample-bench-")
    write_run(os.path.join(work, "run"), cfg, params)
    export_hf(os.path.join(work, "run"), os.path.join(work, "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf")).eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as danlu does with eos_id=None

    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, args.vocab, int(n)).tolist() for n in rng.integers(16, 49, 8)]
    n_new = args.new_tokens
    modes = {"greedy": Sampling(greedy=True), "sample": Sampling(temperature=0.8, top_k=50, top_p=0.95)}

    def run_danlu(batch, sampling):
        return generate(params, m, batch, max_new_tokens=n_new, sampling=sampling, eos_id=None, seed=0)

    def run_hf(batch, sampling):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        kw = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                              use_cache=True, **kw)
        return out[:, width:].tolist()

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        return time.perf_counter() - t0, out

    rows = []
    for mode, sampling in modes.items():
        for bsz in (1, 8):
            batch = prompts[:bsz]
            compile_s, d_out = timed(run_danlu, batch, sampling)
            _, h_out = timed(run_hf, batch, sampling)  # warm-up
            assert all(len(r) == n_new for r in d_out) and all(len(r) == n_new for r in h_out)
            d_times = [timed(run_danlu, batch, sampling)[0] for _ in range(args.repeats)]
            h_times = [timed(run_hf, batch, sampling)[0] for _ in range(args.repeats)]
            d_tps, h_tps = bsz * n_new / statistics.median(d_times), bsz * n_new / statistics.median(h_times)
            row = {"mode": mode, "batch": bsz, "danlu_tokens_per_s": round(d_tps, 1),
                   "transformers_tokens_per_s": round(h_tps, 1), "speedup": round(d_tps / h_tps, 2),
                   "danlu_first_call_s": round(compile_s, 2)}
            if mode == "greedy":
                row["greedy_outputs_equal"] = d_out == h_out
            rows.append(row)
            print(f"{mode:6s} batch {bsz}: danlu {d_tps:8.1f} tok/s   transformers {h_tps:8.1f} tok/s   "
                  f"x{d_tps / h_tps:.2f}   (danlu first call incl. compile {compile_s:.1f} s)", flush=True)
    result = {"benchmark": "sample_throughput", "model": {"d_model": m.d_model, "n_layers": m.n_layers,
              "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "vocab_size": m.vocab_size,
              "params": int(sum(x.size for x in jax.tree.leaves(params)))},
              "new_tokens": n_new, "prompt_tokens": [len(p) for p in prompts], "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
