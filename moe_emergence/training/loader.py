"""Generic typed YAML loader for nested dataclasses, with dotted ``key=value`` overrides.

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Any``, ``Literal[...]``, ``X | None``,
other unions (tried in order), ``list[X]``, ``dict[str, X]`` and nested dataclasses. Every error is a
``ValueError`` naming the full dotted key; an unknown key comes with the closest valid key (difflib).

YAML inheritance: a top-level ``base: parent.yaml`` (a path relative to the file) loads the parent first
and deep-merges the child over it: mappings merge key by key, everything else (lists, scalars, null)
replaces; a child mapping with ``_replace: true`` replaces the parent's mapping instead of merging. Overrides are parsed as YAML scalars (``train.steps=10``, ``model.moe=null``,
``model.moe.layers=[8,9]``) and applied after inheritance.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from moe_emergence.errors import ConfigError  # re-exported: the user-error type
from moe_emergence.yamlio import DuplicateKeyError, strict_load

T = TypeVar("T")
INHERIT_KEY = "base"
REPLACE_KEY = "_replace"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Allowed keys: {', '.join(sorted(allowed))}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking every key and type."""
    return _convert(cls, data, prefix)


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigError(
            f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {_join(prefix, str(key))!r}{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(_dotted_message(cls, str(e), prefix)) from e


def _dotted_message(cls: type, message: str, prefix: str) -> str:
    """A dataclass's own validation message with its class name (``MoEConfig.top_k=9 is invalid``) replaced by
    the dotted key it was loaded from (``model.moe.top_k=9 is invalid``); other messages get the key prefixed."""
    own = f"{cls.__name__}."
    if prefix and message.startswith(own):
        return f"{prefix}.{message[len(own) :]}"
    return f"{prefix or 'config'}: {message}"


def _convert(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: null is not allowed, expected {_type_name(tp)}")
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _convert(alt, value, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)} ({'; '.join(errors)})")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, f"{key} (key {k!r})"): _convert(val_tp, v, _join(key, str(k)))
            for k, v in value.items()
        }
    return _convert_scalar(tp, value, key)


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):  # .inf, .nan, "1e999": never a meaningful setting
                raise ConfigError(f"{key}={value!r} is invalid: expected a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    else:
        raise TypeError(f"{key}: the config loader does not support field type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _as_float(value: Any) -> float | None:
    """``value`` as a float when it is a number, or a string PyYAML left unparsed ("1e-3" has no dot)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# ----------------------------------------------------------------------------- YAML files and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, with ``base:`` inheritance resolved (module docstring)."""
    return _read_yaml(Path(path), ())


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' inheritance through {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from e
    try:
        data = strict_load(text)
    except DuplicateKeyError as e:
        raise ConfigError(
            f"{path}: duplicate key {e.key!r} at line {e.problem_mark.line + 1} (first at line "
            f"{e.first_line}); each key may appear once per mapping"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a file name, got {parent!r}")
    return deep_merge(_read_yaml(path.parent / parent, (*seen, path)), data)


def deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: mappings merge recursively (unless the child's has ``_replace: true``),
    anything else replaces."""
    out = dict(parent)
    for k, v in child.items():
        if isinstance(v, dict) and v.get(REPLACE_KEY) is True:
            out[k] = {kk: vv for kk, vv in v.items() if kk != REPLACE_KEY}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key component in {key!r}")
    try:
        value = strict_load(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise ConfigError(f"override {text!r}: duplicate key {e.key!r} in the value") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with every ``key.path=value`` override set (missing mappings are created)."""
    data = deep_merge({}, data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where!r} is {child!r}, not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) form of a config dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
