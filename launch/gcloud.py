"""Shared helpers of the cloud launchers: commands as argument lists, run without a shell.

Every command is a ``list[str]``; it is executed with ``subprocess`` (no shell) or, with
``--dry-run``, printed as one ``shlex.join`` line (paste-able into a shell, and exactly the
arguments that would have been passed). A command that must itself be a shell string (the
``--command`` of ``gcloud ... ssh``) is built with ``shlex.quote`` around every user value.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import Sequence, TextIO


class LaunchError(RuntimeError):
    """A launch that cannot go ahead (missing project or zone, bad launch config, failed command)."""


class Runner:
    """Runs argument lists, or prints them (dry run). ``commands`` keeps every one, in order."""

    def __init__(self, dry_run: bool = False, out: TextIO | None = None):
        self.dry_run = dry_run
        self.out = out or sys.stdout
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str], *, capture: bool = False, check: bool = True,
            dry_output: str = "") -> str:
        """Runs ``argv``; returns its stdout when ``capture`` (else ""). A dry run prints it and returns
        ``dry_output``. Raises LaunchError naming the command when it exits non-zero and ``check``."""
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        if self.dry_run:
            print(shlex.join(argv), file=self.out, flush=True)
            return dry_output
        if not capture:
            print(f"+ {shlex.join(argv)}", file=self.out, flush=True)
        try:
            proc = subprocess.run(argv, text=True, capture_output=capture, check=False)
        except FileNotFoundError:
            raise LaunchError(f"{argv[0]}: not found on PATH (install the Google Cloud CLI: "
                              f"https://cloud.google.com/sdk/docs/install)") from None
        if check and proc.returncode != 0:
            detail = f": {proc.stderr.strip()[-2000:]}" if capture and proc.stderr else ""
            raise LaunchError(f"command failed with exit code {proc.returncode}: {shlex.join(argv)}{detail}")
        return proc.stdout if capture else ""


def gcloud_config_value(prop: str) -> str:
    """``gcloud config get-value PROP`` ("" when gcloud is absent or the property unset)."""
    exe = shutil.which("gcloud")
    if exe is None:
        return ""
    try:
        proc = subprocess.run([exe, "config", "get-value", prop], text=True, capture_output=True, check=False,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    value = proc.stdout.strip() if proc.returncode == 0 else ""
    return "" if value in ("(unset)",) else value


def resolve_setting(value: str, *, what: str, flag: str, key: str, env: Sequence[str], prop: str) -> str:
    """``value`` if set, else the first of the environment variables ``env``, else the gcloud property
    ``prop``; raises LaunchError saying the three ways to set it."""
    if value:
        return value
    for name in env:
        if os.environ.get(name):
            return os.environ[name]
    if got := gcloud_config_value(prop):
        return got
    raise LaunchError(f"no {what} given: pass {flag}, set `{key}:` in the launch config, set ${env[0]}, "
                      f"or run `gcloud config set {prop} VALUE`")


def remote_script(lines: Sequence[str]) -> str:
    """Joins shell lines that were built with shlex.quote around every value into one --command string."""
    return "; ".join(lines)
