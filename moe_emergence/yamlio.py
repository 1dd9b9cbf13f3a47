"""The one YAML reader of the project's config files and ``key=value`` overrides: PyYAML's safe loader,
except that a mapping with the same key twice is an error (plain ``yaml.safe_load`` silently keeps the
last value, so a repeated ``steps:`` would quietly replace the first).

``strict_load(text)`` raises ``DuplicateKeyError`` (a ``yaml.YAMLError`` with ``problem_mark`` at the
repeated key, like every other PyYAML error) naming the key and the line of its first occurrence. Merge
keys (``<<: *anchor``) may still be overridden by the mapping's own keys, as YAML specifies.
``strict_load_lines(text)`` also returns the line of every mapping key, so a config error can name it;
``read_mapping_file(path)`` reads a config file with both, turning every problem into a ``ConfigError`` that
names the file (base chains, overrides and types are ``config_loader``'s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from moe_emergence.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConstructorError):
    """A mapping holds the same key twice; ``key`` is the key, ``problem_mark`` its second occurrence."""

    def __init__(self, key: Any, first: yaml.Mark, node: MappingNode, again: yaml.Mark) -> None:
        super().__init__(
            "while constructing a mapping",
            node.start_mark,
            f"duplicate key {key!r} (first at line {first.line + 1})",
            again,
        )
        self.key = key
        self.first_line = first.line + 1


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key in one mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(key, first, node, key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def strict_load(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing duplicate keys (``DuplicateKeyError``)."""
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass


def strict_load_lines(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """``strict_load(text)`` and the 1-based line of each mapping key, by its path of keys (``("train",
    "steps")``); keys inside lists and merged (``<<``) keys are not listed. Raises what ``strict_load`` raises."""
    loader = StrictSafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(node, (), lines)
    return data, lines


def _key_lines(node: Node | None, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if not isinstance(node, MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag != MERGE_TAG:
            key = (*path, key_node.value)
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key, out)


def read_mapping_file(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The top-level mapping of the YAML file ``path`` (``{}`` when empty) and the line of each key
    (``strict_load_lines``). Raises ``ConfigError`` naming the file: missing, unreadable or not UTF-8,
    malformed (line and column), a key given twice (both lines), or not a mapping at the top."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from e
    try:
        data, lines = strict_load_lines(text)
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
    return data, lines


__all__ = ["DuplicateKeyError", "StrictSafeLoader", "read_mapping_file", "strict_load", "strict_load_lines"]
