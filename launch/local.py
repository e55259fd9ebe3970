"""`danlu launch local`: a fake pod on this machine.

    danlu launch local --processes 2 --devices-per-process 2 -- \\
        danlu train configs/train/tiny.yaml data.path=demo/shards mesh.data=2 mesh.fsdp=2

starts N copies of the command after `--`, process i with these environment additions:

    DANLU_COORDINATOR=127.0.0.1:PORT     (--port, default: a free port)
    DANLU_NUM_PROCESSES=N  DANLU_PROCESS_ID=i
    JAX_PLATFORMS=cpu
    XLA_FLAGS=--xla_force_host_platform_device_count=D   (--devices-per-process, default 1;
                                                           other flags already in XLA_FLAGS are kept)
    PYTHONUNBUFFERED=1                   (lines arrive as they are printed, not when a buffer fills)

`danlu train` joins the job from those variables (gloo CPU collectives), so N processes with D
devices each see one global mesh of N·D devices. Commands are argument lists, never shell strings;
a leading `danlu` is the `danlu` beside this Python, so the children run the launcher's install.

Output: each child's stdout and stderr stream here with a `[i] ` prefix, or go to
`--log-dir DIR/process_i.log`. When a child exits non-zero the others are sent SIGTERM (SIGKILL
after `--grace` seconds) and the launcher exits with that child's code (128+N for a signal N).
SIGINT/SIGTERM sent to the launcher are forwarded to every child (each runs in its own process
group, so a Ctrl-C in the terminal reaches them once, through the launcher); a second one kills
them. `--dry-run` prints each process's environment additions and command, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

DEFAULT_DEVICES_PER_PROCESS = 1  # one CPU device per process: a pod of N single-chip hosts
DEFAULT_GRACE_SECONDS = 10.0
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_command(command: list[str]) -> list[str]:
    """`danlu ...` -> the `danlu` script beside this interpreter (the same install), if there is one."""
    if command and command[0] == "danlu":
        sibling = Path(sys.executable).parent / "danlu"
        if sibling.is_file() and os.access(sibling, os.X_OK):
            return [str(sibling), *command[1:]]
    return list(command)


def process_env(process_id: int, processes: int, port: int, devices_per_process: int,
                base_xla_flags: str = "") -> dict[str, str]:
    """The environment additions of process ``process_id``; ``base_xla_flags`` (the caller's
    XLA_FLAGS) are kept except for a device count, which is replaced."""
    flags = [f for f in shlex.split(base_xla_flags) if not f.startswith(DEVICE_COUNT_FLAG)]
    flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
    return {
        "DANLU_COORDINATOR": f"127.0.0.1:{port}",
        "DANLU_NUM_PROCESSES": str(processes),
        "DANLU_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(flags),
        "PYTHONUNBUFFERED": "1",
    }


def plan(command: list[str], processes: int, port: int,
         devices_per_process: int = DEFAULT_DEVICES_PER_PROCESS,
         base_env: dict[str, str] | None = None) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argument list) of each process, in process order."""
    base_env = os.environ if base_env is None else base_env
    argv = resolve_command(command)
    return [(process_env(i, processes, port, devices_per_process, base_env.get("XLA_FLAGS", "")), list(argv))
            for i in range(processes)]


def format_plan(plans: list[tuple[dict[str, str], list[str]]]) -> str:
    """One shell line per process (for reading and pasting; the launcher itself never uses a shell)."""
    lines = []
    for i, (env, argv) in enumerate(plans):
        lines.append(f"# process {i}")
        lines.append(shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv]))
    return "\n".join(lines)


class _Pod:
    """The running children: output pumps, first failure, signal forwarding, teardown."""

    def __init__(self, out: IO[str], grace: float):
        self.out, self.grace = out, grace
        self.lock = threading.RLock()  # re-entrant: the signal handler may interrupt say()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.logs: list[Path] = []
        self.signalled: int | None = None
        self.kill_at: float | None = None  # when still-running children get SIGKILL

    def say(self, msg: str) -> None:
        with self.lock:
            self.out.write(f"[launch] {msg}\n")
            self.out.flush()

    def _pump(self, i: int, pipe: IO[bytes]) -> None:
        prefix = f"[{i}] "
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            with self.lock:
                self.out.write(prefix + (line if line.endswith("\n") else line + "\n"))
                self.out.flush()
        pipe.close()

    def start(self, plans: list[tuple[dict[str, str], list[str]]], log_dir: Path | None) -> None:
        for i, (adds, argv) in enumerate(plans):
            env = {**os.environ, **adds}
            if log_dir is not None:
                path = log_dir / f"process_{i}.log"
                with open(path, "wb") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                self.logs.append(path)
            else:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                pump = threading.Thread(target=self._pump, args=(i, proc.stdout), daemon=True,
                                        name=f"launch-local-{i}")
                pump.start()
                self.pumps.append(pump)
            self.procs.append(proc)

    def send(self, sig: int) -> None:
        """Signals every child still running (its whole process group)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send(sig)
        if self.kill_at is None:
            self.kill_at = time.monotonic() + self.grace

    def on_signal(self, signum: int, _frame) -> None:
        if self.signalled is None:
            self.signalled = signum
            self.say(f"got {signal.Signals(signum).name}; forwarding it to the processes")
            self.stop(signum)
        else:  # asked twice: do not wait any longer
            self.send(signal.SIGKILL)

    def wait(self) -> tuple[int, int] | None:
        """Waits for every child; returns (process id, exit code) of the first failure, if any."""
        failure = None
        while True:
            running = 0
            for i, proc in enumerate(self.procs):
                rc = proc.poll()
                if rc is None:
                    running += 1
                elif rc != 0 and failure is None:
                    failure = (i, rc)
                    if self.signalled is None:
                        self.say(f"process {i} exited with {_describe(rc)}; stopping the others")
                    self.stop()
            if not running:
                break
            if self.kill_at is not None and time.monotonic() > self.kill_at:
                self.say(f"processes still running {self.grace:g} s after SIGTERM; sending SIGKILL")
                self.send(signal.SIGKILL)
                self.kill_at = float("inf")
            time.sleep(0.05)
        for pump in self.pumps:  # EOF comes at exit, unless a grandchild still holds the pipe
            pump.join(timeout=5)
        return failure


def _describe(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"code {rc}"


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def run(plans: list[tuple[dict[str, str], list[str]]], *, log_dir: str | Path | None = None,
        out: IO[str] | None = None, grace: float = DEFAULT_GRACE_SECONDS) -> int:
    """Runs the processes of ``plans`` until all exit; returns the launcher's exit code: 0, the
    first failing process's code (128+N for signal N), or 128+N when the launcher got signal N."""
    pod = _Pod(out if out is not None else sys.stdout, grace)
    if log_dir is not None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
    forward = threading.current_thread() is threading.main_thread()  # handlers only work there
    previous = {s: signal.signal(s, pod.on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if forward else {}
    try:
        try:
            pod.start(plans, log_dir)
        except OSError as e:  # e.g. the command does not exist
            pod.say(f"cannot start process {len(pod.procs)}: {e}")
            pod.stop()
            pod.wait()
            return 127 if isinstance(e, FileNotFoundError) else 126
        if log_dir is not None:
            pod.say(f"{len(plans)} processes, logs in {log_dir}/process_<i>.log")
        failure = pod.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if pod.signalled is not None:
        return 128 + pod.signalled
    if failure is None:
        return 0
    i, rc = failure
    if log_dir is not None:
        pod.say(f"last lines of {pod.logs[i]}:\n{_tail(pod.logs[i])}".rstrip())
    return _exit_code(rc)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `danlu launch local`."""
    parser.add_argument("--processes", "-n", type=int, required=True, metavar="N", help="processes to start")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free port)")
    parser.add_argument("--devices-per-process", type=int, default=DEFAULT_DEVICES_PER_PROCESS, metavar="D",
                        help=f"simulated CPU devices per process (default: {DEFAULT_DEVICES_PER_PROCESS})")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="write DIR/process_<i>.log instead of streaming [i]-prefixed lines")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS, metavar="SECONDS",
                        help="after SIGTERM, seconds before the remaining processes get SIGKILL "
                             f"(default: {DEFAULT_GRACE_SECONDS:g})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each process's environment additions and command, run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command after `--`, e.g. -- danlu train configs/train/tiny.yaml ...")


def main(args: argparse.Namespace) -> int:
    """Runs `danlu launch local`; returns the exit code."""
    command = list(args.command)
    if command[:1] == ["--"]:  # argparse keeps the separator in a REMAINDER
        command = command[1:]
    errors = []
    if not command:
        errors.append("no command: put it after `--`, e.g. -- danlu train configs/train/tiny.yaml")
    if args.processes < 1:
        errors.append(f"--processes must be at least 1, got {args.processes}")
    if args.devices_per_process < 1:
        errors.append(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    if args.port is not None and not 0 < args.port < 65536:
        errors.append(f"--port must be in 1..65535, got {args.port}")
    if errors:
        for e in errors:
            print(f"danlu launch local: error: {e}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else free_port()
    plans = plan(command, args.processes, port, args.devices_per_process)
    if args.dry_run:
        print(format_plan(plans))
        return 0
    return run(plans, log_dir=args.log_dir, grace=args.grace)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
