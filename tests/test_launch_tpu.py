"""`danlu launch tpu|xpk|dataflow`: golden command lines (those docs/tpu.md shows, dry-run), arguments
reaching gcloud intact, the gcsfuse mount and $DANLU_MOUNTS of data on GCS, the watch loop against a
fake `gcloud` executable (a real subprocess that records its argv and answers from a script of canned
states), and clear errors for a missing project or zone."""

import json
import os
import re
import shlex
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from danlu import tpu as top
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
    cfg = top.resolved_config(j)
    assert cfg.mesh.dcn_data == 2 and cfg.distributed.auto and cfg.train.run_dir == "gs://b/runs/7b"
    assert tpu.chips_of(j) == 512 and tpu.hosts_of(j) == 128  # 64 hosts of 4 chips per slice
    runs = tpu.run_commands(j, top.config_text(cfg))
    assert [c[5] for c in runs] == ["big-0", "big-1"] and all("--worker=all" in c for c in runs)


def test_run_script_starts_train_with_the_resolved_config(tmp_path):
    """The remote script, run here by bash, writes the config and starts `python -m danlu.cli train`
    with $DANLU_MOUNTS naming the mount of data.path."""
    j = job(python=str(tmp_path / "fakepy"), env={"LIBTPU_INIT_ARGS": "--xla_tpu_x=1 $(rm -rf /)"})
    # A stand-in interpreter that records how it was called (argv and the environment asked for).
    (tmp_path / "fakepy").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > args.txt\nprintf '%s' \"$LIBTPU_INIT_ARGS\" > env.txt\n"
                                     "printf '%s' \"$DANLU_MOUNTS\" > mounts.txt\n")
    (tmp_path / "fakepy").chmod(0o755)
    j, text = top.prepare(j)
    cfg = top.resolved_config(j)
    script = tpu.run_script(j, text)
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
    assert (work / "mounts.txt").read_text() == "gs://b/shards=/tmp/danlu-gcs/b/shards"
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
    j, cfg_yaml = top.prepare(j)
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
            verb = "ssh:" + ("install" if "pip install" in joined else "mount" if "gcsfuse" in joined
                             else "run" if "danlu.cli train" in joined
                             else "check" if "echo running" in joined else "exit_code")
        verbs.append(verb)
    assert verbs == [
        "queued-resources describe", "ssh:check", "ssh:install", "ssh:mount", "ssh:run",  # found ACTIVE: start
        "queued-resources describe", "ssh:exit_code",                        # still training
        "queued-resources describe", "queued-resources delete", "queued-resources create",  # preempted
        "queued-resources describe", "queued-resources describe",            # waiting, provisioning
        "queued-resources describe", "ssh:check", "ssh:install", "ssh:mount", "ssh:run",  # back: install, resume
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
    with pytest.raises(LaunchError, match=r"l.yaml: unknown config key 'zoen' \(did you mean 'zone'\?\)"):
        tpu.load_job(str(bad), {})
    bad.write_text("name: x\nnum_slices: two\n")
    with pytest.raises(LaunchError, match="l.yaml: num_slices: expected an integer, got 'two'"):
        tpu.load_job(str(bad), {})
    bad.write_text("name: x\nenv: [A]\n")
    with pytest.raises(LaunchError, match="l.yaml: env: expected a mapping KEY: VALUE"):
        tpu.load_job(str(bad), {})
    with pytest.raises(LaunchError, match="launch config not found: .*nope.yaml"):
        tpu.load_job(str(tmp_path / "nope.yaml"), {})
    with pytest.raises(LaunchError, match="num_slices > 1 needs a queued resource"):
        job(num_slices=2, queued=False)
    with pytest.raises(LaunchError, match="provisioning=preemptible is for plain TPU VMs"):
        job(provisioning="preemptible")
    with pytest.raises(LaunchError, match="accelerator type 'v5x-16': expected e.g. v5litepod-16"):
        job(accelerator_type="v5x-16")
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="not divisible by mesh"):  # the training config is checked too
        top.resolved_config(job(overrides=("train.global_batch_size=24",)))


def test_tpu_facts_chips_and_hosts():
    """danlu/base/tpu.py: what the launcher validates a training config against (devices, processes)."""
    from danlu.base import tpu as facts

    table = [(a, facts.chips(a), facts.hosts(a)) for a in
             ("v5litepod-4", "v5litepod-8", "v5litepod-16", "v5litepod-256", "v4-8", "v4-32", "v5p-8", "v5p-32",
              "v6e-8", "v6e-16", "v6e-256")]
    assert table == [("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v5litepod-256", 256, 64),
                     ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5p-8", 4, 1), ("v5p-32", 16, 4), ("v6e-8", 8, 1),
                     ("v6e-16", 16, 4), ("v6e-256", 256, 64)]
    assert facts.hosts("v5e:4x4") == 4 and facts.chips("v5p:4x4x8") == 128


# ---------------------------------------------------------------------------------------------
# Data on GCS: gcsfuse on every worker, $DANLU_MOUNTS for danlu train


def test_data_on_gcs_is_mounted_and_other_urls_are_refused(tmp_path):
    j = job()
    got = tpu.with_data_path(j, "gs://b/shards", "gs://b/runs/x")
    assert got.mounts == ("gs://b/shards",) and tpu.buckets(got) == ["b"]
    assert tpu.mounts_env(got) == "gs://b/shards=/tmp/danlu-gcs/b/shards"
    assert tpu.train_env(got) == {"DANLU_MOUNTS": "gs://b/shards=/tmp/danlu-gcs/b/shards"}
    assert tpu.with_data_path(j, "/disk/shards") == j and tpu.train_env(j) == {}  # the workers' own disks
    with pytest.raises(LaunchError, match="data.path is empty"):
        tpu.with_data_path(j, "")
    with pytest.raises(LaunchError, match="data.path='s3://b/x': the TPU workers mount gs:// buckets"):
        tpu.with_data_path(j, "s3://b/x")
    with pytest.raises(LaunchError, match="train.run_dir='gs://b/shards/run' is under gs://b/shards, which danlu "
                                          "train reads through a read-only gcsfuse mount"):
        tpu.with_data_path(j, "gs://b/shards/", "gs://b/shards/run")
    # More buckets: the `mounts` launch key and --mount; an `env:` entry overrides $DANLU_MOUNTS.
    launch = tmp_path / "l.yaml"
    launch.write_text(f"name: n\nconfig: {TPU_DIR / '125m-v5e-16.yaml'}\naccelerator_type: v5litepod-16\n"
                      f"mounts: [gs://c/eval]\n")
    more = tpu.with_data_path(tpu.load_job(str(launch), {"mounts": ["gs://b/shards/"]}), "gs://b/shards")
    assert more.mounts == ("gs://c/eval", "gs://b/shards/", "gs://b/shards") and tpu.buckets(more) == ["b", "c"]
    assert tpu.mounts_env(more) == "gs://b/shards=/tmp/danlu-gcs/b/shards,gs://c/eval=/tmp/danlu-gcs/c/eval"
    script = tpu.gcsfuse_script(more)
    assert script.count("gcsfuse -o ro") == 2 and " b /tmp/danlu-gcs/b; }" in script and " c /tmp/danlu-gcs/c; }" in script
    assert tpu.train_env(job(env={"DANLU_MOUNTS": "gs://x=/y"}, mounts=("gs://b/s",))) == {"DANLU_MOUNTS": "gs://x=/y"}
    with pytest.raises(LaunchError, match="mounts: 's3://b' is not a gs://BUCKET"):
        job(mounts=("s3://b",))
    with pytest.raises(LaunchError, match="separators of \\$DANLU_MOUNTS"):
        job(mounts=("gs://b/date=1",))


FAKES = {
    # sudo: records its arguments; `tee F` keeps what it would write; `apt-get install` installs gcsfuse.
    "sudo": """#!/bin/bash
echo "sudo $*" >> "$LOG"
if [ "$1" = tee ]; then cat > "$LOG.$(basename "$2")"; fi
if [ "$1" = apt-get ] && [[ " $* " == *" install "* ]]; then cp "$FAKES/gcsfuse.later" "$FAKES/gcsfuse"; fi
""",
    "curl": "#!/bin/bash\necho \"curl $*\" >> \"$LOG\"; echo KEY\n",
    "lsb_release": "#!/bin/bash\necho jammy\n",
    "mountpoint": "#!/bin/bash\ntest -e \"$2/.mounted\"\n",
    # gcsfuse (installed by the fake apt-get): records its arguments, "mounts" by marking the directory;
    # bucket `bad` fails.
    "gcsfuse.later": "#!/bin/bash\necho \"gcsfuse $*\" >> \"$LOG\"\n"
                     "for d; do :; done; [ \"${@: -2:1}\" = bad ] && exit 1; touch \"$d/.mounted\"\n",
}


def test_gcsfuse_script_installs_and_mounts_once(tmp_path, monkeypatch):
    """setup's remote command, run here by bash against stand-ins for sudo, curl, lsb_release,
    mountpoint and gcsfuse: a worker without gcsfuse gets Google's apt repository and the package and
    mounts the bucket read-only; a second run (installed, mounted) runs nothing; a failing mount fails it."""
    import subprocess

    fakes = tmp_path / "bin"
    fakes.mkdir()
    for name, text in FAKES.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    monkeypatch.setattr(tpu, "MOUNT_ROOT", str(tmp_path / "gcs"))
    log = tmp_path / "log"
    env = {"PATH": f"{fakes}:/usr/bin:/bin", "LOG": str(log), "FAKES": str(fakes), "HOME": str(tmp_path)}
    script = tpu.gcsfuse_script(job(mounts=("gs://my-lm-bucket/shards",)))

    assert subprocess.run(["bash", "-c", script], env=env).returncode == 0
    mount = tmp_path / "gcs" / "my-lm-bucket"
    lines = log.read_text().splitlines()
    # `curl KEY | sudo tee FILE`: the two ends of a pipeline run at once and log in either order
    assert sorted(lines[1:3]) == ["curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg",
                                  "sudo tee /usr/share/keyrings/cloud.google.asc"]
    assert lines[:1] + lines[3:] == [
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
        "sudo apt-get -o DPkg::Lock::Timeout=600 update -qq",
        "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse",
        "gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 --stat-cache-max-size-mb=-1 "
        f"--type-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 my-lm-bucket {mount}"]
    assert Path(f"{log}.gcsfuse.list").read_text() == (
        "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-jammy main\n")
    assert Path(f"{log}.cloud.google.asc").read_text() == "KEY\n"

    log.unlink()
    assert subprocess.run(["bash", "-c", script], env=env).returncode == 0
    assert not log.exists()  # gcsfuse there, bucket mounted: nothing to do

    bad = tpu.gcsfuse_script(job(mounts=("gs://bad/shards",)))
    assert subprocess.run(["bash", "-c", bad], env=env).returncode == 1  # gcloud ssh fails, setup stops


# ---------------------------------------------------------------------------------------------
# The commands of docs/tpu.md, dry-run, against golden command lines

DOCS = ROOT / "docs" / "tpu.md"
WHERE = "--project=my-lm-project --zone=us-west4-a"
SSH = f"gcloud compute tpus tpu-vm ssh danlu-125m-v5e-16 {WHERE} --worker=all --command="
GCSFUSE = (
    'command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list '
    '>/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee '
    '/usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && '
    'sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; } && mkdir -p /tmp/danlu-gcs/my-lm-bucket && '
    '{ mountpoint -q /tmp/danlu-gcs/my-lm-bucket || gcsfuse -o ro --implicit-dirs --metadata-cache-ttl-secs=-1 '
    '--stat-cache-max-size-mb=-1 --type-cache-max-size-mb=-1 --kernel-list-cache-ttl-secs=-1 my-lm-bucket '
    '/tmp/danlu-gcs/my-lm-bucket; }')
LOG_TO = 'gs://my-lm-bucket/logs/danlu-125m-v5e-16/"$(hostname).log"'
TRAIN = (
    "mkdir -p danlu-job; rm -f danlu-job/exit_code; printf '%s' CONFIG > danlu-job/config.yaml; nohup bash -c "
    "'env PYTHONUNBUFFERED=1 DANLU_MOUNTS=gs://my-lm-bucket/shards=/tmp/danlu-gcs/my-lm-bucket/shards "
    "python3 -m danlu.cli train danlu-job/config.yaml > danlu-job/train.log 2>&1 & pid=$!; "
    "echo $pid > danlu-job/train.pid; (while sleep 60; do gcloud storage cp -q danlu-job/train.log "
    f"{LOG_TO} >/dev/null 2>&1; done) & sync=$!; wait $pid; rc=$?; kill $sync; gcloud storage cp -q "
    f"danlu-job/train.log {LOG_TO}; echo $rc > danlu-job/exit_code' > /dev/null 2>&1 < /dev/null &")


def golden(action: str) -> list[str]:
    """What `danlu launch tpu ACTION $L --dry-run` of docs/tpu.md prints, each argv joined by spaces
    (so the remote scripts read as written); CONFIG stands for the resolved training config."""
    create = [f"gcloud compute tpus queued-resources create danlu-125m-v5e-16 {WHERE} "
              "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --node-id=danlu-125m-v5e-16 --spot"]
    status = [f"gcloud compute tpus queued-resources describe danlu-125m-v5e-16 {WHERE} --format=value(state.state)"]
    setup = [f"{sys.executable} -m pip wheel --no-deps --wheel-dir dist {ROOT}",
             f"gcloud compute tpus tpu-vm scp dist/{tpu.wheel_name()} danlu-125m-v5e-16: {WHERE} --worker=all",
             f"{SSH}python3 -m pip install --upgrade './{tpu.wheel_name()}[tpu]'",
             f"{SSH}{GCSFUSE}"]
    run = [f"{SSH}{TRAIN}"]
    running = [f"gcloud compute tpus tpu-vm ssh danlu-125m-v5e-16 {WHERE} --worker=0 --command=test -f "
               "danlu-job/train.pid && kill -0 $(cat danlu-job/train.pid) 2>/dev/null && echo running || true"]
    return {"create": create, "status": status, "setup": setup, "run": run, "up": create + setup + run,
            "logs": [f"gcloud compute tpus tpu-vm ssh danlu-125m-v5e-16 {WHERE} --worker=0 "
                     "--command=tail -n 100 danlu-job/train.log"],
            "watch": status + running + setup + run,
            "stop": [f"{SSH}test -f danlu-job/train.pid && kill -TERM $(cat danlu-job/train.pid) || true"],
            "delete": [f"gcloud compute tpus queued-resources delete danlu-125m-v5e-16 {WHERE} --force --quiet"]}[action]


def docs_commands(prefix: str) -> list[list[str]]:
    """The command lines of docs/tpu.md's ```bash blocks that start with ``prefix``, as argv: the
    shell variables the blocks assign expanded (unquoted, so split into words, as bash does),
    comments dropped, backslash-continued lines joined."""
    values, out = {}, []
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if m := re.fullmatch(r"([A-Za-z_]\w*)=(.*)", line.strip()):
                values[m.group(1)] = shlex.split(m.group(2))[0]
            elif line.startswith(prefix + " "):
                out.append(shlex.split(re.sub(r"\$(\w+)", lambda v: values[v.group(1)], line), comments=True))
    return out


def dry_run_lines(argv: list[str], capsys) -> list[str]:
    """`argv` (a `danlu ...` command line) run with --dry-run; its printed commands, each argv joined by
    spaces, the resolved config (checked to be one line of JSON) replaced by CONFIG."""
    from danlu.cli import main

    rc = main([*argv[1:], *([] if "--dry-run" in argv else ["--dry-run"])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = []
    for line in out.strip().splitlines():
        joined = " ".join(shlex.split(line))
        for config in re.findall(r"printf '%s' ('[^']*') > danlu-job/config.yaml", joined):
            json.loads(shlex.split(config)[0])
            joined = joined.replace(config, "CONFIG")
        lines.append(joined)
    return lines


def test_docs_tpu_commands_dry_run_golden(fake_gcloud, capsys):
    """Every `danlu launch tpu` line of docs/tpu.md, as written there (`$L`: the launch config and the
    bucket), prints exactly the golden gcloud commands: setup installs gcsfuse and mounts the data
    bucket, run gives danlu train $DANLU_MOUNTS; the project comes from `gcloud config` (step 1)."""
    set_rules, calls = fake_gcloud
    set_rules([{"match": "get-value project", "answers": [{"stdout": "my-lm-project\n"}]}])
    commands = docs_commands("danlu launch tpu")
    assert [argv[3] for argv in commands] == ["create", "create", "status", "setup", "run", "up", "logs", "watch",
                                             "stop", "delete"]
    for argv in commands:
        assert dry_run_lines(argv, capsys) == golden(argv[3]), shlex.join(argv)
    assert [c for c in calls() if "get-value" not in " ".join(c)] == []  # nothing ran

    # The config that run writes: the doc's bucket, the launcher's overrides.
    from danlu.cli import build_parser

    args = build_parser().parse_args(commands[4][1:])
    j, text = top.prepare(tpu.resolve_location(tpu.load_job(args.launch, {k: getattr(args, k) for k in tpu._FLAG_KEYS})))
    cfg = json.loads(text)
    assert cfg["data"]["path"] == "gs://my-lm-bucket/shards" and cfg["train"]["run_dir"] == "gs://my-lm-bucket/runs/125m"
    assert cfg["distributed"]["auto"] is True and tpu.mounts_env(j) == "gs://my-lm-bucket/shards=/tmp/danlu-gcs/my-lm-bucket/shards"


def test_docs_xpk_command_dry_run_golden(fake_gcloud, capsys):
    set_rules, _ = fake_gcloud
    set_rules([{"match": "get-value project", "answers": [{"stdout": "my-lm-project\n"}]}])
    (argv,) = docs_commands("danlu launch xpk")
    assert dry_run_lines(argv, capsys) == [
        "xpk workload create --cluster=my-cluster --workload=danlu-7b-v6e --tpu-type=v6e-256 --num-slices=2 "
        "--docker-image=us-docker.pkg.dev/my-lm-project/danlu/danlu:latest --project=my-lm-project --zone=us-east5-b "
        "--max-restarts=3 --command=mkdir -p danlu-job; printf '%s' CONFIG > danlu-job/config.yaml; "
        "env DANLU_MOUNTS=gs://BUCKET/shards=/tmp/danlu-gcs/BUCKET/shards python3 -m danlu.cli train danlu-job/config.yaml"]


# ---------------------------------------------------------------------------------------------
# xpk and Dataflow


def test_xpk_golden(capsys):
    from danlu.cli import main

    rc = main(["launch", "xpk", "--launch", str(TPU_DIR / "launch-7b-2xv6e-256.yaml"), "--project", "p",
               "--cluster", "c1", "--docker-image", "us-docker.pkg.dev/p/danlu/danlu:1", "--storage", "danlu-data",
               "--dry-run"])
    assert rc == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    argv = shlex.split(line)
    assert argv[:-1] == ["xpk", "workload", "create", "--cluster=c1", "--workload=danlu-7b-v6e", "--tpu-type=v6e-256",
                         "--num-slices=2", "--docker-image=us-docker.pkg.dev/p/danlu/danlu:1", "--project=p",
                         "--zone=us-east5-b", "--max-restarts=3", "--storage=danlu-data"]
    script = argv[-1].removeprefix("--command=")
    assert script.endswith("; env DANLU_MOUNTS=gs://BUCKET/shards=/tmp/danlu-gcs/BUCKET/shards "
                           "python3 -m danlu.cli train danlu-job/config.yaml")
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
    assert sum("gcsfuse -o ro" in c for c in joined) == 1  # the data bucket, mounted with the install
    runs = [c for c in joined if "danlu.cli train" in c]
    assert len(runs) == 2
    for name, d_model, cmd in zip(only, (448, 704), runs):
        assert f'"run_dir": "gs://b/sweep/{name}"' in cmd and f'"d_model": {d_model},' in cmd
        assert '"auto": true' in cmd and "gs://b/shards" in cmd  # the launcher's and the launch config's overrides
        assert "DANLU_MOUNTS=gs://b/shards=/tmp/danlu-gcs/b/shards" in cmd
    assert run_sweep_on_tpu(sweep, j, Runner(out=open(os.devnull, "w")), only=only, log=lambda _: None) == []
    assert len(calls()) == len(joined)  # nothing left to run: no gcloud call at all

    with pytest.raises(LaunchError, match="demo_data builds token shards on this machine"):
        run_sweep_on_tpu(load_sweep(ROOT / "configs/scaling/cpu_demo.yaml"), j, Runner(dry_run=True))
    with pytest.raises(LaunchError, match="needs a gs:// run_dir"):
        run_sweep_on_tpu(sweep, job(run_dir="/tmp/x"), Runner(dry_run=True))
