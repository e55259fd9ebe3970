"""Parameter counts, training FLOPs per token, peak FLOP/s per chip, and MFU.

Everything here is analytic except the CPU peak, which is measured once per host and cached.

    counts = count_params(cfg.model)                  # {"total", "embedding", "nonembed"}
    fpt = flops_per_token(cfg.model, seq_len=2048)    # {"six_n", "attention", "total", ...}
    peak = peak_flops_per_device(jax.devices()[0])    # FLOP/s per chip (or per CPU "device")
    mfu(tokens_per_sec, fpt["total"], jax.device_count(), peak)

The model config is anything with the attributes of `pretrain.config`'s model section:
`vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, max_seq_len, norm,
position, mlp, tie_embeddings, qk_norm, use_bias` (`head_dim` and `n_kv_heads` resolved ints).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

_NORMS = ("rmsnorm", "layernorm")
_MLPS = ("swiglu", "gelu")
_POSITIONS = ("rope", "learned")


def _check(model_cfg: Any) -> None:
    if model_cfg.norm not in _NORMS:
        raise ValueError(f"model.norm={model_cfg.norm!r}: expected one of {_NORMS}")
    if model_cfg.mlp not in _MLPS:
        raise ValueError(f"model.mlp={model_cfg.mlp!r}: expected one of {_MLPS}")
    if model_cfg.position not in _POSITIONS:
        raise ValueError(f"model.position={model_cfg.position!r}: expected one of {_POSITIONS}")


def _layer_matmul_params(m: Any) -> int:
    """Weights of the dense layers of one block (no biases, no norm scales)."""
    q_dim = m.n_heads * m.head_dim
    kv_dim = m.n_kv_heads * m.head_dim
    attn = m.d_model * q_dim + 2 * m.d_model * kv_dim + q_dim * m.d_model  # q, k, v, o
    n_mlp = 3 if m.mlp == "swiglu" else 2  # gate, up, down | up, down
    return attn + n_mlp * m.d_model * m.d_ff


def count_params(model_cfg: Any) -> dict[str, int]:
    """Exact parameter count of the danlu decoder described by `model_cfg`.

    Returns {"total", "embedding", "nonembed"}: `embedding` is the token embedding
    [vocab, d] + the output layer [d, vocab] when untied + learned positions [max_seq_len, d]
    when `position == "learned"`; `nonembed = total - embedding` (blocks and final norm).
    Norms (the two per block, the final one, and the q/k norms of `qk_norm` over head_dim) have
    a scale, plus a bias when `norm == "layernorm"` and `use_bias`, as in `pretrain.model.Norm`.
    """
    m = model_cfg
    _check(m)
    d = m.d_model
    q_dim = m.n_heads * m.head_dim
    kv_dim = m.n_kv_heads * m.head_dim

    embedding = m.vocab_size * d
    if not m.tie_embeddings:
        embedding += d * m.vocab_size
    if m.position == "learned":
        embedding += m.max_seq_len * d

    # Every norm has a scale; LayerNorm also has a bias when use_bias (scale-only otherwise, as OLMo).
    per_dim = 2 if m.norm == "layernorm" and m.use_bias else 1
    norm = per_dim * d
    layer = _layer_matmul_params(m) + 2 * norm
    if m.qk_norm:
        layer += 2 * per_dim * m.head_dim  # one norm over head_dim for q, one for k
    if m.use_bias:
        layer += q_dim + 2 * kv_dim + d  # q, k, v, o output dims
        layer += (2 * m.d_ff if m.mlp == "swiglu" else m.d_ff) + d  # gate/up, down
    nonembed = m.n_layers * layer + norm  # + final norm
    return {"total": embedding + nonembed, "embedding": embedding, "nonembed": nonembed}


def flops_per_token(model_cfg: Any, seq_len: int) -> dict[str, int]:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    `six_n = 6 * N` with N the matmul weights actually multiplied per token: every dense
    layer of every block plus the unembedding [d, vocab] (counted even when tied, since the
    output matmul happens either way). The embedding lookup, biases, norms and
    elementwise ops are not matmuls and are left out.
    `attention = 6 * n_layers * seq_len * n_heads * head_dim`: the QK^T and AV matmuls with
    no causal halving (PaLM's 6·L·H·Q·T), so MFU is comparable to PaLM/MaxText figures.
    Returns {"six_n", "attention", "total", "matmul_params"}.
    """
    m = model_cfg
    _check(m)
    matmul_params = m.n_layers * _layer_matmul_params(m) + m.d_model * m.vocab_size
    six_n = 6 * matmul_params
    attention = 6 * m.n_layers * seq_len * m.n_heads * m.head_dim
    return {"six_n": six_n, "attention": attention, "total": six_n + attention,
            "matmul_params": matmul_params}


# Dense (no sparsity) bf16 peak FLOP/s per chip, as JAX names the chip in `device.device_kind`.
# Conventionally MFU is quoted against this even for fp32 runs. fp32 is not one number:
# TPUs run fp32 matmuls as bf16 passes (precision "default" = 1 pass, "highest" = 6 passes),
# H100 SXM does 494e12 TF32 and 67e12 plain fp32; use the bf16 figure and say so.
PEAK_BF16_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,   # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,        # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,   # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100 80gb hbm3": 989e12,  # H100 SXM
    "nvidia h100 pcie": 756e12,
    "nvidia h200": 989e12,
}


def peak_flops_per_device(device: Any) -> float:
    """Peak FLOP/s of one JAX device.

    Accelerators: the dense bf16 figure of `PEAK_BF16_FLOPS` by `device.device_kind`
    (raises ValueError for a chip not in the table). CPU: the measured fp32 matmul peak of
    this host (`cpu_peak_flops()`, cached) divided by the number of local CPU devices, since
    simulated devices (`--xla_force_host_platform_device_count`) share the same cores.
    """
    if device.platform == "cpu":
        import jax

        return cpu_peak_flops() / jax.local_device_count("cpu")
    kind = device.device_kind.lower().strip()
    if kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[kind]
    # Other SKUs spell the name differently ("NVIDIA H200 NVL", "NVIDIA H100 SXM5 ..."):
    # fall back on the family name, keeping the slower PCIe H100 apart.
    if "h200" in kind:
        return 989e12
    if "h100" in kind:
        return 756e12 if "pcie" in kind else 989e12
    raise ValueError(
        f"no peak FLOP/s known for device_kind={device.device_kind!r} "
        f"(platform {device.platform!r}); add it to pretrain.flops.PEAK_BF16_FLOPS")


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int,
        peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    return tokens_per_sec * flops_per_token / (num_devices * peak_per_device)


# --- measured CPU peak -------------------------------------------------------------------------

def cache_dir() -> Path:
    """`$DANLU_CACHE_DIR`, else `~/.cache/danlu`."""
    return Path(os.environ.get("DANLU_CACHE_DIR") or Path.home() / ".cache" / "danlu")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, not the whole box
    except AttributeError:
        return os.cpu_count() or 1


def cpu_description() -> dict[str, Any]:
    """CPU model and usable core count of this host."""
    return {"cpu_model": _cpu_model(), "cores": _cpu_cores()}


def _cache_key() -> str:
    import jax

    d = cpu_description()
    return f"{d['cpu_model']}|{d['cores']} cores|jax {jax.__version__}"


def measure_cpu_matmul_flops(n: int = 2048, repeats: int = 7) -> float:
    """Best-of-`repeats` FLOP/s of a jitted fp32 [n, n] @ [n, n] on CPU device 0.

    One XLA CPU device already uses every core of the host for a matmul (Eigen thread pool),
    so this is the host's peak, shared by all simulated CPU devices.
    """
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), cpu)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def machine_busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all processes, all cores); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_peak_flops() -> float:
    """Measured fp32 matmul FLOP/s of this host, cached in `cache_dir()/cpu_peak.json`.

    Keyed by CPU model, usable core count and jax version, so it is measured once per
    machine shape; delete the file (or its entry) to measure again. A measurement taken while
    other processes kept more than a quarter of the cores busy is returned but not cached,
    since a low peak would inflate every later MFU on this machine.
    """
    path = cache_dir() / "cpu_peak.json"
    key = _cache_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key]["flops_per_sec"])
    busy0, self0, wall0 = machine_busy_cpu_seconds(), time.process_time(), time.perf_counter()
    flops = measure_cpu_matmul_flops()
    busy1, wall = machine_busy_cpu_seconds(), time.perf_counter() - wall0
    if busy0 is not None and busy1 is not None and wall > 0.2:
        others = ((busy1 - busy0) - (time.process_time() - self0)) / wall  # cores busy elsewhere
        if others > 0.25 * _cpu_cores():
            warnings.warn(f"CPU peak measured while other processes kept {others:.1f} cores busy: "
                          f"{flops / 1e9:.0f} GFLOP/s, not cached", stacklevel=2)
            return flops
    cache[key] = {"flops_per_sec": flops,
                  "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so concurrent processes never read a half-written file.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(f.name, path)
    return flops


def training_flops(model_cfg: Any, seq_len: int, tokens: float) -> dict[str, float]:
    """Training compute of a run of `tokens` tokens, counted two ways.

    `flops` is the exact count of `flops_per_token` (every matmul incl. attention and the
    output layer) times tokens; `flops_6nd = 6 * N * D` with N the total parameter count of
    `count_params` (Chinchilla's approximation). Returns {"flops", "flops_6nd", "params",
    "params_nonembed"}.
    """
    counts = count_params(model_cfg)
    per_token = flops_per_token(model_cfg, seq_len)["total"]
    return {"flops": float(per_token) * tokens, "flops_6nd": 6.0 * counts["total"] * tokens,
            "params": counts["total"], "params_nonembed": counts["nonembed"]}
