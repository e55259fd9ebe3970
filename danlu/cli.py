"""`danlu` command line: each subcommand parses its arguments and calls a library function."""

from __future__ import annotations

import argparse
import signal
import sys


def _train(args) -> int:
    from pretrain.config import load_config
    from pretrain.train import train

    from pretrain.train import TrainingStopped

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except TrainingStopped as e:
        print(f"danlu: training stopped: {e}", file=sys.stderr)
        return 3
    if summary["signal"]:  # preempted: the checkpoint is saved; rerunning the command continues
        print(f"stopped by {summary['signal']} at step {summary['steps']}; checkpoint saved in {summary['run_dir']}")
        return 128 + int(signal.Signals[summary["signal"]])
    print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}"
          + (f", eval loss {summary['final_eval_loss']:.4f}" if summary["final_eval_loss"] is not None else "")
          + f"; run directory {summary['run_dir']}")
    return 0


def _demo(args) -> int:
    from danlu.demo import run_demo

    run_demo(args.workdir, minutes=args.minutes, steps=args.steps, sweep=not args.no_sweep,
             max_bytes=int(args.corpus_mb * 1_000_000))
    return 0


# Subcommands served by a module with `add_arguments(parser)` and `main(args) -> int`.
# (name, module, help). Modules keep heavy imports (jax, beam) inside their functions so that
# `danlu --help` stays fast.
COMMANDS: list[tuple[str, str, str]] = [
    ("tokenize", "data_pipeline.tokenize", "train a sentencepiece model and/or encode documents into token shards"),
    ("sweep", "danlu.sweep", "plan and run a scaling sweep of small runs (configs/scaling/*.yaml) into runs.csv"),
    ("fit", "pretrain.scaling.cmd_fit", "fit scaling laws to a runs table: Chinchilla approaches 1-3, GPT-4 form, bootstrap"),
    ("predict", "pretrain.scaling.cmd_predict", "loss at (N, D) or compute-optimal N, D and loss at C, from a fit.json"),
    ("fit-curve", "pretrain.scaling.cmd_fit_curve", "fit one run's loss curve and predict its final loss"),
    ("clean", "data_pipeline.clean", "clean raw corpora (JSONL, Parquet, WARC/WET, books, code, TFDS) into JSONL shards + a report"),
    ("dedup", "data_pipeline.dedup_cli", "fuzzy (MinHash LSH) dedup of JSONL documents, in bounded memory"),
    ("quality", "data_pipeline.quality", "GPT-3-style quality classifier: train on reference vs crawl, score"),
    ("mix", "data_pipeline.mix", "mix sources by weights or epochs into the input of danlu tokenize"),
    ("compile", "pretrain.aot", "compile the train step for a TPU topology without a TPU: memory per chip, "
                                "fit, roofline step time; --search finds a mesh/remat/microbatches that fits"),
    ("export-hf", "pretrain.hf", "a checkpoint as a Hugging Face LLaMA or GPT-2 directory (safetensors, tokenizer)"),
    ("import-hf", "pretrain.hf_import", "a Hugging Face LLaMA or GPT-2 model into a run directory danlu train continues"),
    ("sample", "pretrain.generate", "generate text from a checkpoint (greedy, temperature, top-k, top-p; KV cache)"),
    ("eval", "danlu.evaluate", "loss, perplexity and bits per byte of a checkpoint on token shards or JSONL text"),
]

# `danlu launch <target>`: same convention.
LAUNCH_TARGETS: list[tuple[str, str, str]] = [
    ("local", "launch.local", "N processes on localhost (CPU, gloo collectives) as a fake pod; "
                              "example: danlu launch local --processes 2 -- danlu train configs/train/tiny.yaml"),
    ("tpu", "danlu.tpu", "Cloud TPU VMs / queued resources: create, setup, run, status, logs, stop, delete, "
                         "watch (recreate after preemption and resume), up"),
    ("xpk", "danlu.xpk", "the same training job as an xpk workload on GKE"),
    ("dataflow", "launch.dataflow", "a `danlu clean` job on Dataflow, Flink or Spark (Apache Beam)"),
]


# Commands that never use an accelerator. With the `tpu` extra installed (libtpu, as `make test`
# installs it) JAX would probe for a TPU when one of them imports it and print libtpu's start-up
# warnings; they say CPU up front (an explicit JAX_PLATFORMS wins).
CPU_ONLY_COMMANDS = frozenset({"demo", "tokenize", "fit", "predict", "fit-curve", "clean", "dedup", "quality", "mix"})


# Top-level modules of the optional extras (pyproject.toml) -> (extra, what needs it): a command
# that fails to import one says which extra to install instead of printing a traceback.
EXTRAS: dict[str, tuple[str, str]] = {
    "apache_beam": ("beam", "--runner beam"),
    "transformers": ("hf", "Hugging Face conversion"),
    "safetensors": ("hf", "Hugging Face conversion"),
    "libtpu": ("tpu", "compiling for a TPU topology"),
    "torch": ("bench", "this benchmark"),
}


def missing_extra(e: ModuleNotFoundError) -> tuple[str, str] | None:
    """(extra, what needs it) when `e` is about a module of an optional extra, else None."""
    return EXTRAS.get((e.name or "").split(".")[0])


def _add_module_commands(sub, table) -> None:
    import importlib

    for name, module_name, help_text in table:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(func=module.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="danlu", description="Clean data, pretrain decoder-only LMs, predict big runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the embedded end-to-end job: corpus -> clean -> tokenizer -> shards -> tiny model "
                                         "-> loss.png -> scaling sweep and fit")
    p.add_argument("--workdir", default="demo", help="where everything goes (default: ./demo)")
    p.add_argument("--minutes", type=float, default=8.0, help="training time limit (default: 8)")
    p.add_argument("--steps", type=int, default=1200, help="training steps (default: 1200)")
    p.add_argument("--no-sweep", action="store_true", help="skip the scaling sweep and fit (the last ~2 minutes)")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="size of the embedded corpus in MB (default: 8)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="pretrain a decoder on token shards",
                       description="Pretrain. Overrides are dotted key=value pairs after the config file, e.g. "
                                   "`danlu train configs/train/tiny.yaml mesh.fsdp=-1 train.steps=100`.")
    p.add_argument("config", help="YAML preset (configs/train/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.d_model=512 mesh.tensor=2")
    p.set_defaults(func=_train)

    _add_module_commands(sub, COMMANDS)

    launch = sub.add_parser("launch", help="run jobs elsewhere: a fake pod here, Cloud TPU, GKE, Dataflow")
    _add_module_commands(launch.add_subparsers(dest="target", required=True), LAUNCH_TARGETS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.steps import StepError
    from pretrain.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    # `danlu clean ... -- OPTIONS`: what follows `--` are Beam pipeline options, handed on untouched
    # (other commands, e.g. `danlu launch local -- CMD`, read their own `--`).
    passthrough: list[str] = []
    if argv[:1] == ["clean"] and "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.passthrough = passthrough
    if args.command in CPU_ONLY_COMMANDS:
        import os

        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        return args.func(args) or 0
    except (ConfigError, StepError) as e:
        print(f"danlu: invalid config: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        found = missing_extra(e)
        if found is None:
            raise
        extra, what = found
        command = " ".join(filter(None, [args.command, getattr(args, "target", None)]))
        print(f"danlu {command}: {what} needs the '{extra}' extra: pip install 'danlu[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
