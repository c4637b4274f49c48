"""YAML loading that remembers where every mapping key was written, and reads words as llama-swap does.

Errors and warnings about a config must name the file and line, so each
mapping is loaded as a `LineDict` that records the 1-based line of each key.

llama-swap reads its config with Go's yaml.v3, which follows YAML 1.2 here: only true/false are
booleans, and a key is the text written. PyYAML follows YAML 1.1, where yes/no/on/off (in three
spellings each) are booleans too: a model named `off` would become the id `False`. So the loader
resolves booleans by YAML 1.2's rule and takes keys as written. Where the schema wants a bool, pydantic
still reads yes/no/on/off as one (as yaml.v3 does for a bool field). Numbers keep PyYAML's rules.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from berth.core.errors import ConfigError

_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class LineDict(dict[str, Any]):
    """A dict that also knows the line of each of its keys (`key_lines`) and its own `line`."""

    key_lines: dict[str, int]
    line: int

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


def empty_mapping() -> LineDict:
    """A mapping with no keys, as an empty file reads."""
    mapping = LineDict()
    mapping.key_lines, mapping.line = {}, 1
    return mapping


def line_at(raw: Any, loc: tuple[str, ...]) -> int | None:
    """The deepest known line along a key path (list items by index)."""
    line = raw.line if isinstance(raw, LineDict) else None
    node = raw
    for key in loc:
        if isinstance(node, LineDict) and key in node:
            line = node.line_of(key)
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            if isinstance(node, LineDict):
                line = node.line
        else:
            break
    return line


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans (its own copy of the resolver table; SafeLoader is untouched)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL_TAG, _YAML12_BOOL, list("tTfF"))


def _key_text(loader: yaml.SafeLoader, node: yaml.Node, path: str) -> str:
    """A mapping key as written (yaml.v3 decodes a string key from its text), or ConfigError."""
    if isinstance(node, yaml.ScalarNode) and node.tag != _NULL_TAG:
        return str(node.value)
    key = loader.construct_object(node, deep=True)
    raise ConfigError(path, node.start_mark.line + 1, str(key), "mapping keys must be plain strings")


def _make_loader(path: str) -> type[yaml.SafeLoader]:
    class Loader(_Yaml12Loader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LineDict:
        loader.flatten_mapping(node)
        result = LineDict()
        result.key_lines = {}
        result.line = node.start_mark.line + 1
        for key_node, value_node in node.value:
            key = _key_text(loader, key_node, path)
            if key in result:
                raise ConfigError(
                    path, key_node.start_mark.line + 1, key,
                    f"duplicate key (first written on line {result.key_lines[key]}); keep one of them",
                )
            result[key] = loader.construct_object(value_node, deep=True)
            result.key_lines[key] = key_node.start_mark.line + 1
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_yaml(text: str, path: str) -> Any:
    """Parse YAML text; syntax errors become ConfigError with the line."""
    try:
        return yaml.load(text, Loader=_make_loader(path))  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(path, line, "", f"YAML syntax error: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, None, "", f"YAML error: {exc}") from None
