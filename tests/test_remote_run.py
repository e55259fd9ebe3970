"""`danlu train` writes everything through danlu.base.fs: with train.run_dir a URL, config.yaml,
metrics.jsonl, summary.json and the TensorBoard events land at the URL (fsspec's memory://
filesystem here), nothing locally; checkpoints need orbax's schemes; and a gs:// run dir under a
bucket mounted through $DANLU_MOUNTS is written, and resumed from, as the local directory."""

import json
import struct
import uuid
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import yaml
from tensorboardX.proto import event_pb2

from pretrain import checkpoint as ckpt_lib
from pretrain.config import config_from_dict, load_config
from pretrain.train import MetricsWriter, build, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "data.seq_len=64", "train.global_batch_size=8",
        "optimizer.warmup_steps=2", "logging.log_every=1", "train.eval_every=0", "data.eval_batches=0",
        "mesh.data=1", "mesh.fsdp=2"]
DEVICES = 2


def tiny_train(shards, run_dir, *extra, log=None):
    overrides = [f"data.path={shards}", f"train.run_dir={run_dir}", *TINY, *extra]
    cfg = load_config(ROOT / "configs/train/tiny.yaml", overrides)
    return train(cfg, devices=jax.devices()[:DEVICES], log=log or (lambda _: None))


def event_scalars(data: bytes) -> dict[str, list[int]]:
    """tag -> steps of the scalars in a TensorBoard event file (TFRecord framing: length, its CRC,
    the Event proto, its CRC)."""
    out: dict[str, list[int]] = {}
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append(event.step)
    return out


@pytest.fixture
def memory_url():
    root = f"memory://danlu-test-{uuid.uuid4().hex}"
    yield root
    mem = fsspec.filesystem("memory")
    if mem.exists(root):
        mem.rm(root, recursive=True)


def test_url_run_dir_is_written_through_fsspec(shards, tmp_path, monkeypatch, memory_url):
    monkeypatch.chdir(tmp_path)  # where a folder named "memory:" would appear
    url = f"{memory_url}/run"
    summary = tiny_train(shards, url, "train.steps=6", "checkpoint.enabled=false")
    assert summary["steps"] == 6 and summary["run_dir"] == url

    mem = fsspec.filesystem("memory")
    rows = [json.loads(line) for line in mem.cat_file(f"{url}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] == summary["final_loss"]
    assert json.loads(mem.cat_file(f"{url}/summary.json"))["steps"] == 6
    resolved = config_from_dict(yaml.safe_load(mem.cat_file(f"{url}/config.yaml")))
    assert resolved.train.run_dir == url and resolved.model.d_model == 64
    events = mem.glob(f"{url}/tensorboard/events.out.tfevents.*")
    assert len(events) == 1
    assert event_scalars(mem.cat_file(events[0]))["loss"] == list(range(1, 7))

    assert list(tmp_path.iterdir()) == [] and not (ROOT / "memory:").exists()  # nothing written locally


def test_metrics_at_a_url_are_rewritten_whole(memory_url):
    """An object store has no append: the rows are kept and the object rewritten, at the first row,
    then at most every REWRITE_EVERY_S seconds, at each flush (before a checkpoint) and at close."""
    url = f"{memory_url}/run"
    mem = fsspec.filesystem("memory")

    def steps():
        return [json.loads(line)["step"] for line in mem.cat_file(f"{url}/metrics.jsonl").decode().splitlines()]

    mem.pipe(f"{url}/metrics.jsonl", b'{"step": 1}\n{"step": 2}\n{"step": 3}\n')  # a run that died after step 3
    writer = MetricsWriter(url, tensorboard=False, resume_step=2)  # ... resumed from its checkpoint of step 2
    assert steps() == [1, 2]
    writer.write({"step": 3, "loss": 1.0})
    writer.write({"step": 4, "loss": 1.0})
    assert steps() == [1, 2, 3]  # step 4's row within REWRITE_EVERY_S of the last rewrite: not yet
    writer.flush()
    assert steps() == [1, 2, 3, 4]
    writer.truncate(3)  # a roll-back to step 3
    assert steps() == [1, 2, 3]
    writer.write({"step": 4, "loss": 2.0})
    writer.write({"step": 5, "loss": 2.0})
    writer.close()
    assert steps() == [1, 2, 3, 4, 5]


def test_url_run_dir_that_orbax_cannot_write_is_refused(shards, tmp_path, monkeypatch, memory_url, capsys):
    """Refused before anything compiles, with the key and the fixes."""
    from danlu.cli import main
    import pretrain.train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrain.train, "build", lambda *a, **k: pytest.fail("compiled before refusing"))
    rc = main(["train", str(ROOT / "configs/train/tiny.yaml"), f"data.path={shards}",
               f"train.run_dir={memory_url}/run", *TINY, "mesh.fsdp=-1", "checkpoint.enabled=true"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"danlu: invalid config: train.run_dir={memory_url}/run: checkpoints are written by orbax" in err
    assert "gs:// URLs" in err and "$DANLU_MOUNTS" in err and "checkpoint.enabled=false" in err
    assert not fsspec.filesystem("memory").exists(memory_url) and list(tmp_path.iterdir()) == []


def final_params(run_dir, step):
    cfg = load_config(Path(run_dir) / "config.yaml")
    built = build(cfg, devices=jax.devices()[:DEVICES])
    manager = ckpt_lib.make_manager(Path(run_dir) / "checkpoints", cfg.checkpoint)
    state, _ = ckpt_lib.restore(manager, step, built.state, built.state_sharding)
    manager.close()
    return jax.device_get(state.params)


def test_mounted_bucket_run_dir_is_local_and_resumes(shards, tmp_path, monkeypatch):
    """gs://bkt mounted at tmp/bkt (as gcsfuse on a TPU VM): everything, checkpoints included, is
    under tmp/bkt/run, and a second invocation continues from there like an uninterrupted run."""
    monkeypatch.setenv("DANLU_MOUNTS", f"gs://bkt={tmp_path / 'bkt'}")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where a folder named "gs:" would appear
    ref = tiny_train(shards, tmp_path / "ref", "train.steps=8")

    first = tiny_train(shards, "gs://bkt/run", "train.steps=8", "train.stop_at=4")
    assert first["stopped_early"] and first["steps"] == 4
    lines: list[str] = []
    second = tiny_train(shards, "gs://bkt/run", "train.steps=8", log=lines.append)
    run = tmp_path / "bkt" / "run"
    assert f"resumed from {run}/checkpoints at step 4" in lines
    assert second["steps"] == 8 and second["run_dir"] == str(run)

    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "summary.json", "tensorboard",
                                               "checkpoints"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per invocation
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bit for bit
    assert second["final_loss"] == ref["final_loss"]
    for a, b in zip(jax.tree.leaves(final_params(run, 8)), jax.tree.leaves(final_params(tmp_path / "ref", 8))):
        np.testing.assert_array_equal(a, b)
    assert list((tmp_path / "cwd").iterdir()) == []


def test_profile_steps_write_a_trace_of_those_steps(shards, tmp_path, memory_url):
    """logging.profile_steps: a jax.profiler trace of the chosen steps lands in RUN/profile/ (a
    URL run directory gets it copied), with the train step's executions in it."""
    import gzip

    logged: list[str] = []
    tiny_train(shards, tmp_path / "run", "train.steps=6", "checkpoint.enabled=false", "logging.profile_steps=2",
               "logging.profile_start=3", log=logged.append)
    traces = sorted((tmp_path / "run" / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"))
    assert len(traces) == 1 and list(traces[0].parent.glob("*.xplane.pb"))
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    assert any("train_step" in str(e.get("name", "")) for e in events)
    assert any("profile of steps 4-5 written to" in line for line in logged)

    tiny_train(shards, f"{memory_url}/run", "train.steps=4", "checkpoint.enabled=false", "logging.profile_steps=1",
               "logging.profile_start=2")
    mem = fsspec.filesystem("memory")
    assert mem.glob(f"{memory_url}/run/profile/plugins/profile/*/*.xplane.pb".removeprefix("memory://"))
