"""Documents/s per core of danlu's web cleaning chain vs datatrove's, on the same real JSONL input.

The chain (extraction excluded): Gopher quality -> Gopher repetition -> C4 -> FineWeb, as
danlu steps (data_pipeline/filters) and as datatrove filters (GopherQualityFilter,
GopherRepetitionFilter, C4QualityFilter, FineWebQualityFilter, default parameters), one
process each, timed in CPU seconds of this process (so other jobs on a shared machine
change the figures less). Also reported: danlu's chain with language id in front
(py3langid, en, min_score 0.65), and the share of documents on which the two chains' keep/drop
decisions agree (and, for kept documents, the text C4 leaves).

datatrove's LanguageFilter needs fastText and downloads its lid.176 model at run time; nothing
may be downloaded here, so datatrove runs without language id. Two comparisons are printed:
like for like (both without language id) and danlu with language id vs datatrove without.

Input: bench/clean_corpus.py builds a corpus from documentation on this machine (HTML pages
extracted with resiliparse, plain-text docs, man pages, pydoc); nothing synthetic.

    .venv/bin/python bench/clean_throughput.py                 # 2000 documents, a few minutes
    .venv/bin/python bench/clean_throughput.py --max-docs 300  # quick

Last line: one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from danlu.base import fs as dio  # noqa: E402
from data_pipeline.filters.c4 import C4  # noqa: E402
from data_pipeline.filters.fineweb import FineWeb  # noqa: E402
from data_pipeline.filters.gopher import GopherQuality, GopherRepetition  # noqa: E402
from data_pipeline.filters.language import Language  # noqa: E402
from data_pipeline import readers as R  # noqa: E402
from data_pipeline.loop import ShardStats, process_records  # noqa: E402

DEFAULT_CORPUS = os.path.join(os.environ.get("TMPDIR", "/tmp"), "danlu_clean_corpus.jsonl")


def run_ours(docs: list[dict], with_language: bool) -> tuple[list, float]:
    """[(kept, reason, text)] per document and the CPU seconds it took."""
    steps = [GopherQuality(), GopherRepetition(), C4(), FineWeb()]
    if with_language:
        steps.insert(0, Language(languages=("en",), min_score=0.65))
    # The loop both runners use (counting included), over the documents as one in-memory shard.
    shard = R.Shard(0, "memory", "", (("<bench corpus>", ""),), R.CommonOptions())
    stats = ShardStats(shard, [s.name for s in steps])
    out = []
    t0 = time.process_time()
    for kind, d in process_records(docs, steps, shard, stats):
        out.append((True, None, d["text"]) if kind == "doc" else (False, d.get("drop_reason") or d["reason"], None))
    return out, time.process_time() - t0


def run_datatrove(docs: list[dict]) -> tuple[list, float]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)

    filters = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter(), FineWebQualityFilter()]
    out = []
    t0 = time.process_time()
    for d in docs:
        doc = Document(text=d["text"], id=d["id"])
        verdict = (True, None, None)
        for f in filters:
            try:
                r = f.filter(doc)
            except ZeroDivisionError:  # e.g. FineWeb on a text with no words left
                r = (False, "ZeroDivisionError")
            if r is not True and not (isinstance(r, tuple) and r[0]):
                verdict = (False, f"{f.name}:{r[1] if isinstance(r, tuple) else ''}", None)
                break
        else:
            verdict = (True, None, doc.text)
        out.append(verdict)
    return out, time.process_time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="JSONL input (built when missing)")
    ap.add_argument("--max-docs", type=int, default=2000)
    a = ap.parse_args()

    if not os.path.exists(a.corpus):
        from bench.clean_corpus import build_corpus

        print(f"building the corpus at {a.corpus} ...", file=sys.stderr)
        print(json.dumps(build_corpus(a.corpus)), file=sys.stderr)
    docs = list(dio.read_jsonl(a.corpus))[: a.max_docs]
    n = len(docs)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{n} documents, {chars / 1e6:.1f} M characters", file=sys.stderr)

    warnings.filterwarnings("ignore")
    theirs, t_theirs = run_datatrove(docs)
    print(f"datatrove: {t_theirs:.1f} CPU s", file=sys.stderr)
    ours, t_ours = run_ours(docs, with_language=False)
    print(f"danlu: {t_ours:.1f} CPU s", file=sys.stderr)
    ours_lid, t_ours_lid = run_ours(docs, with_language=True)
    print(f"danlu + language id: {t_ours_lid:.1f} CPU s", file=sys.stderr)

    same_decision = sum(o[0] == t[0] for o, t in zip(ours, theirs))
    same_output = sum(o[0] == t[0] and (not o[0] or o[2] == t[2]) for o, t in zip(ours, theirs))
    disagreements = [(d["id"], o[1] or "keep", t[1] or "keep")
                     for d, o, t in zip(docs, ours, theirs) if o[0] != t[0]]
    for row in disagreements[:20]:
        print("disagree:", *row, file=sys.stderr)

    sources: dict[str, int] = {}
    for d in docs:
        sources[d["source"]] = sources.get(d["source"], 0) + 1
    result = {
        "bench": "clean_throughput",
        "documents": n,
        "characters": chars,
        "sources": sources,
        "chain": "gopher_quality > gopher_repetition > c4 > fineweb (defaults)",
        "datatrove_docs_per_s_per_core": round(n / t_theirs, 1),
        "danlu_docs_per_s_per_core": round(n / t_ours, 1),
        "speedup": round(t_theirs / t_ours, 2),
        "danlu_with_language_id_docs_per_s_per_core": round(n / t_ours_lid, 1),
        "speedup_danlu_with_language_id_vs_datatrove_without": round(t_theirs / t_ours_lid, 2),
        "datatrove_language_filter": "not run: needs fasttext and downloads the lid.176 model",
        "agreement_keep_drop": round(same_decision / n, 4),
        "agreement_keep_drop_and_text": round(same_output / n, 4),
        "kept_danlu": sum(o[0] for o in ours),
        "kept_datatrove": sum(t[0] for t in theirs),
        "kept_danlu_with_language_id": sum(o[0] for o in ours_lid),
        "cpu_seconds": {"datatrove": round(t_theirs, 2), "danlu": round(t_ours, 2),
                        "danlu_with_language_id": round(t_ours_lid, 2)},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
