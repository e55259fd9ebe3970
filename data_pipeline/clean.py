"""`danlu clean`: a data cleaning job (readers -> steps -> sharded JSONL + report), run locally.

A job is declared in YAML (configs/data/*.yaml)::

    name: web
    inputs:                               # paths, globs, directories or fsspec URLs
      - {path: "raw/cc/*.warc.gz", reader: warc, source: commoncrawl}
      - {path: raw/dump.jsonl.zst, source: forum, options: {text_key: body}}
    readers: {max_doc_bytes: 20000000, invalid_utf8: error, jsonl: {text_key: text}}
    steps: [html_extract, normalize, {step: language, languages: [en]}, gopher_quality]
    output: {dir: out/web, compression: gz, docs_per_shard: 100000, rejected: false}
    workers: 0                            # 0: os.cpu_count()

Dotted ``key=value`` overrides follow the file on the command line (``output.dir=x``,
``readers.code.max_file_bytes=500000``, ``steps.gopher_quality.min_words=40`` or ``steps.3.min_words=40``,
``inputs.0.source=cc``). Everything is checked before any document is read: unknown keys (with a
"did you mean"), unknown steps and bad thresholds, missing inputs, bad reader options.

Running a job has two phases, so the same plan can be run by other runners:

1. *map*: each input shard (readers.Shard) is read, passed through the steps and written to
   ``documents/part-SSSSS-PPPP.jsonl.gz`` (SSSSS: the shard, PPPP: its part of ``docs_per_shard``
   documents), with rejected documents in ``rejected/`` and unreadable records in the shard's
   error file. A shard is committed atomically: its files are written under temporary names,
   renamed, and only then is its done marker (``.state/shard-SSSSS.json``, holding its stats)
   written. A killed job rerun with the same command skips committed shards; since a shard's
   output depends only on the shard, the result is byte-identical to an uninterrupted run, for
   any number of workers.
2. *finalisation*: the per-shard stats are merged into ``report.json``, ``report.md`` and
   ``removals.png`` (data_pipeline/report.py) and the error files into ``errors.jsonl``.

Corpus-level stages (dedup, decontamination: `stages:`) run between the two phases: they read the
map phase's ``documents/`` and the merged stats, and add their own counts to the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import gzip
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any


from data_pipeline import readers as R
from danlu.base.fs import dumps_line, local_path
from data_pipeline.loop import ShardStats, process_records
from data_pipeline.steps import Drop, Step, StepError, build_steps
from danlu.base.config import ConfigError, build, parse_override, read_yaml_mapping, set_path, unknown_key_error

STATE_DIR = ".state"
DOCUMENTS_DIR = "documents"
REJECTED_DIR = "rejected"
ERRORS = "errors.jsonl"
JOB_FILE = "job.json"
COMPRESSION_SUFFIX = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}
RUNNERS = ("local", "beam")


# ---------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class InputConfig:
    path: str = ""  # path, glob, directory or fsspec URL; for reader tfds, the dataset name
    reader: str = "auto"  # auto (from the suffix) | jsonl | parquet | warc | books | code | tfds
    source: str = ""  # label on every document and in the report (default: the job's name)
    options: tuple[tuple[str, Any], ...] = ()  # this input's reader options (readers.<reader> keys)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = ""  # local directory (the local runner renames files into it atomically)
    compression: str = "gz"  # gz | zst | none
    docs_per_shard: int = 100_000  # documents per output file; a shard's output is split into parts
    rejected: bool = False  # also write dropped documents (with `drop_reason`) to rejected/
    examples_per_reason: int = 3  # removed documents shown per reason in report.md


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    name: str = "clean"
    inputs: tuple[InputConfig, ...] = ()
    readers: tuple[tuple[str, Any], ...] = ()  # raw `readers:` mapping, resolved per input by `reader_options`
    steps: tuple[Any, ...] = ()  # step specs as in YAML (name or {step: name, param: value})
    output: OutputConfig = OutputConfig()
    imports: tuple[str, ...] = ()  # modules (or .py files) imported first: your own steps, TFDS builders
    workers: int = 0  # 0: os.cpu_count()
    runner: str = "local"  # local | beam
    strict: bool = False  # exit non-zero when any record went to errors.jsonl
    progress: bool = True  # a progress bar on stderr when it is a terminal
    # Corpus stages after the map phase (exact/url/lines/minhash dedup, decontamination, ...) and
    # their options (memory_budget_mb, cc_rounds): data_pipeline/dedup/stages.py.
    stages: tuple[Any, ...] = ()
    stage_options: tuple[tuple[str, Any], ...] = ()


def _build_input(raw: Any, where: str) -> InputConfig:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: an input is a path or a mapping {{path, reader, source, options}}, got {raw!r}")
    raw = dict(raw)
    options = raw.pop("options", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.options: expected a mapping of reader options, got {options!r}")
    cfg = build(InputConfig, raw, where)
    if not cfg.path:
        raise ConfigError(f"{where}: no `path`")
    return dataclasses.replace(cfg, options=tuple(options.items()))


def config_from_dict(tree: dict) -> CleanConfig:
    """A CleanConfig from a YAML tree; rejects unknown keys and wrong types (no input is touched)."""
    tree = dict(tree)
    inputs = tree.pop("inputs", None) or []
    readers = tree.pop("readers", None) or {}
    steps = tree.pop("steps", None) or []
    stages = tree.pop("stages", None) or []
    stage_options = tree.pop("stage_options", None) or {}
    if not isinstance(stages, list):
        raise ConfigError(f"stages: expected a list of stages, got {stages!r}")
    if not isinstance(stage_options, dict):
        raise ConfigError(f"stage_options: expected a mapping, got {stage_options!r}")
    if not isinstance(inputs, list):
        raise ConfigError(f"inputs: expected a list of inputs, got {inputs!r}")
    if not isinstance(readers, dict):
        raise ConfigError(f"readers: expected a mapping, got {readers!r}")
    if not isinstance(steps, list):
        raise ConfigError(f"steps: expected a list of steps, got {steps!r}")
    cfg = build(CleanConfig, tree, "")
    cfg = dataclasses.replace(cfg, inputs=tuple(_build_input(x, f"inputs[{i}]") for i, x in enumerate(inputs)),
                              readers=tuple(readers.items()), steps=tuple(steps), stages=tuple(stages),
                              stage_options=tuple(stage_options.items()))
    common = {f.name for f in dataclasses.fields(R.CommonOptions)}
    for k, v in readers.items():
        if k in R.READERS:
            if not isinstance(v, dict):
                raise ConfigError(f"readers.{k}: expected a mapping of options, got {v!r}")
            build(R.READERS[k].options, v, f"readers.{k}")  # unknown keys and types, named as written
        elif k not in common:
            raise unknown_key_error(str(k), [*common, *R.READERS], "readers")
    if cfg.runner not in RUNNERS:
        raise ConfigError(f"runner={cfg.runner!r} is not one of {', '.join(RUNNERS)}")
    if cfg.output.compression not in COMPRESSION_SUFFIX:
        raise ConfigError(f"output.compression={cfg.output.compression!r} is not one of gz, zst, none")
    if cfg.output.docs_per_shard <= 0:
        raise ConfigError(f"output.docs_per_shard must be positive, got {cfg.output.docs_per_shard}")
    if cfg.output.examples_per_reason < 0:
        raise ConfigError(f"output.examples_per_reason must be >= 0, got {cfg.output.examples_per_reason}")
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0 (0: all cores), got {cfg.workers}")
    return cfg


def _set_step_param(steps: list, ref: str, param: str, value: Any, item: str) -> None:
    """`steps.<index or name>.<param>=value`: changes one parameter of one step of the list."""
    names = [s if isinstance(s, str) else s.get("step") if isinstance(s, dict) else None for s in steps]
    if ref.lstrip("-").isdigit():
        i = int(ref)
        if not -len(steps) <= i < len(steps):
            raise ConfigError(f"override {item!r}: the job has {len(steps)} steps")
    elif ref in names:
        i = names.index(ref)
    else:
        close = difflib.get_close_matches(ref, [n for n in names if n], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"override {item!r}: no step {ref!r} in this job{hint}; steps: {names}")
    spec = steps[i]
    spec = {"step": spec} if isinstance(spec, str) else dict(spec)
    spec[param] = value
    steps[i] = spec


def apply_override(tree: dict, item: str) -> None:
    """Applies one dotted ``key=value`` override to a job's YAML tree: the common parser, plus
    ``steps.<index or name>.<param>`` and bare input paths that become ``{path: ...}`` to take keys."""
    parts, value = parse_override(item, "output.dir=out/web")
    if parts[0] == "steps" and len(parts) == 3:
        steps = tree.setdefault("steps", [])
        if not isinstance(steps, list):
            raise ConfigError(f"override {item!r}: steps is not a list")
        _set_step_param(steps, parts[1], parts[2], value, item)
        return
    if parts[0] == "inputs" and isinstance(tree.get("inputs"), list):
        tree["inputs"] = [{"path": x} if isinstance(x, str) else x for x in tree["inputs"]]
    set_path(tree, parts, value, item)


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = (), *,
                inputs: typing.Sequence[str] | None = None, reader: str | None = None,
                source: str | None = None, output: str | None = None, workers: int | None = None,
                runner: str | None = None, strict: bool | None = None) -> CleanConfig:
    """The job's config: YAML file, then overrides, then the command line's replacements.

    `inputs` replaces the config's inputs; they keep the config's reader (and source, when the
    config has exactly one) unless `reader`/`source` are given.
    """
    tree = read_yaml_mapping(str(path)) if path is not None else {}
    for item in overrides:
        apply_override(tree, item)
    if inputs:
        old = [x if isinstance(x, dict) else {"path": x} for x in (tree.get("inputs") or [])]
        readers = {x.get("reader", "auto") for x in old}
        sources = {x.get("source", "") for x in old}
        new = []
        for p in inputs:
            spec: dict = {"path": p}
            if reader or len(readers) == 1:
                spec["reader"] = reader if reader else next(iter(readers))
            if source or len(sources) == 1 and len(old) == 1:
                spec["source"] = source or next(iter(sources))
            if len(old) == 1 and old[0].get("options") and not reader:
                spec["options"] = old[0]["options"]
            new.append({k: v for k, v in spec.items() if v != ""})
        tree["inputs"] = new
    elif reader or source:
        raise ConfigError("--reader and --source apply to --input paths; give --input too")
    for key, value in (("workers", workers), ("runner", runner), ("strict", strict)):
        if value is not None:
            tree[key] = value
    if output is not None:
        tree.setdefault("output", {})
        if not isinstance(tree["output"], dict):
            raise ConfigError("output: expected a mapping")
        tree["output"]["dir"] = output
    return config_from_dict(tree)


def reader_options(cfg: CleanConfig, inp: InputConfig, reader: str, where: str) -> Any:
    """The options of one input: `readers:` common keys < `readers.<reader>` < the input's `options`."""
    spec = R.READERS[reader]
    readers = dict(cfg.readers)
    common = {k: v for k, v in readers.items() if k not in R.READERS}
    raw = {**common, **(readers.get(reader) or {}), **dict(inp.options)}
    try:
        return build(spec.options, raw, f"{where}.options ({reader} reader)")
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Plan: everything checked and resolved before work


def import_modules(names: typing.Sequence[str]) -> None:
    """Imports modules by name, or .py files by path (your own steps or TFDS builders)."""
    for name in names:
        try:
            if name.endswith(".py"):
                mod_name = f"danlu_user_{hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:10]}"
                if mod_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(mod_name, name)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {name}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except (ImportError, FileNotFoundError) as e:
            raise ConfigError(f"imports: cannot import {name!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Job:
    """A resolved job: the config, its built steps, its shards (indexed 0..n-1) and a fingerprint.

    The fingerprint covers everything that decides the output bytes (steps with all their
    parameters, the shards and their reader options, the output format), not the worker count.
    """

    config: CleanConfig
    steps: tuple[Step, ...]
    shards: tuple[R.Shard, ...]
    fingerprint: str

    @property
    def output_dir(self) -> str:
        return self.config.output.dir


def _canon(obj: Any) -> Any:
    """A JSON-able, deterministic form of configs and steps (sets sorted, dataclasses as dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{f.name: _canon(getattr(obj, f.name))
                                                   for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {str(k): _canon(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (set, frozenset)):
        return sorted((_canon(v) for v in obj), key=repr)
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def check_output_dir(cfg: CleanConfig) -> str:
    """The job's output directory as its runner will write it: ``file://`` URLs become local paths;
    a remote URL is refused up front unless the runner can write there (ConfigError naming it)."""
    out = cfg.output.dir
    local = local_path(out)
    if local is not None:
        return local
    if cfg.runner == "local":
        raise ConfigError(
            f"output.dir={out!r}: the local runner writes to a local directory (files are renamed into place "
            "so a killed job resumes); use --runner beam to write to a bucket, or write locally and copy")
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.get_filesystem(out)
    except ValueError as e:
        raise ConfigError(f"output.dir={out!r}: Beam cannot write there ({e})") from None
    return out


def check_runner(cfg: CleanConfig) -> None:
    """Refuses, before any work, a runner whose optional extra is not installed (the command line
    turns the ModuleNotFoundError into one line naming the extra)."""
    if cfg.runner == "beam" and importlib.util.find_spec("apache_beam") is None:
        raise ModuleNotFoundError("runner=beam needs apache_beam (the 'beam' extra)", name="apache_beam")


def plan(cfg: CleanConfig) -> Job:
    """Builds the steps and plans the shards; raises ConfigError/StepError before any document is read."""
    import_modules(cfg.imports)
    if not cfg.inputs:
        raise ConfigError("inputs: the job has no input (set `inputs:` or pass --input)")
    if not cfg.output.dir:
        raise ConfigError("output.dir is not set (set it in the config or pass --output)")
    check_runner(cfg)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=check_output_dir(cfg)))
    steps = tuple(build_steps(list(cfg.steps), "steps"))
    if cfg.stages or cfg.stage_options:  # corpus stages: checked now, run after the map phase
        from data_pipeline.dedup.stages import check_stage_config

        check_stage_config(list(cfg.stages), dict(cfg.stage_options))
    shards: list[R.Shard] = []
    for i, inp in enumerate(cfg.inputs):
        where = f"inputs[{i}]"
        try:
            reader = R.guess_reader(inp.path) if inp.reader == "auto" else inp.reader
        except R.InputError as e:
            raise ConfigError(f"{where}: {e}") from None
        if reader not in R.READERS:
            close = difflib.get_close_matches(reader, R.READERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.reader: unknown reader {reader!r}{hint}; readers: {', '.join(R.READERS)}")
        options = reader_options(cfg, inp, reader, where)
        try:
            found = R.plan_input(inp.path, reader, inp.source or cfg.name, options, i, where)
        except R.InputError as e:
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        if reader == "warc" and "response" in options.records and "html_extract" not in [s.name for s in steps]:
            raise ConfigError(f"{where}: WARC response records carry HTML; add the `html_extract` step "
                              "before the text steps (or read only WET conversion records: records: [conversion])")
        shards.extend(found)
    shards = [dataclasses.replace(s, index=k) for k, s in enumerate(shards)]
    o = cfg.output
    key = {"steps": [[s.name, _canon(s)] for s in steps],
           "shards": [[s.reader, s.source, [rel for _, rel in s.files], s.span, s.dataset, _canon(s.options)]
                      for s in shards],
           "output": [o.compression, o.docs_per_shard, o.rejected, o.examples_per_reason],
           "stages": [_canon(list(cfg.stages)), _canon(dict(cfg.stage_options))]}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Job(cfg, steps, tuple(shards), fingerprint)


# ---------------------------------------------------------------------------------------------
# Map phase: one shard


class _JsonlPart:
    """One output file: JSON lines, gzip (level 6, no timestamp or name in the header), zstd
    (level 3, single-threaded) or plain, written in blocks; the same documents give the same bytes."""

    def __init__(self, path: str, compression: str):
        self._raw = open(path, "wb")
        if compression == "gz":
            self._f = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
        elif compression == "zst":
            import zstandard

            self._f = zstandard.ZstdCompressor(level=3).stream_writer(self._raw, closefd=False)
        else:
            self._f = self._raw
        self._block: list[str] = []
        self._block_bytes = 0
        self.count = 0

    def write(self, obj: dict) -> None:
        line = dumps_line(obj)
        self._block.append(line)
        self._block_bytes += len(line)
        self.count += 1
        if self._block_bytes >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if self._block:
            self._f.write("".join(self._block).encode("utf-8", "surrogatepass"))
            self._block, self._block_bytes = [], 0

    def close(self) -> None:
        self._flush()
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()


class _PartWriter:
    """Writes one shard's documents into parts of `per_part` documents, under temporary names.

    `commit()` renames the parts into place; nothing is visible under the final names before it.
    """

    def __init__(self, directory: str, shard: int, compression: str, per_part: int):
        self.directory, self.shard, self.per_part = directory, shard, per_part
        self.compression, self.suffix = compression, COMPRESSION_SUFFIX[compression]
        self.parts: list[tuple[str, int]] = []  # (final path, documents)
        self._writer: _JsonlPart | None = None

    def write(self, obj: dict) -> None:
        if self._writer is None or self._writer.count >= self.per_part:
            self._close_current()
            final = os.path.join(self.directory, f"part-{self.shard:05d}-{len(self.parts):04d}{self.suffix}")
            self.parts.append((final, 0))
            self._writer = _JsonlPart(_tmp_name(final), self.compression)
        self._writer.write(obj)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.parts[-1] = (self.parts[-1][0], self._writer.count)
            self._writer = None

    def commit(self) -> list[tuple[str, int]]:
        self._close_current()
        for final, _ in self.parts:
            os.replace(_tmp_name(final), final)
        return self.parts


def _tmp_name(final: str) -> str:
    d, base = os.path.split(final)
    return os.path.join(d, f".tmp.{base}")


def _remove_shard_files(out: str, index: int) -> None:
    """Removes whatever an earlier, interrupted attempt at shard `index` left behind."""
    prefix = f"part-{index:05d}-"
    for sub in (DOCUMENTS_DIR, REJECTED_DIR):
        d = os.path.join(out, sub)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.startswith(prefix) or name.startswith(".tmp." + prefix):
                    os.remove(os.path.join(d, name))
    for name in (f"errors-{index:05d}.jsonl", f".tmp.errors-{index:05d}.jsonl"):
        p = os.path.join(out, STATE_DIR, name)
        if os.path.exists(p):
            os.remove(p)


def _marker_path(out: str, index: int) -> str:
    return os.path.join(out, STATE_DIR, f"shard-{index:05d}.json")


def _write_atomic(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def process_shard(job: Job, shard: R.Shard) -> dict:
    """Map phase for one shard: read, apply the steps, write and commit; returns the shard's stats.

    Every record read ends up in exactly one of: the documents, a drop reason (a step's, or a
    reader's Skipped), or the errors (unreadable records, and documents on which a step raised).
    """
    cfg, out = job.config, job.output_dir
    _remove_shard_files(out, shard.index)
    compression = cfg.output.compression
    docs = _PartWriter(os.path.join(out, DOCUMENTS_DIR), shard.index, compression, cfg.output.docs_per_shard)
    rejected = (_PartWriter(os.path.join(out, REJECTED_DIR), shard.index, compression, cfg.output.docs_per_shard)
                if cfg.output.rejected else None)
    err_final = os.path.join(out, STATE_DIR, f"errors-{shard.index:05d}.jsonl")
    stats = ShardStats(shard, [s.name for s in job.steps], cfg.output.examples_per_reason)
    with open(_tmp_name(err_final), "w", encoding="utf-8") as errors:
        records = R.read_guarded(shard, stats.reader_counters)
        for kind, obj in process_records(records, job.steps, shard, stats):
            if kind == "doc":
                docs.write(obj)
            elif kind == "error":
                errors.write(dumps_line(obj))
            elif rejected is not None:
                rejected.write(obj)

    # Commit: parts and errors renamed into place, then the marker. A kill before the marker
    # leaves files that the next attempt removes first (_remove_shard_files).
    files = docs.commit()
    rejected_files = rejected.commit() if rejected is not None else []
    os.replace(_tmp_name(err_final), err_final)
    result = stats.to_dict()
    result["files"] = [[os.path.relpath(p, out), n] for p, n in files]
    result["rejected_files"] = [[os.path.relpath(p, out), n] for p, n in rejected_files]
    result["fingerprint"] = job.fingerprint
    marker = dict(result)
    _write_atomic(_marker_path(out, shard.index), json.dumps(marker, ensure_ascii=False, sort_keys=True))
    result["step_seconds"] = stats.step_seconds
    return result


# ---------------------------------------------------------------------------------------------
# Local runner

_WORKER_JOB: Job | None = None
_WORKER_ERROR: str | None = None


def _worker_init(cfg: CleanConfig, fingerprint: str) -> None:
    """Rebuilds the steps in the worker (step classes may live in modules only `imports` can load,
    so they are not pickled); a failure is reported on the first task instead of a respawn loop."""
    global _WORKER_JOB, _WORKER_ERROR
    try:
        import_modules(cfg.imports)
        _WORKER_JOB = Job(cfg, tuple(build_steps(list(cfg.steps), "steps")), (), fingerprint)
    except Exception as e:  # noqa: BLE001 - re-raised in the parent by _worker_run
        _WORKER_ERROR = f"{type(e).__name__}: {e}"


def _worker_run(shard: R.Shard) -> dict:
    if _WORKER_JOB is None:
        raise RuntimeError(f"worker failed to start: {_WORKER_ERROR}")
    return process_shard(_WORKER_JOB, shard)


def _load_markers(job: Job) -> dict[int, dict]:
    """Stats of the shards an earlier run committed with the same fingerprint."""
    done = {}
    for s in job.shards:
        p = _marker_path(job.output_dir, s.index)
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8") as f:
                    m = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue  # a damaged marker: the shard is redone
            if m.get("fingerprint") == job.fingerprint:
                done[s.index] = m
    return done


def prepare_output(job: Job) -> None:
    """Creates the output tree; refuses a directory holding another job's results."""
    out = job.output_dir
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, DOCUMENTS_DIR), exist_ok=True)
    if job.config.output.rejected:
        os.makedirs(os.path.join(out, REJECTED_DIR), exist_ok=True)
    path = os.path.join(out, STATE_DIR, JOB_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("fingerprint") != job.fingerprint:
            raise ConfigError(
                f"output directory {out!r} holds the results of a different job (its steps, inputs or output "
                f"format differ); choose another --output, or delete {out!r} to start over")
    else:
        _write_atomic(path, json.dumps({"fingerprint": job.fingerprint, "name": job.config.name,
                                        "shards": len(job.shards)}, sort_keys=True))


def run_local(job: Job, workers: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """Map phase on a process pool; returns (stats of every shard in shard order, run info)."""
    t0 = time.time()
    prepare_output(job)
    done = _load_markers(job)
    todo = [s for s in job.shards if s.index not in done]
    workers = workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(todo) or 1))
    results: dict[int, dict] = dict(done)
    step_seconds = [0.0] * len(job.steps)

    from tqdm import tqdm

    bar = tqdm(total=len(job.shards), initial=len(done), unit="shard", desc=f"clean {job.config.name}",
               disable=None if progress else True, dynamic_ncols=True)
    docs_in = sum(m["documents_in"] for m in done.values())
    docs_out = sum(m["documents_out"] for m in done.values())

    def finished(stats: dict) -> None:
        nonlocal docs_in, docs_out
        for k, s in enumerate(stats.pop("step_seconds", [])):
            step_seconds[k] += s
        results[stats["shard"]] = stats
        docs_in += stats["documents_in"]
        docs_out += stats["documents_out"]
        bar.update(1)
        bar.set_postfix(docs=docs_in, kept=docs_out, refresh=False)

    try:
        if workers == 1:
            for s in todo:
                finished(process_shard(job, s))
        else:
            # spawn: workers start clean (no copied locks from threads of the parent); each imports the
            # step modules once and then takes one shard at a time, so a slow shard delays no other.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init,
                          initargs=(job.config, job.fingerprint), maxtasksperchild=None) as pool:
                for stats in pool.imap_unordered(_worker_run, todo, chunksize=1):
                    finished(stats)
    finally:
        bar.close()
    ordered = [results[s.index] for s in job.shards]
    run = {"runner": "local", "workers": workers, "wall_seconds": round(time.time() - t0, 3),
           "shards": len(job.shards), "shards_resumed": len(done),
           "step_seconds": {s.name: round(t, 3) for s, t in zip(job.steps, step_seconds)}}
    return ordered, run


def finalize(job: Job, shard_stats: list[dict], run: dict) -> dict:
    """Finalisation: merges the shards' error files and stats, writes errors.jsonl and the report."""
    from data_pipeline import report as report_mod

    out = job.output_dir
    tmp = _tmp_name(os.path.join(out, ERRORS))
    with open(tmp, "w", encoding="utf-8") as dst:
        for s in job.shards:
            p = os.path.join(out, STATE_DIR, f"errors-{s.index:05d}.jsonl")
            if os.path.exists(p):
                with open(p, encoding="utf-8") as src:
                    for line in src:
                        dst.write(line)
    os.replace(tmp, os.path.join(out, ERRORS))
    rep = report_mod.merge(job.config.name, [s.name for s in job.steps], shard_stats,
                           job.config.output.examples_per_reason)
    rep["run"] = run
    report_mod.write_report(out, rep)
    return rep


def run_job(job: Job, workers: int | None = None, progress: bool | None = None,
            beam_args: typing.Sequence[str] = ()) -> dict:
    """Runs a planned job with its runner; returns the report (also written to the output directory).

    `beam_args`: Beam pipeline options for runner=beam (what follows `--` on the command line).
    """
    cfg = job.config
    if cfg.runner == "beam":
        from data_pipeline.beam_runner import run_job_beam

        return run_job_beam(job, beam_args)
    workers = cfg.workers if workers is None else workers
    stats, run = run_local(job, workers, cfg.progress if progress is None else progress)
    rep = finalize(job, stats, run)
    if cfg.stages:  # corpus stages over the map phase's documents; their drops join the report
        from data_pipeline.dedup.stages import run_job_stages

        rep = run_job_stages(job, rep, workers=workers or os.cpu_count() or 1)
    return rep


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `danlu clean`."""
    parser.add_argument("config", help="job YAML (configs/data/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output.dir=out "
                        "steps.gopher_quality.min_words=40 readers.max_doc_bytes=1000000")
    parser.add_argument("--input", nargs="+", metavar="PATH", help="replace the config's inputs (paths, globs, "
                        "directories, fsspec URLs); they keep the config's reader unless --reader is given")
    parser.add_argument("--reader", choices=sorted(R.READERS), help="reader of the --input paths")
    parser.add_argument("--source", help="source label of the --input paths")
    parser.add_argument("--output", metavar="DIR", help="output directory (replaces output.dir)")
    parser.add_argument("--runner", choices=RUNNERS, help="local (default) or beam")
    parser.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="exit with status 1 when any record went to errors.jsonl")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Runs `danlu clean`; returns the exit code (config errors raise ConfigError/StepError: status 2)."""
    cfg = load_config(args.config, args.overrides, inputs=args.input, reader=args.reader, source=args.source,
                      output=args.output, workers=args.workers, runner=args.runner, strict=args.strict)
    job = plan(cfg)
    rep = run_job(job, progress=args.progress, beam_args=getattr(args, "passthrough", None) or ())
    n_in, n_out = rep["documents_in"], rep["documents_out"]
    dropped = sum(rep["dropped"].values())
    print(f"{job.config.name}: {n_in} records in, {n_out} kept ({100 * n_out / max(n_in, 1):.1f}%), "
          f"{dropped} dropped, {rep['errors']} errors; {len(job.shards)} shards "
          f"({rep['run']['shards_resumed']} resumed) in {rep['run']['wall_seconds']:.1f} s")
    print(f"documents in {os.path.join(job.output_dir, DOCUMENTS_DIR)}/, report in "
          f"{os.path.join(job.output_dir, 'report.md')}")
    for warning in rep.get("warnings", []):
        print(f"danlu clean: warning: {warning}", file=sys.stderr)
    if n_in and rep["errors"] == n_in:
        print(f"danlu clean: no record of any input could be read ({rep['errors']} errors, in "
              f"{os.path.join(job.output_dir, ERRORS)})", file=sys.stderr)
        return 1
    if rep["errors"] and cfg.strict:
        print(f"danlu clean: --strict: {rep['errors']} records went to {os.path.join(job.output_dir, ERRORS)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m data_pipeline.clean CONFIG ...`: the same as `danlu clean`
    _parser = argparse.ArgumentParser(prog="danlu clean", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except (ConfigError, StepError) as _e:
        print(f"danlu: invalid config: {_e}", file=sys.stderr)
        sys.exit(2)
