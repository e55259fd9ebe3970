"""Every shipped cleaning preset (configs/data/*.yaml) parses, names known readers with valid
options, and builds its steps (unknown steps or bad thresholds would fail here)."""
from pathlib import Path

import pytest

from data_pipeline import clean as C
from data_pipeline import readers as R
from data_pipeline.steps import build_steps

PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs" / "data").glob("*.yaml"))


def test_the_four_presets_exist():
    assert {p.stem for p in PRESETS} >= {"web", "books", "code", "mixed"}


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_and_builds(path):
    text = path.read_text()
    assert text.startswith("#") and "danlu clean configs/data/" in text.split("\nname:")[0]  # self-documenting header
    cfg = C.load_config(path)
    assert cfg.inputs and cfg.steps and cfg.output.dir
    steps = build_steps(list(cfg.steps))
    assert [s.name for s in steps]
    if cfg.stages:  # corpus stages (dedup) build too
        from data_pipeline.dedup.stages import check_stage_config

        assert len(check_stage_config(list(cfg.stages), dict(cfg.stage_options))) == len(cfg.stages)
    for i, inp in enumerate(cfg.inputs):
        reader = R.guess_reader(inp.path) if inp.reader == "auto" else inp.reader
        assert reader in R.READERS
        R.check_options(reader, C.reader_options(cfg, inp, reader, f"inputs[{i}]"), f"inputs[{i}]")
    if any(i.reader == "warc" and "response" in C.reader_options(cfg, i, "warc", "").records for i in cfg.inputs):
        assert steps[0].name == "html_extract"
    # an override reaches a step: a numeric parameter of the last step with one, changed
    import dataclasses

    for step in reversed(steps):
        numeric = [f for f in dataclasses.fields(step) if type(getattr(step, f.name)) in (int, float)]
        if numeric:
            break
    else:
        return
    field = numeric[0].name
    old = getattr(step, field)
    value = old + 1 if isinstance(old, int) else (old / 2 if old else 0.5)  # stays in range (fractions too)
    built = build_steps(list(C.load_config(path, [f"steps.{step.name}.{field}={value}"]).steps))
    assert getattr(next(s for s in built if s.name == step.name), field) == value
