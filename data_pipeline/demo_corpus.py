"""A small real corpus from what every Python install has: nothing is downloaded.

Two sources:
  - "code": the standard library's own .py files, as they are on disk, plus (optional,
    `packages=`) the .py files of installed packages, such as the pinned jax and flax
    that danlu itself depends on: more text than the standard library's ~15 MB;
  - "docs": pydoc's plain-text rendering of standard-library modules (what `help(json)`
    prints): English prose with signatures, a different register from the code.

Every document names its module in `group` ("json.decoder" for both json/decoder.py and
the rendered docs of json.decoder), so a split by group (tokenize's `split_by="group"`)
keeps a module's docs out of eval when its code is in train: pydoc prints the code's
docstrings again.

Content is fixed by the Python version (and its build): files are chosen in the order
of a hash of their relative path (a spread over the library instead of just a-c) until
the byte budget is spent, then written sorted. The docs are rendered in a child process
(`-S`, PYTHONHASHSEED=0, empty working directory) so imports with side effects stay out
of this process, installed packages cannot shadow the standard library, set and dict
reprs do not vary run to run, and a module that hangs on import is cut off by an alarm.
Object addresses ("at 0x7f...") and the install prefix are scrubbed from the text.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Sequence

from danlu.base import fs as dio

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DOCS_SHARE = 0.5  # at most this share of the budget goes to rendered docs; code fills the rest

# Imported for their side effects (browsers, printing, GUI, terminal state, writing
# caches into the stdlib), platform-specific, or tests: never imported, never read.
SKIP_MODULES = frozenset({
    "antigravity", "this", "__hello__", "__phello__", "tkinter", "turtle", "turtledemo",
    "idlelib", "test", "tests", "lib2to3", "ensurepip", "venv", "distutils", "pydoc_data",
    "readline", "rlcompleter", "msilib", "winreg", "winsound", "msvcrt", "nt", "_winapi",
    "xxsubtype", "xxlimited", "xxlimited_35", "site", "sitecustomize", "usercustomize",
})
# Their docs are mostly a dump of this process's state (sys.path, sys.modules, with
# reprs truncated mid-path so paths cannot be scrubbed): read as code only.
SKIP_DOCS = frozenset({"sys"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                       "__pycache__", "turtledemo", "idlelib", "tkinter", "lib2to3", "ensurepip",
                       "pydoc_data", "distutils", "venv", "config-3", "encodings"})

_ADDRESS_RE = re.compile(r"( at 0x| handle )[0-9a-fA-F]+")  # object reprs, ctypes.CDLL reprs

# Runs in the child: reads {"timeout": s, "modules": [...]} on stdin and renders each
# module, one JSON line each on the original stdout; whatever modules print while
# importing goes to /dev/null. argv is reset because `sys`'s docs print it.
_RENDER_CHILD = r"""
import contextlib, io, importlib, json, os, pydoc, signal, sys, warnings
warnings.simplefilter("ignore")
job = json.load(sys.stdin)
sys.argv = ["python"]
sys.orig_argv = ["python"]
out = os.fdopen(os.dup(1), "w", encoding="utf-8")
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1); os.dup2(devnull, 2)
def on_alarm(*_):
    raise TimeoutError("import/render took too long")
signal.signal(signal.SIGALRM, on_alarm)
for name in job["modules"]:
    signal.alarm(job["timeout"])
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = importlib.import_module(name)
            text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        rec = {"module": name, "text": text}
    except BaseException as e:  # SystemExit and friends too: one module never ends the job
        rec = {"module": name, "error": type(e).__name__ + ": " + str(e)[:200]}
    finally:
        signal.alarm(0)
    out.write(json.dumps(rec) + "\n"); out.flush()
"""


def _stable_key(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _py_files(root: str) -> list[str]:
    """Relative paths of the .py files under root (the standard library or an installed package),
    tests and tooling excluded, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-3"))
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def package_py_files(package: str) -> list[tuple[str, str]]:
    """(relative path under site-packages, absolute path) of an installed package's .py
    files, tests excluded, sorted; found without importing it. Raises ValueError when the
    package is not installed or is a single module."""
    if package in getattr(sys, "stdlib_module_names", ()):
        raise ValueError(f"demo corpus: package {package!r} is part of the standard library, already in the corpus")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not roots:
        raise ValueError(f"demo corpus: package {package!r} is not installed as a package (no directory to read)")
    out = []
    for root in roots:
        for rel in _py_files(root):
            out.append((f"{package}/{rel}", os.path.join(root, rel)))
    return sorted(out)


def module_group(relpath: str) -> str:
    """The module a .py path holds: 'json/decoder.py' -> 'json.decoder', 'json/__init__.py' -> 'json'."""
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _module_name(relpath: str) -> str | None:
    """'json/decoder.py' -> 'json.decoder'; None for private or skipped modules."""
    parts = relpath[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(p.startswith("_") for p in parts) or parts[0] in SKIP_MODULES:
        return None
    if any(p in SKIP_MODULES for p in parts):
        return None
    return ".".join(parts)


def _doc_modules(py_files: list[str]) -> list[str]:
    """Public stdlib modules to document: built-in (C) ones plus those with .py files."""
    names = {n for n in getattr(sys, "stdlib_module_names", ()) if not n.startswith("_")}
    names |= {m for m in (_module_name(p) for p in py_files) if m}
    return sorted(n for n in names if n.split(".")[0] not in SKIP_MODULES and n not in SKIP_DOCS)


def _render_docs(modules: list[str], per_module_timeout_s: int, total_timeout_s: float) -> tuple[dict, int]:
    """{module: text} rendered in a child process; also the number of modules that failed."""
    # A fixed, minimal environment: docs print os.environ (e.g. cgi's default arguments)
    # and time zone / locale data, which must neither leak secrets nor vary by machine.
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8", "TZ": "UTC", "PATH": os.defpath,
           "HOME": "/nonexistent"}
    cmd = [sys.executable, "-S", "-c", _RENDER_CHILD]
    job = json.dumps({"timeout": per_module_timeout_s, "modules": modules}).encode()
    with tempfile.TemporaryDirectory() as cwd:  # nothing in cwd can shadow a stdlib module
        try:
            stdout = subprocess.run(cmd, input=job, cwd=cwd, env=env, capture_output=True,
                                    timeout=total_timeout_s, check=False).stdout
        except subprocess.TimeoutExpired as e:  # keep what was rendered before the cut
            stdout = e.stdout or b""
    texts, failed = {}, 0
    for line in stdout.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "text" in rec:
            texts[rec["module"]] = rec["text"]
        else:
            failed += 1
    return texts, failed


def _scrub(text: str, root: str) -> str:
    """Removes what differs run to run (addresses) or machine to machine (install paths)."""
    text = _ADDRESS_RE.sub(lambda m: m.group(1) + "...", text)
    text = text.replace(root + os.sep, "").replace(root, "<stdlib>")
    for path, name in sorted(_install_paths().items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


def _install_paths() -> dict[str, str]:
    paths = {sys.executable: "python", os.path.realpath(sys.executable): "python"}
    for attr in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix"):
        paths[getattr(sys, attr)] = "<prefix>"
    return {p: n for p, n in paths.items() if p and p != os.sep}


def _take(items: list[tuple[str, str]], budget: int, max_item: int,
          max_count: int | None) -> list[tuple[str, str]]:
    """Items (name, text) in hash order of name while the UTF-8 size fits the budget; sorted."""
    chosen, used = [], 0
    for name, text in sorted(items, key=lambda it: _stable_key(it[0])):
        if max_count is not None and len(chosen) >= max_count:
            break
        n = len(text.encode("utf-8"))
        if n == 0 or n > max_item or used + n > budget:
            continue  # one huge file must not eat the budget; smaller ones may still fit
        chosen.append((name, text))
        used += n
    return sorted(chosen)


def build_demo_corpus(out_path: str, max_docs: int | None = None,
                      max_bytes: int = DEFAULT_MAX_BYTES, packages: Sequence[str] = ()) -> dict:
    """Writes the demo corpus as JSONL to `out_path` (.gz/.zst by suffix) and returns stats.

    Documents: {"id": "code:json/decoder.py", "text", "source": "code", "path": "json/decoder.py",
    "group": "json.decoder"} and {"id": "docs:json.decoder", "text", "source": "docs",
    "module": "json.decoder", "group": "json.decoder"}; docs first, then code, each sorted by id.

    Args:
      out_path: output file.
      max_docs: at most this many documents (split like the bytes: docs up to half).
      max_bytes: budget of text bytes (UTF-8). Docs take up to half; code gets the rest.
      packages: installed packages whose .py files join the code (path "jax/_src/api.py"),
        chosen with the standard library's files by the same hash order. The text then
        depends on the installed versions too.

    Returns:
      {"path", "documents", "bytes", "python", "seconds", "sources": {source: {"documents",
      "bytes"}}, "docs_failed": modules whose docs could not be rendered}.
    """
    t0 = time.perf_counter()
    root = stdlib_dir()
    py_files = _py_files(root)
    max_item = max(1, max_bytes // 16)

    docs_budget = int(max_bytes * DOCS_SHARE)
    modules = _doc_modules(py_files)
    max_doc_count = None if max_docs is None else (max_docs + 1) // 2
    if max_doc_count is not None:
        # Rendering is most of the time: for a small corpus, render only the first
        # candidates in selection order, with room for ones that fail or do not fit.
        modules = sorted(sorted(modules, key=_stable_key)[: 2 * max_doc_count + 8])
    rendered, failed = _render_docs(modules, per_module_timeout_s=5, total_timeout_s=120)
    docs = _take([(m, _scrub(t, root)) for m, t in rendered.items()], docs_budget, max_item, max_doc_count)
    used = sum(len(t.encode("utf-8")) for _, t in docs)

    files = [(rel, os.path.join(root, rel)) for rel in py_files]
    for package in packages:
        files += package_py_files(package)
    code_items = []
    for rel, path in files:
        try:
            with open(path, "rb") as f:
                code_items.append((rel, f.read().decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # a few files are in legacy encodings; not worth special-casing
    code = _take(code_items, max_bytes - used, max_item,
                 None if max_docs is None else max_docs - len(docs))

    records = [{"id": f"docs:{m}", "text": t, "source": "docs", "module": m, "group": m} for m, t in docs]
    records += [{"id": f"code:{p}", "text": t, "source": "code", "path": p, "group": module_group(p)}
                for p, t in code]
    dio.write_jsonl(out_path, records)

    sources = {}
    for r in records:
        s = sources.setdefault(r["source"], {"documents": 0, "bytes": 0})
        s["documents"] += 1
        s["bytes"] += len(r["text"].encode("utf-8"))
    return {
        "path": out_path,
        "documents": len(records),
        "bytes": sum(s["bytes"] for s in sources.values()),
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - t0, 2),
        "sources": dict(sorted(sources.items())),
        "docs_failed": failed,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the embedded demo corpus as JSONL")
    ap.add_argument("out_path")
    ap.add_argument("--max-docs", type=int, default=None)
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    ap.add_argument("--packages", nargs="*", default=[], help="installed packages whose .py files join the code")
    a = ap.parse_args()
    print(json.dumps(build_demo_corpus(a.out_path, a.max_docs, a.max_bytes, a.packages), indent=2))
