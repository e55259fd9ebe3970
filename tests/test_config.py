"""Every shipped config loads and validates; invalid configs fail with their documented message."""

from pathlib import Path

import pytest

from pretrain.config import CONFIGS_DIR, Config, ConfigError, config_from_dict, load_config, validate
from pretrain.sharding import MESH_AXES

# Training presets; data (configs/data), scaling (configs/scaling) and TPU-target (configs/tpu)
# configs are parsed by the tests of their own rooms.
SHIPPED = sorted([*Path(CONFIGS_DIR).glob("model/*.yaml"), *Path(CONFIGS_DIR).glob("train/*.yaml")])


def test_configs_are_shipped():
    names = {p.relative_to(CONFIGS_DIR).as_posix() for p in SHIPPED}
    for preset in ("tiny", "25m", "125m", "350m", "1b", "7b"):
        assert f"model/{preset}.yaml" in names
    assert "train/tiny.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CONFIGS_DIR).as_posix())
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    shape = validate(cfg, num_devices=8)
    assert shape["data"] * shape["fsdp"] * shape["tensor"] == 8
    text = path.read_text()
    assert text.startswith("#"), "each shipped config starts with a header comment saying how to run it"


def test_overrides_and_includes():
    cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", ["model.d_model=256", "mesh.tensor=2", "optimizer.lr=1e-3",
                                                            "model.qk_norm=true", "train.run_dir=/tmp/x"])
    assert cfg.model.d_model == 256 and cfg.model.n_layers == 4  # n_layers from the included model preset
    assert cfg.mesh.tensor == 2 and cfg.optimizer.lr == 1e-3 and cfg.model.qk_norm is True
    with pytest.raises(Exception):
        cfg.model.d_model = 3  # frozen


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", ["model.d_model=192", "rules.embed=[]"])
    import yaml
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert dict(again.rules)["embed"] == ()


def test_defaults_resolve_derived_sizes():
    cfg = load_config(None, ["model.d_model=512", "model.n_heads=8"])
    assert cfg.model.head_dim == 64 and cfg.model.n_kv_heads == 8
    assert cfg.model.d_ff == 1536  # 8/3 * 512 = 1365.3, rounded up to a multiple of 256


BAD = [
    # (overrides, devices, message fragment)
    (["model.dmodel=3"], 8, "unknown config key 'model.dmodel' (did you mean 'model.d_model'?)"),
    (["modle.d_model=3"], 8, "unknown config key 'modle'"),
    (["model.n_layers=two"], 8, "model.n_layers: expected an integer, got 'two'"),
    (["model.norm=batchnorm"], 8, "model.norm='batchnorm' is not one of rmsnorm, layernorm"),
    (["model.n_heads=8", "model.n_kv_heads=3"], 8, "model.n_kv_heads=3 must divide model.n_heads=8"),
    (["model.n_heads=6", "model.d_model=384", "mesh.tensor=4", "mesh.fsdp=2"], 8,
     "model.n_heads=6 is not divisible by mesh.tensor=4"),
    (["model.n_heads=8", "model.n_kv_heads=1", "mesh.tensor=2", "mesh.fsdp=4"], 8,
     "model.n_kv_heads=1 is not divisible by mesh.tensor=2"),
    (["train.global_batch_size=12", "mesh.fsdp=8"], 8, "train.global_batch_size=12 is not divisible by mesh data*fsdp=8"),
    (["train.global_batch_size=16", "train.microbatches=4", "mesh.fsdp=8"], 8,
     "the microbatch size train.global_batch_size/train.microbatches=4 is not divisible by mesh data*fsdp=8"),
    (["train.global_batch_size=16", "train.microbatches=3"], 8, "not divisible by train.microbatches=3"),
    (["mesh.data=4", "mesh.fsdp=4", "mesh.tensor=1"], 8, "is larger than the 8 devices available"),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"], 8, "uses only 4 of 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
    (["mesh.tensor=3"], 8, "do not divide the 8 devices per slice"),
    (["data.seq_len=4096"], 8, "data.seq_len=4096 exceeds model.max_seq_len=512"),
    (["train.vocab_chunk=1000"], 8, "train.vocab_chunk=1000 must divide model.vocab_size=4096"),
    (["optimizer.warmup_steps=5000", "train.steps=600"], 8, "optimizer.warmup_steps=5000 must be smaller than train.steps=600"),
    (["train.stop_at=700", "train.steps=600"], 8, "train.stop_at=700 must be in [0, train.steps=600]"),
    (["model.vocab_size=4097", "mesh.tensor=2", "mesh.fsdp=4"], 8, "model.vocab_size=4097 is not divisible by mesh.tensor=2"),
    (["model.head_dim=33"], 8, "must be even for rotary position embeddings"),
    (["train.loss_chunks=7"], 8, "train.loss_chunks=7 must divide the tokens of a microbatch (16 x 128)"),
    (["train.loss_chunks=8", "train.vocab_chunk=1024"], 8, "set at most one"),
    (["model.attention=cudnn"], 8, "model.attention=cudnn needs model.compute_dtype=bfloat16"),
    (["mesh.dcn_data=3"], 8, "mesh.dcn_data=3 slices do not divide the 8 devices"),
]


@pytest.mark.parametrize("overrides,devices,message", BAD, ids=[b[2][:40] for b in BAD])
def test_invalid_config_is_rejected_with_its_message(overrides, devices, message):
    with pytest.raises(ConfigError) as err:
        cfg = load_config(CONFIGS_DIR / "train" / "tiny.yaml", overrides)
        validate(cfg, num_devices=devices)
    assert message in str(err.value)


def test_cli_refuses_invalid_config_before_compiling(capsys):
    from danlu.cli import main

    rc = main(["train", str(CONFIGS_DIR / "train" / "tiny.yaml"), "mesh.data=16", "mesh.fsdp=1"])
    assert rc == 2
    assert "is larger than the 8 devices available" in capsys.readouterr().err


def test_rules_accept_exactly_the_mesh_axes():
    """The rules table's check (config, no jax) and the mesh (sharding) name the same axes."""
    for axis in MESH_AXES:
        assert dict(load_config(None, [f"rules.embed=[{axis}]"]).rules)["embed"] == (axis,)
    with pytest.raises(ConfigError, match="rules.embed: unknown mesh axis 'model'"):
        load_config(None, ["rules.embed=[model]"])
    assert {a for _, axes in load_config(None).rules for a in axes} <= set(MESH_AXES)
