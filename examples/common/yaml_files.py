"""YAML as the examples read it: PyYAML's safe loader, with a key written twice in one mapping an error
and ``1e-3`` a float (YAML 1.1 reads a number with an exponent but no dot as a string).

Plain ``yaml.safe_load`` keeps the last of two equal keys without a word, so a configuration or
variants file with ``epochs: 3`` and, further down the same section, ``epochs: 30`` silently runs
with 30. :func:`safe_load_unique` refuses it instead, naming the key and both lines. Merge keys
(``<<: *base``) still override what they merge, as YAML defines.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "safe_load_unique"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice; the message names the key and both lines (1-based)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader's own error names it
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(
                    f"key {key!r} appears twice in one mapping (lines {first_line[key]} and {line}); "
                    "YAML would keep only the last, so remove one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads a number with an exponent but no dot, ``1e-3``, as a string; YAML 1.2 and
# every user read it as a float. Ints still resolve first (the resolvers above match them).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load_unique(text: str) -> Any:
    """Parse YAML text like :func:`yaml.safe_load`, refusing a key repeated within one mapping; ``1e-3``
    is a float, as in YAML 1.2.

    Args:
        text: the document.

    Returns:
        The parsed value (``None`` for an empty document).

    Raises:
        DuplicateKeyError: a mapping holds one key twice (a :class:`yaml.YAMLError`).
        yaml.YAMLError: any other syntax error.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
