"""The one loader of run, study and search files: YAML plus `key.path=value` overrides, into dataclasses.

`load_yaml` reads a file's mapping (strict YAML 1.2, `pipeline/yamlio.py`), reads the files some top-level
keys name in their place (`includes`) and applies the overrides; `build` makes a dataclass from that mapping,
refusing unknown keys and values of the wrong type with a ValueError naming the field; `to_dict` and
`dump_yaml` go back. Nothing here knows a particular config: `pipeline/config.py` holds RunConfig,
`pipeline/study/spec.py` the study's and `pipeline/search/space.py` the search's.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

import yaml

from attamba.checks import boolean, fail, integer, number

from pipeline import yamlio

def load_yaml(path: str | Path | None, overrides: list[str] | None = None, *, kind: str = "config",
              hint: str = "", includes: tuple[str, ...] = ()) -> dict:
    """The mapping in YAML file `path` (None: an empty one) with `key.path=value` overrides applied.

    Errors name the file as "{kind} file 'path'" and end with `hint` (where to find examples).
    `includes` are top-level keys whose value may be the path of another YAML file, relative to this one,
    read in its place (a study's base `run`): before the overrides, so `run.train.steps=8` reaches into
    it, and after them, so `run=other.yaml` works too.
    """
    data = {} if path is None else _read_mapping(Path(path), kind, hint)
    data = _read_includes(data, path, kind, includes)
    data = apply_overrides(data, overrides or [])
    return _read_includes(data, path, kind, includes)   # an override may name another file


def _read_includes(data: dict, path: str | Path | None, kind: str, includes: tuple[str, ...]) -> dict:
    for key in includes:
        name = data.get(key)
        if isinstance(name, str):
            where = Path(path).parent if path is not None else Path(".")
            hint = f"give a path relative to the {kind} file's folder {str(where)!r}"
            data = {**data, key: _read_mapping(where / name, key, hint)}   # an absolute name stays absolute
    return data


# YAML 1.2 decimal numbers as text (a quoted "1e-3" in a float field is read as the number)
NUMBER_TEXT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")   # decimal, no nan/inf
MAX_MESSAGE = 300   # characters of a YAML problem quoted in an error


def _parse(text: str):
    return yamlio.parse(text)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a PyYAML error (1-based, the place the parser stopped)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or _one_line(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _one_line(where + (f"{context}, {problem}" if context else problem))[:MAX_MESSAGE]


def _read_mapping(path: Path, kind: str, hint: str) -> dict:
    tail = f"; {hint}" if hint else ""
    try:
        text = yamlio.read_file(path)
    except ValueError as exc:
        raise ValueError(f"{kind} file {str(path)!r} {exc}{tail}") from None
    try:
        data = _parse(text)
    except yamlio.StrictYAMLError as exc:
        raise ValueError(f"{kind} file {str(path)!r} is refused at {_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{kind} file {str(path)!r} is not valid YAML at {_yaml_error(exc)}") from None
    if data is None:
        raise ValueError(f"{kind} file {str(path)!r} is empty (no keys, only comments or blank lines); write the "
                         f"settings that differ from the defaults{tail}")
    if not isinstance(data, dict):
        raise ValueError(f"{kind} file {str(path)!r} must hold a mapping of keys at the top level, got a "
                         f"{type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings; the value is parsed as YAML (so 8 is an int, 1e-3 a float, true a bool, [1,2] a
    list).
    Returns a new dict; the mappings on each override's path are copied, never changed in place."""
    data = dict(data)
    for item in overrides:
        path, eq, raw = item.partition("=")
        keys = path.strip().split(".")
        if not eq or not all(keys):
            raise ValueError(f"override {item!r} must look like key.path=value")
        try:
            value = _parse(raw) if raw != "" else ""
        except yamlio.StrictYAMLError as exc:
            raise ValueError(f"override {item!r}: the value is refused: {_yaml_error(exc)}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {_yaml_error(exc)}") from None
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is not None and not isinstance(child, dict):
                where = ".".join(keys[:depth + 1])
                raise ValueError(f"override {item!r}: {where} is {child!r}, not a mapping; override {where} "
                                 f"itself or fix the path")
            node[k] = dict(child or {})
            node = node[k]
        node[keys[-1]] = value
    return data


def to_dict(obj) -> dict:
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        return value
    return convert(obj)


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _check_type(name: str, value, hint):
    """Coerce/check a YAML value against a field's type hint; ValueError naming the field otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail(name, value, "a list")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else typing.Any
        items = [_check_type(name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            fail(name, value, f"a mapping of {hint.__name__} fields", f"indent its keys under {name}")
        return build(hint, value, f"{name}.")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            fail(name, value, "a mapping of keys", f"indent its keys under {name}")
        return value
    if hint is bool:
        return boolean(name, value)
    if hint is int:
        return integer(name, value)
    if hint is float:
        if isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip()):
            value = float(value)   # "1e-3" (YAML 1.1 reads an exponent without a dot as text), quoted numbers
        return float(number(name, value))   # each section's checks refuse infinities where they do not belong
    if hint is str and not isinstance(value, str):
        fail(name, value, "a string")
    return value


def build(cls, data: dict | None, prefix: str = ""):
    """Instantiate dataclass `cls` from a dict, recursively; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                fail(prefix + key, value, f"a mapping of {hint.__name__} fields")
            kwargs[key] = build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        # Field checks inside attamba.config name fields from their own section ("ssm.state_dim"); give them
        # their place in the file without repeating the part of the place they already name.
        if prefix and not message.startswith(prefix):
            parts = prefix.rstrip(".").split(".")
            named = next((i for i in range(len(parts)) if message.startswith(".".join(parts[i:]) + ".")), len(parts))
            message = "".join(f"{p}." for p in parts[:named]) + message
        raise ValueError(message) from None
