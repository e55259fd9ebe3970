"""A real, offline text corpus for the cleaning benchmark (bench/clean_throughput.py).

Nothing is downloaded and nothing is synthetic: documents come from what this machine has.
  - "html": HTML documentation pages (the Rust book, reference, nomicon, std docs and the
    rest of a rustup toolchain's docs; Node.js API docs; HTML under /usr/share/doc), main
    text extracted with resiliparse, the way a web crawl's pages are;
  - "text": plain-text documentation (/usr/share/doc READMEs, NEWS and changelogs, git
    release notes, vim help);
  - "man": manual pages rendered to text by `man`;
  - "pydoc": pydoc renderings of standard-library modules (data_pipeline.demo_corpus).
Each source is sampled in the order of a hash of the file's path (a spread, not a-c), up to a
per-source cap; the corpus is written once to a JSONL file and reused.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from danlu.base import fs as dio  # noqa: E402

MAX_CHARS = 200_000  # one document; longer ones are cut (a real crawl caps pages too)

HTML_GLOBS = [
    "/root/.rustup/toolchains/*/share/doc/rust/html/book/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/reference/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/nomicon/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/rust-by-example/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/cargo/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/edition-guide/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/rustc/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/unstable-book/**/*.html",
    "/root/.rustup/toolchains/*/share/doc/rust/html/std/**/*.html",
    "/usr/share/doc/nodejs/api/*.html",
    "/usr/share/doc/**/*.html",
]
TEXT_GLOBS = [
    "/usr/share/doc/*/README*",
    "/usr/share/doc/*/NEWS*",
    "/usr/share/doc/*/changelog*.gz",
    "/usr/share/doc/git/RelNotes/*.txt",
    "/usr/share/vim/vim*/doc/*.txt",
]
MAN_GLOB = "/usr/share/man/man[1-8]/*"


def _key(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()


def _sample(globs: list[str], cap: int) -> list[str]:
    paths = sorted({p for g in globs for p in glob.glob(g, recursive=True) if os.path.isfile(p)})
    # The stable and nightly toolchains ship the same pages: keep one copy of each.
    seen, unique = set(), []
    for p in sorted(paths, key=_key):
        tail = p.split("/share/doc/rust/html/")[-1]
        if tail in seen:
            continue
        seen.add(tail)
        unique.append(p)
    return unique[:cap]


def _read(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _html_docs(cap: int) -> list[dict]:
    from resiliparse.extract.html2text import extract_plain_text

    docs = []
    for p in _sample(HTML_GLOBS, cap * 2):
        text = extract_plain_text(_read(p), preserve_formatting=True, main_content=True,
                                  list_bullets=True, alt_texts=False)
        if len(text.strip()) >= 200:
            docs.append({"id": f"html:{p}", "text": text[:MAX_CHARS], "source": "html"})
        if len(docs) >= cap:
            break
    return docs


def _text_docs(cap: int) -> list[dict]:
    docs = []
    for p in _sample(TEXT_GLOBS, cap * 2):
        text = _read(p)
        if len(text.strip()) >= 200 and "\x00" not in text:
            docs.append({"id": f"text:{p}", "text": text[:MAX_CHARS], "source": "text"})
        if len(docs) >= cap:
            break
    return docs


def _man_docs(cap: int) -> list[dict]:
    docs = []
    env = dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0", LANG="C.UTF-8")
    for p in _sample([MAN_GLOB], cap * 2):
        try:
            out = subprocess.run(["man", "-E", "UTF-8", "-l", p], capture_output=True, env=env, timeout=10)
        except (subprocess.TimeoutExpired, OSError):
            continue
        text = out.stdout.decode("utf-8", errors="replace")
        # `man` to a pipe still overstrikes bold/underline (c\bc, _\bc): keep the last char.
        while "\b" in text:
            i = text.index("\b")
            text = text[: i - 1] + text[i + 1:] if i > 0 else text[1:]
        if len(text.strip()) >= 200:
            docs.append({"id": f"man:{p}", "text": text[:MAX_CHARS], "source": "man"})
        if len(docs) >= cap:
            break
    return docs


def _pydoc_docs(cap: int, tmp: str) -> list[dict]:
    from data_pipeline.demo_corpus import build_demo_corpus

    path = os.path.join(tmp, "demo.jsonl")
    build_demo_corpus(path, max_docs=2 * cap)
    docs = [d for d in dio.read_jsonl(path) if d["source"] == "docs"][:cap]
    return [{"id": f"pydoc:{d['module']}", "text": d["text"][:MAX_CHARS], "source": "pydoc"} for d in docs]


def build_corpus(out_path: str, per_source: int = 1500) -> dict:
    """Writes the corpus to `out_path` (JSONL) and returns {source: documents}."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        docs = (_html_docs(per_source * 2) + _text_docs(per_source) + _man_docs(per_source // 2)
                + _pydoc_docs(per_source // 3, tmp))
    docs.sort(key=lambda d: _key(d["id"]))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    dio.write_jsonl(out_path + ".tmp", docs)
    os.replace(out_path + ".tmp", out_path)
    counts: dict[str, int] = {}
    for d in docs:
        counts[d["source"]] = counts.get(d["source"], 0) + 1
    return counts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_path")
    ap.add_argument("--per-source", type=int, default=1500)
    a = ap.parse_args()
    print(json.dumps(build_corpus(a.out_path, a.per_source)))
