"""danlu: the layers around the three jobs.

- `danlu.base` is the bottom layer every package may import: the dataclass/YAML config builder and
  its one override parser (`danlu.base.config`), paths and I/O through fsspec (`danlu.base.fs`),
  and the facts about TPU accelerators both the compiler and the launcher need (`danlu.base.tpu`).
  It imports nothing of danlu's.
- `pretrain/`, `data_pipeline/` and `launch/` sit on it and never import each other; they meet
  through file contracts (docs/design.md).
- The rest of this package is the top layer that composes them: the command line (`danlu.cli`),
  the demo (`danlu.demo`), `danlu eval` on text (`danlu.evaluate`), scaling sweeps on launchers
  (`danlu.sweep`), `danlu launch tpu` and `xpk` (`danlu.tpu`, `danlu.xpk`). Nothing below imports it.

`tests/test_layers.py` checks these rules on the import statements of every module.
"""
