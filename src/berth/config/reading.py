"""One reading of one config file: what every resolution step shares, and how it reports.

Errors are ConfigError(path, line, key, message) with the line the key was written on; warnings are
`path:line: key: message` lines. Keys the schema does not know are warned about here, by walking the
schema's sections, so a new key or section needs no line in this module.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from berth.config import schema
from berth.config.yamlines import LineDict, line_at
from berth.core.errors import ConfigError

_SCALARS = (str, int, float, bool, type(None))


@dataclass
class Reading:
    """The file as written (`raw`, with lines), as validated (`parsed`), the environment for ${env.X},
    and what reading it found: warnings in order, and references to undefined models left out."""

    path: str
    raw: LineDict
    parsed: schema.BerthConfigFile
    environ: Mapping[str, str]
    warnings: list[str]
    left_out: list[tuple[int, str]] = field(default_factory=list)

    def error(self, loc: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(self.path, line_at(self.raw, loc), ".".join(loc), message)

    def warn(self, loc: tuple[str, ...], message: str) -> None:
        self.warnings.append(f"{self.path}:{line_at(self.raw, loc)}: {'.'.join(loc)}: {message}")

    def dangling(self, loc: tuple[str, ...], name: str, what: str) -> None:
        """A reference to a model the config does not define (llama-swap's reference config has such
        illustrative names): reported with its line, and left out."""
        line = line_at(self.raw, loc)
        self.left_out.append((line or 0, f"{self.path}:{line}: {'.'.join(loc)}: no model {name!r} is "
                                         f"defined under models:; {what} is left out"))

    def findings(self) -> list[str]:
        """Every warning, then the references left out by line."""
        return self.warnings + [text for _, text in sorted(self.left_out)]


def carried(section: BaseModel, record: type[Any], resolved: dict[str, Any],
            defaults: BaseModel | None = None) -> dict[str, Any]:
    """The fields of `record` (a dataclass): those in `resolved`, and besides them each field the schema
    `section` has under the same name, as written. A None there takes the same field of `defaults` (the
    top level, for a model). A carried value must be a scalar: a list or mapping needs resolving."""
    fields = dict(resolved)
    given = type(section).model_fields
    fallback = type(defaults).model_fields if defaults is not None else {}
    for record_field in dataclasses.fields(record):
        name = record_field.name
        if name in fields or name not in given:
            continue
        value = getattr(section, name)
        if value is None and name in fallback:
            value = getattr(defaults, name)
        if not isinstance(value, _SCALARS):
            raise TypeError(f"{record.__name__}.{name}: the schema holds a {type(value).__name__}; resolve it "
                            "explicitly (records are immutable and typed)")
        fields[name] = value
    return fields


def unknown_keys(raw: LineDict, path: str) -> list[str]:
    """Keys the schema does not have, at any depth, each warned with its line, in line order."""
    found: list[tuple[int, str]] = []

    def check(node: Any, section: type[BaseModel], where: str) -> None:
        if not isinstance(node, LineDict):
            return
        fields = {info.alias or name: info for name, info in section.model_fields.items()}
        for key, value in node.items():
            dotted = f"{where}.{key}" if where else key
            info = fields.get(key)
            if info is None:
                line = node.line_of(key)
                found.append((line, f"{path}:{line}: {dotted}: not supported by berth; ignored"))
                continue
            inner = _sections(info.annotation)
            if inner is None:
                continue
            holder, shape = inner
            if holder is None:
                check(value, shape, dotted)
            elif holder is dict and isinstance(value, LineDict):
                for name, entry in value.items():
                    check(entry, shape, f"{dotted}.{name}")
            elif holder is list and isinstance(value, list):
                for index, entry in enumerate(value):
                    check(entry, shape, f"{dotted}.{index}")

    check(raw, schema.BerthConfigFile, "")
    return [text for _, text in sorted(found)]


def _sections(annotation: Any) -> tuple[type | None, type[BaseModel]] | None:
    """For a field's type: (what holds the sections: None for one section, `dict` for sections by name,
    `list` for a list of them; the section type), or None when the field holds no section (`X`,
    `X | None`, `dict[str, X]` and `list[X]` hold one)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return None, annotation
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if (origin is dict and len(args) == 2) or (origin is list and len(args) == 1):
        inner = _sections(args[-1])
        return (origin, inner[1]) if inner is not None and inner[0] is None else None
    for arg in args:  # a union: X | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return None, arg
    return None
