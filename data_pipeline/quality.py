"""GPT-3-style quality classifier: hashed word n-grams + logistic regression.

Brown et al. (2020, appendix A) trained a logistic regression on features of a standard tokenizer
(Spark's HashingTF) to tell curated text (WebText, Wikipedia, books) from raw Common Crawl, then
kept a crawl document iff ``np.random.pareto(alpha=9) > 1 - score``, so that mostly high-scoring
documents survive but some low-scoring ones do too.

Here: `HashingVectorizer` (word 1- and 2-grams by default, 2^20 features, no state to fit) and
scikit-learn's `LogisticRegression`. Train with positives (a reference corpus) against negatives
(raw crawl), both read by `readers` (JSONL, Parquet, WET; records that cannot be read are counted
and skipped); a deterministic held-out split by hash of the document id gives the accuracy. The
saved model is two files: ``<path>.npz`` (coefficients, intercept) and ``<path>.json``
(vectoriser settings, metrics), read back with numpy and json only.

Filtering (the step ``quality``): the score (probability of "reference-like") is written to the
document as ``quality_score``; ``rule: pareto`` keeps a document iff
``default_rng(seed ⊕ hash(id)).pareto(alpha) > 1 - score`` (reproducible per document whatever
the order or the number of workers), ``rule: threshold`` keeps it iff ``score >= threshold``.

    danlu quality train --positive books.jsonl --negative crawl.jsonl --output models/quality
    danlu quality score --model models/quality --input crawl/ --output scored.jsonl

`score` writes the documents with ``quality_score`` and, next to them, ``<output>.errors.jsonl``
(``scored.errors.jsonl`` here): one row per record that could not be read (file,
line/row/offset, kind, reason, bytes, raw snippet).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections import Counter
from typing import ClassVar, Iterable, Sequence

import numpy as np

from danlu.base import fs as dio
from data_pipeline import readers as R
from data_pipeline.steps import Drop, Step, StepError, register, require

FORMAT = "danlu.quality_classifier"


@dataclasses.dataclass(frozen=True)
class VectorizerConfig:
    n_features: int = 1 << 20
    ngram_max: int = 2
    lowercase: bool = True

    def build(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(n_features=self.n_features, ngram_range=(1, self.ngram_max),
                                 lowercase=self.lowercase, alternate_sign=False, norm="l2",
                                 dtype=np.float64)


class QualityModel:
    """A trained classifier: `score(texts)` → float64 [n] in (0, 1), 1 = reference-like."""

    def __init__(self, coef: np.ndarray, intercept: float, vec: VectorizerConfig, metrics: dict | None = None):
        self.coef = np.asarray(coef, dtype=np.float64)  # [n_features]
        self.intercept = float(intercept)
        self.vec = vec
        self.metrics = metrics or {}
        self._vectorizer = vec.build()

    def score(self, texts: Sequence[str]) -> np.ndarray:
        x = self._vectorizer.transform(list(texts))  # sparse [n, n_features]
        z = x @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: str) -> None:
        """Writes `path`.npz and `path`.json (byte-identical for the same model); `path` may be a URL."""
        nz = np.flatnonzero(self.coef)
        buf = io.BytesIO()  # zipfile seeks back while writing, which object-store files cannot
        np.savez(buf, index=nz.astype(np.int64), value=self.coef[nz])  # sparse: most hashed features never occur
        with dio.open_output(path + ".npz") as f:
            f.write(buf.getvalue())
        meta = {"format": FORMAT, "version": 1, "intercept": self.intercept,
                "vectorizer": dataclasses.asdict(self.vec), "metrics": self.metrics}
        dio.write_text(path + ".json", json.dumps(meta, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str) -> "QualityModel":
        for suffix in (".json", ".npz"):  # accept either file's name for the prefix
            if path.endswith(suffix):
                path = path[: -len(suffix)]
        for suffix in (".json", ".npz"):
            if not os.path.exists(path + suffix):
                raise FileNotFoundError(f"quality model: {path + suffix} is missing (train one with "
                                        f"`danlu quality train`)")
        with open(path + ".json") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}.json is not a {FORMAT} file")
        vec = VectorizerConfig(**meta["vectorizer"])
        with np.load(path + ".npz") as z:
            coef = np.zeros(vec.n_features, dtype=np.float64)
            coef[z["index"]] = z["value"]
        return cls(coef, meta["intercept"], vec, meta.get("metrics"))


def _texts(inputs: Sequence[str], limit: int | None, flags: R.InputFlags,
           errors: list) -> tuple[list[str], list[str]]:
    """Texts and ids of the first `limit` documents; records that cannot be read go to `errors`."""
    texts, ids = [], []
    for _, doc in R.read_documents(flags.plan(inputs), errors):
        texts.append(doc["text"])
        ids.append(doc["id"])
        if limit is not None and len(texts) >= limit:
            break
    return texts, ids


def _is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64 < fraction


def train(positive: Sequence[str], negative: Sequence[str], *, vec: VectorizerConfig = VectorizerConfig(),
          c: float = 1.0, heldout: float = 0.1, seed: int = 0, max_docs: int | None = None,
          max_iter: int = 1000, flags: R.InputFlags = R.InputFlags()) -> QualityModel:
    """Fits the classifier on positive (label 1) vs negative (label 0) documents (read with `flags`).

    The held-out share (by hash of id) gives `metrics["heldout_accuracy"]`; the model is then
    the one fitted on the training part. lbfgs on a fixed input order: deterministic. Records
    that cannot be read are skipped and counted in `metrics["errors"]`.
    """
    from sklearn.linear_model import LogisticRegression

    pos_errors: list[dict] = []
    neg_errors: list[dict] = []
    pos, pos_ids = _texts(positive, max_docs, flags, pos_errors)
    neg, neg_ids = _texts(negative, max_docs, flags, neg_errors)
    if not pos or not neg:
        raise ValueError(f"need documents on both sides: {len(pos)} positive, {len(neg)} negative")
    texts = pos + neg
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    held = np.array([_is_heldout(i, heldout, seed) for i in pos_ids + neg_ids])
    if held.all():
        held[:] = False
    x = vec.build().transform(texts)
    clf = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
    clf.fit(x[~held], y[~held])
    metrics = {"positive": len(pos), "negative": len(neg), "train": int((~held).sum()), "heldout": int(held.sum()),
               "errors": {"positive": len(pos_errors), "negative": len(neg_errors)},
               "train_accuracy": float(clf.score(x[~held], y[~held]))}
    if held.any():
        metrics["heldout_accuracy"] = float(clf.score(x[held], y[held]))
    return QualityModel(clf.coef_[0], float(clf.intercept_[0]), vec, metrics)


def doc_uniform_rng(seed: int, doc_id: str) -> np.random.Generator:
    """A generator seeded by (seed, id) alone: same draw for a document whatever else runs."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def pareto_keep(score: float, seed: int, doc_id: str, alpha: float = 9.0) -> bool:
    """GPT-3's rule: keep iff pareto(alpha) > 1 - score, with a per-document seeded draw."""
    return bool(doc_uniform_rng(seed, doc_id).pareto(alpha) > 1.0 - score)


@register
@dataclasses.dataclass(frozen=True)
class QualityFilter(Step):
    """Scores documents with a saved `QualityModel`; keeps by GPT-3's Pareto rule or a threshold."""

    name: ClassVar[str] = "quality"
    model: str = ""
    rule: str = "pareto"
    alpha: float = 9.0
    threshold: float = 0.5
    seed: int = 0
    field: str = "quality_score"

    def check(self) -> None:
        require(bool(self.model), "model: give the path of a model saved by `danlu quality train`")
        require(self.rule in ("pareto", "threshold"), f"rule must be 'pareto' or 'threshold', got {self.rule!r}")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}")
        if not (os.path.exists(self.model + ".json") or os.path.exists(self.model)):
            raise StepError(f"model: {self.model}.json does not exist")

    def loaded(self) -> QualityModel:
        m = self.__dict__.get("_model")
        if m is None:
            m = QualityModel.load(self.model)
            object.__setattr__(self, "_model", m)
        return m

    def decide(self, doc: dict, score: float) -> dict | Drop:
        doc = {**doc, self.field: round(float(score), 6)}
        if self.rule == "threshold":
            keep = score >= self.threshold
        else:
            keep = pareto_keep(score, self.seed, doc["id"], self.alpha)
        return doc if keep else self.drop("low_score")

    def apply(self, doc: dict) -> dict | Drop:
        return self.decide(doc, float(self.loaded().score([doc["text"]])[0]))

    def __call__(self, docs: Iterable[dict]):
        """Batched: one sparse matrix product per 256 documents."""
        batch: list[dict] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == 256:
                yield from self._batch(batch)
                batch = []
        yield from self._batch(batch)

    def _batch(self, docs: list[dict]):
        if docs:
            for doc, s in zip(docs, self.loaded().score([d["text"] for d in docs])):
                yield self.decide(doc, float(s))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_model", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


def errors_path(output: str) -> str:
    """Where `score` writes the records it could not read: "dir/x.jsonl.gz" -> "dir/x.errors.jsonl"."""
    stem = output
    for suffix in sorted(dio.JSONL_SUFFIXES, key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + ".errors.jsonl"


def score_files(model: QualityModel, inputs: Sequence[str], output: str, *, batch_size: int = 1024,
                flags: R.InputFlags = R.InputFlags()) -> dict:
    """Writes the documents of `inputs` with `quality_score` to `output` (a JSONL path or URL), and
    the records that could not be read to `errors_path(output)`; returns the counts:
    documents_in (every record read) = documents_out + sum(dropped) + errors."""
    shards = flags.plan(inputs)
    errors: list[dict] = []
    dropped: Counter = Counter()
    with dio.JsonlWriter(output) as w:
        batch: list[dict] = []
        for _, doc in R.read_documents(shards, errors, dropped):
            batch.append(doc)
            if len(batch) == batch_size:
                _write_scored(w, model, batch)
                batch = []
        _write_scored(w, model, batch)
        written = w.count
    dio.write_jsonl(errors_path(output), errors)
    return {"documents_in": written + sum(dropped.values()) + len(errors), "documents_out": written,
            "dropped": dict(sorted(dropped.items())), "errors": len(errors),
            "error_kinds": dict(sorted(Counter(e["kind"] for e in errors).items())), "errors_path": errors_path(output)}


def _write_scored(w: dio.JsonlWriter, model: QualityModel, docs: list[dict]) -> None:
    if docs:
        for doc, sc in zip(docs, model.score([d["text"] for d in docs])):
            w.write({**doc, "quality_score": round(float(sc), 6)})


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train on reference (positive) vs crawl (negative) documents")
    t.add_argument("--positive", nargs="+", required=True, help="reference corpus: files/dirs/globs/URLs")
    t.add_argument("--negative", nargs="+", required=True, help="raw crawl: files/dirs/globs/URLs")
    t.add_argument("--output", required=True, help="model path prefix (or URL); writes PREFIX.npz and PREFIX.json")
    t.add_argument("--heldout", type=float, default=0.1, help="held-out share by hash of id (default 0.1)")
    t.add_argument("--max-docs", type=int, default=None, help="at most this many documents per side")
    t.add_argument("--features", type=int, default=1 << 20, help="hashed features (default 2^20)")
    t.add_argument("--ngram", type=int, default=2, help="word n-grams 1..N (default 2)")
    t.add_argument("--c", type=float, default=1.0, help="inverse regularisation strength (default 1)")
    t.add_argument("--seed", type=int, default=0)
    R.add_input_arguments(t)
    s = sub.add_parser("score", help="score documents; writes them with quality_score")
    s.add_argument("--model", required=True)
    s.add_argument("--input", nargs="+", required=True, help="documents: files/dirs/globs/URLs (JSONL, Parquet, WET)")
    s.add_argument("--output", required=True,
                   help="JSONL file or URL; records that cannot be read go to OUTPUT's name + .errors.jsonl")
    R.add_input_arguments(s)


def main(args: argparse.Namespace) -> int:
    """Runs `danlu quality train|score`; returns the exit code (2: bad flags or inputs, before any work)."""
    flags = R.InputFlags.from_args(args)
    try:
        for inputs in ((args.positive, args.negative) if args.action == "train" else (args.input,)):
            flags.plan(inputs)
        model = QualityModel.load(args.model) if args.action == "score" else None
    except (FileNotFoundError, ValueError) as e:
        print(f"danlu quality {args.action}: error: {e}", file=sys.stderr)
        return 2
    if args.action == "train":
        model = train(args.positive, args.negative, vec=VectorizerConfig(args.features, args.ngram),
                      c=args.c, heldout=args.heldout, seed=args.seed, max_docs=args.max_docs, flags=flags)
        model.save(args.output)
        print(json.dumps(model.metrics))
        print(f"wrote {args.output}.npz, {args.output}.json")
        return 0
    counts = score_files(model, args.input, args.output, flags=flags)
    print(f"{counts['documents_in']} records in, {counts['documents_out']} scored, "
          f"{sum(counts['dropped'].values())} dropped, {counts['errors']} errors -> {counts['errors_path']}")
    print(f"wrote {args.output}")
    return 0
