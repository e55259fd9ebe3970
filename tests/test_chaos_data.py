"""Killed data jobs rerun to the same bytes: `danlu clean` SIGKILLed once a shard is committed and
another has written parts but is not, `danlu tokenize` SIGKILLed while encoding; the rerun of the
same command matches an uninterrupted run byte for byte. (bench/chaos_data.py kills them at random
moments, many times.)"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SHARDS = 16
WORDS = ("data model token shard layer batch step loss corpus python module clean kill rerun byte "
         "reference marker worker process group commit rename directory output input report").split()


def write_corpus(d: Path) -> list[str]:
    """SHARDS JSONL files of seeded random text (~1 MB): e-mail addresses for the pii step, a
    line that is not JSON for errors.jsonl."""
    rng = random.Random(0)
    d.mkdir()
    paths = []
    for i in range(SHARDS):
        lines = []
        for k in range(40):
            text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
                             + (f" mail user{k}@example.com" if k % 7 == 0 else "") for _ in range(20))
            lines.append(json.dumps({"id": f"doc-{i}-{k}", "text": text + "\n"}))
        if i == 3:
            lines.append('{"id": "broken", "text": ')
        paths.append(d / f"part-{i:02d}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    return [str(p) for p in paths]


def output_bytes(root: Path) -> dict[str, bytes]:
    """Every output file's bytes by relative path; `.state/` (resume bookkeeping) and report.md
    (report.json rendered, with wall times) left out, report.json without its `run` key."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith(".state/") or rel == "report.md":
            continue
        data = p.read_bytes()
        if rel == "report.json":
            report = json.loads(data)
            report.pop("run")
            data = json.dumps(report, sort_keys=True).encode()
        files[rel] = data
    return files


def assert_same_outputs(rerun: Path, ref: Path):
    a, b = output_bytes(rerun), output_bytes(ref)
    assert sorted(a) == sorted(b), f"only in the rerun: {sorted(set(a) - set(b))}; missing: {sorted(set(b) - set(a))}"
    differ = [rel for rel in a if a[rel] != b[rel]]
    assert not differ, f"files that differ from the uninterrupted run: {differ}"


def start(cmd):
    # A session of its own: the kill takes the spawned pool workers with the parent.
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def run_ok(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def kill_when(proc, ready, timeout_s=120.0):
    """Polls `ready()` every 2 ms and SIGKILLs the process group as soon as it holds; fails if the
    job ended first."""
    deadline = time.time() + timeout_s
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"the job ended by itself (exit {rc}) before the kill: {proc.stderr.read()[-2000:]}"


def test_clean_killed_mid_shard_reruns_to_same_bytes(tmp_path):
    inputs = write_corpus(tmp_path / "in")

    def cmd(out):
        # No dedup stages: they would drop the duplicated documents of a part that a rerun appended
        # to, and hide the fault; the map phase's own bytes are compared.
        return [sys.executable, "-m", "danlu.cli", "clean", str(ROOT / "configs/data/demo.yaml"),
                "output.docs_per_shard=10", "stages=[]", "--input", *inputs, "--output", str(out),
                "--workers", "2", "--no-progress"]

    run_ok(cmd(tmp_path / "ref"))
    out = tmp_path / "killed"

    def committed():
        return {int(p.name[6:11]) for p in (out / ".state").glob("shard-*.json")}

    def half_done():
        """Shards not committed that have written a part already (under whatever name)."""
        written = set()
        for p in (out / "documents").glob("*part-*"):
            try:
                if p.stat().st_size > 0:
                    written.add(int(p.name.split("part-")[1][:5]))
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return written - committed()

    # Killed once a shard is committed and another has closed some parts but is not committed:
    # the rerun must resume and redo that shard without keeping any of those parts.
    proc = start(cmd(out))
    kill_when(proc, lambda: committed() and half_done())
    left = half_done()
    assert not (out / "report.json").exists()
    assert left and 1 <= len(committed()) < SHARDS, f"{sorted(committed())} committed, {sorted(left)} half done"

    run_ok(cmd(out))
    resumed = json.loads((out / "report.json").read_text())["run"]["shards_resumed"]
    assert 1 <= resumed <= SHARDS - len(left)
    ref = output_bytes(tmp_path / "ref")
    assert len([f for f in ref if f.startswith("documents/")]) > SHARDS  # several parts per shard
    assert (tmp_path / "ref" / "errors.jsonl").read_text().count("\n") == 1
    assert_same_outputs(out, tmp_path / "ref")

    # The comparison catches a half-written part (what a rerun that trusted one would keep).
    part = sorted((out / "documents").iterdir())[-1]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    try:
        assert_same_outputs(out, tmp_path / "ref")
    except AssertionError as e:
        assert part.name in str(e)
    else:
        raise AssertionError("a truncated part went unnoticed")


def test_tokenize_killed_while_encoding_reruns_to_same_bytes(tmp_path):
    from data_pipeline.tokenize import train_tokenizer

    inputs = write_corpus(tmp_path / "in")
    model = train_tokenizer(inputs, str(tmp_path / "tok"), vocab_size=512, num_threads=1)

    def cmd(out):
        return [sys.executable, "-m", "danlu.cli", "tokenize", "--input", *inputs, "--output", str(out),
                "--model", model, "--num-shards", "4", "--eval-fraction", "0.05", "--workers", "2"]

    # The uninterrupted run, timing its encoding: from the shard files' creation to the exit.
    ref = tmp_path / "ref"
    proc = start(cmd(ref))
    while not list(ref.glob("*.array_record")) and proc.poll() is None:
        time.sleep(0.002)
    t_files = time.perf_counter()
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    encoding_s = time.perf_counter() - t_files

    out = tmp_path / "killed"
    proc = start(cmd(out))
    t_kill = []

    def halfway():
        if not t_kill and list(out.glob("*.array_record")):
            t_kill.append(time.perf_counter() + encoding_s / 2)
        return bool(t_kill) and time.perf_counter() >= t_kill[0]

    kill_when(proc, halfway)
    assert list(out.glob("*.array_record")) and not (out / "manifest.json").exists()  # mid-encoding

    run_ok(cmd(out))
    assert json.loads((ref / "manifest.json").read_text())["errors"]["count"] == 1
    assert_same_outputs(out, ref)
