"""Killed data jobs: SIGKILL `danlu clean` and `danlu tokenize` at random moments, rerun, compare bytes.

    .venv/bin/python bench/chaos_data.py              # 10 kill trials per command (~6 min on 2 cores)
    .venv/bin/python bench/chaos_data.py --quick      # a 2 MB corpus, 2 trials per command
    .venv/bin/python bench/chaos_data.py --kills 30 --seed 3 --workdir /tmp/chaos-data

1. Builds the demo corpus in a work directory (data_pipeline/demo_corpus.py: the standard
   library's source and rendered docs, 8 MB; 2 MB with --quick) and deals its lines round robin
   into 16 JSONL files (16 shards for `danlu clean`), with a line that is not JSON in every fourth
   file, so errors.jsonl is not empty. Tokenize reads the cleaned documents plus `extra.jsonl`
   (two documents, a line that is not JSON, a document with empty text).
2. The references: one uninterrupted run of each command below, into `ref/<command>/out`, timed.
   Then per command a control, one more uninterrupted run compared like the trials: it tells a
   kill's damage from a command that is not deterministic.
3. For each command, `--kills` trials, each in a fresh `<command>/trial_<j>/out`: start the
   command, SIGKILL its whole process group (the spawned pool workers with it) after a delay,
   then rerun the same command until an attempt exits 0. The window is the wall time of the
   fastest uninterrupted run so far (reference, control, or a trial's first attempt that finished
   before its kill: that trial is then run again, at most twice, so load that comes and goes
   cannot leave trials without a kill). The first kills of the K trials are spread over it: trial
   j's delay is uniform in the j-th of K equal slices (seeded, trials in shuffled order), so kills
   land in start-up, the map phase or encoding, and finalisation alike. Each rerun is killed too
   with probability 1/2 (at most 3 kills a trial), after a delay uniform over the window: a rerun
   that finishes first is not killed (clean's reruns skip committed shards).
4. Compares every output file of a trial with the reference's, byte for byte: the documents and
   rejected parts, errors.jsonl, removals.png and report.json (without its `run` key: wall times
   and resumed shards) for clean; every shard and lengths file, manifest.json, tokenizer.model
   (and .vocab), errors.jsonl for tokenize. Not compared: `.state/` (clean's resume bookkeeping)
   and report.md (report.json rendered, with the `run` line). A file missing from one side is a
   difference too, so a temporary file a kill left behind is one.

The commands (clean resumes: committed shards are skipped; tokenize starts over):

    clean           python -m danlu.cli clean configs/data/demo.yaml output.docs_per_shard=10
                        --input CORPUS/part-*.jsonl --output OUT --workers 2 --no-progress
    tokenize_train  python -m danlu.cli tokenize --input CLEAN/documents EXTRA --output OUT
                        --train-model --vocab-size 4096 --num-shards 4 --eval-fraction 0.02 --workers 2
    tokenize_model  the same with --model REF/tokenize_train/out/tokenizer.model instead of --train-model

Where each kill landed is read off the output directory right after it (clean: shards committed
of 16, stages; tokenize: training, encoding, manifest written). The last line printed is one JSON
object with every figure and the machine; the exit status is 0 iff every trial was identical.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The CPU accounting of the training chaos benchmark beside this file (bench/ is on sys.path when run).
from chaos_train import _cpu_marks, busy_cores_elsewhere, machine as chaos_machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
INPUT_FILES = 16
COMMANDS = ("clean", "tokenize_train", "tokenize_model")
MAX_KILLS_PER_TRIAL = 3
RERUN_KILL_PROBABILITY = 0.5


# --------------------------------------------------------------------------- the machine

def machine() -> dict:
    return chaos_machine(("sentencepiece", "array-record", "numpy", "matplotlib"))


# --------------------------------------------------------------------------- inputs and commands

def build_inputs(work: Path, max_bytes: int) -> bool:
    """The demo corpus dealt into INPUT_FILES files under `work/corpus/`, and `work/extra.jsonl`;
    False when the corpus was there already."""
    from data_pipeline.demo_corpus import build_demo_corpus

    corpus = work / "corpus"
    size = corpus / ".max_bytes"  # a work directory is reused: rebuilt only for another size
    built = not (size.exists() and size.read_text() == str(max_bytes))
    if built:
        shutil.rmtree(corpus, ignore_errors=True)
        whole = work / "corpus.jsonl"
        build_demo_corpus(str(whole), max_bytes=max_bytes)
        lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
        corpus.mkdir(exist_ok=True)
        for i in range(INPUT_FILES):
            with open(corpus / f"part-{i:02d}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(lines[i::INPUT_FILES])
                if i % 4 == 3:  # unreadable records go to errors.jsonl, which is compared too
                    f.write('{"id": "broken-%d", "text": "no closing brace"\n' % i)
        whole.unlink()
        size.write_text(str(max_bytes))
    extra = work / "extra.jsonl"
    extra.write_text("\n".join([
        json.dumps({"id": "extra-1", "text": "A short document outside the demo corpus.\n", "source": "extra"}),
        "this line is not JSON",
        json.dumps({"id": "extra-2", "text": "", "source": "extra"}),
        json.dumps({"id": "extra-3", "text": "def f(x):\n    return x + 1\n", "source": "extra"}),
    ]) + "\n", encoding="utf-8")
    return built


def command(name: str, out: Path, work: Path, shown: bool = False) -> list[str]:
    """The command line of `name` writing to `out`; `shown`: with placeholders, for the report."""
    py = [sys.executable, "-m", "danlu.cli"]
    corpus = (["CORPUS/part-*.jsonl"] if shown
              else sorted(str(p) for p in (work / "corpus").glob("part-*.jsonl")))
    if name == "clean":
        return [*py, "clean", "configs/data/demo.yaml" if shown else str(REPO / "configs/data/demo.yaml"),
                "output.docs_per_shard=10", "--input", *corpus, "--output", str(out), "--workers", "2",
                "--no-progress"]
    clean_docs = "CLEAN/documents" if shown else str(work / "ref/clean/out/documents")
    tok = [*py, "tokenize", "--input", clean_docs, "EXTRA" if shown else str(work / "extra.jsonl"),
           "--output", str(out), "--vocab-size", "4096", "--num-shards", "4", "--eval-fraction", "0.02",
           "--workers", "2"]
    if name == "tokenize_train":
        return [*tok, "--train-model"]
    model = "REF_TOKENIZER" if shown else str(work / "ref/tokenize_train/out/tokenizer.model")
    return [*tok, "--model", model]


def child_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


# --------------------------------------------------------------------------- one attempt

def group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc; [] off Linux."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            alive.append(int(stat.parent.name))
    return alive


def where_killed(name: str, out: Path, since: float) -> str:
    """How far a killed attempt that started at time `since` (time.time()) had got, read off the
    output directory: only what it wrote counts, not what an earlier attempt left."""
    def new(paths) -> list[Path]:
        found = []
        for p in paths:
            try:
                if p.stat().st_mtime >= since:
                    found.append(p)
            except FileNotFoundError:
                pass
        return found

    if name == "clean":
        if not new(out.rglob("*")):
            return "start-up (nothing written yet)"
        state = out / ".state"
        shards = list(state.glob("shard-*.json"))
        if len(shards) < INPUT_FILES:
            mine = len(new(shards))
            return (f"map: {len(shards)}/{INPUT_FILES} shards committed"
                    + (f" ({mine} by this attempt)" if mine != len(shards) else ""))
        if (state / "stages.json").exists():
            return "after the stages' marker (committing, report)"
        return "after the map phase (finalisation, stages)"
    if new([out / "manifest.json"]):
        return "manifest written (exiting)"
    if new(out.glob("*.array_record")):
        return "encoding"
    if name == "tokenize_train" and new([out / "tokenizer.model"]):
        return "tokenizer trained, before encoding"
    return "start-up or training the tokenizer" if name == "tokenize_train" else "start-up"


def run_attempt(cmd: list[str], name: str, out: Path, log_path: Path, kill_after_s: float | None,
                timeout_s: float) -> dict:
    """Runs the command once; with `kill_after_s`, SIGKILLs its process group that long after the
    start unless it has exited. Returns what happened."""
    t0, since = time.perf_counter(), time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        killed_at, phase, stragglers, hung = None, None, 0, False
        deadline = t0 + (kill_after_s if kill_after_s is not None else timeout_s)
        while proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(min(0.005, max(0.0, deadline - time.perf_counter())))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = time.perf_counter() - t0
            hung = kill_after_s is None
        rc = proc.wait()
        if killed_at is not None:
            # Orphaned pool workers are killed with the group; wait until none is left, so no
            # process of this attempt writes while the next one runs.
            t1 = time.perf_counter()
            while (left := group_alive(proc.pid)) and time.perf_counter() - t1 < 10:
                time.sleep(0.01)
            stragglers = len(left)
            if left:
                os.killpg(proc.pid, signal.SIGKILL)
            phase = where_killed(name, out, since)
    # A kill sent as the job exited lands on nothing: it counts only if the exit status says so.
    killed = killed_at is not None and not hung and rc == -signal.SIGKILL
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "killed": killed,
            "kill_after_s": kill_after_s, "killed_after_s": killed_at, "where": phase,
            "stragglers": stragglers, "hung": hung, "log": str(log_path)}


# --------------------------------------------------------------------------- comparing outputs

NOT_COMPARED = ("report.md",)  # report.json rendered, with the run's wall time and resumed shards


def output_files(root: Path) -> dict[str, Path]:
    """Every file under an output directory, by relative path; `.state/` and NOT_COMPARED left out."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".state/") and rel not in NOT_COMPARED:
            files[rel] = p
    return files


def comparable_bytes(rel: str, path: Path) -> bytes:
    data = path.read_bytes()
    if rel == "report.json":  # everything but `run` (wall times, shards resumed)
        report = json.loads(data)
        report.pop("run", None)
        return json.dumps(report, sort_keys=True, ensure_ascii=False).encode()
    return data


def compare_outputs(rerun: Path, ref: Path) -> dict:
    """Byte-for-byte comparison of two output directories (see `output_files`)."""
    a, b = output_files(rerun), output_files(ref)
    differing = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            differing.append({"file": rel, "what": "only in the rerun", "bytes": a[rel].stat().st_size})
        elif rel not in a:
            differing.append({"file": rel, "what": "missing in the rerun", "bytes": b[rel].stat().st_size})
        else:
            x, y = comparable_bytes(rel, a[rel]), comparable_bytes(rel, b[rel])
            if x != y:
                first = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
                differing.append({"file": rel, "what": "bytes differ", "bytes": [len(x), len(y)],
                                  "first_difference_at": first})
    return {"files": len(set(a) | set(b)), "identical": not differing, "differing": differing}


# --------------------------------------------------------------------------- trials

def run_trial(name: str, cmd_for, trial_dir: Path, kill_delays: list[float], timeout_s: float) -> dict:
    """Attempts until one exits 0; attempt i is killed after kill_delays[i] seconds (if any)."""
    if trial_dir.exists():
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True)
    out = trial_dir / "out"
    cmd = cmd_for(out)
    attempts, crashes = [], 0
    while True:
        i = len(attempts)
        delay = kill_delays[i] if i < len(kill_delays) else None
        a = run_attempt(cmd, name, out, trial_dir / f"attempt_{i}.log", delay, timeout_s)
        attempts.append(a)
        if a["rc"] == 0 or a["hung"]:
            break
        if not a["killed"]:  # died on its own: a finding; retry a few times, then give up
            crashes += 1
            print(Path(a["log"]).read_text(errors="replace")[-2000:], file=sys.stderr)
            if crashes >= 3:
                break
    finished = attempts[-1]["rc"] == 0
    return {"first_killed": attempts[0]["killed"], "first_wall_s": attempts[0]["wall_s"],
            "attempts": len(attempts), "kills": sum(a["killed"] for a in attempts),
            "kills_drawn": len(kill_delays), "crashes": crashes, "finished": finished,
            "wall_s": sum(a["wall_s"] for a in attempts),
            "killed": [{"after_s": round(a["killed_after_s"], 3), "where": a["where"],
                        "stragglers": a["stragglers"]} for a in attempts if a["killed"]],
            "hung": any(a["hung"] for a in attempts), "out": str(out)}


def kill_plans(rng, trials: int) -> list[list[float]]:
    """Per trial, its kill moments as fractions of the window: the first spread over [0, 1) (one
    per slice of it, shuffled), then one more per rerun with probability RERUN_KILL_PROBABILITY."""
    firsts = [(j + rng.uniform()) / trials for j in range(trials)]
    rng.shuffle(firsts)
    plans = []
    for first in firsts:
        fractions = [float(first)]
        while len(fractions) < MAX_KILLS_PER_TRIAL and rng.uniform() < RERUN_KILL_PROBABILITY:
            fractions.append(float(rng.uniform()))
        plans.append(fractions)
    return plans


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill trials per command (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--quick", action="store_true", help="a 2 MB corpus, 2 trials per command")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, deleted)")
    p.add_argument("--corpus-bytes", type=int, default=8_000_000, help=argparse.SUPPRESS)
    p.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.corpus_bytes = 2, 2_000_000
    if args.kills < 1:
        p.error(f"--kills must be >= 1, got {args.kills}")
    sys.path.insert(0, str(REPO))

    import numpy as np

    info = machine()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="danlu-chaos-data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {info['cpu_model']}, {info['cores']} cores; work directory {work}", flush=True)
    t0 = time.perf_counter()
    built = build_inputs(work, args.corpus_bytes)
    print(f"inputs: {INPUT_FILES} files of the demo corpus ({args.corpus_bytes / 1e6:g} MB), "
          + (f"built in {time.perf_counter() - t0:.1f} s" if built else "reused"), flush=True)

    # --- the references: one uninterrupted run of each command, in order (each reads the last's) --
    refs: dict[str, dict] = {}
    for name in COMMANDS:
        marks0 = _cpu_marks()
        ref = run_trial(name, lambda out, name=name: command(name, out, work), work / "ref" / name, [],
                        timeout_s=1800)
        if not ref["finished"]:
            print(Path(work / "ref" / name / "attempt_0.log").read_text(errors="replace")[-3000:], file=sys.stderr)
            raise SystemExit(f"the uninterrupted {name} run failed")
        ref["other_cpu_cores"] = busy_cores_elsewhere(marks0, _cpu_marks())
        refs[name] = ref
        print(f"{name}: uninterrupted {ref['wall_s']:.1f} s, "
              f"{len(output_files(Path(ref['out'])))} output files", flush=True)

    results: dict[str, dict] = {}
    for name in args.commands:
        def cmd_for(out: Path, name=name) -> list[str]:
            return command(name, out, work)

        ref_wall, ref_out = refs[name]["wall_s"], Path(refs[name]["out"])
        timeout_s = max(120.0, 20 * ref_wall)
        rng = np.random.default_rng([args.seed, COMMANDS.index(name)])  # the same draws whatever else runs
        marks0 = _cpu_marks()

        # --- control: a second uninterrupted run -------------------------------------------------------
        control = run_trial(name, cmd_for, work / name / "control", [], timeout_s)
        control["compare"] = compare_outputs(Path(control["out"]), ref_out)
        print(f"{name}, control (no kill): identical {control['compare']['identical']}", flush=True)
        for d in control["compare"]["differing"]:
            print("    differs:", json.dumps(d), flush=True)

        # --- kill trials ---------------------------------------------------------------------------
        # The window is the fastest uninterrupted run so far (the reference pays for cold caches;
        # on a shared machine the load comes and goes). A trial whose first attempt finished before
        # its kill shrinks it and is run again, so that each trial has its first kill.
        window = min(ref_wall, control["wall_s"])
        trials, redone = [], 0
        for j, fractions in enumerate(kill_plans(rng, args.kills)):
            for _ in range(3):
                t = run_trial(name, cmd_for, work / name / f"trial_{j}", [f * window for f in fractions],
                              timeout_s)
                if t["first_killed"] or not t["finished"]:
                    break
                print(f"  trial {j:2d}: finished in {t['first_wall_s']:.2f} s, before its kill at "
                      f"{fractions[0] * window:.2f} s; again, window {window:.2f} s -> "
                      f"{min(window, t['first_wall_s']):.2f} s", flush=True)
                window = min(window, t["first_wall_s"])
                redone += 1
            t["compare"] = compare_outputs(Path(t["out"]), ref_out) if t["finished"] else None
            t["identical"] = bool(t["compare"] and t["compare"]["identical"])
            trials.append(t)
            where = "; ".join(f"{k['after_s']:.2f} s, {k['where']}" for k in t["killed"])
            print(f"  trial {j:2d}: {t['kills']} kill(s) [{where}], {t['attempts']} attempts, "
                  f"identical {t['identical']}", flush=True)
            for d in (t["compare"] or {}).get("differing", []):
                print("    differs:", json.dumps(d), flush=True)
            if t["identical"] and not args.workdir:
                shutil.rmtree(work / name / f"trial_{j}", ignore_errors=True)
        others = busy_cores_elsewhere(marks0, _cpu_marks())
        differing = sorted({d["file"] for t in trials for d in (t["compare"] or {}).get("differing", [])})
        results[name] = {
            "command": " ".join(["python", *command(name, Path("OUT"), work, shown=True)[1:]]),
            "reference_wall_s": ref_wall, "reference_files": len(output_files(ref_out)),
            "reference_other_cpu_cores": refs[name]["other_cpu_cores"],
            "control_identical": control["compare"]["identical"], "control_wall_s": control["wall_s"],
            "kill_window_s": window, "trials": len(trials), "trials_redone": redone,
            "kills": sum(t["kills"] for t in trials), "kills_drawn": sum(t["kills_drawn"] for t in trials),
            "attempts": sum(t["attempts"] for t in trials), "crashes": sum(t["crashes"] for t in trials),
            "hung": sum(t["hung"] for t in trials), "stragglers": sum(k["stragglers"] for t in trials
                                                                     for k in t["killed"]),
            "trials_identical": sum(t["identical"] for t in trials),
            "identical": all(t["identical"] for t in trials), "differing_files": differing,
            "chaos_wall_s": sum(t["wall_s"] for t in trials), "other_cpu_cores": others,
            "per_trial": [{k: t[k] for k in ("kills", "attempts", "crashes", "finished", "identical", "killed",
                                             "wall_s")} | {"differing": (t["compare"] or {}).get("differing")}
                          for t in trials]}

    argv_shown = argv if argv is not None else sys.argv[1:]
    result = {"bench": "chaos_data", "command": " ".join(["chaos_data.py", *argv_shown]),
              "machine": info, "seed": args.seed, "kills_planned": args.kills, "corpus_bytes": args.corpus_bytes,
              "input_files": INPUT_FILES, "commands": results,
              "identical": all(r["identical"] and r["control_identical"] for r in results.values()),
              "total_wall_s": time.perf_counter() - t0}
    print_table(result)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["identical"] else 1


def print_table(r: dict) -> None:
    rows = []
    for name, c in r["commands"].items():
        rows.append((name, f"{c['kills']} kills ({c['kills_drawn']} drawn) in {c['trials']} trials "
                           f"({c['trials_redone']} redone, window {c['kill_window_s']:.1f} s), "
                           f"{c['attempts']} attempts, {c['crashes']} crashes; identical "
                           f"{c['trials_identical']}/{c['trials']} (control {c['control_identical']}); "
                           f"uninterrupted {c['reference_wall_s']:.1f} s, {c['reference_files']} files"))
        if c["differing_files"]:
            rows.append(("  differing files", ", ".join(c["differing_files"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
