"""`danlu` entry point: a missing optional extra is one line naming the extra and how to install
it, exit code 2, for any command."""
import json
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

import danlu.cli as cli


def test_clean_beam_without_the_beam_extra(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": f"document number {i}"}) + "\n" for i in range(3)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "tiny", "inputs": [{"path": str(docs), "source": "web"}], "steps": []}))
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "data_pipeline.beam_runner", raising=False)
    rc = cli.main(["clean", str(job), "--output", str(tmp_path / "out"), "--runner", "beam", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err == "danlu clean: --runner beam needs the 'beam' extra: pip install 'danlu[beam]'"
    assert not (tmp_path / "out").exists()  # refused before any work


def _command_importing(monkeypatch, module: str) -> None:
    """`danlu fake`, the only command, imports `module`; None in sys.modules: the import fails."""
    monkeypatch.setitem(sys.modules, module, None)
    fake = types.ModuleType("danlu_fake_command")
    fake.add_arguments = lambda parser: None
    fake.main = lambda args: __import__(module)
    monkeypatch.setitem(sys.modules, "danlu_fake_command", fake)
    monkeypatch.setattr(cli, "COMMANDS", [("fake", "danlu_fake_command", "imports a module")])
    monkeypatch.setattr(cli, "LAUNCH_TARGETS", [])


@pytest.mark.parametrize("module, line", [
    ("apache_beam", "danlu fake: --runner beam needs the 'beam' extra: pip install 'danlu[beam]'"),
    ("transformers", "danlu fake: Hugging Face conversion needs the 'hf' extra: pip install 'danlu[hf]'"),
    ("libtpu", "danlu fake: compiling for a TPU topology needs the 'tpu' extra: pip install 'danlu[tpu]'"),
])
def test_any_command_missing_an_extra(monkeypatch, capsys, module, line):
    _command_importing(monkeypatch, module)
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_other_missing_modules_still_raise(monkeypatch):
    _command_importing(monkeypatch, "not_a_danlu_module")
    with pytest.raises(ModuleNotFoundError):
        cli.main(["fake"])


def test_extras_table_names_real_extras():
    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {extra for extra, _ in cli.EXTRAS.values()} <= set(extras)
    assert cli.missing_extra(ModuleNotFoundError(name="apache_beam.metrics")) == cli.EXTRAS["apache_beam"]
    assert cli.missing_extra(ModuleNotFoundError(name="yaml")) is None


def test_cpu_only_commands_do_not_probe_for_a_tpu(tmp_path):
    """`danlu fit-curve` imports jax; with libtpu installed (the `tpu` extra, as in CI) it used to
    print libtpu's start-up warnings on every call."""
    import os
    import subprocess
    from pathlib import Path

    import shutil

    recorded = sorted((Path(__file__).resolve().parent.parent / "bench" / "data" / "scaling_cpu_demo" / "runs").iterdir())[0]
    run = shutil.copytree(recorded, tmp_path / recorded.name)  # fit-curve writes curve_fit.json into the run
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "-m", "danlu.cli", "fit-curve", str(run)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TPU" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]
