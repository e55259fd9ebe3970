"""The cleaning job as an Apache Beam graph: `danlu clean CONFIG --runner beam`.

    shards ─► map (FlatMap: read + steps, data_pipeline/loop.py) ─► corpus stages ─► write
                  ├─► errors.jsonl, rejected/                  │
                  └─► per-shard stats ─► report.json           │
            exact / url:  key by hash ─► GroupByKey ─► keep one       │
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

The report: the map phase counts each shard with the local runner's loop and emits the shard's
stats once (written to ``.state/shard-stats.jsonl``); they are merged by `report.merge` as the
local runner merges its shards. The corpus stages count their drops and cuts in Beam metrics
(namespace ``danlu``: ``stage_dropped|<source>|<reason>``, ``stage_bytes_dropped|...``,
``stage_bytes_edited|<source>``), added to the report after the run as the local runner adds them.

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
                                        build_stages, stage_name)
from data_pipeline.loop import ShardStats, process_records
from data_pipeline.readers import doc_bytes
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


def _src(doc: dict) -> str:
    return str(doc.get("source", ""))


def count_drop(doc: dict, reason: str) -> None:
    """The counters of one document a corpus stage dropped (every drop reason has its own counter)."""
    _count(f"stage_dropped|{_src(doc)}|{reason}")
    _count(f"stage_bytes_dropped|{_src(doc)}|{reason}", doc_bytes(doc))


def count_edit(doc: dict, new: dict) -> None:
    """The counter of the bytes a corpus stage cut from a document that stays."""
    _count(f"stage_bytes_edited|{_src(doc)}", doc_bytes(doc) - doc_bytes(new))


# --------------------------------------------------------------------------- read + steps

def map_shard(shard, steps: Sequence[Step], examples_per_reason: int = 3) -> Iterator:
    """The map phase of one shard, through the same loop as the local runner (data_pipeline/loop.py):
    kept documents as (order, doc), error rows to the "errors" output, dropped documents (with
    ``drop_reason``) to "rejected", and the shard's stats, once, to "stats". The reader streams:
    what it read before a failure is kept."""
    from apache_beam import pvalue

    from data_pipeline import readers as R

    stats = ShardStats(shard, [s.name for s in steps], examples_per_reason)
    pos = 0
    for kind, obj in process_records(R.read_guarded(shard, stats.reader_counters), steps, shard, stats):
        if kind == "doc":
            yield (shard.index << ORDER_SHIFT) + pos, obj
            pos += 1
        else:
            yield pvalue.TaggedOutput("errors" if kind == "error" else "rejected", obj)
    yield pvalue.TaggedOutput("stats", {**stats.to_dict(), "step_seconds": stats.step_seconds})


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
        count_edit(doc, new)
        yield order, new

    bad = docs | f"{label} units" >> beam.FlatMap(units) | f"{label} group lines" >> beam.GroupByKey() \
        | f"{label} repeated" >> beam.FlatMap(repeated)
    return {"doc": docs, "bad": bad} | f"{label} join" >> beam.CoGroupByKey() | f"{label} cut" >> beam.FlatMap(apply)


class _BandKeys:
    """(order, doc) → (band key, (order, shingle set or None)) for each band."""

    def __init__(self, stage: MinHashStage):
        self.stage = stage
        self.cfg = stage  # a MinHashConfig
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
    cfg = stage  # a MinHashConfig
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
            count_edit(doc, out)
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


def stage_results(counters: dict[str, int], stages: Sequence[CorpusStage]) -> dict:
    """The corpus stages' drops and edits from the Beam counters, in the shape of the local runner's
    `stages.run_stages` result, for `stages.apply_to_report`."""
    per_source: dict[str, dict] = {}
    for key, v in sorted(counters.items()):
        kind, _, rest = key.partition("|")
        if kind not in ("stage_dropped", "stage_bytes_dropped", "stage_bytes_edited"):
            continue
        src, _, reason = rest.partition("|")
        ps = per_source.setdefault(src, {"dropped": {}, "bytes_dropped": {}, "bytes_edited": 0})
        if kind == "stage_bytes_edited":
            ps["bytes_edited"] += v
        else:
            d = ps["dropped" if kind == "stage_dropped" else "bytes_dropped"]
            d[reason] = d.get(reason, 0) + v
    return {"per_source": per_source, "examples": {},
            "stages": [{"stage": stage_name(s)} for s in stages]}


def _read_rows(pattern: str) -> list[dict]:
    """The JSON lines of the files matching `pattern` (local or remote, through Beam's FileSystems)."""
    import json

    from apache_beam.io.filesystems import FileSystems

    rows = []
    for m in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
        with FileSystems.open(m.path) as f:
            rows += [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]
    return rows


def pipeline_options(args: Sequence[str] = ()):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(list(args) or ["--runner=DirectRunner"])


def run_job_beam(job: Any, beam_args: Sequence[str] = (), cc_rounds: int | None = None) -> dict:
    """Runs a planned cleaning job (data_pipeline.clean.Job) on Beam; writes documents/,
    errors.jsonl and the report into the job's output directory; returns the report.

    The report is merged from the shards' stats exactly as the local runner's is (report.merge),
    then the corpus stages' drops are applied from the Beam counters (stages.apply_to_report).
    """
    beam = _beam()
    from apache_beam.io.filesystems import FileSystems

    from data_pipeline import report as report_mod
    from data_pipeline.dedup.stages import apply_to_report
    from danlu.base.fs import dumps_line

    cfg = job.config
    out = job.output_dir.rstrip("/")
    stages = build_stages(getattr(cfg, "stages", ()) or ())
    if cc_rounds is None:
        cc_rounds = int(dict(getattr(cfg, "stage_options", ()) or ()).get("cc_rounds", 12))
    t0 = time.time()
    remote = "://" in out  # gs://, s3://: Beam's FileSystems write it (file:// was made a path by clean.plan)
    if not remote:
        os.makedirs(out, exist_ok=True)
    suffix = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", "none": ".jsonl"}[cfg.output.compression]  # AUTO by suffix
    stats_prefix = f"{out}/.state/shard-stats"

    def to_json(obj) -> str:
        return dumps_line(obj).rstrip("\n")

    with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        mapped = (p | "shards" >> beam.Create(list(job.shards)) | "spread" >> beam.Reshuffle()
                  | "map" >> beam.FlatMap(map_shard, list(job.steps), cfg.output.examples_per_reason)
                  .with_outputs("errors", "rejected", "stats", main="docs"))
        kept = apply_stages(mapped.docs, stages, cc_rounds)
        (kept | "to json" >> beam.Map(lambda it: to_json(it[1]))
         | "write" >> beam.io.WriteToText(f"{out}/documents/part", file_name_suffix=suffix))
        (mapped.errors | "errors json" >> beam.Map(to_json)
         | "write errors" >> beam.io.WriteToText(f"{out}/errors", file_name_suffix=".jsonl", shard_name_template=""))
        (mapped.stats | "stats json" >> beam.Map(to_json)
         | "write stats" >> beam.io.WriteToText(stats_prefix, file_name_suffix=".jsonl", shard_name_template=""))
        if cfg.output.rejected:
            (mapped.rejected | "rejected json" >> beam.Map(to_json)
             | "write rejected" >> beam.io.WriteToText(f"{out}/rejected/part", file_name_suffix=suffix))
    counters = counters_of(p.result)
    shard_stats = sorted(_read_rows(stats_prefix + ".jsonl"), key=lambda st: st["shard"])
    step_seconds = [sum(st.pop("step_seconds")[k] for st in shard_stats) for k in range(len(job.steps))]
    rep = report_mod.merge(cfg.name, [s.name for s in job.steps], shard_stats, cfg.output.examples_per_reason)
    if stages:
        apply_to_report(rep, stage_results(counters, stages))
    matched = FileSystems.match([f"{out}/documents/part*"])[0].metadata_list
    rep["files"] = [["documents/" + m.path.rsplit("/", 1)[-1], None] for m in sorted(matched, key=lambda m: m.path)]
    rep["run"] = {"runner": "beam", "pipeline_options": list(beam_args) or ["--runner=DirectRunner"],
                  "wall_seconds": round(time.time() - t0, 3), "shards": len(job.shards), "shards_resumed": 0,
                  "workers": None, "cc_unconverged": counters.get("minhash:cc_unconverged", 0),
                  "step_seconds": {s.name: round(t, 3) for s, t in zip(job.steps, step_seconds)}}
    if not remote:
        report_mod.write_report(out, rep)
        return rep
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # written here, then copied next to the documents
        report_mod.write_report(tmp, rep)
        for name in ("report.json", "report.md", "removals.png"):
            with open(os.path.join(tmp, name), "rb") as src, FileSystems.create(f"{out}/{name}") as dst:
                dst.write(src.read())
    return rep


def run_docs_beam(docs: Iterable[dict], steps: Sequence[Step], stage_specs: Sequence, *,
                  beam_args: Sequence[str] = (), cc_rounds: int = 12) -> tuple[list[dict], dict]:
    """Steps and stages over in-memory documents (order = position), for tests and notebooks.

    Returns (kept documents in input order, the report as the local runner would write it).
    """
    import tempfile

    beam = _beam()
    from data_pipeline import readers as R
    from data_pipeline import report as report_mod
    from data_pipeline.dedup.stages import apply_to_report
    from danlu.base.fs import dumps_line, read_jsonl

    stages = build_stages(stage_specs)
    shard = R.Shard(0, "memory", "", (("<in-memory documents>", ""),), R.CommonOptions())

    def process(all_docs: list[dict]):
        from apache_beam import pvalue

        stats = ShardStats(shard, [s.name for s in steps])
        # one result per document (kept, rejected or error), so its position is the document's order
        for i, (kind, obj) in enumerate(process_records(all_docs, steps, shard, stats)):
            if kind == "doc":
                yield i, obj
        yield pvalue.TaggedOutput("stats", stats.to_dict())

    with tempfile.TemporaryDirectory(prefix="danlu-beam-") as tmp:
        with beam.Pipeline(options=pipeline_options(beam_args)) as p:
            mapped = (p | beam.Create([[dict(d) for d in docs]])
                      | "steps" >> beam.FlatMap(process).with_outputs("stats", main="docs"))
            (apply_stages(mapped.docs, stages, cc_rounds)
             | "to json" >> beam.Map(lambda it: dumps_line({"order": it[0], "doc": it[1]}).rstrip("\n"))
             | "write" >> beam.io.WriteToText(os.path.join(tmp, "kept"), file_name_suffix=".jsonl"))
            (mapped.stats | "stats json" >> beam.Map(lambda st: dumps_line(st).rstrip("\n"))
             | "write stats" >> beam.io.WriteToText(os.path.join(tmp, "stats"), file_name_suffix=".json"))
        rows = [r for name in sorted(os.listdir(tmp)) if name.startswith("kept")
                for r in read_jsonl(os.path.join(tmp, name))]
        stats = [r for name in sorted(os.listdir(tmp)) if name.startswith("stats")
                 for r in read_jsonl(os.path.join(tmp, name))]
    rep = report_mod.merge("docs", [s.name for s in steps], stats)
    apply_to_report(rep, stage_results(counters_of(p.result), stages))
    rep["cc_unconverged"] = counters_of(p.result).get("minhash:cc_unconverged", 0)
    return [r["doc"] for r in sorted(rows, key=lambda r: r["order"])], rep
