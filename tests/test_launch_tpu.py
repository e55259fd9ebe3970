"""`danlu launch tpu|xpk|dataflow`: golden command lines, arguments reaching gcloud intact, the watch
loop against a fake `gcloud` executable (a real subprocess that records its argv and answers from a
script of canned states), and clear errors for a missing project or zone."""

import json
import os
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from launch import tpu
from launch.gcloud import LaunchError, Runner
from pretrain.config import CONFIGS_DIR

ROOT = Path(__file__).resolve().parent.parent
TPU_DIR = CONFIGS_DIR / "tpu"

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """A stand-in for gcloud: appends its argv (JSON) to $FAKE_GCLOUD_DIR/calls.jsonl and prints the
    next canned answer of the first rule whose `match` is in the joined argv (the last one repeats)."""
    import json, os, sys
    d = os.environ["FAKE_GCLOUD_DIR"]
    with open(os.path.join(d, "calls.jsonl"), "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    rules_path = os.path.join(d, "rules.json")
    rules = json.load(open(rules_path)) if os.path.exists(rules_path) else []
    joined = " ".join(sys.argv[1:])
    for rule in rules:
        if rule["match"] in joined:
            answers = rule["answers"]
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            json.dump(rules, open(rules_path, "w"))
            sys.stdout.write(answer.get("stdout", ""))
            sys.stderr.write(answer.get("stderr", ""))
            sys.exit(answer.get("rc", 0))
    ''')


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """PATH gets a fake `gcloud`; returns (set_rules, calls) helpers. No real project or zone leaks in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "gcloud"
    exe.write_text(FAKE_GCLOUD.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(tmp_path))
    for var in ("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_COMPUTE_ZONE"):
        monkeypatch.delenv(var, raising=False)

    def set_rules(rules):
        (tmp_path / "rules.json").write_text(json.dumps(rules))

    def calls():
        p = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    set_rules([{"match": "config get-value", "answers": [{"stdout": ""}]}])
    return set_rules, calls


def job(**kw):
    base = dict(name="danlu-test", config=str(TPU_DIR / "125m-v5e-16.yaml"), project="proj", zone="us-west4-a",
                accelerator_type="v5litepod-16", overrides=("data.path=gs://b/shards",))
    base.update(kw)
    j = tpu.TpuJob(**base)
    j.check()
    return j


# ---------------------------------------------------------------------------------------------
# Golden command lines


def test_single_host_tpu_vm_golden():
    j = job(name="one", accelerator_type="v5litepod-8", queued=False, provisioning="preemptible",
            config=str(CONFIGS_DIR / "train" / "tiny.yaml"), overrides=())
    assert [shlex.join(c) for c in tpu.create_commands(j)] == [
        "gcloud compute tpus tpu-vm create one --project=proj --zone=us-west4-a --accelerator-type=v5litepod-8 "
        "--version=v2-alpha-tpuv5-lite --preemptible"]
    assert shlex.join(tpu.delete_commands(j)[0]) == "gcloud compute tpus tpu-vm delete one --project=proj --zone=us-west4-a --quiet"
    assert shlex.join(tpu.status_command(j)) == ("gcloud compute tpus tpu-vm describe one --project=proj "
                                                 "--zone=us-west4-a '--format=value(state)'")
    assert [shlex.join(c) for c in tpu.logs_commands(j)] == [
        "gcloud compute tpus tpu-vm ssh one --project=proj --zone=us-west4-a --worker=0 "
        "'--command=tail -n 100 danlu-job/train.log'"]


def test_pod_queued_spot_golden():
    j = job(provisioning="spot", network="net-1", subnetwork="sub-1", service_account="sa@proj.iam.gserviceaccount.com",
            labels={"team": "lm"})
    assert [shlex.join(c) for c in tpu.create_commands(j)] == [
        "gcloud compute tpus queued-resources create danlu-test --project=proj --zone=us-west4-a "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-id=danlu-test "
        "--network=net-1 --subnetwork=sub-1 --service-account=sa@proj.iam.gserviceaccount.com --labels=team=lm --spot"]
    setup = [shlex.join(c) for c in tpu.setup_commands(j, dist_dir="dist")]
    wheel = tpu.wheel_name()
    assert setup[0] == shlex.join([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", "dist", str(ROOT)])
    assert setup[1] == (f"gcloud compute tpus tpu-vm scp dist/{wheel} danlu-test: --project=proj --zone=us-west4-a "
                        f"--worker=all")
    assert setup[2] == ("gcloud compute tpus tpu-vm ssh danlu-test --project=proj --zone=us-west4-a --worker=all "
                        f"'--command=python3 -m pip install --upgrade '\"'\"'./{wheel}[tpu]'\"'\"''")
    assert shlex.join(tpu.delete_commands(j)[0]) == (
        "gcloud compute tpus queued-resources delete danlu-test --project=proj --zone=us-west4-a --force --quiet")


def test_multislice_golden_and_config():
    j = job(name="big", accelerator_type="v6e-256", num_slices=2, provisioning="reserved",
            config=str(TPU_DIR / "7b-2xv6e-256.yaml"), run_dir="gs://b/runs/7b")
    assert shlex.join(tpu.create_commands(j)[0]) == (
        "gcloud compute tpus queued-resources create big --project=proj --zone=us-west4-a --accelerator-type=v6e-256 "
        "--runtime-version=v2-alpha-tpuv6e --node-count=2 --node-prefix=big --reserved")
    assert j.nodes == ["big-0", "big-1"]
    cfg = tpu.resolved_config(j)
    assert cfg.mesh.dcn_data == 2 and cfg.distributed.auto and cfg.train.run_dir == "gs://b/runs/7b"
    runs = tpu.run_commands(j, tpu.config_text(cfg))
    assert [c[5] for c in runs] == ["big-0", "big-1"] and all("--worker=all" in c for c in runs)


def test_run_script_starts_train_with_the_resolved_config(tmp_path):
    """The remote script, run here by bash, writes the config and starts `python -m danlu.cli train`."""
    j = job(python=str(tmp_path / "fakepy"), env={"LIBTPU_INIT_ARGS": "--xla_tpu_x=1 $(rm -rf /)"})
    # A stand-in interpreter that records how it was called (argv and the environment asked for).
    (tmp_path / "fakepy").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > args.txt\nprintf '%s' \"$LIBTPU_INIT_ARGS\" > env.txt\n")
    (tmp_path / "fakepy").chmod(0o755)
    cfg = tpu.resolved_config(j)
    script = tpu.run_script(j, tpu.config_text(cfg))
    import subprocess
    import time
    work = tmp_path / "home"
    work.mkdir()
    subprocess.run(["bash", "-c", script], cwd=work, check=True)
    for _ in range(100):
        if (work / "danlu-job" / "exit_code").exists():
            break
        time.sleep(0.05)
    assert (work / "danlu-job" / "exit_code").read_text().strip() == "0"
    assert (work / "args.txt").read_text().split() == ["-m", "danlu.cli", "train", "danlu-job/config.yaml"]
    assert (work / "env.txt").read_text() == "--xla_tpu_x=1 $(rm -rf /)"  # reached intact, never expanded
    from pretrain.config import load_config
    assert load_config(work / "danlu-job" / "config.yaml") == cfg


# ---------------------------------------------------------------------------------------------
# Through the fake gcloud


def test_arguments_with_spaces_and_metacharacters_reach_gcloud_intact(fake_gcloud, capsys):
    set_rules, calls = fake_gcloud
    from danlu.cli import main

    nasty = "lm team; rm -rf / && echo $HOME `id` 'q' \"dq\""
    rc = main(["launch", "tpu", "create", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--project", "p",
               "--zone", "z-1", "--name", "n1", "--network", nasty, "--service-account", "a b@c"])
    assert rc == 0
    (argv,) = calls()
    assert argv[:6] == ["compute", "tpus", "queued-resources", "create", "n1", "--project=p"]
    assert f"--network={nasty}" in argv and "--service-account=a b@c" in argv


def test_missing_project_or_zone_is_a_clear_error(fake_gcloud, capsys):
    from danlu.cli import main

    rc = main(["launch", "tpu", "create", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no project given: pass --project, set `project:` in the launch config" in err
    assert "gcloud config set project VALUE" in err
    rc = main(["launch", "tpu", "create", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--project", "p",
               "--zone", "", "--dry-run"])
    assert rc == 2 and "no zone given: pass --zone" in capsys.readouterr().err


def test_project_from_gcloud_config(fake_gcloud, capsys):
    set_rules, calls = fake_gcloud
    set_rules([{"match": "get-value project", "answers": [{"stdout": "from-gcloud\n"}]},
               {"match": "get-value compute/zone", "answers": [{"stdout": "europe-west4-b\n"}]}])
    from danlu.cli import main

    rc = main(["launch", "tpu", "delete", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--zone", "",
               "--dry-run"])
    assert rc == 0
    assert "--project=from-gcloud --zone=europe-west4-b --force --quiet" in capsys.readouterr().out


def test_dry_run_prints_every_command_and_runs_none(fake_gcloud, capsys):
    set_rules, calls = fake_gcloud
    from danlu.cli import main

    rc = main(["launch", "tpu", "up", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--project", "p",
               "--zone", "z", "--dry-run"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus queued-resources create danlu-125m-v5e-16 --project=p --zone=z")
    assert any(" -m pip wheel " in l for l in lines) and any("tpu-vm scp" in l for l in lines)
    assert "danlu.cli train danlu-job/config.yaml" in lines[-1]
    assert all(shlex.split(l) for l in lines)
    assert [c for c in calls() if "get-value" not in " ".join(c)] == []  # nothing ran


def test_watch_recreates_a_preempted_queued_resource_and_resumes(fake_gcloud, tmp_path):
    """Spot TPUs: ACTIVE -> run -> SUSPENDED (preempted) -> delete, create, wait, setup, run -> done."""
    set_rules, calls = fake_gcloud
    set_rules([
        {"match": "queued-resources describe", "answers": [
            {"stdout": "ACTIVE\n"}, {"stdout": "ACTIVE\n"}, {"stdout": "SUSPENDED\n"},
            {"stdout": "WAITING_FOR_RESOURCES\n"}, {"stdout": "PROVISIONING\n"}, {"stdout": "ACTIVE\n"},
            {"stdout": "ACTIVE\n"}, {"stdout": "ACTIVE\n"}]},
        {"match": "echo running", "answers": [{"stdout": ""}]},
        {"match": "exit_code 2>/dev/null", "answers": [{"stdout": ""}, {"stdout": ""}, {"stdout": "0\n"}]},
    ])
    j = job(provisioning="spot", package="danlu[tpu] @ git+https://example.com/danlu.git@v1", run_dir="gs://b/r")
    cfg_yaml = tpu.config_text(tpu.resolved_config(j))
    log: list[str] = []
    slept: list[float] = []
    rc = tpu.watch(j, Runner(out=open(os.devnull, "w")), cfg_yaml, interval=7, sleep=slept.append, log=log.append)
    assert rc == 0
    verbs = []
    for argv in calls():
        joined = " ".join(argv)
        if "get-value" in joined:
            continue
        verb = " ".join(argv[2:4]) if argv[2] == "queued-resources" else argv[3]
        if verb == "ssh":
            verb = "ssh:" + ("install" if "pip install" in joined else "run" if "danlu.cli train" in joined
                             else "check" if "echo running" in joined else "exit_code")
        verbs.append(verb)
    assert verbs == [
        "queued-resources describe", "ssh:check", "ssh:install", "ssh:run",  # found ACTIVE: start
        "queued-resources describe", "ssh:exit_code",                        # still training
        "queued-resources describe", "queued-resources delete", "queued-resources create",  # preempted
        "queued-resources describe", "queued-resources describe",            # waiting, provisioning
        "queued-resources describe", "ssh:check", "ssh:install", "ssh:run",  # back: install, resume
        "queued-resources describe", "ssh:exit_code",
        "queued-resources describe", "ssh:exit_code",                        # exit code 0: done
    ]
    assert slept == [7] * 7  # between the 8 polls
    assert any("SUSPENDED (preempted or failed)" in l for l in log)
    run_argv = [a for a in calls() if "danlu.cli train" in " ".join(a)][-1]
    assert '"run_dir": "gs://b/r"' in run_argv[-1]  # the resumed run uses the same run directory


def test_watch_gives_up_after_max_recreations(fake_gcloud):
    set_rules, calls = fake_gcloud
    set_rules([{"match": "queued-resources describe", "answers": [{"stdout": "FAILED\n"}]}])
    j = job(provisioning="spot")
    rc = tpu.watch(j, Runner(out=open(os.devnull, "w")), "x: 1\n", interval=0, sleep=lambda s: None,
                   log=lambda s: None, max_recreations=2)
    assert rc == 1
    assert sum("create" in a for a in calls()) == 2


def test_gcloud_failure_names_the_command(fake_gcloud):
    set_rules, calls = fake_gcloud
    set_rules([{"match": "create", "answers": [{"stderr": "PERMISSION_DENIED: quota", "rc": 1}]}])
    with pytest.raises(LaunchError, match="command failed with exit code 1: gcloud compute tpus queued-resources create"):
        Runner(out=open(os.devnull, "w")).run(tpu.create_commands(job())[0])


def test_bad_launch_configs_are_refused(tmp_path):
    bad = tmp_path / "l.yaml"
    bad.write_text("name: x\nzoen: a\n")
    with pytest.raises(LaunchError, match="unknown launch key 'zoen'"):
        tpu.load_job(str(bad), {})
    with pytest.raises(LaunchError, match="num_slices > 1 needs a queued resource"):
        job(num_slices=2, queued=False)
    with pytest.raises(LaunchError, match="provisioning=preemptible is for plain TPU VMs"):
        job(provisioning="preemptible")
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="not divisible by mesh"):  # the training config is checked too
        tpu.resolved_config(job(overrides=("train.global_batch_size=24",)))


# ---------------------------------------------------------------------------------------------
# xpk and Dataflow


def test_xpk_golden(capsys):
    from danlu.cli import main

    rc = main(["launch", "xpk", "--launch", str(TPU_DIR / "launch-7b-2xv6e-256.yaml"), "--project", "p",
               "--cluster", "c1", "--docker-image", "us-docker.pkg.dev/p/danlu/danlu:1", "--dry-run"])
    assert rc == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    argv = shlex.split(line)
    assert argv[:-1] == ["xpk", "workload", "create", "--cluster=c1", "--workload=danlu-7b-v6e", "--tpu-type=v6e-256",
                         "--num-slices=2", "--docker-image=us-docker.pkg.dev/p/danlu/danlu:1", "--project=p",
                         "--zone=us-east5-b", "--max-restarts=3"]
    script = argv[-1].removeprefix("--command=")
    assert script.endswith("python3 -m danlu.cli train danlu-job/config.yaml")
    written = shlex.split(script.split("; ")[1])  # printf '%s' CONFIG > danlu-job/config.yaml
    cfg = json.loads(written[2])
    assert cfg["mesh"]["dcn_data"] == 2 and cfg["distributed"]["auto"] is True
    assert cfg["train"]["run_dir"] == "gs://BUCKET/runs/7b-2xv6e-256"


def test_xpk_needs_a_cluster(capsys):
    from danlu.cli import main

    rc = main(["launch", "xpk", "--launch", str(TPU_DIR / "launch-125m-v5e-16.yaml"), "--project", "p",
               "--docker-image", "img", "--dry-run"])
    assert rc == 2 and "no cluster given: pass --cluster" in capsys.readouterr().err


def test_dataflow_golden(fake_gcloud, capsys):
    from launch.tpu import wheel_name
    from danlu.cli import main

    cfg = "configs/data/my job.yaml"  # a space reaches the command intact
    rc = main(["launch", "dataflow", cfg, "output.compression=zst", "--project", "p", "--region", "us-central1",
               "--temp-location", "gs://b/tmp", "--output", "gs://b/clean/web", "--machine-type", "n2-standard-8",
               "--max-workers", "50", "--dry-run"])
    assert rc == 0
    build, run = [shlex.split(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert build == [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", "dist", str(ROOT)]
    assert run == [sys.executable, "-m", "danlu.cli", "clean", cfg, "output.compression=zst", "--runner", "beam",
                   "--output", "gs://b/clean/web", "--", "--runner=DataflowRunner", "--project=p",
                   "--region=us-central1", "--temp_location=gs://b/tmp", "--staging_location=gs://b/tmp/staging",
                   "--job_name=danlu-clean-my-job", "--machine_type=n2-standard-8", "--max_num_workers=50",
                   f"--extra_package=dist/{wheel_name()}"]


def test_dataflow_flink_spark_and_errors(fake_gcloud, capsys):
    from danlu.cli import main

    rc = main(["launch", "dataflow", "c.yaml", "--runner", "flink", "--flink-master", "localhost:8081",
               "--parallelism", "4", "--output", "out", "--container-image", "img:1", "--dry-run"])
    assert rc == 0
    (run,) = [shlex.split(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert run[run.index("--") + 1:] == ["--runner=FlinkRunner", "--flink_master=localhost:8081",
                                         "--environment_type=LOOPBACK", "--parallelism=4", "--sdk_container_image=img:1"]
    rc = main(["launch", "dataflow", "c.yaml", "--runner", "spark", "--spark-master", "spark://h:7077", "--output",
               "out", "--package", "none", "--option", "max_bundle_size=10", "--dry-run"])
    (run,) = [shlex.split(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert run[run.index("--") + 1:] == ["--runner=SparkRunner", "--spark_master_url=spark://h:7077",
                                         "--environment_type=LOOPBACK", "--max_bundle_size=10"]
    rc = main(["launch", "dataflow", "c.yaml", "--region", "r", "--temp-location", "gs://b/t", "--output", "gs://b/o",
               "--dry-run"])
    assert rc == 2 and "no project given: pass --project" in capsys.readouterr().err
    rc = main(["launch", "dataflow", "c.yaml", "--project", "p", "--region", "r", "--output", "gs://b/o", "--dry-run"])
    assert rc == 2 and "no --temp-location given" in capsys.readouterr().err
    rc = main(["launch", "dataflow", "c.yaml", "--runner", "flink", "--output", "o", "--dry-run"])
    assert rc == 2 and "--runner flink needs --flink-master" in capsys.readouterr().err


def test_watch_dry_run_prints_only_commands(fake_gcloud, capsys):
    from danlu.cli import main

    rc = main(["launch", "tpu", "watch", "--launch", str(TPU_DIR / "launch-7b-2xv6e-256.yaml"), "--project", "p",
               "--dry-run"])
    assert rc == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert all(shlex.split(l)[0] in ("gcloud", sys.executable) for l in lines)
    assert sum("danlu.cli train" in l for l in lines) == 2  # one run command per slice
    assert "installing danlu and starting training" in out.err


def test_sweep_on_tpu_installs_once_runs_each_point_and_records_its_row(fake_gcloud, tmp_path):
    """`danlu sweep --launch`: every point's validated config runs on the same TPU (danlu installed
    once), each in its own gs:// run directory; its summary.json (from its gs:// run directory) becomes its runs.csv
    row, and a second sweep skips the recorded points."""
    from danlu.sweep import run_sweep_on_tpu
    from pretrain.scaling.plan import load_sweep

    set_rules, calls = fake_gcloud
    summary = {"steps": 1, "final_loss": 3.25, "final_eval_loss": 3.5, "seconds": 60.0}
    set_rules([{"match": "queued-resources describe", "answers": [{"stdout": "ACTIVE\n"}]},
               {"match": "echo running", "answers": [{"stdout": ""}]},
               {"match": "exit_code 2>/dev/null", "answers": [{"stdout": "0\n"}]},
               {"match": "summary.json", "answers": [{"stdout": json.dumps(summary)}]}])
    sweep = load_sweep(ROOT / "configs/scaling/tpu_isoflop.yaml", [f"output={tmp_path / 'out'}"])
    only = ["C3.00e17_d448_L10", "C1.00e18_d704_L11"]
    j = job(run_dir="gs://b/sweep/", provisioning="spot", package="danlu[tpu]==0.1.0")  # its config is replaced by each point's
    rows = run_sweep_on_tpu(sweep, j, Runner(out=open(os.devnull, "w")), only=only, sleep=lambda _: None,
                            log=lambda _: None)
    assert [r["name"] for r in rows] == only
    table = (tmp_path / "out" / "runs.csv").read_text().splitlines()
    assert len(table) == 3 and table[1].split(",")[5] == "3.500000"  # header + 2 rows; loss = final eval loss
    assert rows[0]["run_dir"] == "gs://b/sweep/C3.00e17_d448_L10"
    joined = [" ".join(a) for a in calls()]
    assert sum("pip install" in c for c in joined) == 1
    runs = [c for c in joined if "danlu.cli train" in c]
    assert len(runs) == 2
    for name, d_model, cmd in zip(only, (448, 704), runs):
        assert f'"run_dir": "gs://b/sweep/{name}"' in cmd and f'"d_model": {d_model},' in cmd
        assert '"auto": true' in cmd and "gs://b/shards" in cmd  # the launcher's and the launch config's overrides
    assert run_sweep_on_tpu(sweep, j, Runner(out=open(os.devnull, "w")), only=only, log=lambda _: None) == []
    assert len(calls()) == len(joined)  # nothing left to run: no gcloud call at all

    with pytest.raises(LaunchError, match="demo_data builds token shards on this machine"):
        run_sweep_on_tpu(load_sweep(ROOT / "configs/scaling/cpu_demo.yaml"), j, Runner(dry_run=True))
    with pytest.raises(LaunchError, match="needs a gs:// run_dir"):
        run_sweep_on_tpu(sweep, job(run_dir="/tmp/x"), Runner(dry_run=True))
