"""The one config loader: YAML files with ``base:`` chains, dotted ``key=value`` overrides, typed dataclasses
and the "did you mean" hint, for the library and every script (``RunConfig``, ``DataConfig``/``SourceConfig``,
``MoEConfig``). A dataclass keeps only its own *value* rules (ranges, allowed strings) in ``__post_init__``.
Why no library (pydantic, dacite, omegaconf): docs/architecture.md, "Configuration: one loader".

YAML is read strictly through ``yamlio`` (a key given twice is an error). A top-level ``base: parent.yaml``
(relative to the file) loads the parent and deep-merges the child over it: mappings merge key by key,
anything else replaces; a child mapping with ``_replace: true`` replaces instead. Overrides are
``key.path=value``, the value parsed as YAML (``model.moe=null``, ``model.moe.layers=[8,9]``), applied
after inheritance; missing mappings are created.

Types (``build``): ``str``; ``int`` (an integral float too); ``float`` (an int too, or a string such as
``1e-3`` that YAML 1.1 leaves unparsed; never NaN or infinite); ``bool``; ``Any``; ``Literal``; ``X | None``;
other unions (tried in order); ``list[X]``; ``dict[K, V]``; nested dataclasses. Nothing else is coerced, but for
one thing: a boolean where a ``Literal`` allows exactly one word that YAML 1.1 reads as that boolean
(``no``/``off``/``false`` or ``yes``/``on``/``true``) is that word: ``mixed_precision: no`` is ``"no"``, not
False (and so are ``off`` and ``false`` there).

Errors: a ``ConfigError`` (a ``ValueError``) naming the full dotted key and what is allowed, an unknown key
with the closest valid one; ``load`` puts the file and line in front when a YAML file wrote the key
(``tiny.yaml line 3: unknown key 'train.stpes'; did you mean 'steps'? Allowed keys: ...``). A dataclass's
own ``ValueError`` naming its class (``MoEConfig.top_k=9 is invalid``) gets the dotted key instead
(``model.moe.top_k=9 is invalid``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from moe_emergence.errors import ConfigError  # re-exported: the user-error type
from moe_emergence.yamlio import DuplicateKeyError, read_mapping_file, strict_load

# words YAML 1.1 (PyYAML) reads as booleans, in any case: a ``Literal`` that allows one of them gets it back
YAML11_BOOL_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}

T = TypeVar("T")
INHERIT_KEY = "base"
REPLACE_KEY = "_replace"
HINT_CUTOFF = 0.5  # difflib ratio a "did you mean" needs
Origins = dict[str, str]  # dotted key -> "path line N" where a YAML file wrote it


class ConfigKeyError(ConfigError):
    """A ``ConfigError`` about one dotted ``key`` (``load`` uses it to name the file and line of the key)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def closest(word: Any, choices: Iterable[Any]) -> str | None:
    """The choice nearest to ``word`` (difflib, ratio >= ``HINT_CUTOFF``), or None: the one "did you mean"."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=HINT_CUTOFF)
    return near[0] if near else None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------- typed building


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Dataclass ``cls`` from a (nested) mapping, checking every key and type. ``prefix`` is the dotted key
    ``data`` sits at (``"data"``, ``"model.moe"``; empty = the top), so messages name full keys.

    Raises ``ConfigError``: an unknown key (with the closest valid one and the allowed keys), a missing
    required key, a value of the wrong type, a non-finite float, or the dataclass's own ``ValueError`` /
    ``TypeError`` (its class name replaced by ``prefix``)."""
    return _convert(cls, data, prefix)


@functools.cache
def _fields(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Type hints and ``__init__`` fields of ``cls`` (cached: ``MoEConfig.from_dict`` runs on every model)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    data = {} if data is None else data
    if not isinstance(data, dict):
        where = prefix or "config"
        raise ConfigKeyError(
            where, f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}"
        )
    hints, fields = _fields(cls)
    for key in data:
        if key not in fields:
            near = closest(key, fields)
            hint = f"; did you mean {near!r}?" if near else ";"
            full = _join(prefix, str(key))
            raise ConfigKeyError(
                full, f"unknown key {full!r}{hint} Allowed keys: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigKeyError(key, f"missing required key {key!r} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(_dotted_message(cls, str(e), prefix)) from e


def _dotted_message(cls: type, message: str, prefix: str) -> str:
    """A dataclass's own validation message with its class name (``MoEConfig.top_k=9 is invalid``) replaced by
    the dotted key it was loaded from (``model.moe.top_k=9 is invalid``); other messages get the key prefixed.
    At the top (no prefix) the message is kept as it is."""
    own = f"{cls.__name__}."
    if not prefix:
        return message
    if message.startswith(own):
        return f"{prefix}.{message[len(own) :]}"
    return f"{prefix}: {message}"


def _convert_literal(allowed: tuple, value: Any, key: str) -> Any:
    """``value`` if ``allowed``; a boolean is the one allowed word YAML 1.1 reads as it (``no`` for False)."""
    if isinstance(value, bool):
        words = [a for a in allowed if isinstance(a, str) and a.lower() in YAML11_BOOL_WORDS[value]]
        if len(words) == 1:
            return words[0]
        shown = f"{'/'.join(YAML11_BOOL_WORDS[value])} (YAML reads them as {value})"
    elif value in allowed:
        return value
    else:
        shown = repr(value)
    raise ConfigKeyError(key, f"{key}: {shown} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key)
    if origin is Literal:
        return _convert_literal(args, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(key, f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0] if args else Any, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigKeyError(key, f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, f"{key} (key {k!r})"): _convert(val_tp, v, _join(key, str(k)))
            for k, v in value.items()
        }
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigKeyError(key, f"{key}: null is not allowed, expected {_type_name(tp)}")
    errors: list[ConfigError] = []
    for alt in (a for a in args if a is not type(None)):
        try:
            return _convert(alt, value, key)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    reasons = "; ".join(map(str, errors))
    raise ConfigKeyError(key, f"{key}: {value!r} matches none of {_type_name(tp)} ({reasons})")


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
                raise ConfigKeyError(key, f"{key}={value!r} is invalid: expected a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    else:
        raise TypeError(f"{key}: the config loader does not support field type {tp!r}")
    raise ConfigKeyError(key, f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


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


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) form of a config dataclass tree; a dataclass with ``serialized_fields()``
    contributes only those fields (e.g. a data source: the fields its type reads)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = [f.name for f in dataclasses.fields(obj)]
        if hasattr(obj, "serialized_fields"):
            names = [n for n in names if n in obj.serialized_fields()]
        return {n: to_dict(getattr(obj, n)) for n in names}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- YAML files


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` with its ``base:`` chain merged in (module docstring).

    Raises ``ConfigError`` naming the file: missing, unreadable or not UTF-8, malformed (line and column), a
    key given twice (both lines), not a mapping at the top, a ``base:`` that is not a file name, or a file
    that is its own ancestor."""
    return _read_located(Path(path), ())[0]


def _read_located(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], Origins]:
    """``read_yaml`` plus where each dotted key was written (the child's line wins over its base's)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' inheritance through {[str(p) for p in seen]}")
    data, lines = read_mapping_file(path)
    origins = {".".join(k): f"{path} line {n}" for k, n in lines.items()}
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: '{INHERIT_KEY}' must be a file name, got {parent!r}")
    base, base_origins = _read_located(path.parent / parent, (*seen, path))
    return _deep_merge(base, data), {**base_origins, **origins}


def _deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: mappings merge recursively (unless the child's has ``_replace: true``),
    anything else replaces. Neither argument is changed."""
    out = dict(parent)
    for k, v in child.items():
        if isinstance(v, dict) and v.get(REPLACE_KEY) is True:
            out[k] = {kk: vv for kk, vv in v.items() if kk != REPLACE_KEY}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- overrides


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], section: str | None = None
) -> dict[str, Any]:
    """A copy of ``data`` with every ``key.path=value`` override set (missing mappings are created; ``data``
    is not changed). With ``section`` (e.g. ``"data"``), ``data`` is that block of a config: keys are relative
    to it, and a leading ``section.`` is dropped (``seq_len=64`` and ``data.seq_len=64`` are the same).

    Raises ``ConfigError`` naming the override: no ``=``, an empty key part, a value that is not valid YAML
    or repeats a key, or a path through something that is not a mapping."""
    return _apply(data, overrides, section)[0]


def _apply(
    data: dict[str, Any], overrides: Iterable[str], section: str | None
) -> tuple[dict[str, Any], list[str]]:
    """``apply_overrides`` plus the dotted keys the overrides set."""
    data = _deep_merge({}, data)
    keys = []
    for text in overrides:
        parts, value = _parse_override(text)
        if section and parts[0] == section and len(parts) > 1:
            parts = parts[1:]
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and part in node:  # an explicit null: the section is switched off
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {text!r}: {where!r} is null in this config (switched off), so a key inside it "
                    f"cannot be set; give the whole section, e.g. {where}={{...}}, or start from a config that sets it"
                )
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where!r} is {child!r}, not a mapping")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
        keys.append(".".join(parts))
    return data, keys


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (key.path=value for a nested key)")
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


# ----------------------------------------------------------------------------- everything together


def load(
    cls: type[T],
    path: str | Path | None = None,
    *,
    data: dict[str, Any] | None = None,
    overrides: Iterable[str] = (),
    section: str | None = None,
) -> T:
    """``cls`` from the YAML file ``path`` (else the mapping ``data``, else nothing) with ``overrides``
    applied. With ``section`` only that top-level block is built, which must be there; overrides are
    relative to it (``apply_overrides``).

    Raises ``ConfigError`` as ``read_yaml``, ``apply_overrides`` and ``build`` do, and for a missing section;
    an error about a key written in a file starts with that file and line."""
    origins: Origins = {}
    if path is not None:
        data, origins = _read_located(Path(path), ())
    data = data or {}
    if section and not isinstance(data.get(section), dict):
        where = path if path is not None else "config"
        raise ConfigError(f"{where}: expected a mapping with a '{section}:' block")
    tree, overridden = _apply(data[section] if section else data, overrides, section)
    if section:  # back to keys of the whole file, as build names them
        tree, overridden = {section: tree}, [f"{section}.{k}" for k in overridden]
    try:
        return build(cls, tree[section] if section else tree, section or "")
    except ConfigError as e:
        where = _origin(e, _settled(origins, tree, overridden))
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}") from e


_LEADING_KEY = re.compile(r"([\w.-]+?)(?:\[\d+\])*[=:]")  # "optim.lr=-1.0 is invalid", "train.x: ..."


def _origin(err: ConfigError, origins: Origins) -> str | None:
    """Where a YAML file wrote the key ``err`` is about (its ``key``, else the key its message starts with)."""
    key = getattr(err, "key", None)
    if key is None:
        match = _LEADING_KEY.match(str(err))
        key = match.group(1) if match else None
    return origins.get(re.sub(r"(\[\d+\])+$", "", key)) if key else None


def _settled(origins: Origins, data: dict[str, Any], overridden: list[str]) -> Origins:
    """The origins of keys whose value still comes from a file: present in ``data`` and not overridden."""

    def in_data(key: str) -> bool:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def overridden_(key: str) -> bool:
        return any(key == o or key.startswith(f"{o}.") for o in overridden)

    return {k: v for k, v in origins.items() if in_data(k) and not overridden_(k)}


__all__ = ["ConfigError", "apply_overrides", "build", "closest", "load", "read_yaml", "to_dict"]
