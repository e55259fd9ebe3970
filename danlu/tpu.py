"""`danlu launch tpu ACTION`: a training job on Cloud TPU VMs, from a launch config (see launch/tpu.py).

This module (and danlu/xpk.py, for `danlu launch xpk`) is where the launcher meets the training
config: launch/tpu.py knows gcloud and TPU VMs but not pretrain; pretrain.config knows the training
config but not gcloud. Here a launch job's training config is resolved (the config file, the launch
config's overrides, the launcher's `distributed.auto=true`, `mesh.dcn_data`, `train.run_dir`),
validated for the job's chips and hosts before any TPU is touched, and the bucket of its `data.path`
added to the buckets the workers mount. The actions themselves are launch/tpu.py's.
"""

from __future__ import annotations

import json

from launch import tpu as launcher


def resolved_config(job: launcher.TpuJob):
    """The training config of ``job`` as it will run, validated for its slices' chips and hosts."""
    from pretrain.config import load_config, validate

    cfg = load_config(job.config, launcher.train_overrides(job))
    validate(cfg, launcher.chips_of(job), launcher.hosts_of(job))
    return cfg


def config_text(cfg) -> str:
    """The resolved config as one line of JSON (valid YAML), so that a dry run prints one command per line."""
    return json.dumps(cfg.to_dict())


def prepare(job: launcher.TpuJob) -> tuple[launcher.TpuJob, str]:
    """(``job`` mounting its data bucket, its resolved config as text): launch.tpu's `Prepare`."""
    cfg = resolved_config(job)
    return launcher.with_data_path(job, cfg.data.path, cfg.train.run_dir), config_text(cfg)


def add_arguments(p) -> None:
    launcher.add_arguments(p)


def main(args) -> int:
    return launcher.main(args, prepare)
