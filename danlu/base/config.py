"""Typed, frozen configs from YAML and dotted ``key=value`` overrides: the one builder and the one
override parser of every danlu config (training, data jobs, sweeps, launch jobs).

- `read_yaml(path)` reads a YAML mapping; with ``includes=True`` a file may start with
  ``include: [other.yaml, ...]`` (paths relative to the file), merged first, the file on top.
- `apply_override(tree, "a.b.c=value")` sets one key of such a tree; the value is parsed as YAML,
  a list element is addressed by its index (``inputs.0.path=x``).
- `build(cls, tree)` makes the frozen dataclass: unknown keys are rejected with a did-you-mean and
  the list of known keys, values are coerced to the field types, and every error names the key.
  A field whose metadata has ``"build": fn`` is built by ``fn(raw, key)`` instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """An invalid config: the message names the key (or file) and what to change."""


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the file
    when it is missing, not YAML, or not a mapping. `what` names the file in "... not found"."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`; mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, *, includes: bool = False, what: str = "config file",
              _seen: tuple[Path, ...] = ()) -> dict:
    """The mapping in a YAML file, its ``include:`` files merged under it when `includes`."""
    if not includes:
        return read_yaml_mapping(path, what)
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in _seen]}")
    raw = read_yaml_mapping(path, what)
    inc = raw.pop("include", []) or []
    merged: dict = {}
    for name in [inc] if isinstance(inc, str) else inc:
        merged = deep_merge(merged, read_yaml(path.parent / name, includes=True, _seen=_seen + (path,)))
    return deep_merge(merged, raw)


def parse_override(item: str, example: str = "model.d_model=512") -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML; empty text is "")."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example {example})")
    key, text = item.split("=", 1)
    return key.strip().split("."), (yaml.safe_load(text) if text.strip() else "")


def set_path(tree: dict, parts: list[str], value: Any, item: str) -> None:
    """Sets ``tree[parts[0]][parts[1]]... = value``, creating sections; list elements by index."""
    node: Any = tree
    for p in parts[:-1]:
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {item!r}: {p!r} is not an index of a list of {len(node)}")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {item!r}: give an index after {parts[-2]!r}")
    node[parts[-1]] = value


def apply_override(tree: dict, item: str, example: str = "model.d_model=512") -> None:
    """Applies one dotted ``key=value`` override to a YAML tree (value parsed as YAML)."""
    parts, value = parse_override(item, example)
    set_path(tree, parts, value, item)


def unknown_key_error(key: str, known: typing.Iterable[str], prefix: str) -> ConfigError:
    """`unknown config key 'prefix.key' (did you mean ...?); known keys: ...`"""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    full = f"{prefix}.{key}" if prefix else key
    hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint}; known keys: {', '.join(sorted(known))}")


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Converts a YAML/command-line value to the field's type, or raises naming the key."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        return coerce(value, non_none[0], key)
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(v, args[0], key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping KEY: VALUE, got {value!r}")
        return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """A frozen dataclass from a mapping (YAML or dotted overrides): unknown keys are rejected with a
    did-you-mean, values coerced to the field types; errors name the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise unknown_key_error(str(k), fields, prefix)
        custom: Callable[[Any, str], Any] | None = fields[k].metadata.get("build")
        typ = hints[k]
        if custom is not None:
            kwargs[k] = custom(v, key)
        elif dataclasses.is_dataclass(typ):
            kwargs[k] = build(typ, v, key)
        else:
            kwargs[k] = coerce(v, typ, key)
    return cls(**kwargs)
