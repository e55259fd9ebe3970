"""`danlu compile`: the train step compiled ahead of time for TPU topologies by the real libtpu
(no TPU here), memory per chip against HBM, exit codes, --search, and the shipped configs/tpu targets."""

import json
import math
import re
from pathlib import Path

import pytest

from pretrain import aot
from pretrain.config import CONFIGS_DIR, ConfigError, load_config, validate

TPU_DIR = CONFIGS_DIR / "tpu"
TRAIN_CONFIGS = sorted(p for p in TPU_DIR.glob("*.yaml") if not p.name.startswith("launch-"))
LAUNCH_CONFIGS = sorted(TPU_DIR.glob("launch-*.yaml"))


def target_of(path: Path) -> tuple[str, int]:
    """(topology, slices) from the `danlu compile` line of a shipped config's header."""
    m = re.search(r"danlu compile \S+ --topology (\S+)(?: --num-slices (\d+))?", path.read_text())
    assert m, f"{path.name}: the header must give its `danlu compile ... --topology` command"
    return m.group(1), int(m.group(2) or 1)


def test_topology_names():
    assert aot.topology_for_accelerator("v5litepod-16") == "v5e:4x4"
    assert aot.topology_for_accelerator("v5p-32") == "v5p:2x2x4"
    assert aot.topology_for_accelerator("v5p-256") == "v5p:4x4x8"
    assert aot.topology_for_accelerator("v6e-256") == "v6e:16x16"
    assert aot.accelerator_for_topology("v5e:4x4") == "v5litepod-16"
    assert aot.accelerator_for_topology("v5p:4x4x8") == "v5p-256"
    chip, shape = aot.parse_topology("v5p-32")
    assert chip.name == "v5p" and shape == (2, 2, 4) and chip.hbm_bytes == 95 * aot.GiB
    for bad, msg in [("v9:4x4", "unknown TPU generation"), ("v5e:4x4x4", "2-D"), ("v5p:4x4", "3-D"),
                     ("v5p-33", "multiple of 2")]:
        with pytest.raises(aot.TopologyError, match=msg):
            aot.parse_topology(bad)


def test_topology_devices_come_from_libtpu():
    devices = aot.topology_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8 and devices[0].platform == "tpu" and devices[0].device_kind == "TPU v5 lite"
    assert sorted({d.slice_index for d in devices}) == [0, 1]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_tpu_config_validates_for_its_topology(path):
    topology, slices = target_of(path)
    chip, shape = aot.parse_topology(topology)
    cfg = load_config(path)
    assert cfg.mesh.dcn_data == slices
    mesh = validate(cfg, math.prod(shape) * slices)
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] == math.prod(shape) * slices
    assert "Expect (danlu compile):" in path.read_text() and "TBD" not in path.read_text()
    assert any(path.name in p.read_text() for p in LAUNCH_CONFIGS), f"no launch config runs {path.name}"


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launch_config_matches_its_training_config(path):
    from danlu.tpu import resolved_config
    from launch import tpu

    job = tpu.load_job(str(path), {})
    topology, slices = target_of(Path(job.config))
    assert aot.topology_for_accelerator(job.accelerator_type) == topology and job.num_slices == slices
    cfg = resolved_config(job)  # validated for the slices' chips and hosts, with the launcher's overrides
    assert cfg.distributed.auto and cfg.train.run_dir.startswith("gs://")


def test_shipped_125m_v5e16_compiles_and_fits(capsys):
    """CI's real TPU compile: the exact train step, memory per chip from XLA, JSON report, exit 0."""
    from danlu.cli import main

    rc = main(["compile", str(TPU_DIR / "125m-v5e-16.yaml"), "--topology", "v5e:4x4", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["fits"] and report["chips"] == 16 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert report["total_bytes"] <= report["hbm_bytes"] == 16 * aot.GiB
    # Arguments = the state sharded 16 ways (fp32 params + Adam m, v) + the batch, as XLA lays them out:
    # at least the bytes of the shards, plus the TPU's padding of minor dimensions (head_dim 64 -> 128 lanes).
    from pretrain.flops import count_params
    cfg = load_config(TPU_DIR / "125m-v5e-16.yaml")
    n = count_params(cfg.model)["total"]
    expected = 12 * n / 16 + 4 * 4 * cfg.train.global_batch_size * cfg.data.seq_len / 16
    assert expected <= report["argument_bytes"] <= 1.25 * expected
    assert report["alias_bytes"] > 0.95 * (report["argument_bytes"] - 4 * 4 * 256 * 2048 / 16)  # state donated
    assert 0 < report["roofline"]["step_s"] <= report["roofline"]["serial_s"]
    assert report["model_flops_per_step"] == pytest.approx(6 * 256 * 2048 * 1.06e8, rel=0.35)


def test_does_not_fit_exits_4_and_names_the_knobs(capsys):
    """configs/train/25m.yaml as shipped (fp32, no remat, 32 sequences per chip) overflows a v5e-4."""
    from danlu.cli import main

    rc = main(["compile", str(CONFIGS_DIR / "train" / "25m.yaml"), "--topology", "v5e:2x2"])
    out = capsys.readouterr().out
    assert rc == aot.EXIT_DOES_NOT_FIT
    assert "DOES NOT FIT" in out and "model.remat=full (now none)" in out and "train.microbatches=2" in out
    assert "--search" in out


def test_search_finds_a_fitting_configuration_for_a_preset_that_does_not_fit():
    cfg = load_config(CONFIGS_DIR / "train" / "25m.yaml")
    results = aot.search(cfg, "v5e:2x2", max_candidates=1, log=lambda s: None)
    (ov, report), = results
    assert report.fits, (ov, report.total_bytes)
    assert report.total_bytes <= 16 * aot.GiB
    assert set(k.split("=")[0] for k in ov) == {"mesh.data", "mesh.fsdp", "mesh.tensor", "model.remat",
                                                "train.microbatches"}
    validate(aot._with(cfg, ov), 4)  # the printed overrides are a valid config


def test_config_and_topology_must_agree():
    cfg = load_config(TPU_DIR / "7b-2xv6e-256.yaml")
    with pytest.raises(ConfigError, match="mesh.dcn_data=2 slices, but --num-slices 1"):
        aot.compile_config(cfg, "v6e:16x16", num_slices=1, devices=[])
    cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", ["mesh.data=2", "mesh.fsdp=8"])
    with pytest.raises(ConfigError, match="cannot be laid out on the v5e:4x4 torus"):
        aot.compile_config(cfg, "v5e:4x4")


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_tpu_config_compiles_and_fits(path):
    topology, slices = target_of(path)
    report = aot.compile_config(load_config(path), topology, slices)
    print(aot.format_report(report))
    assert report.fits, aot.format_report(report)


@pytest.mark.slow
def test_search_fits_1b_on_a_v5e_16():
    """The 1b preset (fp32 compute, save_dots, 32 sequences per chip) does not fit a v5e-16; the search finds one."""
    cfg = load_config(CONFIGS_DIR / "train" / "1b.yaml")
    assert not aot.compile_config(cfg, "v5e:4x4").fits
    results = aot.search(cfg, "v5e:4x4", max_candidates=4)
    assert any(r.fits for _, r in results)


def test_chip_table_agrees_with_the_peak_table_and_libtpu():
    """The roofline's peak FLOP/s per generation is the one train.py's MFU uses for that device_kind."""
    from pretrain.flops import peak_flops_per_device

    for name, topology in [("v4", "v4:2x2x2"), ("v5e", "v5e:2x2"), ("v5p", "v5p:2x2x2"), ("v6e", "v6e:2x2")]:
        chip = aot.CHIPS[name]
        try:
            device = aot.topology_devices(topology)[0]
        except aot.TopologyError:  # libtpu gives v4 TensorCores, not chips: check the table alone
            assert name == "v4"
            continue
        assert peak_flops_per_device(device) == chip.peak_flops


def test_splash_lowers_to_the_tpu_kernel_for_tpu_devices():
    """On a mesh of libtpu's devices the splash kernel is lowered as a Mosaic TPU custom call, not
    in Pallas interpret mode (which `jax.devices()`, CPU here, would have chosen)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from pretrain import sharding, splash
    from pretrain.config import DEFAULT_RULES

    devices = aot.topology_devices("v5e:2x2")
    mesh = Mesh(np.array(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    q = jax.ShapeDtypeStruct((4, 256, 4, 128), jnp.bfloat16)  # [B, T, N, H]

    def attend(q, k, v):
        with sharding.axis_rules(mesh, dict(DEFAULT_RULES)):
            return splash.splash_attention(q, k, v)

    text = jax.jit(attend).lower(q, q, q).as_text()
    assert "tpu_custom_call" in text
