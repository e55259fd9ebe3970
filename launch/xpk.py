"""`danlu launch xpk`: the same training job as `danlu launch tpu`, as an xpk workload on a GKE cluster.

    danlu launch xpk --launch configs/tpu/launch-7b-2xv6e-256.yaml --cluster my-cluster \\
        --docker-image us-docker.pkg.dev/PROJECT/danlu/danlu:latest --dry-run

builds (and, without `--dry-run`, runs) one argument list::

    xpk workload create --cluster=C --workload=NAME --tpu-type=v6e-256 --num-slices=2
        --docker-image=IMAGE --project=P --zone=Z --max-restarts=N [--storage=S] --command=SCRIPT

The launch config is the one of `danlu launch tpu` (name, config, overrides, run_dir, project, zone,
accelerator_type, num_slices, env, mounts); `SCRIPT` writes the resolved, validated training config
(given by the top layer, danlu/xpk.py) into the container and starts `python3 -m danlu.cli train` on
it (xpk sets up jax.distributed and the MEGASCALE variables of multi-slice jobs). The image must have
danlu installed with the `tpu` extra (`pip install '.[tpu]'` in a Dockerfile FROM python:3.11), or
give `--base-docker-image` and xpk builds one from `--script-dir` (default: this checkout).

Data on GCS: as on TPU VMs, danlu train reads data.path=gs://BUCKET/... from the bucket's mount at
MOUNT_ROOT/BUCKET ($DANLU_MOUNTS, set by SCRIPT). On GKE the mount is xpk's: attach the bucket once
per cluster (`xpk storage attach NAME --type=gcsfuse --bucket=BUCKET --mount-point=MOUNT_ROOT/BUCKET
--readonly=true --auto-mount=true`), or with `--auto-mount=false` pass `--storage NAME` here.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from launch.gcloud import LaunchError, Runner, remote_script
from launch import tpu


def xpk_command(job: tpu.TpuJob, config_yaml: str, cluster: str, docker_image: str = "",
                base_docker_image: str = "", script_dir: str = "", max_restarts: int = 3,
                priority: str = "", storage: Sequence[str] = ()) -> list[str]:
    """The `xpk workload create` argument list of ``job``."""
    if not cluster:
        raise LaunchError("no cluster given: pass --cluster (the GKE cluster made by `xpk cluster create`)")
    if bool(docker_image) == bool(base_docker_image):
        raise LaunchError("give exactly one of --docker-image (danlu installed) or --base-docker-image (xpk builds "
                          "an image from --script-dir)")
    py = shlex.quote(job.python)
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in tpu.train_env(job).items())
    script = remote_script([
        f"mkdir -p {tpu.JOB_DIR}",
        f"printf '%s' {shlex.quote(config_yaml)} > {tpu.JOB_DIR}/config.yaml",
        f"{('env ' + env + ' ') if env else ''}{py} -m danlu.cli train {tpu.JOB_DIR}/config.yaml",
    ])
    cmd = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={job.name}",
           f"--tpu-type={job.accelerator_type}", f"--num-slices={job.num_slices}"]
    if docker_image:
        cmd.append(f"--docker-image={docker_image}")
    else:
        cmd += [f"--base-docker-image={base_docker_image}", f"--script-dir={script_dir or Path(__file__).resolve().parent.parent}"]
    cmd += [f"--project={job.project}", f"--zone={job.zone}", f"--max-restarts={max_restarts}"]
    if priority:
        cmd.append(f"--priority={priority}")
    cmd += [f"--storage={name}" for name in storage]
    cmd.append(f"--command={script}")
    return cmd


def add_arguments(p) -> None:
    p.add_argument("--launch", metavar="YAML", help="launch config of `danlu launch tpu` (configs/tpu/launch-*.yaml)")
    p.add_argument("--cluster", default="", help="GKE cluster (xpk cluster create)")
    p.add_argument("--docker-image", default="", help="image with danlu[tpu] installed")
    p.add_argument("--base-docker-image", default="", help="base image; xpk adds --script-dir to it")
    p.add_argument("--script-dir", default="", help="with --base-docker-image: directory copied into the image")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of the workload after a failure (default 3)")
    p.add_argument("--priority", default="", help="xpk workload priority (low, medium, high, ...)")
    p.add_argument("--storage", action="append", default=[], metavar="NAME",
                   help="xpk storage to mount (attached with --auto-mount=false), repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    g = p.add_argument_group("launch config keys (override the YAML)")
    for flag, dest in (("--name", "name"), ("--config", "config"), ("--run-dir", "run_dir"), ("--project", "project"),
                       ("--zone", "zone"), ("--accelerator-type", "accelerator_type")):
        g.add_argument(flag, dest=dest)
    g.add_argument("--num-slices", dest="num_slices", type=int)
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="training override")


def main(args, prepare: tpu.Prepare) -> int:
    """Builds and runs (or prints) the workload of the launch config; ``prepare`` (the top layer's)
    resolves and validates its training config and adds the data bucket to its mounts."""
    keys = ("name", "config", "run_dir", "project", "zone", "accelerator_type", "num_slices", "overrides")
    try:
        job = tpu.resolve_location(tpu.load_job(args.launch, {k: getattr(args, k) for k in keys}))
        job, config_yaml = prepare(job)
        cmd = xpk_command(job, config_yaml, args.cluster, args.docker_image, args.base_docker_image,
                          args.script_dir, args.max_restarts, args.priority, args.storage)
        Runner(dry_run=args.dry_run).run(cmd)
        return 0
    except LaunchError as e:
        print(f"danlu launch xpk: {e}", file=sys.stderr)
        return 2
