"""`danlu launch tpu ACTION`: a training job on Cloud TPU VMs, from a launch config.

    danlu launch tpu create --launch configs/tpu/launch-125m-v5e-16.yaml --project my-proj
    danlu launch tpu setup  --launch ...     # install danlu[tpu] on every worker, mount the data bucket
    danlu launch tpu run    --launch ...     # danlu train on every worker (resumes from run_dir)
    danlu launch tpu status | logs [--worker all] [--follow] | stop | delete --launch ...
    danlu launch tpu watch  --launch ...     # create, setup, run; recreate after preemption; resume
    danlu launch tpu up     --launch ...     # create + setup + run, once

A launch config (YAML, keys below; every one also a flag) names the training config and where it runs::

    name: danlu-125m                      # TPU VM / queued resource name (slices: NAME-0, NAME-1, ...)
    config: 125m-v5e-16.yaml              # training config, relative to this file
    overrides: [data.path=gs://B/shards]  # training overrides (also --set KEY=VALUE)
    run_dir: gs://B/runs/125m             # train.run_dir: checkpoints there survive the TPUs
    project: ""                           # "" -> --project, $CLOUDSDK_CORE_PROJECT, gcloud config
    zone: us-west4-a                      # "" -> --zone, $CLOUDSDK_COMPUTE_ZONE, gcloud config
    accelerator_type: v5litepod-16        # gcloud --accelerator-type
    runtime_version: ""                   # "" -> the TPU VM image for the generation
    num_slices: 1                         # > 1: multi-slice over DCN (queued resource, mesh.dcn_data)
    provisioning: spot                    # on-demand | spot | preemptible | reserved
    queued: true                          # queued resource (multi-slice, watch) or plain TPU VM
    network: "" / subnetwork: "" / service_account: "" / internal_ips: false / labels: {}
    package: "."                          # "." -> a wheel of this checkout; else a pip requirement
    env: {}                               # extra environment of danlu train on every worker
    gcs_logs: ""                          # gs:// prefix the workers' train logs are copied to
    mounts: []                            # more gs:// URLs whose buckets the workers mount (--mount URL)

Every gcloud call is an argument list run without a shell; `--dry-run` prints them all, one per
line. The remote side (`--command` of `tpu-vm ssh`) is a shell string built with shlex.quote.

This module knows gcloud, not the training config: the top layer (danlu/tpu.py) resolves that
(includes, overrides, `distributed.auto=true`, `mesh.dcn_data=num_slices`, `train.run_dir`),
validates it for the slices' chips and hosts (`chips_of`, `hosts_of`), adds the bucket of its
`data.path` to `mounts` and hands `main` the job and the config's text, which the run command
writes on each worker as `danlu-job/config.yaml`, so what runs is what was checked. On the
workers: `danlu-job/train.log` (output), `train.pid`, `exit_code` when done.

Data on GCS. The token shards are ArrayRecord files, which need POSIX files: `setup` installs
gcsfuse (when missing) and mounts each bucket of `mounts` read-only at MOUNT_ROOT/BUCKET on every
worker of every slice; `run` starts danlu train with DANLU_MOUNTS=gs://BUCKET/PATH=MOUNT_ROOT/BUCKET/PATH
for data.path=gs://BUCKET/PATH, through which the data loader reads the shards from the mount.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


from danlu.base import tpu as tpu_facts
from danlu.base.config import ConfigError, build, read_yaml_mapping
from danlu.base.fs import MOUNTS_ENV
from launch.gcloud import LaunchError, Runner, remote_script, resolve_setting

ACTIONS = ("create", "setup", "run", "status", "logs", "stop", "delete", "watch", "up")
PROVISIONING = ("on-demand", "spot", "preemptible", "reserved")
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
JOB_DIR = "danlu-job"  # on every worker, relative to the login directory
# States of a queued resource after which it must be deleted and created again.
DEAD_STATES = ("SUSPENDING", "SUSPENDED", "FAILED", "NOT_FOUND")
DEAD_NODE_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
# Where `setup` mounts each data bucket on the workers (gcsfuse): MOUNT_ROOT/BUCKET.
MOUNT_ROOT = "/tmp/danlu-gcs"
# gcsfuse for training reads of immutable shards: read-only, so caching metadata forever (stat,
# type, kernel list caches unbounded, no TTL) cannot serve stale data; directories implied by
# object names (`gcloud storage cp -r` makes no directory objects). No file cache: pretraining
# reads each document about once per epoch and the corpus outgrows the boot disk, so a cache
# would only fill the disk (gcsfuse's advice: leave it off when the dataset does not fit).
GCSFUSE_FLAGS = ("-o", "ro", "--implicit-dirs", "--metadata-cache-ttl-secs=-1", "--stat-cache-max-size-mb=-1",
                 "--type-cache-max-size-mb=-1", "--kernel-list-cache-ttl-secs=-1")
# Installs gcsfuse from Google's apt repository (the TPU VM images are Ubuntu) when it is missing;
# the lock timeout waits for the unattended upgrades a fresh VM runs at boot.
GCSFUSE_INSTALL = (
    "command -v gcsfuse >/dev/null || { "
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
    'gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && '
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc "
    ">/dev/null && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && "
    "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; }")


@dataclasses.dataclass(frozen=True)
class TpuJob:
    name: str = ""
    config: str = ""
    overrides: tuple[str, ...] = ()
    run_dir: str = ""
    project: str = ""
    zone: str = ""
    accelerator_type: str = ""
    runtime_version: str = ""
    num_slices: int = 1
    provisioning: str = "on-demand"
    queued: bool = True
    network: str = ""
    subnetwork: str = ""
    service_account: str = ""
    internal_ips: bool = False
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    package: str = "."
    python: str = "python3"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    gcs_logs: str = ""
    mounts: tuple[str, ...] = ()  # gs:// URLs whose buckets every worker mounts (the top layer adds data.path)

    @property
    def nodes(self) -> list[str]:
        """The TPU VM names: NAME, or NAME-0 .. NAME-{K-1} for K slices (queued-resource node prefix)."""
        return [self.name] if self.num_slices == 1 else [f"{self.name}-{i}" for i in range(self.num_slices)]

    def check(self) -> None:
        """Rejects an impossible launch before any command runs, naming the key."""
        if not self.name:
            raise LaunchError("name is empty: set `name:` in the launch config or pass --name")
        if not self.accelerator_type:
            raise LaunchError("accelerator_type is empty: set `accelerator_type:` (e.g. v5litepod-16) or pass "
                              "--accelerator-type")
        try:
            tpu_facts.topology_for_accelerator(self.accelerator_type)
        except tpu_facts.TopologyError as e:
            raise LaunchError(str(e)) from None
        if not self.config:
            raise LaunchError("config is empty: set `config:` (a training config) or pass --config")
        if self.provisioning not in PROVISIONING:
            raise LaunchError(f"provisioning={self.provisioning!r} is not one of {', '.join(PROVISIONING)}")
        if self.num_slices < 1:
            raise LaunchError(f"num_slices={self.num_slices} must be >= 1")
        if self.num_slices > 1 and not self.queued:
            raise LaunchError("num_slices > 1 needs a queued resource (queued: true): slices are created together "
                              "as the nodes of one queued resource")
        if self.queued and self.provisioning == "preemptible":
            raise LaunchError("provisioning=preemptible is for plain TPU VMs (queued: false); queued resources "
                              "take spot instead")
        for k in self.env:
            if not str(k).isidentifier():
                raise LaunchError(f"env: {k!r} is not a valid environment variable name")
        for url in self.mounts:
            if not url.startswith("gs://") or not url[len("gs://"):].split("/")[0]:
                raise LaunchError(f"mounts: {url!r} is not a gs://BUCKET[/PATH] URL (the workers mount GCS buckets "
                                  f"with gcsfuse)")
            if "," in url or "=" in url:
                raise LaunchError(f"mounts: {url!r} contains ',' or '=', the separators of ${MOUNTS_ENV}")


def load_job(path: str | None, flags: dict[str, Any]) -> TpuJob:
    """The launch config at ``path`` (or none) with non-None ``flags`` on top; ``config`` is made
    relative to the current directory. Unknown keys and values of the wrong type are rejected
    (danlu.base.config's builder, as every danlu config), naming the file and the key."""
    raw: dict = {}
    try:
        if path:
            raw = read_yaml_mapping(path, "launch config")
            if raw.get("config"):
                raw["config"] = str(Path(path).parent / raw["config"])
            build(TpuJob, raw)  # the file's own keys, before the flags join them
        for k, v in flags.items():
            if v is not None:
                raw[k] = [*(raw.get(k) or ()), *v] if k in ("overrides", "mounts") else v
        job = build(TpuJob, raw)
    except ConfigError as e:
        raise LaunchError(f"{path}: {e}" if path and str(path) not in str(e) else str(e)) from None
    job.check()
    return job


def resolve_location(job: TpuJob) -> TpuJob:
    """Fills project and zone from the environment or gcloud's configuration, or raises saying how."""
    project = resolve_setting(job.project, what="project", flag="--project", key="project",
                              env=("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"), prop="project")
    zone = resolve_setting(job.zone, what="zone", flag="--zone", key="zone", env=("CLOUDSDK_COMPUTE_ZONE",),
                           prop="compute/zone")
    return dataclasses.replace(job, project=project, zone=zone)


# ---------------------------------------------------------------------------------------------
# What the training config is checked against, and what the launcher adds to it


def chips_of(job: TpuJob) -> int:
    """Chips of all slices: the devices of the training mesh."""
    return tpu_facts.chips(job.accelerator_type) * job.num_slices


def hosts_of(job: TpuJob) -> int:
    """TPU VM hosts of all slices: the processes of danlu train."""
    return tpu_facts.hosts(job.accelerator_type) * job.num_slices


def train_overrides(job: TpuJob) -> list[str]:
    """What the launcher adds to the job's overrides: jax.distributed finds its peers on TPU VMs;
    the data axis spans the slices; the run directory (checkpoints) outlives the VMs."""
    out = ["distributed.auto=true", *job.overrides]
    if job.num_slices > 1:
        out.append(f"mesh.dcn_data={job.num_slices}")
    if job.run_dir:
        out.append(f"train.run_dir={job.run_dir}")
    return out


def with_data_path(job: TpuJob, data_path: str, run_dir: str = "") -> TpuJob:
    """``job`` whose workers mount the bucket of the training config's ``data_path`` when it is on GCS.
    Any other URL is refused (the workers read token shards from local files), as is a ``run_dir``
    (the training config's train.run_dir) under a read-only mount."""
    if not data_path:
        raise LaunchError("data.path is empty: the workers need token shards, e.g. --set data.path=gs://BUCKET/shards")
    if data_path.startswith("gs://"):
        job = dataclasses.replace(job, mounts=(*job.mounts, data_path))
        job.check()
    elif "://" in data_path and not data_path.startswith("file://"):
        raise LaunchError(f"data.path={data_path!r}: the TPU workers mount gs:// buckets (gcsfuse) or read a local "
                          f"path of their own disks; copy the shards to GCS (gcloud storage cp -r)")
    for url in mounted_urls(job):
        if run_dir == url or run_dir.startswith(url + "/"):
            raise LaunchError(f"train.run_dir={run_dir!r} is under {url}, which danlu train reads through a read-only "
                              f"gcsfuse mount: give the run directory a path of its own, beside the data (e.g. "
                              f"gs://BUCKET/runs/NAME for data in gs://BUCKET/shards)")
    return job


# ---------------------------------------------------------------------------------------------
# Data on GCS: buckets mounted on every worker, read by danlu train through $DANLU_MOUNTS


def buckets(job: TpuJob) -> list[str]:
    """The distinct bucket names of ``job.mounts``, sorted."""
    return sorted({url[len("gs://"):].split("/")[0] for url in job.mounts})


def mount_dir(bucket: str) -> str:
    return f"{MOUNT_ROOT}/{bucket}"


def mounted_urls(job: TpuJob) -> list[str]:
    """The URLs of ``job.mounts`` (no trailing slash, sorted): the prefixes danlu train reads from the mounts."""
    return sorted({url.rstrip("/") for url in job.mounts})


def mounts_env(job: TpuJob) -> str:
    """$DANLU_MOUNTS of danlu train on the workers: gs://BUCKET/PATH=MOUNT_ROOT/BUCKET/PATH for each URL
    of ``job.mounts`` ("" for none). Only these prefixes are read through the read-only mounts: the
    rest of a bucket (the run directory's checkpoints and metrics) is still written as gs:// URLs."""
    return ",".join(f"{url}={MOUNT_ROOT}/{url[len('gs://'):]}" for url in mounted_urls(job))


def gcsfuse_script(job: TpuJob) -> str:
    """The remote command that installs gcsfuse when missing and mounts each bucket read-only, once
    (an existing mount is kept, so setup can be rerun). Fails (non-zero) when a step fails."""
    steps = [GCSFUSE_INSTALL]
    for b in buckets(job):
        d = shlex.quote(mount_dir(b))
        steps.append(f"mkdir -p {d} && {{ mountpoint -q {d} || gcsfuse {' '.join(GCSFUSE_FLAGS)} "
                     f"{shlex.quote(b)} {d}; }}")
    return " && ".join(steps)


# ---------------------------------------------------------------------------------------------
# Commands (argument lists)


def _where(job: TpuJob) -> list[str]:
    return [f"--project={job.project}", f"--zone={job.zone}"]


def runtime_version(job: TpuJob) -> str:
    if job.runtime_version:
        return job.runtime_version
    return RUNTIME_VERSIONS[tpu_facts.parse_topology(job.accelerator_type)[0].name]


def create_commands(job: TpuJob) -> list[list[str]]:
    """Creates the TPUs: one queued resource (all slices) or one TPU VM."""
    extra = []
    if job.network:
        extra.append(f"--network={job.network}")
    if job.subnetwork:
        extra.append(f"--subnetwork={job.subnetwork}")
    if job.service_account:
        extra.append(f"--service-account={job.service_account}")
    if job.internal_ips:
        extra.append("--internal-ips")
    if job.labels:
        extra.append("--labels=" + ",".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
    if job.provisioning != "on-demand":
        extra.append(f"--{job.provisioning}")
    if job.queued:
        nodes = [f"--node-id={job.name}"] if job.num_slices == 1 else [f"--node-count={job.num_slices}",
                                                                        f"--node-prefix={job.name}"]
        return [["gcloud", "compute", "tpus", "queued-resources", "create", job.name, *_where(job),
                 f"--accelerator-type={job.accelerator_type}", f"--runtime-version={runtime_version(job)}",
                 *nodes, *extra]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", job.name, *_where(job),
             f"--accelerator-type={job.accelerator_type}", f"--version={runtime_version(job)}", *extra]]


def ssh_command(job: TpuJob, node: str, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(job), f"--worker={worker}",
            f"--command={command}"]


def scp_command(job: TpuJob, node: str, files: Sequence[str], dest: str = "") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *files, f"{node}:{dest}", *_where(job), "--worker=all"]


def wheel_name() -> str:
    """The file name `pip wheel` gives this checkout (from pyproject.toml's version)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return f"{meta['name']}-{meta['version']}-py3-none-any.whl"


def setup_commands(job: TpuJob, dist_dir: str = "dist") -> list[list[str]]:
    """Installs danlu with the `tpu` extra on every worker of every slice, then (when the job has
    data on GCS) installs gcsfuse and mounts the buckets there."""
    py = shlex.quote(job.python)
    cmds: list[list[str]] = []
    if job.package == ".":
        root = str(Path(__file__).resolve().parent.parent)
        wheel = wheel_name()
        cmds.append([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist_dir, root])
        for node in job.nodes:
            cmds.append(scp_command(job, node, [str(Path(dist_dir) / wheel)]))
        requirement = f"./{wheel}[tpu]"
    else:
        requirement = job.package
    install = f"{py} -m pip install --upgrade {shlex.quote(requirement)}"
    for node in job.nodes:
        cmds.append(ssh_command(job, node, install))
    if job.mounts:
        for node in job.nodes:
            cmds.append(ssh_command(job, node, gcsfuse_script(job)))
    return cmds


def train_env(job: TpuJob) -> dict[str, str]:
    """The extra environment of danlu train on a worker: $DANLU_MOUNTS, then `env` (sorted), which wins."""
    out = {MOUNTS_ENV: mounts_env(job)} if job.mounts else {}
    out.update((str(k), str(v)) for k, v in sorted(job.env.items()))
    return out


def run_script(job: TpuJob, config_yaml: str) -> str:
    """The --command that starts training on a worker, detached, and returns at once.

    It writes the resolved config, then runs (under nohup, in the background) a script that starts
    `danlu train` (with $DANLU_MOUNTS naming the buckets `setup` mounted, unless `env` sets it),
    copies the log to GCS every minute and at the end when `gcs_logs` is set, and records the exit
    code. Every value is shlex-quoted; nothing in it is expanded but $(hostname), $!, $?.
    """
    py = shlex.quote(job.python)
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in train_env(job).items())
    train = f"env PYTHONUNBUFFERED=1 {env + ' ' if env else ''}{py} -m danlu.cli train {JOB_DIR}/config.yaml"
    inner = [f"{train} > {JOB_DIR}/train.log 2>&1 & pid=$!", f"echo $pid > {JOB_DIR}/train.pid"]
    if job.gcs_logs:
        dest = shlex.quote(job.gcs_logs.rstrip("/") + f"/{job.name}/") + '"$(hostname).log"'
        inner += [f"(while sleep 60; do gcloud storage cp -q {JOB_DIR}/train.log {dest} >/dev/null 2>&1; done) & "
                  f"sync=$!"]
    inner += ["wait $pid; rc=$?"]
    if job.gcs_logs:
        inner += ["kill $sync", f"gcloud storage cp -q {JOB_DIR}/train.log {dest}"]
    inner += [f"echo $rc > {JOB_DIR}/exit_code"]
    return remote_script([
        f"mkdir -p {JOB_DIR}",
        f"rm -f {JOB_DIR}/exit_code",
        f"printf '%s' {shlex.quote(config_yaml)} > {JOB_DIR}/config.yaml",
        f"nohup bash -c {shlex.quote(remote_script(inner))} > /dev/null 2>&1 < /dev/null &",
    ])


def run_commands(job: TpuJob, config_yaml: str) -> list[list[str]]:
    """Starts `danlu train` on every worker of every slice (a multi-slice job starts on all of them)."""
    script = run_script(job, config_yaml)
    return [ssh_command(job, node, script) for node in job.nodes]


def status_command(job: TpuJob) -> list[str]:
    if job.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", job.name, *_where(job),
                "--format=value(state.state)"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", job.name, *_where(job), "--format=value(state)"]


def logs_commands(job: TpuJob, worker: str = "0", lines: int = 100, follow: bool = False) -> list[list[str]]:
    tail = f"tail -n {int(lines)}{' -F' if follow else ''} {JOB_DIR}/train.log"
    return [ssh_command(job, node, tail, worker) for node in (job.nodes if worker == "all" else job.nodes[:1])]


def stop_commands(job: TpuJob) -> list[list[str]]:
    """SIGTERM to danlu train: it saves a checkpoint at the next step and exits (rerun resumes)."""
    stop = f"test -f {JOB_DIR}/train.pid && kill -TERM $(cat {JOB_DIR}/train.pid) || true"
    return [ssh_command(job, node, stop) for node in job.nodes]


def delete_commands(job: TpuJob) -> list[list[str]]:
    if job.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", job.name, *_where(job), "--force",
                 "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", job.name, *_where(job), "--quiet"]]


def exit_code_command(job: TpuJob) -> list[str]:
    """Prints worker 0's exit code of danlu train, or nothing while it runs."""
    return ssh_command(job, job.nodes[0], f"cat {JOB_DIR}/exit_code 2>/dev/null || true", worker="0")


def running_command(job: TpuJob) -> list[str]:
    """Prints `running` when worker 0's danlu train is alive (so watch does not start a second one)."""
    check = f"test -f {JOB_DIR}/train.pid && kill -0 $(cat {JOB_DIR}/train.pid) 2>/dev/null && echo running || true"
    return ssh_command(job, job.nodes[0], check, worker="0")


# ---------------------------------------------------------------------------------------------
# Actions


def state(job: TpuJob, runner: Runner) -> str:
    """The queued resource's (or TPU VM's) state; NOT_FOUND when it does not exist."""
    try:
        out = runner.run(status_command(job), capture=True, dry_output="ACTIVE" if job.queued else "READY")
    except LaunchError as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return "NOT_FOUND"
        raise
    return out.strip().splitlines()[-1].strip() if out.strip() else "UNKNOWN"


def wait_until_ready(job: TpuJob, runner: Runner, interval: float, sleep: Callable[[float], None],
                     log: Callable[[str], None], timeout: float = 0) -> None:
    ready = "ACTIVE" if job.queued else "READY"
    waited = 0.0
    while True:
        s = state(job, runner)
        if s == ready:
            return
        if s in DEAD_STATES or s in DEAD_NODE_STATES:
            raise LaunchError(f"{job.name} is {s} while waiting for it to become {ready}")
        log(f"{job.name}: {s}; waiting for {ready}")
        if timeout and waited >= timeout:
            raise LaunchError(f"{job.name} not {ready} after {timeout:.0f} s")
        sleep(interval)
        waited += interval


def watch(job: TpuJob, runner: Runner, config_yaml: str, *, interval: float = 60.0, max_recreations: int = 10,
          max_restarts: int = 3, sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = print,
          delete_when_done: bool = False, install: bool = True) -> int:
    """Keeps the job running until danlu train exits: creates the TPUs if absent, installs and starts
    training; when the queued resource is preempted or fails, deletes and recreates it, installs again
    and reruns training, which resumes from the latest checkpoint in the run directory. A training
    process that exits non-zero on healthy TPUs is restarted up to ``max_restarts`` times.
    ``install=False``: the TPUs already have danlu (a sweep's later points); recreated TPUs get it again.
    Returns danlu train's exit code (0 when it finished)."""
    recreations = restarts = 0
    started = False
    while True:
        s = state(job, runner)
        ready = s == ("ACTIVE" if job.queued else "READY")
        if s in DEAD_STATES or s in DEAD_NODE_STATES:
            if s != "NOT_FOUND":
                if recreations >= max_recreations:
                    log(f"{job.name} is {s}; already recreated {recreations} times, giving up")
                    return 1
                recreations += 1
                log(f"{job.name} is {s} (preempted or failed): deleting and creating it again "
                    f"({recreations}/{max_recreations})")
                for cmd in delete_commands(job):
                    runner.run(cmd, check=False)
            else:
                log(f"{job.name} does not exist: creating it")
            for cmd in create_commands(job):
                runner.run(cmd)
            started, install = False, True
        elif ready and not started and runner.run(running_command(job), capture=True, check=False).strip():
            log(f"{job.name} is {s} and danlu train is running on it: watching")
            started = True
        elif ready and not started:
            log(f"{job.name} is {s}: {'installing danlu and ' if install else ''}starting training")
            for cmd in (setup_commands(job) if install else []) + run_commands(job, config_yaml):
                runner.run(cmd)
            started = True
        elif ready:
            code = runner.run(exit_code_command(job), capture=True, check=False).strip()
            if code:
                if code == "0":
                    log(f"{job.name}: danlu train finished")
                    if delete_when_done:
                        for cmd in delete_commands(job):
                            runner.run(cmd)
                    return 0
                if restarts >= max_restarts:
                    log(f"{job.name}: danlu train exited with {code}; restarted {restarts} times, giving up")
                    return int(code) if code.isdigit() else 1
                restarts += 1
                log(f"{job.name}: danlu train exited with {code}; starting it again ({restarts}/{max_restarts})")
                for cmd in run_commands(job, config_yaml):
                    runner.run(cmd)
        else:
            log(f"{job.name}: {s}")
        if runner.dry_run:  # one pass shows every command the loop would run
            return 0
        sleep(interval)


def add_arguments(p) -> None:
    p.add_argument("action", choices=ACTIONS, help="what to do (see `danlu launch tpu --help`)")
    p.add_argument("--launch", metavar="YAML", help="launch config (configs/tpu/launch-*.yaml); flags override it")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    g = p.add_argument_group("launch config keys (override the YAML)")
    g.add_argument("--name")
    g.add_argument("--config", help="training config (YAML)")
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="training override, repeatable (e.g. --set data.path=gs://B/shards)")
    g.add_argument("--run-dir", dest="run_dir", help="train.run_dir, e.g. gs://BUCKET/runs/NAME")
    g.add_argument("--project")
    g.add_argument("--zone")
    g.add_argument("--accelerator-type", dest="accelerator_type", help="e.g. v5litepod-16, v5p-32, v6e-256")
    g.add_argument("--runtime-version", dest="runtime_version")
    g.add_argument("--num-slices", dest="num_slices", type=int)
    g.add_argument("--provisioning", choices=PROVISIONING)
    g.add_argument("--spot", dest="provisioning", action="store_const", const="spot")
    g.add_argument("--queued", dest="queued", action="store_true", default=None)
    g.add_argument("--no-queued", dest="queued", action="store_false", help="a plain TPU VM, not a queued resource")
    g.add_argument("--network")
    g.add_argument("--subnetwork")
    g.add_argument("--service-account", dest="service_account")
    g.add_argument("--package", help='"." (a wheel of this checkout) or a pip requirement')
    g.add_argument("--gcs-logs", dest="gcs_logs", help="gs:// prefix for the workers' train logs")
    g.add_argument("--mount", dest="mounts", action="append", metavar="gs://BUCKET[/PATH]",
                   help="another bucket the workers mount, repeatable (data.path's bucket always is)")
    p.add_argument("--worker", default="0", help="logs: worker number or `all` (default 0)")
    p.add_argument("--lines", type=int, default=100, help="logs: last N lines (default 100)")
    p.add_argument("--follow", action="store_true", help="logs: keep following")
    p.add_argument("--interval", type=float, default=60.0, help="watch: seconds between polls (default 60)")
    p.add_argument("--max-recreations", type=int, default=10, help="watch: recreate the TPUs at most N times")
    p.add_argument("--max-restarts", type=int, default=3, help="watch: restart a failed danlu train at most N times")
    p.add_argument("--delete-when-done", action="store_true", help="watch: delete the TPUs when training finished")


_FLAG_KEYS = ("name", "config", "overrides", "run_dir", "project", "zone", "accelerator_type", "runtime_version",
              "num_slices", "provisioning", "queued", "network", "subnetwork", "service_account", "package",
              "gcs_logs", "mounts")

# The top layer's part (danlu/tpu.py): the job's training config resolved and validated for its
# chips, as text; the job with that config's data bucket added to its mounts.
Prepare = Callable[[TpuJob], tuple[TpuJob, str]]


def main(args, prepare: Prepare) -> int:
    """Runs ``args.action`` (parsed by `add_arguments`). ``prepare`` is called for the actions that
    need the training config: setup (its data bucket), run, watch and up."""
    try:
        job = load_job(args.launch, {k: getattr(args, k) for k in _FLAG_KEYS})
        job = resolve_location(job)
        runner = Runner(dry_run=args.dry_run)
        config_yaml = ""
        if args.action in ("setup", "run", "watch", "up"):
            job, config_yaml = prepare(job)
        a = args.action
        if a == "status":
            if args.dry_run:
                runner.run(status_command(job))
            else:
                print(state(job, runner))
            return 0
        cmds = {"create": lambda: create_commands(job), "setup": lambda: setup_commands(job),
                "run": lambda: run_commands(job, config_yaml),
                "logs": lambda: logs_commands(job, args.worker, args.lines, args.follow),
                "stop": lambda: stop_commands(job), "delete": lambda: delete_commands(job),
                "up": lambda: create_commands(job) + setup_commands(job) + run_commands(job, config_yaml)}
        if a == "watch":
            # Progress to stderr: stdout carries only commands (what a dry run promises).
            return watch(job, runner, config_yaml, interval=args.interval, max_recreations=args.max_recreations,
                         max_restarts=args.max_restarts, delete_when_done=args.delete_when_done,
                         log=lambda s: print(f"[watch {time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True))
        if a == "up" and not args.dry_run:
            for cmd in create_commands(job):
                runner.run(cmd)
            wait_until_ready(job, runner, args.interval, time.sleep, lambda s: print(s, file=sys.stderr, flush=True))
            for cmd in setup_commands(job) + run_commands(job, config_yaml):
                runner.run(cmd)
            return 0
        for cmd in cmds[a]():
            runner.run(cmd)
        return 0
    except LaunchError as e:
        print(f"danlu launch tpu: {e}", file=sys.stderr)
        return 2
