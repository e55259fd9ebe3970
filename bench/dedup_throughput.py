"""Fuzzy dedup throughput and quality: danlu vs datasketch MinHashLSH vs datatrove's MinHash pipeline.

Corpus (real, with real near-duplicates, nothing downloaded): the Python sources of every Python
installed on this machine (pyenv's 2.7 … 3.13 standard libraries plus their site-packages' pip
and setuptools, which vendor the same libraries again), one document per file, id
"<python version>/<relative path>". The same module in successive Python versions is a natural
near-duplicate at every similarity; unchanged files are exact duplicates.

Every method runs in its own child process (so its peak memory is its own) on the same documents
already in memory, single process (so MB/s is also MB/s per core):

* danlu: `data_pipeline.dedup.fuzzy.fuzzy_dedup` (vectorised MinHash, LSH, union-find), as is,
  with exact-Jaccard verification (`--verify`), with verification and bands × rows weighted
  towards recall (`danlu_recall`: false-positive weight 0.05, false-negative weight 0.95; the
  false positives this lets in are removed by verification), and with a memory budget that
  forces spilling (`danlu_spill`).
* datasketch: `MinHash.update_batch` on the same word 5-gram shingles (strings from
  `minhash.words_re`), `MinHashLSH(threshold, num_perm)` query-then-insert, the same
  union-find and keep-first rule (`datasketch_recall`: the same weights as danlu_recall).
* datatrove: `MinhashDedupSignature` → `MinhashDedupBuckets` → `MinhashDedupCluster` with
  `LocalPipelineExecutor` in a temp dir, the same bands × rows, n-gram 5, sha1 hashing
  (xxhash is not installed). Its own word tokenizer and text normalisation, so its shingles
  differ a little.

Ground truth: exact shingle Jaccard of every pair sharing a bucket under a high-recall LSH (bands ×
rows for threshold 0.5: P(candidate | J = 0.8) > 0.9999), identical shingle sets collapsed first;
pairs with J >= threshold are duplicates, clusters are their connected components. Reported:
precision/recall of the removed set (keep-first, the rule of danlu and of the datasketch driver),
and a keep-rule-free version for all three (a removed document is right if its true cluster
keeps another document; recall counts the documents a perfect dedup removes).

    .venv/bin/python bench/dedup_throughput.py                # ~30 MB corpus, ~6 minutes on 2 cores
    .venv/bin/python bench/dedup_throughput.py --max-mb 10 --peers datasketch

The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- corpus

def python_roots() -> list[tuple[str, str]]:
    """(version label, lib/pythonX.Y directory) of the Pythons on this machine."""
    roots = []
    for d in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/*/lib/python*"))):
        if os.path.isdir(d) and os.path.basename(d).startswith("python") and "." in os.path.basename(d):
            roots.append((os.path.basename(d)[len("python"):], d))
    if not roots:
        import sysconfig

        roots.append((f"{sys.version_info.major}.{sys.version_info.minor}", sysconfig.get_paths()["stdlib"]))
    return roots


def _wanted(rel: str) -> bool:
    parts = rel.split(os.sep)
    if any(p in ("test", "tests", "idle_test", "__pycache__", "lib2to3") for p in parts):
        return False
    if parts[0] == "site-packages":
        return len(parts) > 1 and parts[1] in ("pip", "setuptools", "pkg_resources", "_distutils_hack")
    return rel.endswith(".py") or rel.endswith(".txt") or os.path.basename(rel).startswith("LICENSE")


def build_corpus(path: str, max_mb: float) -> dict:
    """Writes the corpus JSONL; files taken in an order spread by a hash of their relative path
    (all versions of a file together) until max_mb of text."""
    files: dict[str, list[tuple[str, str]]] = {}
    for version, root in python_roots():
        for dirpath, dirnames, names in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "test", "tests")]
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if (name.endswith((".py", ".txt")) or name.startswith("LICENSE")) and _wanted(rel):
                    files.setdefault(rel, []).append((version, full))
    order = sorted(files, key=lambda r: hashlib.blake2b(r.encode(), digest_size=8).digest())
    budget = int(max_mb * 1e6)
    size = docs = 0
    from danlu.base.fs import JsonlWriter

    with JsonlWriter(path) as w:
        for rel in order:
            for version, full in files[rel]:
                try:
                    with open(full, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if not 200 <= len(data) <= 1_000_000:
                    continue
                text = data.decode("utf-8", errors="replace")
                w.write({"id": f"{version}/{rel}", "text": text, "source": version})
                size += len(text.encode("utf-8"))
                docs += 1
            if size >= budget:
                break
    return {"documents": docs, "mb": round(size / 1e6, 2), "pythons": [v for v, _ in python_roots()]}


def load(path: str) -> list[dict]:
    from danlu.base.fs import read_jsonl

    return list(read_jsonl(path))


def _rss_mb() -> float:
    """Peak resident set of this process (VmHWM, which `_reset_peak` resets; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Resets the peak-RSS mark (Linux: writing 5 to clear_refs) after loading the corpus, so the
    peak reported is the method's; returns the resident set at that point."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_mb()


# ----------------------------------------------------------------------------- methods (children)

def run_danlu(path: str, args: dict, variant: str) -> dict:
    from data_pipeline.dedup.fuzzy import fuzzy_dedup
    from data_pipeline.dedup.minhash import MinHashConfig

    docs = load(path)
    base = _reset_peak()
    recall = variant == "recall"  # verification + bands x rows weighted towards recall (fp 0.05, fn 0.95)
    cfg = MinHashConfig(threshold=args["threshold"], num_perm=args["num_perm"], ngram=args["ngram"],
                        verify=variant in ("verify", "recall"),
                        fp_weight=0.05 if recall else 0.5, fn_weight=0.95 if recall else 0.5)
    cfg.band_rows()  # parameter search (cached) outside the timing, as datasketch's constructor
    budget = args["memory_budget_mb"] if variant == "spill" else None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = fuzzy_dedup(lambda: iter(docs), cfg, memory_budget_mb=budget, workdir=tmp)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "removed": np.flatnonzero(res.removed).tolist(), "rss_after_load_mb": base,
            "peak_rss_mb": _rss_mb(), "spill_runs": res.stats["spill_runs"], "bands": res.stats["bands"],
            "rows": res.stats["rows"]}


def run_datasketch(path: str, args: dict, variant: str) -> dict:
    from datasketch import MinHash, MinHashLSH

    from data_pipeline.dedup import lsh as dlsh
    from data_pipeline.dedup.minhash import words_re

    docs = load(path)
    base = _reset_peak()
    n, k = args["ngram"], args["num_perm"]
    weights = (0.05, 0.95) if variant == "recall" else (0.5, 0.5)
    index = MinHashLSH(threshold=args["threshold"], num_perm=k, weights=weights)
    t0 = time.perf_counter()
    us, vs = [], []
    for i, doc in enumerate(docs):
        w = words_re.findall(doc["text"].lower())
        if not w:
            continue
        grams = {" ".join(w[j:j + n]) for j in range(max(1, len(w) - n + 1))}
        m = MinHash(num_perm=k, seed=1)
        m.update_batch([g.encode("utf-8", "surrogatepass") for g in grams])
        for c in index.query(m):
            us.append(c)
            vs.append(i)
        index.insert(i, m)
    comps = dlsh.Components(len(docs))
    comps.add_edges(np.asarray(us, dtype=np.int64), np.asarray(vs, dtype=np.int64))
    kept = dlsh.choose_kept(comps.labels(), "first")
    dt = time.perf_counter() - t0
    return {"seconds": dt, "removed": np.flatnonzero(kept != np.arange(len(docs))).tolist(),
            "rss_after_load_mb": base, "peak_rss_mb": _rss_mb(), "bands": index.b, "rows": index.r}


def run_datatrove(path: str, args: dict, variant: str) -> dict:
    import logging
    import struct

    from loguru import logger

    logger.remove()  # datatrove logs every stage at INFO and prints stats: keep them off our output
    logging.disable(logging.INFO)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig

    from data_pipeline.dedup.minhash import optimal_bands

    raw = load(path)
    docs = [Document(text=d["text"], id=str(i)) for i, d in enumerate(raw)]
    del raw
    base = _reset_peak()
    b, r = optimal_bands(args["threshold"], args["num_perm"])
    cfg = MinhashConfig(n_grams=args["ngram"], num_buckets=b, hashes_per_bucket=r, seed=1,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        LocalPipelineExecutor(pipeline=[docs, MinhashDedupSignature(output_folder=f"{d}/sigs", config=cfg)],
                              tasks=1, workers=1, logging_dir=f"{d}/l1", skip_completed=False).run()
        LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{d}/sigs", output_folder=f"{d}/buckets",
                                                            config=cfg)],
                              tasks=b, workers=1, logging_dir=f"{d}/l2", skip_completed=False).run()
        LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{d}/buckets", output_folder=f"{d}/remove",
                                                            config=cfg)],
                              tasks=1, workers=1, logging_dir=f"{d}/l3", skip_completed=False).run()
        dt = time.perf_counter() - t0
        p = f"{d}/remove/000000.remove"
        data = open(p, "rb").read() if os.path.exists(p) else b""
    removed = list(struct.unpack(f"<{len(data) // 4}I", data))
    return {"seconds": dt, "removed": removed, "rss_after_load_mb": base, "peak_rss_mb": _rss_mb(),
            "bands": b, "rows": r, "note": "own tokenizer/normalisation; sha1 hashes; signature+buckets+cluster stages"}


METHODS = {"danlu": (run_danlu, "plain"), "danlu_verify": (run_danlu, "verify"), "danlu_spill": (run_danlu, "spill"),
           "danlu_recall": (run_danlu, "recall"), "datasketch": (run_datasketch, ""),
           "datasketch_recall": (run_datasketch, "recall"), "datatrove": (run_datatrove, "")}


def _child(name: str, path: str, args: dict, conn) -> None:
    fn, variant = METHODS[name]
    try:
        conn.send(fn(path, args, variant))
    except Exception as e:  # noqa: BLE001 - report the peer's failure in the JSON, do not die
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    conn.close()


def run_child(name: str, path: str, args: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(name, path, args, send))
    p.start()
    send.close()
    out = recv.recv()
    p.join()
    return out


# ----------------------------------------------------------------------------- ground truth

def ground_truth(docs: list[dict], threshold: float, ngram: int, num_perm: int) -> dict:
    """Exact-Jaccard duplicate clusters among high-recall LSH candidates (see module docstring)."""
    from data_pipeline.dedup import lsh as dlsh
    from data_pipeline.dedup.minhash import MinHasher, band_keys, jaccard, optimal_bands, shingle_set

    t0 = time.perf_counter()
    sets = [shingle_set(d["text"], ngram) for d in docs]
    n = len(docs)
    comps = dlsh.Components(n)
    # identical shingle sets: one representative each
    digest = {}
    rep = np.arange(n)
    for i, s in enumerate(sets):
        if s.size == 0:
            continue
        h = hashlib.blake2b(s.tobytes(), digest_size=16).digest()
        if h in digest:
            rep[i] = digest[h]
        else:
            digest[h] = i
    same = np.flatnonzero(rep != np.arange(n))
    comps.add_edges(rep[same], same)
    reps = np.array(sorted(digest.values()), dtype=np.int64)
    b, r = optimal_bands(0.5, num_perm)
    sigs = MinHasher(num_perm, seed=12345).signatures([sets[i] for i in reps])
    keys = band_keys(sigs, b, r)
    pairs = set()
    for band in range(b):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        bounds = np.flatnonzero(np.r_[True, k[1:] != k[:-1], True])
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e - s > 1:
                members = reps[order[s:e]].tolist()
                for a in range(len(members)):
                    for c in range(a + 1, len(members)):
                        pairs.add((min(members[a], members[c]), max(members[a], members[c])))
    u, v = [], []
    for a, c in pairs:
        if jaccard(sets[a], sets[c]) >= threshold:
            u.append(a)
            v.append(c)
    comps.add_edges(np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64))
    labels = comps.labels()
    return {"labels": labels, "candidate_pairs": len(pairs), "true_pairs": len(u), "identical": int(same.size),
            "seconds": round(time.perf_counter() - t0, 1)}


def scores(removed: list[int], labels: np.ndarray) -> dict:
    n = labels.size
    rem = np.zeros(n, dtype=bool)
    rem[removed] = True
    truth_rem = labels != np.arange(n)  # keep-first truth
    tp = int((rem & truth_rem).sum())
    out = {"removed": int(rem.sum()), "precision_first": tp / max(1, int(rem.sum())),
           "recall_first": tp / max(1, int(truth_rem.sum()))}
    # keep-rule free: per true cluster, how many documents stay
    kept_per = np.bincount(labels[~rem], minlength=n)
    size = np.bincount(labels, minlength=n)
    right = rem & (kept_per[labels] >= 1)  # removed, and its true cluster keeps another document
    should = int((size[size > 0] - 1).sum())
    did = int((size - np.maximum(kept_per, 1))[size > 0].sum())
    out["precision"] = int(right.sum()) / max(1, int(rem.sum()))
    out["recall"] = did / max(1, should)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-mb", type=float, default=30.0, help="corpus size (default 30 MB of text)")
    ap.add_argument("--corpus", default=None, help="reuse this corpus JSONL instead of building one")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--memory-budget-mb", type=float, default=0.25,
                    help="band-record budget of the danlu_spill run (default 0.25 MB: forces spilling)")
    ap.add_argument("--methods", default="danlu,danlu_verify,danlu_recall,danlu_spill,datasketch,datasketch_recall,datatrove",
                    help="*_recall: bands x rows chosen with weights fp 0.05 / fn 0.95 (danlu_recall also verifies)")
    a = ap.parse_args()
    args = {"threshold": a.threshold, "num_perm": a.num_perm, "ngram": a.ngram, "memory_budget_mb": a.memory_budget_mb}
    tmp = tempfile.mkdtemp(prefix="danlu-dedup-bench-")
    path = a.corpus or os.path.join(tmp, "corpus.jsonl")
    corpus = {"path": path}
    if not a.corpus:
        corpus.update(build_corpus(path, a.max_mb))
    docs = load(path)
    mb = sum(len(d["text"].encode("utf-8", "surrogatepass")) for d in docs) / 1e6
    corpus.update(documents=len(docs), mb=round(mb, 2))
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB ({path})", flush=True)
    truth = ground_truth(docs, a.threshold, a.ngram, a.num_perm)
    labels = truth.pop("labels")
    truth["removable"] = int((labels != np.arange(len(docs))).sum())
    print(f"truth: {truth}", flush=True)
    del docs
    results = {}
    for name in a.methods.split(","):
        r = run_child(name, path, args)
        if "error" in r:
            results[name] = {"error": r["error"]}
            print(f"{name}: FAILED {r['error']}\n{r.get('trace', '')}", flush=True)
            continue
        s = scores(r.pop("removed"), labels)
        r.update(s)
        r["mb_per_s_per_core"] = round(mb / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 2)
        for k in ("precision", "recall", "precision_first", "recall_first"):
            r[k] = round(r[k], 4)
        results[name] = r
        print(f"{name:13s} {r['mb_per_s_per_core']:7.2f} MB/s/core  {r['seconds']:7.2f} s  peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (after load {r['rss_after_load_mb']:.0f})  removed {r['removed']}  "
              f"P {r['precision']:.4f} R {r['recall']:.4f}  (keep-first P {r['precision_first']:.4f} "
              f"R {r['recall_first']:.4f})", flush=True)
    summary = {"bench": "dedup_throughput", "date": time.strftime("%Y-%m-%d"), "corpus": corpus, "truth": truth,
               "threshold": a.threshold, "num_perm": a.num_perm, "ngram": a.ngram, "cores_used_per_method": 1,
               "cpu": _cpu(), "results": results}
    if "danlu" in results and "datasketch" in results and "error" not in results["datasketch"]:
        summary["speedup_vs_datasketch"] = round(results["danlu"]["mb_per_s_per_core"]
                                                 / results["datasketch"]["mb_per_s_per_core"], 2)
    if "danlu" in results and "datatrove" in results and "error" not in results["datatrove"]:
        summary["speedup_vs_datatrove"] = round(results["danlu"]["mb_per_s_per_core"]
                                                / results["datatrove"]["mb_per_s_per_core"], 2)
    print(json.dumps(summary))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
