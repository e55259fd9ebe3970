"""Corpus-level stages of a cleaning job: after the per-document steps, over the whole corpus.

In the job YAML, after `steps:`::

    stages:
      - exact                                       # identical normalised text: keep the first
      - {stage: url, date_field: date}              # same normalised URL: keep the newest crawl
      - {stage: lines, max_count: 1, min_chars: 20} # lines seen more than once in the corpus go
      - {stage: minhash, threshold: 0.8, keep: longest, verify: true}
      - {stage: decontaminate, eval_sets: [evals/mmlu.jsonl]}   # any per-document step fits here too
    stage_options: {memory_budget_mb: 1024}          # optional; bounds the corpus-wide indexes

A stage sees the documents in a fixed order (input shard, then position), so "first" means the
same thing in the local runner and in the Beam runner (`data_pipeline/beam_runner.py`), which
run the same stages and keep the same documents. Drop reasons: ``exact:duplicate``,
``url:duplicate``, ``lines:empty`` (nothing left after removing repeated lines),
``minhash:near_duplicate``, and the step's own reasons for per-document steps.

Local runner: each stage reads the previous stage's files, decides (one or two passes), and
writes its own files; `apply_to_report` adds the stage's drops to the job's report so that
``documents_in = documents_out + sum(dropped) + errors`` still holds.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np

from danlu.base import fs as dio
from data_pipeline.dedup import exact
from data_pipeline.dedup.fuzzy import fuzzy_dedup
from data_pipeline.dedup.minhash import MinHashConfig
from data_pipeline.steps import Drop, Step, StepError, build_step, instantiate

Decision = Callable[[int, dict], "dict | Drop"]


@dataclasses.dataclass(frozen=True)
class CorpusStage:
    """Base: `plan(corpus, ctx)` reads the corpus and returns the per-document decision."""

    name: ClassVar[str] = ""

    def check(self) -> None:
        pass

    def plan(self, corpus: Callable[[], Iterable[dict]], ctx: "StageContext") -> Decision:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StageContext:
    memory_budget_mb: float | None = None
    workdir: str | None = None
    workers: int = 1


def _by_kept(kept_for: np.ndarray, reason: str) -> Decision:
    def decide(i: int, doc: dict) -> dict | Drop:
        return doc if kept_for[i] == i else Drop(reason)
    return decide


@dataclasses.dataclass(frozen=True)
class ExactStage(CorpusStage):
    """Identical text after normalisation (NFC, case-folded, whitespace collapsed): the first stays."""

    name: ClassVar[str] = "exact"
    normalize: bool = True

    def plan(self, corpus, ctx):
        return _by_kept(exact.exact_dedup(corpus, normalize=self.normalize, memory_budget_mb=ctx.memory_budget_mb,
                                          workdir=ctx.workdir), "exact:duplicate")


@dataclasses.dataclass(frozen=True)
class UrlStage(CorpusStage):
    """Same normalised URL: the newest by `date_field` stays (ties: the first)."""

    name: ClassVar[str] = "url"
    url_field: str = "url"
    date_field: str = "date"

    def plan(self, corpus, ctx):
        return _by_kept(exact.url_dedup(corpus, url_field=self.url_field, date_field=self.date_field,
                                        memory_budget_mb=ctx.memory_budget_mb, workdir=ctx.workdir), "url:duplicate")


@dataclasses.dataclass(frozen=True)
class LinesStage(CorpusStage):
    """Lines (or paragraphs) seen more than `max_count` times in the corpus are cut from every
    document; a document left with no word character is dropped (``lines:empty``)."""

    name: ClassVar[str] = "lines"
    max_count: int = 1
    unit: str = "line"
    min_chars: int = 0

    def check(self) -> None:
        if self.max_count < 1:
            raise StepError(f"max_count must be >= 1, got {self.max_count}")
        if self.unit not in ("line", "paragraph"):
            raise StepError(f"unit must be 'line' or 'paragraph', got {self.unit!r}")

    def plan(self, corpus, ctx):
        bad = exact.repeated_lines(corpus, max_count=self.max_count, unit=self.unit, min_chars=self.min_chars,
                                   memory_budget_mb=ctx.memory_budget_mb, workdir=ctx.workdir)

        def decide(i: int, doc: dict) -> dict | Drop:
            text, removed = exact.remove_lines(doc["text"], bad, unit=self.unit, min_chars=self.min_chars)
            if not removed:
                return doc
            if not any(c.isalnum() for c in text):
                return Drop("lines:empty")
            return {**doc, "text": text}
        return decide


@dataclasses.dataclass(frozen=True)
class MinHashStage(CorpusStage, MinHashConfig):
    """Fuzzy dedup (MinHash LSH); its parameters are `MinHashConfig`'s, checked by it."""

    name: ClassVar[str] = "minhash"

    def plan(self, corpus, ctx):
        res = fuzzy_dedup(corpus, self, memory_budget_mb=ctx.memory_budget_mb, workdir=ctx.workdir, workers=ctx.workers)
        return _by_kept(res.kept_for, "minhash:near_duplicate")


@dataclasses.dataclass(frozen=True)
class StepStage(CorpusStage):
    """A per-document step run as a stage (e.g. decontaminate or quality after dedup)."""

    step: Step = None  # type: ignore[assignment]

    @property
    def stage_name(self) -> str:
        return self.step.name

    def plan(self, corpus, ctx):
        return lambda i, doc: self.step.apply(doc)


CORPUS_STAGES: dict[str, type[CorpusStage]] = {c.name: c for c in (ExactStage, UrlStage, LinesStage, MinHashStage)}


def stage_name(stage: CorpusStage) -> str:
    return stage.stage_name if isinstance(stage, StepStage) else stage.name


def build_stage(spec: str | dict, where: str) -> CorpusStage:
    """A stage from its YAML form (a name, or a mapping with `stage:`); StepError before any work."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and ("stage" in spec or "step" in spec):
        params = dict(spec)
        name = params.pop("stage", None) or params.pop("step")
    else:
        raise StepError(f"{where}: a stage is a name or a mapping with a 'stage' key, got {spec!r}")
    cls = CORPUS_STAGES.get(name)
    if cls is None:
        try:
            return StepStage(step=build_step({"step": name, **params}, where))
        except StepError as e:
            if "unknown step" not in str(e):
                raise
            from data_pipeline.steps import REGISTRY

            known = sorted(CORPUS_STAGES) + sorted(REGISTRY)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; corpus stages: {', '.join(sorted(CORPUS_STAGES))}"
            raise StepError(f"{where}: unknown stage {name!r}{hint}") from None
    return instantiate(cls, name, params, where, "stage")


def build_stages(specs: Iterable, where: str = "stages") -> list[CorpusStage]:
    return [build_stage(s, f"{where}[{i}]") for i, s in enumerate(specs)]


STAGE_OPTIONS = {"memory_budget_mb": (int, float), "cc_rounds": (int,)}


def check_stage_config(specs: list, options: dict) -> list[CorpusStage]:
    """The job's `stages:` and `stage_options:` checked (StepError naming the key) before any work."""
    for key, value in options.items():
        if key not in STAGE_OPTIONS:
            close = difflib.get_close_matches(str(key), STAGE_OPTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(STAGE_OPTIONS)}"
            raise StepError(f"stage_options: unknown option {key!r}{hint}")
        if isinstance(value, bool) or not isinstance(value, STAGE_OPTIONS[key]) or value <= 0:
            raise StepError(f"stage_options.{key} must be a positive number, got {value!r}")
    return build_stages(specs)


# --------------------------------------------------------------------------- local runner


def _read(files: list[str]) -> Iterator[dict]:
    for path in files:
        yield from dio.read_jsonl(path)


def run_stages(stages: list[CorpusStage], files: list[str], out_dir: str, ctx: StageContext = StageContext(),
               examples_per_reason: int = 3) -> dict:
    """Runs `stages` over the documents of `files` (in order); writes one file per input file
    (same base name) into `out_dir`. Returns {"files": [...], "stages": [per-stage stats],
    "per_source": {source: {"dropped": {reason: n}, "bytes_dropped": {...}, "bytes_edited": n}},
    "examples": {reason: [...]}}.
    """
    from data_pipeline.loop import ShardStats
    from data_pipeline.readers import doc_bytes

    os.makedirs(out_dir, exist_ok=True)
    current = list(files)
    tally = ShardStats(None, [], examples_per_reason)  # drops and edits per source, examples per reason
    stage_stats = []
    for k, stage in enumerate(stages):
        step_dir = os.path.join(out_dir, f".stage-{k}") if k < len(stages) - 1 else out_dir
        os.makedirs(step_dir, exist_ok=True)
        sub_ctx = dataclasses.replace(ctx, workdir=os.path.join(out_dir, ".spill")) if ctx.memory_budget_mb else ctx
        snapshot = list(current)
        decide = stage.plan(lambda: _read(snapshot), sub_ctx)
        st = {"stage": stage_name(stage), "documents_in": 0, "documents_out": 0, "dropped": {}, "changed": 0}
        new_files = []
        counts = []
        i = 0
        for path in current:
            target = os.path.join(step_dir, os.path.basename(path))
            tmp = target + ".tmp" + _suffix(path)
            with dio.JsonlWriter(tmp) as w:
                for doc in dio.read_jsonl(path):
                    st["documents_in"] += 1
                    out = decide(i, doc)
                    i += 1
                    src = str(doc.get("source", ""))
                    if isinstance(out, Drop):
                        st["dropped"][out.reason] = st["dropped"].get(out.reason, 0) + 1
                        tally.dropped(src, out.reason, doc_bytes(doc),
                                      {"id": doc.get("id"), "source": src, "text": doc["text"][:600]})
                        continue
                    if out.get("text") != doc["text"]:
                        st["changed"] += 1
                        tally.edited(src, doc_bytes(doc) - doc_bytes(out))
                    st["documents_out"] += 1
                    w.write(out)
            os.replace(tmp, target)
            new_files.append(target)
            counts.append(w.count)
        if k > 0:  # the previous stage's intermediate files are no longer needed
            for p in current:
                os.remove(p)
            shutil.rmtree(os.path.dirname(current[0]), ignore_errors=True) if current else None
        current = new_files
        stage_stats.append(st)
    if os.path.isdir(os.path.join(out_dir, ".spill")):
        shutil.rmtree(os.path.join(out_dir, ".spill"), ignore_errors=True)
    per_source = {src: {k: c[k] for k in ("dropped", "bytes_dropped", "bytes_edited")}
                  for src, c in tally.per_source.items()}
    return {"files": current, "file_counts": counts if stages else [], "stages": stage_stats,
            "per_source": per_source, "examples": tally.examples}


def _suffix(path: str) -> str:
    for s in (".jsonl.gz", ".jsonl.zst", ".jsonl"):
        if path.endswith(s):
            return s
    return ".jsonl"


def apply_to_report(rep: dict, result: dict) -> dict:
    """Adds the stages' drops and edits to a cleaning report (report.merge's shape), in place.

    Dropped documents move from documents_out/bytes_out to dropped/bytes_dropped; text cut by a
    stage moves from bytes_out to bytes_edited; so the report stays balanced.
    """
    from data_pipeline.report import balanced

    def move(c: dict, ps: dict) -> None:
        for reason, n in ps["dropped"].items():
            c["dropped"][reason] = c["dropped"].get(reason, 0) + n
            c["documents_out"] -= n
        for reason, b in ps["bytes_dropped"].items():
            c["bytes_dropped"][reason] = c["bytes_dropped"].get(reason, 0) + b
            c["bytes_out"] -= b
        c["bytes_edited"] += ps["bytes_edited"]
        c["bytes_out"] -= ps["bytes_edited"]

    for src, ps in result["per_source"].items():
        move(rep, ps)
        if src in rep.get("per_source", {}):
            move(rep["per_source"][src], ps)
    for c in [rep, *rep.get("per_source", {}).values()]:
        c["dropped"] = dict(sorted(c["dropped"].items(), key=lambda kv: (-kv[1], kv[0])))
    rep["stages"] = result["stages"]
    ex = rep.setdefault("examples", {})
    for reason, items in result["examples"].items():
        ex.setdefault(reason, items)
    rep["accounted"] = balanced(rep) and all(balanced(c) for c in rep.get("per_source", {}).values())
    return rep


STAGES_MARKER = "stages.json"


def run_job_stages(job: Any, rep: dict, workers: int = 1) -> dict:
    """The local runner's hook (data_pipeline/clean.py, after the map phase's report): runs the
    job's `stages` over `documents/`, replaces those files with the result, updates and rewrites
    the report. Rerunning a finished job reuses the recorded stage results (no second dedup of
    already deduplicated files).
    """
    from data_pipeline import report as report_mod

    cfg = job.config
    out = job.output_dir
    stages = build_stages(cfg.stages)
    key = json.dumps([job.fingerprint, [str(s) for s in stages]], sort_keys=True)
    marker = os.path.join(out, ".state", STAGES_MARKER)
    staged = os.path.join(out, ".state", "stages")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("key") != key:
            raise StepError(f"{out!r} holds the results of other stages; choose another --output or delete it")
        result = done["result"]
        _commit(staged, out)  # finishes a commit that was cut short
    else:
        files = [os.path.join(out, rel) for rel, _ in rep.get("files", [])]
        options = dict(cfg.stage_options) if getattr(cfg, "stage_options", None) else {}
        ctx = StageContext(memory_budget_mb=options.get("memory_budget_mb"), workers=max(1, workers))
        if os.path.isdir(staged):
            shutil.rmtree(staged)
        result = run_stages(stages, files, staged, ctx, cfg.output.examples_per_reason)
        result["files"] = [os.path.join("documents", os.path.basename(p)) for p in result["files"]]
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"key": key, "result": result}, f)
        os.replace(marker + ".tmp", marker)  # from here on the commit below is finished by a rerun
        _commit(staged, out)
    apply_to_report(rep, result)
    rep["files"] = [[rel, n] for rel, n in zip(result["files"], result["file_counts"])]
    report_mod.write_report(out, rep)
    return rep


def _commit(staged: str, out: str) -> None:
    """Moves the staged document files over documents/ (same names), then removes `staged`."""
    if not os.path.isdir(staged):
        return
    for name in sorted(os.listdir(staged)):
        if os.path.isfile(os.path.join(staged, name)):
            os.replace(os.path.join(staged, name), os.path.join(out, "documents", name))
    shutil.rmtree(staged, ignore_errors=True)
