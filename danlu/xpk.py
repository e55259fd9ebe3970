"""`danlu launch xpk`: the training job of a launch config as an xpk workload on GKE (see launch/xpk.py).

Its training config is resolved and validated by danlu/tpu.py's `prepare`, as for `danlu launch tpu`."""

from __future__ import annotations

from danlu.tpu import prepare
from launch import xpk as launcher


def add_arguments(p) -> None:
    launcher.add_arguments(p)


def main(args) -> int:
    return launcher.main(args, prepare)
