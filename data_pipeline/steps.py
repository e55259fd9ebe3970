"""Pipeline steps: the unit a cleaning job is composed of (reader -> steps -> writer).

A document is a plain ``dict`` (docs/design.md: ``{"id", "text", "source", ...}``); every step keeps
``id`` and the fields it does not know. A step sees one document at a time and returns either the
document (possibly changed, possibly annotated with new fields) or a `Drop` carrying the reason.
That per-document shape is what lets the same step run in the local runner (a loop per shard in a
worker process) and in the Beam runner (a ``FlatMap``), and keeps steps small and testable.

Steps are registered by name and built from YAML:

    steps:
      - normalize
      - {step: language, languages: [en], min_score: 0.65}
      - {step: gopher_quality, min_words: 50}

`build_step` rejects an unknown step name or parameter (with a "did you mean") and each step's
`check()` rejects a bad threshold, all before any document is read.

Drop reasons are ``"<step name>:<short reason>"``, e.g. ``"gopher_quality:too_few_words"``; the
runner counts them per step and per source and can write dropped documents aside.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, Iterable, Iterator


class StepError(ValueError):
    """A step name, parameter or threshold that cannot be used; raised before any work starts."""


@dataclasses.dataclass(frozen=True)
class Drop:
    """The verdict of a step that removes a document. `reason` is "<step>:<reason>"."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Step:
    """Base class: subclasses are frozen dataclasses whose fields are the step's parameters.

    Subclasses set `name` (the registry key used in YAML) and implement `apply`. Parameters
    default to the published values of the rule the step reproduces.
    """

    name: ClassVar[str] = ""

    def check(self) -> None:
        """Raises StepError naming the parameter when a value is out of range. Override to add rules."""

    def apply(self, doc: dict) -> dict | Drop:
        """One document in; the document (maybe changed) or a Drop out."""
        raise NotImplementedError

    def drop(self, reason: str) -> Drop:
        return Drop(f"{self.name}:{reason}")

    def __call__(self, docs: Iterable[dict]) -> Iterator[dict | Drop]:
        """The iterator form: documents in, documents or drops out (one result per input)."""
        for doc in docs:
            yield self.apply(doc)


class Filter(Step):
    """A step that only keeps or drops: implement `reason(doc)` returning None to keep."""

    def reason(self, doc: dict) -> str | None:
        raise NotImplementedError

    def apply(self, doc: dict) -> dict | Drop:
        why = self.reason(doc)
        return doc if why is None else self.drop(why)


REGISTRY: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: makes a step buildable from YAML under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"step name {cls.name!r} registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def _load_builtin_steps() -> None:
    """Imports the modules that register the shipped steps (kept lazy to keep imports light)."""
    import importlib

    for module in BUILTIN_STEP_MODULES:
        importlib.import_module(module)


# Modules whose import registers steps. Each room adds its module here.
BUILTIN_STEP_MODULES: list[str] = ["data_pipeline.dedup.decontam", "data_pipeline.quality", "data_pipeline.extract", "data_pipeline.filters"]


def build_step(spec: str | dict[str, Any], where: str = "steps") -> Step:
    """A step from its YAML form: a bare name, or a mapping with `step:` and parameters.

    `where` names the place in the config for error messages (e.g. "web.yaml: steps[3]").
    """
    _load_builtin_steps()
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and "step" in spec:
        params = dict(spec)
        name = params.pop("step")
    else:
        raise StepError(f"{where}: a step is a name or a mapping with a 'step' key, got {spec!r}")
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known steps: {', '.join(sorted(REGISTRY))}"
        raise StepError(f"{where}: unknown step {name!r}{hint}")
    return instantiate(REGISTRY[name], name, params, where, "step")


def instantiate(cls: type, name: str, params: dict[str, Any], where: str, kind: str) -> Any:
    """`cls(**params)` for a step or corpus stage (a frozen dataclass with a `check()`), with
    StepErrors naming `where`, the `kind` ("step"/"stage") and the unknown or bad parameter."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; parameters: {', '.join(fields) or 'none'}"
            raise StepError(f"{where}: {kind} {name!r} has no parameter {key!r}{hint}")
    try:
        obj = cls(**params)
    except (TypeError, ValueError) as e:  # ValueError: a parameters dataclass that checks itself
        raise StepError(f"{where}: {kind} {name!r}: {e}") from None
    try:
        obj.check()
    except StepError as e:
        raise StepError(f"{where}: {kind} {name!r}: {e}") from None
    return obj


def build_steps(specs: list, where: str = "steps") -> list[Step]:
    return [build_step(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]


def require(condition: bool, message: str) -> None:
    """For `Step.check`: raises StepError(message) unless condition holds."""
    if not condition:
        raise StepError(message)


