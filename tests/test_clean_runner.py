"""`danlu clean`: job config and overrides, errors before work, the local runner (accounting per
source, same bytes for any worker count, resume after SIGKILL byte-identical), bad inputs, report."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_pipeline import clean as C
from data_pipeline import report as report_mod
from pretrain.config import ConfigError
from data_pipeline.steps import StepError

ROOT = Path(__file__).resolve().parent.parent

# Steps only these tests use, in a file the job imports (`imports:`), so that spawned workers and
# subprocess jobs can load them too.
TEST_STEPS = '''
import dataclasses, time
from data_pipeline.steps import Filter, Step, register, require


@register
@dataclasses.dataclass(frozen=True)
class MinWords(Filter):
    name = "t_min_words"
    n: int = 5

    def check(self):
        require(self.n >= 0, f"n must be >= 0, got {self.n}")

    def reason(self, doc):
        return "too_few_words" if len(doc["text"].split()) < self.n else None


@register
@dataclasses.dataclass(frozen=True)
class NoDigitsLine(Step):
    """Removes lines holding a digit: changes text, so bytes are edited."""
    name = "t_strip_digit_lines"

    def apply(self, doc):
        lines = [l for l in doc["text"].split("\\n") if not any(c.isdigit() for c in l)]
        if not lines or not "".join(lines).strip():
            return self.drop("empty")
        return {**doc, "text": "\\n".join(lines)}


@register
@dataclasses.dataclass(frozen=True)
class Boom(Step):
    """Raises on documents containing BOOM: a step bug must not end the job."""
    name = "t_boom"

    def apply(self, doc):
        if "BOOM" in doc["text"]:
            raise RuntimeError("kaboom")
        return doc


@register
@dataclasses.dataclass(frozen=True)
class Sleep(Step):
    name = "t_sleep"
    ms: float = 0.0

    def apply(self, doc):
        time.sleep(self.ms / 1000)
        return doc
'''

WORDS = "the a of and to in river city music night light stone paper garden window history".split()


@pytest.fixture(scope="session")
def steps_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("steps") / "clean_test_steps.py"
    p.write_text(TEST_STEPS)
    C.import_modules([str(p)])
    return str(p)


def _doc_text(rng):
    lines = []
    for _ in range(rng.randint(1, 5)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 99)))
        lines.append(" ".join(words))
    if rng.random() < 0.02:
        lines.append("BOOM")
    return "\n".join(lines)


def write_corpus(d: Path, files: int, docs: int, seed: int = 0, suffix=".jsonl.gz") -> None:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        rows = [json.dumps({"text": _doc_text(rng), "url": f"http://x/{f}/{i}", "n": i}) for i in range(docs)]
        data = ("\n".join(rows) + "\n").encode()
        (d / f"part{f:03d}{suffix}").write_bytes(gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data)


def write_job(path: Path, **tree) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def job_tree(steps_file, inputs, out, steps=None, **extra):
    return {"name": "t", "imports": [steps_file], "inputs": inputs,
            "steps": steps if steps is not None else [{"step": "t_min_words", "n": 4}, "t_boom",
                                                     "t_strip_digit_lines"],
            "output": {"dir": str(out), "docs_per_shard": 40, "rejected": True, **extra.pop("output", {})},
            "progress": False, **extra}


def run(tree, workers=1):
    job = C.plan(C.config_from_dict(tree))
    return job, C.run_job(job, workers=workers, progress=False)


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a job's output except the timing-dependent report files and the state."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".state") and rel not in ("report.json", "report.md", "removals.png"):
            files[rel] = p.read_bytes()
    rep = json.loads((out / "report.json").read_text())
    rep.pop("run")
    files["report.json (without run)"] = json.dumps(rep, sort_keys=True).encode()
    return files


def read_docs(paths):
    docs = []
    for p in sorted(paths):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def check_accounting(rep):
    for c in [rep, *rep["per_source"].values()]:
        assert c["documents_in"] == c["documents_out"] + sum(c["dropped"].values()) + c["errors"]
        assert c["bytes_in"] == (c["bytes_out"] + sum(c["bytes_dropped"].values()) + c["bytes_errors"]
                                 + c["bytes_edited"])
    assert rep["accounted"] is True


# ---------------------------------------------------------------------------------------------
# Config


def test_config_overrides_and_cli_replacements(tmp_path, steps_file):
    write_corpus(tmp_path / "in", 1, 3)
    cfg_path = write_job(tmp_path / "job.yaml", **job_tree(steps_file, [{"path": str(tmp_path / "in"), "reader": "jsonl",
                                                                     "source": "web"}], tmp_path / "out"))
    cfg = C.load_config(cfg_path, ["steps.t_min_words.n=9", "steps.2.step=t_strip_digit_lines",
                                   "readers.max_doc_bytes=1000", "readers.jsonl.text_key=body",
                                   "output.compression=zst", "inputs.0.options.id_key=url"],
                        output=str(tmp_path / "elsewhere"), workers=3, strict=True)
    assert cfg.steps[0] == {"step": "t_min_words", "n": 9}
    assert cfg.output.dir == str(tmp_path / "elsewhere") and cfg.output.compression == "zst"
    assert cfg.workers == 3 and cfg.strict is True
    opts = C.reader_options(cfg, cfg.inputs[0], "jsonl", "inputs[0]")
    assert (opts.max_doc_bytes, opts.text_key, opts.id_key) == (1000, "body", "url")
    # --input keeps the single input's reader and source
    cfg = C.load_config(cfg_path, inputs=[str(tmp_path / "in" / "part000.jsonl.gz"), "x.jsonl"])
    assert [(i.path, i.reader, i.source) for i in cfg.inputs] == [
        (str(tmp_path / "in" / "part000.jsonl.gz"), "jsonl", "web"), ("x.jsonl", "jsonl", "web")]


@pytest.mark.parametrize("override, message", [
    ("outptu.dir=x", "unknown config key 'outptu' (did you mean 'output'?)"),
    ("output.compresion=gz", "unknown config key 'output.compresion' (did you mean 'output.compression'?)"),
    ("output.compression=bz2", "output.compression='bz2' is not one of gz, zst, none"),
    ("output.docs_per_shard=0", "output.docs_per_shard must be positive"),
    ("readers.max_doc_byte=5", "unknown config key 'readers.max_doc_byte' (did you mean 'readers.max_doc_bytes'?)"),
    ("readers.jsonl.text_kye=a", "unknown config key 'readers.jsonl.text_kye' (did you mean 'readers.jsonl.text_key'?)"),
    ("inputs.0.options.text_kye=a", "unknown config key 'inputs[0].options (jsonl reader).text_kye' (did you mean"),
    ("readers.max_doc_bytes=-1", "max_doc_bytes must be positive"),
    ("readers.invalid_utf8=ignore", "invalid_utf8 must be 'error' or 'repair'"),
    ("steps.t_min_word.n=3", "no step 't_min_word' in this job (did you mean 't_min_words'?)"),
    ("steps.t_min_words.n=-3", "step 't_min_words': n must be >= 0, got -3"),
    ("steps.t_min_words.nn=3", "step 't_min_words' has no parameter 'nn'; did you mean 'n'?"),
    ("steps.1.step=t_bom", "unknown step 't_bom'; did you mean 't_boom'?"),
    ("inputs.0.reader=jsnol", "unknown reader 'jsnol' (did you mean 'jsonl'?)"),
    ("inputs.0.path=/no/such/file.jsonl", "inputs[0]: input '/no/such/file.jsonl' does not exist"),
    ("workers=-2", "workers must be >= 0"),
    ("runner=spark", "runner='spark' is not one of local, beam"),
])
def test_bad_config_is_refused_before_work(tmp_path, steps_file, override, message):
    write_corpus(tmp_path / "in", 1, 3)
    cfg_path = write_job(tmp_path / "job.yaml", **job_tree(steps_file, [{"path": str(tmp_path / "in"), "reader": "jsonl"}],
                                                         tmp_path / "out"))
    with pytest.raises((ConfigError, StepError)) as e:
        C.plan(C.load_config(cfg_path, [override]))
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_warc_responses_need_html_extract(tmp_path, steps_file):
    (tmp_path / "a.warc.gz").write_bytes(b"x")
    tree = job_tree(steps_file, [str(tmp_path / "a.warc.gz")], tmp_path / "out")
    with pytest.raises(ConfigError, match="add the `html_extract` step"):
        C.plan(C.config_from_dict(tree))


# ---------------------------------------------------------------------------------------------
# Local runner


def test_run_accounts_for_every_record_per_source_and_report(tmp_path, steps_file):
    write_corpus(tmp_path / "a", 3, 60, seed=1)
    write_corpus(tmp_path / "b", 2, 50, seed=2, suffix=".jsonl")
    inputs = [{"path": str(tmp_path / "a"), "source": "alpha"}, {"path": str(tmp_path / "b" / "*.jsonl"), "source": "beta"}]
    job, rep = run(job_tree(steps_file, inputs, tmp_path / "out"))
    out = tmp_path / "out"
    assert rep["documents_in"] == 280 and rep["shards"] == 5
    check_accounting(rep)
    assert set(rep["per_source"]) == {"alpha", "beta"}
    assert rep["per_source"]["alpha"]["documents_in"] == 180
    assert rep["dropped"]["t_min_words:too_few_words"] > 0 and rep["errors"] > 0  # BOOM docs
    assert rep["error_kinds"] == {"step_failed": rep["errors"]}
    assert rep["bytes_edited"] > 0  # digit lines were cut from kept documents
    steps = {s["step"]: s for s in rep["steps"]}
    assert steps["t_min_words"]["documents_in"] == 280
    assert steps["t_boom"]["documents_in"] == 280 - steps["t_min_words"]["dropped"]
    assert steps["t_strip_digit_lines"]["changed"] > 0
    # kept documents keep every field and their order; their ids are unique and stable
    kept = read_docs((out / "documents").glob("*.jsonl.gz"))
    assert len(kept) == rep["documents_out"]
    assert all(set(d) == {"text", "url", "n", "id", "source"} for d in kept)
    assert len({d["id"] for d in kept}) == len(kept)
    assert all(not any(ch.isdigit() for ch in d["text"]) for d in kept)
    # parts of docs_per_shard documents, names from the shard index
    names = sorted(p.name for p in (out / "documents").iterdir())
    assert names[0] == "part-00000-0000.jsonl.gz" and all(n.startswith("part-0000") for n in names)
    assert max(n for _, n in rep["files"]) <= 40
    assert sum(n for _, n in rep["files"]) == rep["documents_out"]
    # the rejected writer keeps dropped documents with their reason
    rejected = read_docs((out / "rejected").glob("*.jsonl.gz"))
    assert len(rejected) == sum(rep["dropped"].values())
    assert {d["drop_reason"] for d in rejected} == set(rep["dropped"])
    # errors.jsonl: one row per error, naming file and record
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == rep["errors"] and all(e["kind"] == "step_failed" and "kaboom" in e["reason"] for e in errors)
    # report.md and the chart
    md = (out / "report.md").read_text()
    assert "t_min_words:too_few_words" in md and "Every record accounted for: **yes**" in md
    assert "## Examples of removed documents" in md
    assert (out / "removals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["run"]["workers"] == 1 and rep["run"]["wall_seconds"] > 0


def test_same_bytes_for_any_worker_count_and_compression(tmp_path, steps_file):
    write_corpus(tmp_path / "in", 4, 40, seed=3)
    one, _ = run(job_tree(steps_file, [str(tmp_path / "in")], tmp_path / "w1"), workers=1)
    two, rep2 = run(job_tree(steps_file, [str(tmp_path / "in")], tmp_path / "w2"), workers=2)
    assert rep2["run"]["workers"] == 2
    assert output_files(tmp_path / "w1") == output_files(tmp_path / "w2")
    _, rep = run(job_tree(steps_file, [str(tmp_path / "in")], tmp_path / "zst", output={"compression": "zst"}))
    assert sorted(p.suffix for p in (tmp_path / "zst" / "documents").iterdir()) == [".zst"] * len(rep["files"])
    import zstandard

    zst_docs = []
    for p in sorted((tmp_path / "zst" / "documents").iterdir()):
        zst_docs += [json.loads(x) for x in zstandard.ZstdDecompressor().decompressobj().decompress(p.read_bytes()).splitlines()]
    assert zst_docs == read_docs((tmp_path / "w1" / "documents").glob("*.jsonl.gz"))


def test_bad_inputs_corpus(tmp_path, steps_file):
    """Malformed JSON, invalid UTF-8, truncated gzip and zstd, empty and binary files, one enormous
    document: all counted and written to errors.jsonl; exit 0, or 1 with --strict."""
    import zstandard

    d = tmp_path / "bad"
    d.mkdir()
    good = [json.dumps({"text": "a fine line of several words here"}) for _ in range(30)]
    (d / "mixed.jsonl").write_bytes("\n".join(good[:3]).encode() + b'\n{"text": broken\n{"text": "caf\xe9 x y z w"}\n'
                                    + json.dumps({"text": "word " * 30_000}).encode() + b"\n")
    gz = gzip.compress(("\n".join(good * 50) + "\n").encode())
    (d / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    zs = zstandard.ZstdCompressor().compress(("\n".join(good * 50) + "\n").encode())
    (d / "cut.jsonl.zst").write_bytes(zs[: len(zs) - 10])
    (d / "empty.jsonl").write_bytes(b"")
    (d / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\0\0" + os.urandom(2000))
    tree = job_tree(steps_file, [{"path": str(d), "source": "bad"}], tmp_path / "out",
                    readers={"max_doc_bytes": 100_000}, steps=[{"step": "t_min_words", "n": 3}])
    cfg_path = write_job(tmp_path / "job.yaml", **tree)
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.clean", str(cfg_path), "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    check_accounting(rep)
    assert rep["error_kinds"] == {"invalid_json": 1, "invalid_utf8": 1, "too_large": 1, "truncated": 2,
                                  "empty_file": 1, "binary_file": 1}
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    by_kind = {e["kind"]: e for e in errors}
    assert by_kind["invalid_json"]["line"] == 4 and by_kind["invalid_json"]["file"].endswith("mixed.jsonl")
    assert by_kind["too_large"]["line"] == 6
    assert by_kind["binary_file"]["file"].endswith("image.jsonl")
    assert 0 < rep["per_source"]["bad"]["documents_out"] < 3 + 2 * 1500
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.clean", str(cfg_path), "--strict",
                           "--output", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--strict: 7 records went to" in proc.stderr


def test_output_dir_of_another_job_is_refused(tmp_path, steps_file):
    write_corpus(tmp_path / "in", 1, 10)
    run(job_tree(steps_file, [str(tmp_path / "in")], tmp_path / "out"))
    with pytest.raises(ConfigError, match="holds the results of a different job"):
        run(job_tree(steps_file, [str(tmp_path / "in")], tmp_path / "out", steps=["t_boom"]))


def test_resume_after_sigkill_is_byte_identical(tmp_path, steps_file):
    """A job killed part-way (SIGKILL to its whole process group) and rerun gives the same bytes as
    an uninterrupted run; committed shards are skipped, half-written ones redone."""
    write_corpus(tmp_path / "in", 16, 40, seed=5)
    steps = [{"step": "t_sleep", "ms": 4}, {"step": "t_min_words", "n": 4}, "t_boom", "t_strip_digit_lines"]
    tree = job_tree(steps_file, [{"path": str(tmp_path / "in"), "source": "web"}], tmp_path / "killed", steps=steps)
    cfg_path = write_job(tmp_path / "job.yaml", **tree)
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.clean", str(cfg_path), "--workers", "2"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / ".state"
    deadline = time.time() + 90
    while time.time() < deadline and len(list(state.glob("shard-*.json"))) < 4 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(state.glob("shard-*.json")))
    assert 4 <= done_at_kill < 16, f"kill landed at {done_at_kill} shards done"
    assert not (tmp_path / "killed" / "report.json").exists()

    job, rep = run(tree, workers=1)  # rerun (another worker count on purpose)
    assert rep["run"]["shards_resumed"] == done_at_kill
    _, clean_rep = run({**tree, "output": {**tree["output"], "dir": str(tmp_path / "clean")}}, workers=2)
    assert clean_rep["run"]["shards_resumed"] == 0
    killed_files, clean_files = output_files(tmp_path / "killed"), output_files(tmp_path / "clean")
    assert killed_files.keys() == clean_files.keys()
    for name in clean_files:
        assert killed_files[name] == clean_files[name], name
    assert not [p for p in (tmp_path / "killed").rglob(".tmp.*")]  # no leftovers
    check_accounting(rep)


def test_report_merge_examples_and_balance():
    shard = {"documents_in": 3, "documents_out": 1, "dropped": {"a:x": 1}, "errors": 1, "bytes_in": 30,
             "bytes_out": 8, "bytes_dropped": {"a:x": 10}, "bytes_errors": 10, "bytes_edited": 2,
             "per_source": {}, "steps": [], "error_kinds": {"invalid_json": 1},
             "examples": {"a:x": [{"id": "1", "text": "t"}, {"id": "2", "text": "u"}]}}
    shard["per_source"] = {"s": {k: shard[k] for k in report_mod.COUNT_KEYS + ("dropped", "bytes_dropped")}}
    rep = report_mod.merge("n", [], [shard, shard], examples_per_reason=3)
    assert rep["documents_in"] == 6 and rep["dropped"] == {"a:x": 2} and rep["accounted"]
    assert [e["id"] for e in rep["examples"]["a:x"]] == ["1", "2", "1"]
    bad = dict(shard, documents_out=2)
    assert not report_mod.merge("n", [], [bad])["accounted"]


def _english_page(rng, i):
    adj = "quiet old busy small bright local northern modern public early famous new".split()
    noun = "council library river bridge market school station garden museum harbour village farmer teacher".split()
    verb = "opened visited repaired described praised closed reviewed improved funded painted".split()
    sentences = [f"The {rng.choice(adj)} {rng.choice(noun)} {rng.choice(verb)} the {rng.choice(adj)} "
                 f"{rng.choice(noun)} with {rng.choice(['care', 'help', 'pride', 'money'])} and "
                 f"{rng.choice(['patience', 'skill', 'speed', 'humour'])} that {rng.choice(['spring', 'summer', 'week', 'year'])} "
                 f"{rng.randint(1900, 2024)}." for _ in range(rng.randint(12, 20))]
    paras = ["".join(f"<p>{s}</p>" for s in sentences[k:k + 4]) for k in range(0, len(sentences), 4)]
    return (f"<html><head><title>Story {i}</title></head><body><nav>Home | News | Contact</nav><article>"
            + "".join(paras) + f"<p>Write to editor{i}@example.com with any questions about the story.</p>"
            + "</article><footer>Copyright 2024</footer></body></html>")


def test_web_preset_end_to_end_on_a_warc(tmp_path):
    """configs/data/web.yaml through `danlu clean` on a WARC written here: extraction, language,
    Gopher, C4, FineWeb, PII; every record accounted for."""
    from danlu.cli import main as danlu
    from test_clean_readers import _http, _warc_bytes

    rng = random.Random(0)
    records = [("response", f"http://news.example/{i}", _http(_english_page(rng, i).encode())) for i in range(12)]
    records.append(("response", "http://x/de", _http(("<p>" + "Der Zug kam heute Morgen pünktlich an, und die "
                                                     "Reisenden waren sehr zufrieden. " * 12 + "</p>").encode())))
    records.append(("response", "http://x/short", _http(b"<p>Too short.</p>")))
    records.append(("response", "http://x/img", _http(b"GIF89a", ctype="image/gif")))
    (tmp_path / "cc.warc.gz").write_bytes(_warc_bytes(records))
    out = tmp_path / "web"
    rc = danlu(["clean", str(ROOT / "configs/data/web.yaml"), "output.rejected=true", "--input",
                str(tmp_path / "cc.warc.gz"), "--output", str(out), "--workers", "1", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    check_accounting(rep)
    assert rep["documents_in"] == 15 and rep["per_source"]["commoncrawl"]["documents_in"] == 15
    assert rep["dropped"]["warc:not_html"] == 1
    assert any(r.startswith("language:") for r in rep["dropped"])
    kept = read_docs((out / "documents").glob("*.jsonl.gz"))
    assert len(kept) >= 8, rep["dropped"]
    assert all("html" not in d and d["url"].startswith("http://news.example/") and d["title"].startswith("Story")
               for d in kept)
    assert all("@example.com" not in d["text"] and "Home | News" not in d["text"] for d in kept)
    assert rep["pii_redactions"]["email"] == len(kept)  # one address per kept story, counted in the report
    rejected = read_docs((out / "rejected").glob("*.jsonl.gz"))
    de = [d for d in rejected if d["url"] == "http://x/de"]
    assert de and de[0]["drop_reason"].startswith("language:") and "Der Zug" in de[0]["text"]
