"""pretrain.flops: exact parameter counts of known models, FLOPs by hand, peak table, CPU cache."""
import json
import time
import types

import jax
import pytest

from pretrain import flops


def model(**kw):
    base = dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                head_dim=64, d_ff=3072, max_seq_len=1024, norm="layernorm", position="learned",
                mlp="gelu", tie_embeddings=True, qk_norm=False, use_bias=True)
    base.update(kw)
    return types.SimpleNamespace(**base)


GPT2_SMALL = model()
LLAMA2_7B = model(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                  head_dim=128, d_ff=11008, max_seq_len=4096, norm="rmsnorm", position="rope",
                  mlp="swiglu", tie_embeddings=False, use_bias=False)


def test_gpt2_small_is_the_published_124m():
    p = flops.count_params(GPT2_SMALL)
    assert p["total"] == 124_439_808
    assert p["embedding"] == 50257 * 768 + 1024 * 768  # tied: no separate output layer
    assert p["nonembed"] == 124_439_808 - p["embedding"] == 85_056_000


def test_llama2_7b_is_the_published_count():
    p = flops.count_params(LLAMA2_7B)
    assert p["total"] == 6_738_415_616
    assert p["embedding"] == 2 * 32000 * 4096


def test_tiny_config_by_hand_gqa_qknorm_bias():
    m = model(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=3,
              d_ff=5, max_seq_len=7, norm="rmsnorm", position="rope", mlp="swiglu",
              tie_embeddings=False, qk_norm=True, use_bias=True)
    # per layer: q 4*6 + k 4*3 + v 4*3 + o 6*4 = 72; mlp 3*4*5 = 60; norms 2*4;
    # qk-norm 2*3; biases q 6 + k 3 + v 3 + o 4 + gate 5 + up 5 + down 4 = 30
    layer = 72 + 60 + 8 + 6 + 30
    p = flops.count_params(m)
    assert p["embedding"] == 10 * 4 + 4 * 10
    assert p["nonembed"] == 2 * layer + 4
    assert p["total"] == p["embedding"] + p["nonembed"]


def test_flops_per_token_by_hand():
    m = model(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=3,
              d_ff=5, norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True,
              use_bias=True)
    f = flops.flops_per_token(m, seq_len=8)
    matmul = 2 * (72 + 60) + 4 * 10  # blocks' weights + unembedding (tied, still multiplied)
    assert f["matmul_params"] == matmul
    assert f["six_n"] == 6 * matmul
    assert f["attention"] == 6 * 2 * 8 * 2 * 3
    assert f["total"] == f["six_n"] + f["attention"]


def test_flops_gelu_counts_two_mlp_matrices():
    f = flops.flops_per_token(GPT2_SMALL, seq_len=1024)
    assert f["matmul_params"] == 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="model.mlp"):
        flops.count_params(model(mlp="relu"))


def test_mfu():
    assert flops.mfu(1000.0, 6e9, 4, 1e12) == pytest.approx(1.5)


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
])
def test_peak_table(kind, peak):
    dev = types.SimpleNamespace(platform="tpu" if "TPU" in kind else "gpu", device_kind=kind)
    assert flops.peak_flops_per_device(dev) == peak


def test_unknown_accelerator_raises():
    with pytest.raises(ValueError, match="no peak"):
        flops.peak_flops_per_device(types.SimpleNamespace(platform="gpu", device_kind="Foo 9"))


def test_cpu_peak_measured_once_and_shared_by_simulated_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure():
        calls.append(1)
        return 8e11

    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", fake_measure)
    assert flops.cpu_peak_flops() == 8e11
    assert flops.cpu_peak_flops() == 8e11
    assert len(calls) == 1  # second call read the cache
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    (key,) = cache
    assert jax.__version__ in key and "cores" in key
    assert cache[key]["flops_per_sec"] == 8e11
    # conftest simulates 8 CPU devices on the same cores: each gets an eighth.
    n = jax.local_device_count("cpu")
    assert flops.peak_flops_per_device(jax.devices("cpu")[0]) == pytest.approx(8e11 / n)
    assert len(calls) == 1


def test_cpu_cache_key_mismatch_measures_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))
    (tmp_path / "cpu_peak.json").write_text(
        json.dumps({"Other CPU|64 cores|jax 0.0.1": {"flops_per_sec": 1.0}}))
    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda: 5e10)
    assert flops.cpu_peak_flops() == 5e10
    assert len(json.loads((tmp_path / "cpu_peak.json").read_text())) == 2  # old entry kept


def test_cpu_measurement_runs():
    assert flops.measure_cpu_matmul_flops(n=128, repeats=2) > 1e6


def test_norm_bias_only_with_layernorm_and_use_bias():
    base = dict(vocab_size=10, d_model=4, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=2, d_ff=8,
                norm="layernorm", position="rope", mlp="gelu", tie_embeddings=True, qk_norm=True)
    no_bias = flops.count_params(model(**base, use_bias=False))["nonembed"]
    with_bias = flops.count_params(model(**base, use_bias=True))["nonembed"]
    # biases: dense q,k,v,o 4+4+4+4, mlp 8+4; norm biases: 2 blocks' norms + final 3*4, q/k norms 2*2
    assert with_bias - no_bias == 16 + 12 + 12 + 4
    rms = flops.count_params(model(**{**base, "norm": "rmsnorm"}, use_bias=True))["nonembed"]
    assert with_bias - rms == 12 + 4


def test_cpu_peak_measured_under_load_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path))
    busy = iter([0.0, 100.0])  # the machine spent 100 CPU-seconds busy during the measurement
    monkeypatch.setattr(flops, "machine_busy_cpu_seconds", lambda: next(busy))
    monkeypatch.setattr(flops, "measure_cpu_matmul_flops", lambda: time.sleep(0.25) or 1e9)
    with pytest.warns(UserWarning, match="not cached"):
        assert flops.cpu_peak_flops() == 1e9
    assert not (tmp_path / "cpu_peak.json").exists()
