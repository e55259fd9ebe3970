"""Benchmark decontamination: drop documents sharing a word n-gram (13 by default) with an
evaluation set, as GPT-3 did (Brown et al. 2020, appendix C).

Evaluation sets are files: JSONL (plain, .gz, .zst, .bz2, .xz: the `field` of every object, "text"
by default; a list of fields is joined by newlines), Parquet or WET (the first field is the text
column; the others are joined when present) or plain text (one example per non-blank line). They
are read by `readers`: a record that cannot be read (malformed or truncated, no string field) is
skipped and counted, with one line on stderr per file. Their n-grams are
hashed with the same words and hashes as MinHash shingles (`minhash.word_hashes`) and kept as one
sorted uint64 array per set; a document is checked with one vectorised `searchsorted`.
Only full n-grams count: an example or document shorter than n words has none.

The step `decontaminate` drops with reason ``decontaminate:<set name>`` (the file name without
suffixes), so the report counts removals per evaluation set.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import ClassVar, Sequence

import numpy as np

from danlu.base import fs as dio
from data_pipeline import readers as R
from data_pipeline.dedup.minhash import _NGRAM_MULT, splitmix64, word_hashes
from data_pipeline.steps import Drop, Step, StepError, register, require


def ngram_hashes(text: str, n: int = 13) -> np.ndarray:
    """uint64 [words - n + 1]: hashes of every full word n-gram of `text` (empty if shorter)."""
    if n > len(_NGRAM_MULT):
        raise ValueError(f"n must be <= {len(_NGRAM_MULT)}, got {n}")
    w = word_hashes(text)
    count = w.size - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc += w[j:j + count] * _NGRAM_MULT[j]
    return splitmix64(acc)


def set_name(path: str) -> str:
    """"mmlu" for ".../mmlu.test.jsonl.gz": the file name up to its first dot."""
    return os.path.basename(path).split(".")[0]


def load_eval_texts(path: str, field: str | Sequence[str] = "text", errors: list | None = None) -> list[str]:
    """Texts of an evaluation file (see the module docstring); records that cannot be read are
    skipped and go to `errors` as errors.jsonl rows. A missing file raises FileNotFoundError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"evaluation set {path!r} does not exist")
    fields = [field] if isinstance(field, str) else list(field)
    errors = errors if errors is not None else []
    texts = []
    if path.endswith(dio.JSONL_SUFFIXES):
        for rec in R.read_jsonl_objects(path):
            if isinstance(rec, R.ReadError):
                errors.append(R.error_row(rec))
                continue
            line, obj = rec
            parts = [obj[f] for f in fields if isinstance(obj.get(f), str)]
            if parts:
                texts.append("\n".join(parts))
            else:
                errors.append(R.error_row(R.ReadError(path, "bad_text", f"no string field "
                                                      f"{' or '.join(map(repr, fields))}", {"line": line})))
        return texts
    if path.endswith(R.PARQUET_SUFFIXES + R.WARC_SUFFIXES):
        for _, doc in R.read_documents(R.InputFlags(text_key=fields[0]).plan([path]), errors):
            texts.append("\n".join([doc["text"]] + [doc[f] for f in fields[1:] if isinstance(doc.get(f), str)]))
        return texts
    line_no = 0
    with dio.open_input(path) as f:
        try:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    errors.append(R.error_row(R.ReadError(path, "invalid_utf8", f"invalid UTF-8 at byte {e.start}",
                                                          {"line": line_no}, len(raw))))
                    continue
                if line.strip():
                    texts.append(line)
        except dio.STREAM_ERRORS as e:
            errors.append(R.error_row(R.ReadError(path, "truncated", f"stream ended early or is damaged: {e}",
                                                  {"line": line_no + 1})))
    return texts


class EvalIndex:
    """The n-gram hashes of evaluation sets: {set name: sorted unique uint64 [G]}."""

    def __init__(self, paths: Sequence[str], n: int = 13, field: str | Sequence[str] = "text"):
        self.n = n
        self.sets: dict[str, np.ndarray] = {}
        self.errors: dict[str, int] = {}  # set name -> records that could not be read
        for path in paths:
            errors: list[dict] = []
            grams = [ngram_hashes(t, n) for t in load_eval_texts(path, field, errors)]
            name = set_name(path)
            if errors:
                self.errors[name] = self.errors.get(name, 0) + len(errors)
                first = errors[0]
                where = next((f"{k} {first[k]}: " for k in ("line", "row", "offset") if k in first), "")
                print(f"decontaminate: {path}: {len(errors)} records could not be read and were skipped "
                      f"(first: {where}{first['kind']}: {first['reason']})", file=sys.stderr)
            arr = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
            self.sets[name] = np.union1d(self.sets[name], arr) if name in self.sets else arr

    def match(self, text: str) -> str | None:
        """The name of the first evaluation set sharing an n-gram with `text`, or None."""
        g = ngram_hashes(text, self.n)
        if g.size == 0:
            return None
        for name, grams in self.sets.items():
            if grams.size == 0:
                continue
            pos = np.searchsorted(grams, g)
            pos[pos == grams.size] = 0
            if np.any(grams[pos] == g):
                return name
        return None


@register
@dataclasses.dataclass(frozen=True)
class Decontaminate(Step):
    """Drops documents sharing a `ngram`-word n-gram with any of `eval_sets` (files)."""

    name: ClassVar[str] = "decontaminate"
    eval_sets: tuple = ()
    ngram: int = 13
    field: str = "text"

    def __post_init__(self) -> None:
        if isinstance(self.eval_sets, str):  # YAML may give one path
            object.__setattr__(self, "eval_sets", (self.eval_sets,))
        elif not isinstance(self.eval_sets, tuple):
            object.__setattr__(self, "eval_sets", tuple(self.eval_sets))

    def check(self) -> None:
        require(len(self.eval_sets) > 0, "eval_sets: give at least one evaluation file")
        require(1 <= self.ngram <= 64, f"ngram must be in 1..64, got {self.ngram}")
        for p in self.eval_sets:
            if not os.path.exists(p):
                raise StepError(f"eval_sets: {p!r} does not exist")

    def index(self) -> EvalIndex:
        idx = self.__dict__.get("_index")
        if idx is None:  # built on first use, once per process (frozen dataclass: set directly)
            idx = EvalIndex(list(self.eval_sets), self.ngram, self.field)
            object.__setattr__(self, "_index", idx)
        return idx

    def apply(self, doc: dict) -> dict | Drop:
        hit = self.index().match(doc["text"])
        return doc if hit is None else self.drop(hit)

    def __getstate__(self):  # ship the parameters to workers, not the (large) index
        state = dict(self.__dict__)
        state.pop("_index", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
