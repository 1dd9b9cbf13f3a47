"""The one YAML reader of the project's config files and ``key=value`` overrides: PyYAML's safe loader,
except that a mapping with the same key twice is an error (plain ``yaml.safe_load`` silently keeps the
last value, so a repeated ``steps:`` would quietly replace the first).

``strict_load(text)`` raises ``DuplicateKeyError`` (a ``yaml.YAMLError`` with ``problem_mark`` at the
repeated key, like every other PyYAML error) naming the key and the line of its first occurrence. Merge
keys (``<<: *anchor``) may still be overridden by the mapping's own keys, as YAML specifies.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

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


__all__ = ["DuplicateKeyError", "StrictSafeLoader", "strict_load"]
