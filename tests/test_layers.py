"""The layers hold: every import statement of every module (top level or inside a function) is
checked against the rules of danlu/__init__.py, and importing a package loads no other."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("danlu", "pretrain", "data_pipeline", "launch")


def layer(module: str) -> str:
    """'base' (danlu.base), 'top' (the rest of danlu), or the package name."""
    if module == "danlu.base" or module.startswith("danlu.base."):
        return "base"
    top = module.split(".")[0]
    return "top" if top == "danlu" else top


ALLOWED = {"base": {"base"}, "pretrain": {"base", "pretrain"}, "data_pipeline": {"base", "data_pipeline"},
           "launch": {"base", "launch"}, "top": {"base", "top", "pretrain", "data_pipeline", "launch"}}


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of danlu's packages in `path` (or in `source`,
    taken as the text of the module at `path`)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_no_import_runs_up_or_sideways():
    bad = []
    for path in modules():
        src = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, name in imports_of(path):
            if layer(name) not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {name} ({layer(name)})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation():
    """The rule fires on a sideways import written inside a function, and on a relative one."""
    source = "def f():\n    from pretrain.config import load_config\n    from ..data_pipeline import io\n"
    names = [n for _, n in imports_of(ROOT / "launch" / "probe.py", source)]
    assert names == ["pretrain.config", "data_pipeline"]
    assert {layer(n) for n in names} - ALLOWED["launch"] == {"pretrain", "data_pipeline"}


@pytest.mark.parametrize("package,others", [
    ("pretrain.train", ("data_pipeline", "launch", "danlu.cli")),
    ("data_pipeline.clean", ("pretrain", "launch", "danlu.cli")),
    ("launch.tpu", ("pretrain", "data_pipeline", "danlu.cli")),
])
def test_importing_a_package_loads_no_other(package, others):
    code = (f"import sys, {package}; "
            f"print(sorted({{m.split('.')[0] if not m.startswith('danlu') else m for m in sys.modules}} & {set(others)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {package} loaded {out.stdout.strip()}"
