"""`danlu launch dataflow`: a `danlu clean` job on Dataflow, Flink or Spark through Apache Beam.

    danlu launch dataflow configs/data/web.yaml --project P --region us-central1 \\
        --temp-location gs://B/tmp --output gs://B/clean/web --machine-type n2-standard-8 --max-workers 50
    danlu launch dataflow configs/data/web.yaml --runner flink --flink-master localhost:8081 --output out/web
    danlu launch dataflow configs/data/web.yaml --runner spark --spark-master spark://host:7077 --output out/web

It builds (and, without `--dry-run`, runs) the command line of the Beam runner of `danlu clean`::

    python -m danlu.cli clean CONFIG [overrides] --runner beam --output OUT -- <Beam pipeline options>

Everything after `--` is Beam's (``PipelineOptions``): for Dataflow `--runner=DataflowRunner
--project --region --temp_location --staging_location --job_name --machine_type --max_num_workers
[--num_workers] [--service_account_email] [--network --subnetwork --no_use_public_ips]`, and how the
workers get danlu: `--package wheel` (default) builds a wheel of this checkout (`pip wheel --no-deps`,
printed first) and passes `--extra_package=dist/danlu-VERSION-py3-none-any.whl` (Dataflow installs it
and its dependencies on every worker at start-up); `--package setup` passes `--setup_file` of a
`setup.py` you provide; `--container-image IMAGE` (`--sdk_container_image`) uses an image that already
has danlu, the fastest start for large jobs. Flink: `--runner=FlinkRunner --flink_master
--parallelism --environment_type`; Spark: `--runner=SparkRunner --spark_master_url --environment_type`.
`--option KEY=VALUE` adds any other pipeline option.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from launch.gcloud import LaunchError, Runner, resolve_setting
from launch.tpu import wheel_name

RUNNERS = {"dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner", "direct": "DirectRunner"}


def job_name(config: str) -> str:
    """A Dataflow job name from the config file name: lower case letters, digits and dashes."""
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config).stem.lower()).strip("-") or "job"
    return f"danlu-clean-{stem}"[:63]


def build_commands(args, dist_dir: str = "dist") -> list[list[str]]:
    """[optional packaging command, the clean command]; raises LaunchError for a missing setting."""
    runner = RUNNERS[args.runner]
    opts = [f"--runner={runner}"]
    cmds: list[list[str]] = []
    if args.runner == "dataflow":
        project = resolve_setting(args.project or "", what="project", flag="--project", key="project",
                                  env=("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"), prop="project")
        region = resolve_setting(args.region or "", what="region", flag="--region", key="region",
                                 env=("CLOUDSDK_DATAFLOW_REGION",), prop="dataflow/region")
        if not args.temp_location:
            raise LaunchError("no --temp-location given: Dataflow needs a gs:// directory for temporary files")
        if not args.output.startswith("gs://"):
            raise LaunchError(f"--output {args.output!r}: Dataflow workers write to Cloud Storage; use gs://BUCKET/...")
        opts += [f"--project={project}", f"--region={region}", f"--temp_location={args.temp_location}",
                 f"--staging_location={args.staging_location or args.temp_location.rstrip('/') + '/staging'}",
                 f"--job_name={args.job_name or job_name(args.config)}", f"--machine_type={args.machine_type}",
                 f"--max_num_workers={args.max_workers}"]
        if args.num_workers:
            opts.append(f"--num_workers={args.num_workers}")
        if args.service_account:
            opts.append(f"--service_account_email={args.service_account}")
        if args.network:
            opts.append(f"--network={args.network}")
        if args.subnetwork:
            opts.append(f"--subnetwork={args.subnetwork}")
    elif args.runner == "flink":
        if not args.flink_master:
            raise LaunchError("--runner flink needs --flink-master HOST:PORT (the Flink JobManager's REST address)")
        opts += [f"--flink_master={args.flink_master}", f"--environment_type={args.environment_type}"]
        if args.parallelism:
            opts.append(f"--parallelism={args.parallelism}")
    elif args.runner == "spark":
        if not args.spark_master:
            raise LaunchError("--runner spark needs --spark-master spark://HOST:PORT")
        opts += [f"--spark_master_url={args.spark_master}", f"--environment_type={args.environment_type}"]
    if args.container_image:
        opts.append(f"--sdk_container_image={args.container_image}")
    elif args.runner != "direct" and args.package == "wheel":
        root = str(Path(__file__).resolve().parent.parent)
        cmds.append([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist_dir, root])
        opts.append(f"--extra_package={Path(dist_dir) / wheel_name()}")
    elif args.runner != "direct" and args.package == "setup":
        opts.append(f"--setup_file={args.setup_file}")
    for item in args.option or ():
        if "=" not in item:
            raise LaunchError(f"--option {item!r}: expected KEY=VALUE (a Beam pipeline option)")
        key, value = item.split("=", 1)
        opts.append(f"--{key.lstrip('-')}={value}")
    cmds.append([sys.executable, "-m", "danlu.cli", "clean", args.config, *args.overrides, "--runner", "beam",
                 "--output", args.output, "--", *opts])
    return cmds


def add_arguments(p) -> None:
    p.add_argument("config", help="cleaning job (configs/data/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the job")
    p.add_argument("--output", required=True, help="output directory (gs://... for Dataflow)")
    p.add_argument("--runner", choices=sorted(RUNNERS), default="dataflow", help="Beam runner (default dataflow)")
    p.add_argument("--project")
    p.add_argument("--region", help="Dataflow region, e.g. us-central1")
    p.add_argument("--temp-location", dest="temp_location", default="", help="gs:// for Dataflow temporary files")
    p.add_argument("--staging-location", dest="staging_location", default="", help="default: TEMP/staging")
    p.add_argument("--job-name", dest="job_name", default="")
    p.add_argument("--machine-type", dest="machine_type", default="n2-standard-4")
    p.add_argument("--max-workers", dest="max_workers", type=int, default=20)
    p.add_argument("--num-workers", dest="num_workers", type=int, default=0)
    p.add_argument("--service-account", dest="service_account", default="")
    p.add_argument("--network", default="")
    p.add_argument("--subnetwork", default="")
    p.add_argument("--package", choices=("wheel", "setup", "none"), default="wheel",
                   help="how workers get danlu: a wheel of this checkout (default), --setup-file, or none")
    p.add_argument("--setup-file", dest="setup_file", default="./setup.py")
    p.add_argument("--container-image", dest="container_image", default="",
                   help="an SDK container image with danlu installed (replaces --package)")
    p.add_argument("--flink-master", dest="flink_master", default="")
    p.add_argument("--spark-master", dest="spark_master", default="")
    p.add_argument("--parallelism", type=int, default=0)
    p.add_argument("--environment-type", dest="environment_type", default="LOOPBACK",
                   help="Flink/Spark: LOOPBACK (workers call back into this process), DOCKER or PROCESS")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other Beam pipeline option")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")


def main(args) -> int:
    try:
        runner = Runner(dry_run=args.dry_run)
        for cmd in build_commands(args):
            runner.run(cmd)
        return 0
    except LaunchError as e:
        print(f"danlu launch dataflow: {e}", file=sys.stderr)
        return 2
