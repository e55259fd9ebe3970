"""The cleaning job as an Apache Beam graph: `danlu clean CONFIG --runner beam`.

    shards ─► read (FlatMap) ─► per-document steps (FlatMap, `steps.run_steps`) ─► corpus stages ─► write
                                                                                  │
            exact / url:  key by hash ─► GroupByKey ─► keep one                    │
            lines:        (line hash, doc) ─► GroupByKey ─► repeated lines ─► CoGroupByKey with docs
            minhash:      signature ─► band keys ─► GroupByKey ─► candidate edges (star, or verified)
                          ─► connected components: large-star / small-star rounds (Kiveris et al. 2014)
                          ─► CombinePerKey(best of cluster) ─► CoGroupByKey with docs ─► keep / drop
            step stages:  Map

Every element is ``(order, doc)`` where ``order = shard index * 2^32 + position in the shard``:
the same order the local runner sees the documents in, so "first", "longest" and "score" pick
the same documents and both runners keep the same set (tests/test_beam.py).

Connected components never gather the edges on one worker: each round is a GroupByKey by node,
and `cc_rounds` rounds (default 12) contract every component to a star around its smallest
node. Whether that happened is checked inside the graph; if not (a component needing more
rounds; counter ``minhash:cc_unconverged``), the remaining, already contracted edges are
finished on one worker and the counter says so: raise `cc_rounds`.

Counters (Beam metrics, namespace ``danlu``): ``in|<source>``, ``out|<source>``,
``dropped|<source>|<reason>`` for every drop reason, ``errors|<source>``, bytes alike; the
report.json of the job is made from them after the run.

Runners (`beam.options` in the job YAML, or ``--beam-option`` flags after ``--runner beam``;
the job's inputs and output must be reachable from the workers, e.g. gs:// paths):

    DirectRunner (default):  --direct_num_workers=4 --direct_running_mode=multi_processing
    DataflowRunner:          --runner=DataflowRunner --project=P --region=us-central1
                             --temp_location=gs://B/tmp --staging_location=gs://B/staging
                             --setup_file=./setup.py (or --sdk_container_image=...)
                             --max_num_workers=100 --experiments=use_runner_v2
    FlinkRunner:             --runner=FlinkRunner --flink_master=HOST:8081 --environment_type=DOCKER
                             --parallelism=64
    SparkRunner:             --runner=SparkRunner --spark_master_url=spark://HOST:7077
                             --environment_type=DOCKER   (or PortableRunner with a job server)
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline.dedup import exact, lsh
from data_pipeline.dedup.minhash import MinHasher, band_keys, shingles, string_hash64
from data_pipeline.dedup.stages import (CorpusStage, ExactStage, LinesStage, MinHashStage, StepStage, UrlStage,
                                        build_stages)
from data_pipeline.steps import Drop, Step

NS = "danlu"
ORDER_SHIFT = 32


def _beam():
    import apache_beam as beam

    return beam


def _count(name: str, n: int = 1) -> None:
    from apache_beam.metrics import Metrics

    if n:
        Metrics.counter(NS, name).inc(n)


def _doc_bytes(doc: dict) -> int:
    n = len(doc["text"].encode("utf-8", "surrogatepass"))
    html = doc.get("html")
    return n + (len(html.encode("utf-8", "surrogatepass")) if isinstance(html, str) else 0)


def _src(doc: dict) -> str:
    return str(doc.get("source", ""))


def count_drop(doc: dict, reason: str) -> None:
    """The counters of one dropped document (every drop reason has its own counter)."""
    s = _src(doc)
    _count(f"dropped|{s}|{reason}")
    _count(f"bytes_dropped|{s}|{reason}", _doc_bytes(doc))
    _count(f"out|{s}", -1)
    _count(f"bytes_out|{s}", -_doc_bytes(doc))


# --------------------------------------------------------------------------- read + steps

def read_shard(shard, max_doc_bytes: int | None = None) -> Iterator:
    """(order, doc) of one shard; ReadErrors go to the "errors" output, Skipped are counted drops."""
    from collections import Counter

    from apache_beam import pvalue

    from data_pipeline import readers as R

    counters: Counter = Counter()
    limit = shard.options.max_doc_bytes if max_doc_bytes is None else max_doc_bytes
    pos = 0
    source = shard.source
    try:
        records = list(R.read_shard(shard, counters))
    except Exception as e:  # noqa: BLE001 - as the local runner: the shard becomes one error
        records = [R.ReadError(shard.name, "unreadable", f"reader failed: {type(e).__name__}: {e}")]
    for rec in records:
        if isinstance(rec, R.ReadError):
            _count(f"in|{source}")
            _count(f"bytes_in|{source}", rec.nbytes)
            _count(f"errors|{source}")
            _count(f"bytes_errors|{source}", rec.nbytes)
            _count(f"error_kind|{rec.kind}")
            yield pvalue.TaggedOutput("errors", {"file": rec.file, **rec.location, "kind": rec.kind,
                                                 "reason": rec.reason, "source": source, "shard": shard.index,
                                                 "raw": rec.raw})
            continue
        if isinstance(rec, R.Skipped):
            _count(f"in|{source}")
            _count(f"bytes_in|{source}", rec.nbytes)
            _count(f"dropped|{source}|{rec.reason}")
            _count(f"bytes_dropped|{source}|{rec.reason}", rec.nbytes)
            continue
        n = _doc_bytes(rec)
        _count(f"in|{source}")
        _count(f"bytes_in|{source}", n)
        if n > limit:
            _count(f"errors|{source}")
            _count(f"bytes_errors|{source}", n)
            _count("error_kind|too_large")
            yield pvalue.TaggedOutput("errors", {"file": shard.name, "id": rec["id"], "kind": "too_large",
                                                 "reason": f"document {rec['id']} of {n} bytes exceeds "
                                                           f"max_doc_bytes={limit}", "source": source,
                                                 "shard": shard.index, "raw": rec["text"][:100]})
            continue
        yield ((shard.index << ORDER_SHIFT) + pos, rec)
        pos += 1
    for k, v in counters.items():
        _count(f"reader|{k}", v)


def apply_steps(item: tuple[int, dict], steps: Sequence[Step]) -> Iterator:
    """Per-document steps on one (order, doc), as the local runner applies them."""
    from apache_beam import pvalue

    order, doc = item
    source = _src(doc)
    n_in = _doc_bytes(doc)
    result: dict | Drop = doc
    for k, step in enumerate(steps):
        _count(f"step_in|{k}")
        before = result["text"]
        try:
            out = step.apply(result)
        except Exception as ex:  # noqa: BLE001 - one bad document must not end the job
            _count(f"errors|{source}")
            _count(f"bytes_errors|{source}", n_in)
            _count("error_kind|step_failed")
            yield pvalue.TaggedOutput("errors", {"file": "", "id": doc["id"], "kind": "step_failed",
                                                 "reason": f"{step.name}: {type(ex).__name__}: {ex}",
                                                 "source": source, "raw": before[:100]})
            return
        if isinstance(out, Drop):
            _count(f"step_dropped|{k}")
            _count(f"dropped|{source}|{out.reason}")
            _count(f"bytes_dropped|{source}|{out.reason}", n_in)
            return
        if out.get("text") is not before and out.get("text") != before:
            _count(f"step_changed|{k}")
        result = out
    n_out = _doc_bytes(result)
    _count(f"out|{source}")
    _count(f"bytes_out|{source}", n_out)
    _count(f"bytes_edited|{source}", n_in - n_out)
    yield order, result


# --------------------------------------------------------------------------- stages

def _exact_stage(docs, stage: ExactStage, label: str):
    beam = _beam()

    def key(item):
        order, doc = item
        t = doc["text"]
        return exact.hash64(exact.normalize_text(t) if stage.normalize else t), item

    def pick(kv):
        items = sorted(kv[1], key=lambda it: it[0])
        for order, doc in items[1:]:
            count_drop(doc, "exact:duplicate")
        yield items[0]

    return docs | f"{label} key" >> beam.Map(key) | f"{label} group" >> beam.GroupByKey() \
        | f"{label} keep" >> beam.FlatMap(pick)


def _url_stage(docs, stage: UrlStage, label: str):
    beam = _beam()

    def key(item):
        url = item[1].get(stage.url_field)
        if isinstance(url, str) and url.strip():
            yield exact.hash64(exact.normalize_url(url)), item
        else:
            yield None, item  # no URL: passes (a key of its own below)

    def pick(kv):
        k, items = kv
        items = sorted(items, key=lambda it: it[0])
        if k is None:
            yield from items
            return
        dates = [exact.parse_date(doc.get(stage.date_field)) for _, doc in items]
        best = max(range(len(items)), key=lambda i: (-np.inf if np.isnan(dates[i]) else dates[i], -items[i][0]))
        for i, (order, doc) in enumerate(items):
            if i == best:
                yield order, doc
            else:
                count_drop(doc, "url:duplicate")

    with_url = docs | f"{label} key" >> beam.FlatMap(key)
    keyed = with_url | f"{label} has url" >> beam.Filter(lambda kv: kv[0] is not None)
    no_url = with_url | f"{label} no url" >> beam.Filter(lambda kv: kv[0] is None) \
        | f"{label} pass" >> beam.Map(lambda kv: kv[1])
    kept = keyed | f"{label} group" >> beam.GroupByKey() | f"{label} keep" >> beam.FlatMap(pick)
    return (kept, no_url) | f"{label} merge" >> beam.Flatten()


def _lines_stage(docs, stage: LinesStage, label: str):
    beam = _beam()

    def units(item):
        order, doc = item
        for u in exact.split_units(doc["text"], stage.unit):
            k = exact.unit_key(u, stage.min_chars)
            if k is not None:
                yield k, order

    def repeated(kv):
        k, orders = kv
        orders = list(orders)
        if len(orders) > stage.max_count:
            for o in sorted(set(orders)):
                yield o, k

    def apply(kv):
        order, groups = kv
        docs_ = list(groups["doc"])
        if not docs_:
            return
        doc = docs_[0]
        bad = np.unique(np.asarray(list(groups["bad"]), dtype=np.uint64))
        if bad.size == 0:
            yield order, doc
            return
        text, removed = exact.remove_lines(doc["text"], bad, unit=stage.unit, min_chars=stage.min_chars)
        if not any(c.isalnum() for c in text):
            count_drop(doc, "lines:empty")
            return
        new = {**doc, "text": text}
        cut = _doc_bytes(doc) - _doc_bytes(new)
        _count(f"bytes_out|{_src(doc)}", -cut)
        _count(f"bytes_edited|{_src(doc)}", cut)
        yield order, new

    bad = docs | f"{label} units" >> beam.FlatMap(units) | f"{label} group lines" >> beam.GroupByKey() \
        | f"{label} repeated" >> beam.FlatMap(repeated)
    return {"doc": docs, "bad": bad} | f"{label} join" >> beam.CoGroupByKey() | f"{label} cut" >> beam.FlatMap(apply)


class _BandKeys:
    """(order, doc) → (band key, (order, shingle set or None)) for each band."""

    def __init__(self, stage: MinHashStage):
        self.stage = stage
        self.cfg = stage.config()
        self.bands, self.rows = self.cfg.band_rows()
        self._hasher = None

    def __call__(self, item):
        order, doc = item
        if self._hasher is None:
            self._hasher = MinHasher(self.cfg.num_perm, self.cfg.seed)
        sh = shingles(doc["text"], self.cfg.ngram)
        if sh.size == 0:
            return
        sig = self._hasher.signatures([sh])
        salt = string_hash64([_src(doc)]) if self.cfg.scope == "source" else None
        keys = band_keys(sig, self.bands, self.rows, salt)[0]
        payload = (order, np.unique(sh) if self.cfg.verify else None)
        for k in keys.tolist():
            yield k, payload


def _bucket_edges(kv, threshold: float, verify: bool):
    """Edges of one bucket: star edges to its first member, or the verified spanning forest."""
    members = sorted(kv[1], key=lambda m: m[0])
    if len(members) < 2:
        return
    if not verify:
        first = members[0][0]
        for order, _ in members[1:]:
            yield first, order
        return
    sets = {order: s for order, s in members}
    u, v, _ = lsh.verified_edges([np.asarray([m[0] for m in members], dtype=np.int64)], sets.__getitem__, threshold)
    yield from zip(u.tolist(), v.tolist())


def _large_star(kv):
    u, nbrs = kv
    nbrs = set(nbrs)
    m = min(min(nbrs), u)
    for v in nbrs:
        if v > u:
            yield v, m


def _small_star(kv):
    u, nbrs = kv
    nodes = set(nbrs) | {u}
    m = min(nodes)
    for v in nodes:
        if v != m:
            yield v, m


def connected_components(edges, rounds: int, label: str):
    """(node, smallest node of its component) for every node on an edge; edges: PCollection of (u, v).

    `rounds` rounds of large-star then small-star, each a GroupByKey by node (no single worker
    sees more than one node's neighbours); then a check that every component is a star around
    its minimum, with a single-worker finish of the contracted edges only if it is not.
    """
    beam = _beam()
    e = edges | f"{label} orient" >> beam.Map(lambda uv: (max(uv), min(uv)))
    for r in range(rounds):
        e = (e | f"{label} L{r} both" >> beam.FlatMap(lambda uv: [(uv[0], uv[1]), (uv[1], uv[0])])
             | f"{label} L{r} group" >> beam.GroupByKey() | f"{label} L{r} star" >> beam.FlatMap(_large_star))
        e = (e | f"{label} S{r} orient" >> beam.Map(lambda uv: (max(uv), min(uv)))
             | f"{label} S{r} group" >> beam.GroupByKey() | f"{label} S{r} star" >> beam.FlatMap(_small_star))
    # Converged iff every node has one parent and no parent has a parent.
    parents = e | f"{label} parents" >> beam.GroupByKey() | f"{label} parent set" >> beam.Map(lambda kv: (kv[0], sorted(set(kv[1]))))
    as_parent = e | f"{label} as parent" >> beam.Map(lambda uv: (uv[1], None))

    def check(kv):
        node, g = kv
        ps = list(g["parents"])
        bad = (ps and len(ps[0]) > 1) or (ps and list(g["is_parent"]))
        if bad:
            _count("minhash:cc_unconverged")
        return 1 if bad else 0

    unconverged = ({"parents": parents, "is_parent": as_parent} | f"{label} check" >> beam.CoGroupByKey()
                   | f"{label} bad" >> beam.Map(check) | f"{label} count bad" >> beam.CombineGlobally(sum))
    side = beam.pvalue.AsSingleton(unconverged)
    fast = parents | f"{label} labels" >> beam.FlatMap(lambda kv, bad: [(kv[0], kv[1][0])] if bad == 0 else [], side)

    def finish(edges_list):  # only reached with edges when the rounds did not converge
        if not edges_list:
            return []
        u = np.array([a for a, _ in edges_list], dtype=np.int64)
        v = np.array([b for _, b in edges_list], dtype=np.int64)
        nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
        comps = lsh.Components(nodes.size)
        comps.add_edges(inv[:u.size], inv[u.size:])
        lab = comps.labels()
        return [(int(nodes[i]), int(nodes[lab[i]])) for i in range(nodes.size) if lab[i] != i]

    slow = (e | f"{label} residual" >> beam.FlatMap(lambda uv, bad: [uv] if bad else [], side)
            | f"{label} gather residual" >> beam.combiners.ToList() | f"{label} finish" >> beam.FlatMap(finish))
    return (fast, slow) | f"{label} merge labels" >> beam.Flatten()


def _minhash_stage(docs, stage: MinHashStage, label: str, rounds: int):
    beam = _beam()
    cfg = stage.config()
    cfg.band_rows()  # computed here once, not per worker
    edges = (docs | f"{label} band keys" >> beam.FlatMap(_BandKeys(stage))
             | f"{label} buckets" >> beam.GroupByKey()
             | f"{label} edges" >> beam.FlatMap(_bucket_edges, cfg.threshold, cfg.verify))
    labels = connected_components(edges, rounds, label)  # (node, cluster label), nodes in clusters only

    def metric(item):
        order, doc = item
        if cfg.keep == "longest":
            return order, float(len(doc["text"]))
        if cfg.keep == "score":
            s = doc.get(cfg.score_field)
            return order, float(s) if isinstance(s, (int, float)) and not np.isnan(s) else -np.inf
        return order, 0.0

    def to_cluster(kv):
        node, g = kv
        labs = list(g["label"])
        lab = labs[0] if labs else node
        for m in g["metric"]:
            yield lab, (m, node)

    member = ({"label": labels, "metric": docs | f"{label} metric" >> beam.Map(metric)}
              | f"{label} join labels" >> beam.CoGroupByKey() | f"{label} by cluster" >> beam.FlatMap(to_cluster))
    # The best of each cluster: largest metric, ties to the smallest order (as lsh.choose_kept).
    winners = (member | f"{label} best" >> beam.combiners.Top.PerKey(1, key=lambda mv: (mv[0], -mv[1]))
               | f"{label} winner" >> beam.Map(lambda kv: (kv[0], kv[1][0][1])))
    kept_for = ({"members": member | f"{label} member" >> beam.Map(lambda kv: (kv[0], kv[1][1])),
                 "winner": winners}
                | f"{label} join winners" >> beam.CoGroupByKey()
                | f"{label} kept for" >> beam.FlatMap(lambda kv: [(n, list(kv[1]["winner"])[0])
                                                                  for n in kv[1]["members"]]))

    def decide(kv):
        order, g = kv
        for doc in g["doc"]:
            k = list(g["kept"])
            if k and k[0] != order:
                count_drop(doc, "minhash:near_duplicate")
            else:
                yield order, doc

    return ({"doc": docs, "kept": kept_for} | f"{label} join docs" >> beam.CoGroupByKey()
            | f"{label} decide" >> beam.FlatMap(decide))


def _step_stage(docs, stage: StepStage, label: str):
    beam = _beam()
    step = stage.step

    def apply(item):
        order, doc = item
        out = step.apply(doc)
        if isinstance(out, Drop):
            count_drop(doc, out.reason)
            return
        if out.get("text") != doc["text"]:
            cut = _doc_bytes(doc) - _doc_bytes(out)
            _count(f"bytes_out|{_src(doc)}", -cut)
            _count(f"bytes_edited|{_src(doc)}", cut)
        yield order, out

    return docs | f"{label}" >> beam.FlatMap(apply)


def apply_stages(docs, stages: Sequence[CorpusStage], cc_rounds: int = 12):
    """The corpus stages on a PCollection of (order, doc); returns the kept (order, doc)."""
    for k, stage in enumerate(stages):
        label = f"stage{k} {getattr(stage, 'name', '') or stage.step.name}"
        if isinstance(stage, ExactStage):
            docs = _exact_stage(docs, stage, label)
        elif isinstance(stage, UrlStage):
            docs = _url_stage(docs, stage, label)
        elif isinstance(stage, LinesStage):
            docs = _lines_stage(docs, stage, label)
        elif isinstance(stage, MinHashStage):
            docs = _minhash_stage(docs, stage, label, cc_rounds)
        elif isinstance(stage, StepStage):
            docs = _step_stage(docs, stage, label)
        else:
            raise TypeError(f"no Beam form for stage {stage!r}")
    return docs


# --------------------------------------------------------------------------- whole jobs

def counters_of(result) -> dict[str, int]:
    """{counter name: committed (or attempted) value} of the danlu namespace."""
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NS))["counters"]:
        v = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(v)
    return out


def report_from_counters(name: str, step_names: list[str], counters: dict[str, int]) -> dict:
    """A report in report.merge's shape from the Beam counters."""
    from data_pipeline.report import balanced

    def empty():
        return {"documents_in": 0, "documents_out": 0, "dropped": {}, "errors": 0, "bytes_in": 0, "bytes_out": 0,
                "bytes_dropped": {}, "bytes_errors": 0, "bytes_edited": 0}

    per_source: dict[str, dict] = {}
    error_kinds, reader = {}, {}
    steps = [{"step": n, "documents_in": 0, "dropped": 0, "changed": 0} for n in step_names]
    simple = {"in": "documents_in", "out": "documents_out", "errors": "errors", "bytes_in": "bytes_in",
              "bytes_out": "bytes_out", "bytes_errors": "bytes_errors", "bytes_edited": "bytes_edited"}
    for key, v in sorted(counters.items()):
        kind, _, rest = key.partition("|")
        if kind in simple:
            per_source.setdefault(rest, empty())[simple[kind]] += v
        elif kind in ("dropped", "bytes_dropped"):
            src, _, reason = rest.partition("|")
            d = per_source.setdefault(src, empty())[kind]
            d[reason] = d.get(reason, 0) + v
        elif kind == "error_kind":
            error_kinds[rest] = v
        elif kind == "reader":
            reader[rest] = v
        elif kind in ("step_in", "step_dropped", "step_changed"):
            steps[int(rest)][{"step_in": "documents_in", "step_dropped": "dropped", "step_changed": "changed"}[kind]] = v
    total = empty()
    for c in per_source.values():
        for k, v in c.items():
            if isinstance(v, dict):
                for r, n in v.items():
                    total[k][r] = total[k].get(r, 0) + n
            else:
                total[k] += v
    for c in [total, *per_source.values()]:
        c["dropped"] = dict(sorted(c["dropped"].items(), key=lambda kv: (-kv[1], kv[0])))
        c["bytes_dropped"] = dict(sorted(c["bytes_dropped"].items()))
    for st in steps:
        st["reasons"] = {r: n for r, n in total["dropped"].items() if r.startswith(st["step"] + ":")}
    rep = {"name": name, **total, "error_kinds": error_kinds, "per_source": dict(sorted(per_source.items())),
           "steps": steps, "reader_counters": reader,
           "accounted": balanced(total) and all(balanced(c) for c in per_source.values()),
           "shards": 0, "files": [], "rejected_files": [], "examples": {}}
    return rep


def pipeline_options(args: Sequence[str] = ()):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(list(args) or ["--runner=DirectRunner"])


def run_job_beam(job: Any, beam_args: Sequence[str] = (), cc_rounds: int | None = None) -> dict:
    """Runs a planned cleaning job (data_pipeline.clean.Job) on Beam; writes documents/,
    errors.jsonl and the report into the job's output directory; returns the report."""
    beam = _beam()
    from data_pipeline import report as report_mod
    from data_pipeline.io import dumps_line

    cfg = job.config
    out = job.output_dir
    stages = build_stages(getattr(cfg, "stages", ()) or ())
    if cc_rounds is None:
        cc_rounds = int(dict(getattr(cfg, "stage_options", ()) or ()).get("cc_rounds", 12))
    t0 = time.time()
    remote = "://" in out and not out.startswith("file://")  # gs://, s3://: Beam's FileSystems write it
    if not remote:
        os.makedirs(out, exist_ok=True)
    suffix = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}[cfg.output.compression]  # AUTO by suffix
    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        read = (p | "shards" >> beam.Create(list(job.shards)) | "spread" >> beam.Reshuffle()
                | "read" >> beam.FlatMap(read_shard).with_outputs("errors", main="docs"))
        mapped = read.docs | "steps" >> beam.FlatMap(apply_steps, list(job.steps)).with_outputs("errors", main="docs")
        kept = apply_stages(mapped.docs, stages, cc_rounds)
        (kept | "to json" >> beam.Map(lambda it: dumps_line(it[1]).rstrip("\n"))
         | "write" >> beam.io.WriteToText(os.path.join(out, "documents", "part"), file_name_suffix=suffix))
        ((read.errors, mapped.errors) | "errors" >> beam.Flatten()
         | "errors json" >> beam.Map(lambda e: dumps_line(e).rstrip("\n"))
         | "write errors" >> beam.io.WriteToText(os.path.join(out, "errors"), file_name_suffix=".jsonl",
                                                  shard_name_template=""))
    result = p.result
    rep = report_from_counters(cfg.name, [s.name for s in job.steps], counters_of(result))
    rep["shards"] = len(job.shards)
    rep["stages"] = [{"stage": getattr(s, "name", "") or s.step.name} for s in stages]
    from apache_beam.io.filesystems import FileSystems

    matched = FileSystems.match([out.rstrip("/") + "/documents/part*"])[0].metadata_list
    rep["files"] = [["documents/" + m.path.rsplit("/", 1)[-1], None] for m in sorted(matched, key=lambda m: m.path)]
    rep["run"] = {"runner": "beam", "pipeline_options": list(beam_args) or ["--runner=DirectRunner"],
                  "wall_seconds": round(time.time() - t0, 3), "shards": len(job.shards), "shards_resumed": 0,
                  "workers": None, "cc_unconverged": counters_of(result).get("minhash:cc_unconverged", 0)}
    if not remote:
        report_mod.write_report(out, rep)
        return rep
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # written here, then copied next to the documents
        report_mod.write_report(tmp, rep)
        for name in ("report.json", "report.md", "removals.png"):
            with open(os.path.join(tmp, name), "rb") as src, FileSystems.create(f"{out.rstrip('/')}/{name}") as dst:
                dst.write(src.read())
    return rep


def _count_in(item: tuple[int, dict]) -> tuple[int, dict]:
    _count(f"in|{_src(item[1])}")
    _count(f"bytes_in|{_src(item[1])}", _doc_bytes(item[1]))
    return item


def run_docs_beam(docs: Iterable[dict], steps: Sequence[Step], stage_specs: Sequence, *,
                  beam_args: Sequence[str] = (), cc_rounds: int = 12) -> tuple[list[dict], dict[str, int]]:
    """Steps and stages over in-memory documents (order = position), for tests and notebooks.

    Returns (kept documents in input order, counters).
    """
    import tempfile

    beam = _beam()
    from data_pipeline.io import dumps_line, read_jsonl

    stages = build_stages(stage_specs)
    items = [(i, d) for i, d in enumerate(docs)]
    with tempfile.TemporaryDirectory(prefix="danlu-beam-") as tmp:
        with beam.Pipeline(options=pipeline_options(beam_args)) as p:
            mapped = (p | beam.Create(items) | "count in" >> beam.Map(_count_in)
                      | "steps" >> beam.FlatMap(apply_steps, list(steps)).with_outputs("errors", main="docs"))
            (apply_stages(mapped.docs, stages, cc_rounds)
             | "to json" >> beam.Map(lambda it: dumps_line({"order": it[0], "doc": it[1]}).rstrip("\n"))
             | "write" >> beam.io.WriteToText(os.path.join(tmp, "kept"), file_name_suffix=".jsonl"))
        rows = [r for name in sorted(os.listdir(tmp)) for r in read_jsonl(os.path.join(tmp, name))]
    return [r["doc"] for r in sorted(rows, key=lambda r: r["order"])], counters_of(p.result)
