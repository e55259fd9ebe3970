"""Chaos training on CPU: SIGKILL a `danlu train` at random moments, restart it, compare the end.

    .venv/bin/python bench/chaos_train.py              # 300 steps, 20 kills (~5 min on 2 cores)
    .venv/bin/python bench/chaos_train.py --quick      # 60 steps, 4 kills, 125m timing on fewer repeats
    .venv/bin/python bench/chaos_train.py --kills 50 --steps 600 --seed 3 --workdir /tmp/chaos

1. Builds token shards in a work directory (the stdlib demo corpus, a 512-piece tokenizer), as
   tests/test_e2e.py does.
2. The reference: one uninterrupted run of the command below, into `clean/`.
3. The chaos run, into `chaos/`: the same command, SIGKILLed (whole process group) `--kills`
   times and restarted each time until it exits 0. Kill k happens once the run has printed step
   s_k, after a further random fraction of a step: s_1 < ... < s_K are drawn (seeded) without
   replacement from 1..steps-1, so kills land all over the run, in and out of asynchronous
   checkpoint saves (every 10 steps). Each attempt's output goes to `chaos/attempt_<k>.log`.
4. Compares the final checkpoints of both runs array by array, bit for bit (every item of the
   checkpoint: the train state, and the JSON items), and the per-step losses of metrics.jsonl.
5. Times a checkpoint of the 125m preset's train state on CPU (`pretrain.train.build`, one train
   step at batch 1 x 128 tokens, then `pretrain.checkpoint.save`): how long the train loop is
   blocked (save() returning) against how long the save takes (wait_until_finished), a
   synchronous save, and a restore; in a child process, `--only-checkpoint-timing` alone.

The command (logging every step, so the step a kill interrupted is known to within one):

    python -m danlu.cli train configs/train/tiny.yaml data.path=SHARDS train.run_dir=RUN
        model.vocab_size=512 model.d_model=64 model.n_layers=2 data.seq_len=64
        train.global_batch_size=8 checkpoint.every=10 train.steps=STEPS
        optimizer.warmup_steps=min(60, STEPS/5) logging.log_every=1

Steps recomputed: for each kill, the last step the killed run printed (or wrote to metrics.jsonl)
minus the step the next run resumed from (`resumed from ... at step N`); a step that finished
but was not yet printed when the kill came is not counted (at most one per kill). The last line
printed is one JSON object with every figure and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^step\s+(\d+) loss")
RESUMED_LINE = re.compile(r"resumed from .* at step (\d+)")


# --------------------------------------------------------------------------- the machine

PACKAGES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "grain")


def machine(packages: tuple[str, ...] = PACKAGES) -> dict:
    """The CPU, memory, Python, the versions of `packages`, any accelerator and the git state."""
    from importlib.metadata import version

    sys.path.insert(0, str(REPO))
    from pretrain.flops import cpu_description

    def v(name):
        try:
            return version(name)
        except Exception:
            return None

    def git(*args):  # not stripped: a porcelain line starts with a space (" M path")
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {**cpu_description(), "python": platform.python_version(),
            **{name.replace("-", "_"): v(name) for name in packages},
            "platform": platform.platform(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                 * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "accelerator": accelerator(), "git_commit": (git("rev-parse", "--short", "HEAD") or "").strip() or None,
            "git_modified": [line[3:] for line in (dirty or "").splitlines()]}


def accelerator() -> str | None:
    """An accelerator's device node on this host, if any."""
    for pattern in ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*"):
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    return None


def busy_cores_elsewhere(t0: tuple, t1: tuple) -> float | None:
    """Cores other processes kept busy between two `_cpu_marks()` (ours and our children excluded)."""
    if t0[0] is None or t1[0] is None or t1[2] <= t0[2]:
        return None
    return max(0.0, ((t1[0] - t0[0]) - (t1[1] - t0[1])) / (t1[2] - t0[2]))


def _cpu_marks() -> tuple:
    from pretrain.flops import machine_busy_cpu_seconds

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # counted once the child has been waited for
    ours = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return machine_busy_cpu_seconds(), ours, time.perf_counter()


# --------------------------------------------------------------------------- data and command

def build_shards(work: Path) -> Path:
    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenize import encode_to_shards, train_tokenizer

    corpus = work / "corpus.jsonl"
    build_demo_corpus(str(corpus), max_bytes=400_000)
    model = train_tokenizer([str(corpus)], str(work / "tok"), vocab_size=512)
    encode_to_shards([str(corpus)], str(work / "shards"), model, num_shards=2, eval_fraction=0.05, workers=1)
    return work / "shards"


def train_command(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "danlu.cli", "train", str(REPO / "configs/train/tiny.yaml"),
            f"data.path={shards}", f"train.run_dir={run_dir}", "model.vocab_size=512", "model.d_model=64",
            "model.n_layers=2", "data.seq_len=64", "train.global_batch_size=8", "checkpoint.every=10",
            f"train.steps={steps}", f"optimizer.warmup_steps={min(60, steps // 5)}", "logging.log_every=1"]


def child_env() -> dict:
    # Unbuffered: every printed line is in the pipe before a SIGKILL can lose it.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- one attempt

def metrics_max_step(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass  # a row cut in half by the kill
    return max(steps, default=None)


def checkpoints_on_disk(run_dir: Path) -> tuple[list[int], list[str]]:
    """(committed steps, other entries: in-flight temporaries, set-aside damaged ones)."""
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return [], []
    names = sorted(p.name for p in d.iterdir())
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def run_attempt(cmd: list[str], run_dir: Path, log_path: Path, kill_at_step: int | None = None,
                jitter_s: float = 0.0, timeout_s: float = 900.0) -> dict:
    """Runs the command once; with ``kill_at_step``, SIGKILLs its process group ``jitter_s``
    seconds after it printed a step >= that one. Returns what happened."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen = {"resumed": None, "first_step": None, "last_step": None, "first_step_s": None, "damaged": 0}
    reached = threading.Event()

    def pump():
        with open(log_path, "wb") as log:
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                line = raw.decode("utf-8", errors="replace")
                if m := STEP_LINE.match(line):
                    step = int(m[1])
                    if seen["first_step"] is None:
                        seen["first_step"], seen["first_step_s"] = step, time.perf_counter() - t0
                    seen["last_step"] = step
                    if kill_at_step is not None and step >= kill_at_step:
                        reached.set()
                elif m := RESUMED_LINE.search(line):
                    seen["resumed"] = int(m[1])
                elif "damaged" in line:
                    seen["damaged"] += 1

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed_at = None
    if kill_at_step is not None:
        while not reached.wait(0.005):
            if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                break
        if reached.is_set():
            time.sleep(jitter_s)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.perf_counter() - t0
    try:
        rc = proc.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        seen["hung"] = True
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    committed, other = checkpoints_on_disk(run_dir)
    printed, logged = seen["last_step"], metrics_max_step(run_dir) if killed_at is not None else None
    return {"rc": rc, "wall_s": wall, "killed": killed_at is not None, "kill_at_step": kill_at_step,
            "jitter_s": jitter_s, "killed_after_s": killed_at, "resumed_from": seen["resumed"],
            "first_step": seen["first_step"], "first_step_s": seen["first_step_s"], "last_printed_step": printed,
            "reached_step": max([s for s in (printed, logged) if s is not None], default=None),
            "checkpoints_committed": committed, "checkpoints_other": other, "damaged_reports": seen["damaged"],
            "hung": seen.get("hung", False), "log": str(log_path)}


def start_step(a: dict) -> int | None:
    """The step an attempt started from: its resume step, 0 if it trained from scratch, None if
    it died before saying (it trained no step then)."""
    if a["resumed_from"] is not None:
        return a["resumed_from"]
    return 0 if a["first_step"] is not None else None


def recomputed_steps(attempts: list[dict], steps: int) -> list[dict]:
    """For each kill: steps reached before it, the step the next run resumed from, steps lost."""
    out = []
    for i, a in enumerate(attempts):
        if not a["killed"]:
            continue
        resumed = next((start_step(b) for b in attempts[i + 1:] if start_step(b) is not None), None)
        reached = a["reached_step"] if a["reached_step"] is not None else (start_step(a) or 0)
        lost = None if resumed is None else max(0, reached - resumed)
        out.append({"attempt": i, "reached": reached, "resumed_at": resumed, "lost": lost,
                    "last_committed_at_kill": max(a["checkpoints_committed"], default=None),
                    "in_flight_at_kill": [n for n in a["checkpoints_other"] if "tmp" in n]})
    return out


# --------------------------------------------------------------------------- comparing the runs

def read_checkpoint(step_dir: Path) -> dict:
    """Every item of one orbax checkpoint step: {item: {path: np.ndarray}} for array trees
    (restored as host arrays, no target needed), {item: object} for JSON items."""
    import logging

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA" in an item: expected
    items = {}
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        if (item / "_METADATA").exists():
            with ocp.StandardCheckpointer() as c:
                tree = c.metadata(item).item_metadata
                target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
                restored = c.restore(item, target)
            items[item.name] = {jax.tree_util.keystr(k): np.asarray(v)
                                for k, v in jax.tree_util.tree_leaves_with_path(restored)}
        elif (item / "metadata").exists():
            items[item.name] = json.loads((item / "metadata").read_text())
    return items


EXPECTED_TO_DIFFER = {"train.run_dir"}  # the two runs write to different directories


def _flatten(x, prefix: str = "") -> dict:
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: x}


def compare_checkpoints(a_dir: Path, b_dir: Path) -> dict:
    """Bitwise comparison of two checkpoint steps: shapes, dtypes and bytes of every array, and
    every key of the JSON items (except ``EXPECTED_TO_DIFFER``)."""
    import numpy as np

    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    report = {"items": sorted(set(a) | set(b)), "arrays": 0, "arrays_identical": 0, "differences": []}
    for item in report["items"]:
        if item not in a or item not in b:
            report["differences"].append({"item": item, "what": "missing in one run"})
            continue
        x, y = a[item], b[item]
        if not (isinstance(x, dict) and x and all(isinstance(v, np.ndarray) for v in x.values())):
            fx, fy = _flatten(x), _flatten(y)
            keys = [k for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k) and k not in EXPECTED_TO_DIFFER]
            if keys:
                report["differences"].append({"item": item, "what": "JSON differs",
                                              "keys": {k: [fx.get(k), fy.get(k)] for k in keys[:20]}})
            continue
        for key in sorted(set(x) | set(y)):
            report["arrays"] += 1
            if key not in x or key not in y:
                report["differences"].append({"item": item, "array": key, "what": "missing in one run"})
            elif x[key].shape != y[key].shape or x[key].dtype != y[key].dtype:
                report["differences"].append({"item": item, "array": key, "what": "shape/dtype",
                                              "chaos": f"{x[key].dtype}{x[key].shape}",
                                              "clean": f"{y[key].dtype}{y[key].shape}"})
            elif x[key].tobytes() == y[key].tobytes():  # bit for bit (NaN == NaN with the same bits)
                report["arrays_identical"] += 1
            else:
                diff = np.abs(x[key].astype(np.float64) - y[key].astype(np.float64))
                report["differences"].append({"item": item, "array": key, "what": "values",
                                              "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
                                              "elements_differing": int(np.sum(x[key] != y[key]))})
    report["bit_identical"] = not report["differences"]
    return report


def compare_metrics(chaos: Path, clean: Path) -> dict:
    def rows(p):
        return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines() if line.strip()]

    a, b = rows(chaos), rows(clean)
    steps_a = [r["step"] for r in a]
    by_step_a, by_step_b = {r["step"]: r for r in a}, {r["step"]: r for r in b}
    common = sorted(set(by_step_a) & set(by_step_b))
    differ = [s for s in common if by_step_a[s]["loss"] != by_step_b[s]["loss"]]
    return {"rows_chaos": len(a), "rows_clean": len(b), "duplicate_step_rows": len(steps_a) - len(set(steps_a)),
            "steps_in_order": steps_a == sorted(steps_a), "steps_missing": sorted(set(by_step_b) - set(by_step_a)),
            "losses_differing": len(differ), "first_differing_step": differ[0] if differ else None}


# --------------------------------------------------------------------------- 125m checkpoint timing

def checkpoint_timing(repeats: int) -> dict:
    """Save/restore of the 125m preset's train state on this CPU (one device)."""
    import dataclasses

    import jax
    import numpy as np

    from pretrain import checkpoint as ckpt_lib
    from pretrain.config import load_config
    from pretrain.train import BATCH_KEYS, build

    batch, seq = 1, 128
    cfg = load_config(REPO / "configs/train/125m.yaml",
                      [f"train.global_batch_size={batch}", f"data.seq_len={seq}", "mesh.fsdp=-1"])
    t0 = time.perf_counter()
    built = build(cfg)
    jax.block_until_ready(built.state)
    build_s = time.perf_counter() - t0
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(built.state))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))}
    device_batch = {k: jax.device_put(host[k], built.batch_sharding) for k in BATCH_KEYS}

    def step(state):
        state, metrics = built.train_step(state, device_batch)
        jax.block_until_ready(metrics)
        return state

    t0 = time.perf_counter()
    state = step(built.state)  # compile + one step: the moments are no longer zeros
    first_step_s = time.perf_counter() - t0
    step_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        state = step(state)
        step_s.append(time.perf_counter() - t0)

    data, config = {"iterator": {"step": 0}, "skip": []}, cfg.to_dict()
    out = {"state_bytes": state_bytes, "build_s": build_s, "first_step_s": first_step_s,
           "step_s": statistics.median(step_s)}
    with tempfile.TemporaryDirectory(prefix="danlu-ckpt-") as tmp:
        # async, idle: save() then wait; async, stepping: save(), one train step, then wait (as the
        # loop does); sync: save() returns when written.
        modes = (("async_idle", True, False), ("async_stepping", True, True), ("sync", False, False))
        for mode, async_save, stepping in modes:
            ccfg = dataclasses.replace(cfg.checkpoint, async_save=async_save, keep=repeats + 1)
            manager = ckpt_lib.make_manager(Path(tmp) / mode, ccfg)
            out[mode] = []
            for r in range(repeats):
                t0 = time.perf_counter()
                ckpt_lib.save(manager, r + 1, state, data, config, force=True)
                row = {"blocked_s": time.perf_counter() - t0}
                if stepping:
                    t1 = time.perf_counter()
                    state = step(state)
                    row["step_s"] = time.perf_counter() - t1
                manager.wait_until_finished()
                row["total_s"] = time.perf_counter() - t0
                out[mode].append(row)
            if mode == "sync":
                out["checkpoint_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / mode / str(repeats)).rglob("*")
                                              if f.is_file())
                t0 = time.perf_counter()
                jax.block_until_ready(ckpt_lib.restore(manager, repeats, state, built.state_sharding))
                out["restore_s"] = time.perf_counter() - t0
            manager.close()
            shutil.rmtree(Path(tmp) / mode)
    for mode, _, stepping in modes:
        for key in ("blocked_s", "total_s") + (("step_s",) if stepping else ()):
            out[f"{mode}_{key}"] = statistics.median(row[key] for row in out[mode])
    out.update({"preset": "configs/train/125m.yaml", "batch": batch, "seq_len": seq, "repeats": repeats,
                "devices": len(jax.devices())})
    return out


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs during the chaos run (default 20)")
    p.add_argument("--steps", type=int, default=300, help="train steps of each run (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--quick", action="store_true", help="60 steps, 4 kills, 1 checkpoint-timing repeat")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, deleted)")
    p.add_argument("--repeats", type=int, default=3, help="saves timed per mode for the 125m preset")
    p.add_argument("--skip-checkpoint-timing", action="store_true", help="no 125m save/restore timing")
    p.add_argument("--only-checkpoint-timing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.kills, args.repeats = 60, 4, 1
    sys.path.insert(0, str(REPO))

    if args.only_checkpoint_timing:  # the child of step 5
        print(json.dumps(checkpoint_timing(args.repeats)))
        return 0
    if not 0 <= args.kills < args.steps:
        p.error(f"--kills must be in 0..steps-1, got {args.kills} for {args.steps} steps")

    import numpy as np

    info = machine()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="danlu-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("clean", "chaos"):
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir()
    print(f"# {info['cpu_model']}, {info['cores']} cores; work directory {work}", flush=True)
    shards = work / "shards" if (work / "shards" / "manifest.json").exists() else build_shards(work)
    # The CPU peak (for MFU) is measured once and cached; do it now, not inside the timed runs.
    subprocess.run([sys.executable, "-c", "from pretrain.flops import cpu_peak_flops; cpu_peak_flops()"],
                   cwd=REPO, env=child_env(), check=True, capture_output=True)

    # --- the uninterrupted run ----------------------------------------------------------------
    marks0 = _cpu_marks()
    clean = run_attempt(train_command(shards, work / "clean", args.steps), work / "clean",
                        work / "clean" / "attempt_0.log")
    clean_others = busy_cores_elsewhere(marks0, _cpu_marks())
    if clean["rc"] != 0:
        print(Path(clean["log"]).read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"the uninterrupted run failed with exit code {clean['rc']}")
    step_time = (clean["wall_s"] - clean["first_step_s"]) / max(args.steps - clean["first_step"], 1)
    print(f"uninterrupted: {clean['wall_s']:.1f} s ({clean['first_step_s']:.1f} s to the first step, "
          f"{step_time * 1e3:.1f} ms per step after it)", flush=True)

    # --- the chaos run --------------------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    targets = sorted(int(s) for s in rng.choice(np.arange(1, args.steps), size=args.kills, replace=False))
    jitters = [float(j) for j in rng.uniform(0.0, step_time, size=args.kills)]
    cmd = train_command(shards, work / "chaos", args.steps)
    attempts: list[dict] = []
    crashes_in_a_row = 0
    marks0 = _cpu_marks()
    while True:
        k = sum(a["killed"] for a in attempts)
        kill = k < args.kills
        a = run_attempt(cmd, work / "chaos", work / "chaos" / f"attempt_{len(attempts)}.log",
                        kill_at_step=targets[k] if kill else None, jitter_s=jitters[k] if kill else 0.0)
        attempts.append(a)
        what = (f"killed at step ~{a['reached_step']} (target {a['kill_at_step']})" if a["killed"]
                else f"exit {a['rc']}")
        print(f"attempt {len(attempts) - 1:2d}: from step {start_step(a)}, {what}, {a['wall_s']:.1f} s", flush=True)
        if a["rc"] == 0:
            break
        if not a["killed"]:  # died on its own: that is a finding, retry a few times then give up
            crashes_in_a_row += 1
            print(Path(a["log"]).read_text()[-2000:], file=sys.stderr)
            if crashes_in_a_row >= 3:
                break
        else:
            crashes_in_a_row = 0
    chaos_others = busy_cores_elsewhere(marks0, _cpu_marks())
    finished = attempts[-1]["rc"] == 0

    # --- results --------------------------------------------------------------------------------
    per_kill = recomputed_steps(attempts, args.steps)
    chaos_wall = sum(a["wall_s"] for a in attempts)
    executed = 0  # steps trained, counted over all attempts
    for a in attempts:
        if start_step(a) is not None:
            end = args.steps if a["rc"] == 0 else (a["reached_step"] or a["last_printed_step"] or start_step(a))
            executed += end - start_step(a)
    result = {"bench": "chaos_train", "command": " ".join(["chaos_train.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": info, "steps": args.steps, "kills_planned": args.kills, "seed": args.seed,
              "train_command": " ".join(train_command(Path("SHARDS"), Path("RUN"), args.steps)[1:]),
              "kill_targets": targets, "finished": finished, "attempts": len(attempts),
              "kills": sum(a["killed"] for a in attempts),
              "crashes": sum(1 for a in attempts if not a["killed"] and a["rc"] != 0),
              "steps_recomputed": sum(x["lost"] or 0 for x in per_kill),
              "steps_executed": executed, "per_kill": per_kill,
              "checkpoints_set_aside": sum(a["damaged_reports"] for a in attempts),
              "clean_wall_s": clean["wall_s"], "clean_first_step_s": clean["first_step_s"],
              "clean_step_ms": step_time * 1e3, "chaos_wall_s": chaos_wall,
              "overhead_s": chaos_wall - clean["wall_s"], "overhead_ratio": chaos_wall / clean["wall_s"],
              "restart_first_step_s": statistics.median(a["first_step_s"] for a in attempts[1:]
                                                        if a["first_step_s"] is not None)
              if any(a["first_step_s"] for a in attempts[1:]) else None,
              "other_cpu_cores": {"clean": clean_others, "chaos": chaos_others}}
    if finished:
        final = work / "chaos" / "checkpoints" / str(args.steps)
        result["params"] = compare_checkpoints(final, work / "clean" / "checkpoints" / str(args.steps))
        result["metrics"] = compare_metrics(work / "chaos", work / "clean")
    if not args.skip_checkpoint_timing:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--only-checkpoint-timing",
                               "--repeats", str(args.repeats)], cwd=REPO, env=child_env(), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            result["checkpoint_125m"] = {"error": f"exit code {proc.returncode}"}
        else:
            result["checkpoint_125m"] = json.loads(proc.stdout.strip().splitlines()[-1])

    print_table(result)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if finished and result.get("params", {}).get("bit_identical") else 1


def print_table(r: dict) -> None:
    rows = [("kills (planned)", f"{r['kills']} ({r['kills_planned']}), {r['attempts']} runs, {r['crashes']} crashes"),
            ("steps recomputed", f"{r['steps_recomputed']} (steps executed {r['steps_executed']} for {r['steps']})"),
            ("damaged checkpoints set aside", str(r["checkpoints_set_aside"])),
            ("wall time uninterrupted", f"{r['clean_wall_s']:.1f} s ({r['clean_first_step_s']:.1f} s to first step, "
                                        f"{r['clean_step_ms']:.1f} ms/step)"),
            ("wall time with kills", f"{r['chaos_wall_s']:.1f} s (x{r['overhead_ratio']:.2f}, "
                                     f"+{r['overhead_s'] / max(r['kills'], 1):.1f} s per kill)")]
    if "params" in r:
        pr = r["params"]
        rows.append(("final checkpoint bit-identical", f"{pr['bit_identical']} ({pr['arrays_identical']}/{pr['arrays']} "
                                                       f"arrays; items {', '.join(pr['items'])})"))
        m = r["metrics"]
        rows.append(("metrics.jsonl", f"{m['rows_chaos']} rows ({m['rows_clean']} uninterrupted), "
                                      f"{m['duplicate_step_rows']} duplicated steps, {m['losses_differing']} losses differ"))
    else:
        rows.append(("final checkpoint bit-identical", "run did not finish"))
    c = r.get("checkpoint_125m")
    if c and "error" not in c:
        rows += [("125m state", f"{c['state_bytes'] / 2**30:.2f} GiB in memory, "
                                f"{c['checkpoint_bytes'] / 2**30:.2f} GiB on disk"),
                 ("125m async save: loop blocked", f"{c['async_idle_blocked_s']:.2f} s in save() "
                                                   f"({c['async_stepping_blocked_s']:.2f} s with a step after it)"),
                 ("125m async save: until written", f"{c['async_idle_total_s']:.2f} s with the loop idle, "
                                                    f"{c['async_stepping_total_s']:.2f} s with a train step"),
                 ("125m train step", f"{c['step_s']:.2f} s alone, {c['async_stepping_step_s']:.2f} s "
                                     f"during an async save"),
                 ("125m sync save", f"{c['sync_total_s']:.2f} s"), ("125m restore", f"{c['restore_s']:.2f} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for d in (r.get("params") or {}).get("differences", [])[:20]:
        print("  differs:", json.dumps(d))


if __name__ == "__main__":
    sys.exit(main())
