"""Macro expansion, as llama-swap does it: `${name}` for the config's and a model's macros (nested),
`${env.NAME}` for the environment, and the reserved `${PORT}`, `${MODEL_ID}` and `${PID}` where a
key allows them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from berth.config.reading import Reading
from berth.config.schema import MacroValue

MACRO_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MACRO_REF = re.compile(r"\$\{([^}]*)\}")
RESERVED = frozenset({"PORT", "MODEL_ID", "PID"})
_WHERE_RESERVED = {  # for the error when one is used elsewhere
    "PORT": "a model's cmd, proxy, env, cmdStop and metadata, the last only when its cmd uses ${PORT}",
    "MODEL_ID": "a model's settings",
    "PID": "a model's cmdStop",
}
MAX_DEPTH = 10
_ENV_REF = re.compile(r"\$\{(env\.[^}]*)\}")


def macro_text(value: MacroValue) -> str:
    """A macro's value as it appears inside a string (booleans as YAML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_macro_names(reading: Reading, macros: Mapping[str, MacroValue], loc: tuple[str, ...]) -> None:
    for name in macros:
        if name in RESERVED:
            raise reading.error(loc + (name,), f"macro name {name!r} is reserved; rename it")
        if not MACRO_NAME.match(name):
            raise reading.error(loc + (name,), "macro names may use only letters, digits, '_' and '-'")


def expand_env(reading: Reading, text: str, loc: tuple[str, ...]) -> str:
    """`text` with each ${env.NAME} replaced; an unset NAME is an error."""

    def env_value(match: re.Match[str]) -> str:
        name = match.group(1)[len("env."):]
        if name not in reading.environ:
            raise reading.error(loc, f"environment variable {name!r} is not set (used as ${{env.{name}}})")
        return reading.environ[name]

    return _ENV_REF.sub(env_value, text)


class Macros:
    """The macros one part of the config sees: `typed` as written (numbers and booleans keep their type
    where a whole value is one macro) and their text, plus ${MODEL_ID} inside a model."""

    def __init__(self, reading: Reading, typed: Mapping[str, MacroValue], model_id: str | None = None) -> None:
        self.reading = reading
        self.typed = dict(typed)
        self.text = {name: macro_text(value) for name, value in self.typed.items()}
        if model_id is not None:
            self.text["MODEL_ID"] = model_id

    def expand(self, text: str, loc: tuple[str, ...], allow: Collection[str] = ()) -> str:
        """Expand macros (nested), ${env.X} and the reserved names given in `allow`."""
        for _ in range(MAX_DEPTH):
            expanded = MACRO_REF.sub(lambda m: self.text.get(m.group(1), m.group(0)), text)
            expanded = expand_env(self.reading, expanded, loc)
            if expanded == text:
                break
            text = expanded
        else:
            raise self.reading.error(loc, f"macros refer to each other in a cycle (or nest deeper than {MAX_DEPTH})")
        for ref in MACRO_REF.findall(text):
            if ref not in RESERVED:
                raise self.reading.error(loc, f"unknown macro ${{{ref}}}; define it under macros:")
            if ref not in allow:
                raise self.reading.error(loc, f"${{{ref}}} cannot be used here; it is filled in only in "
                                              f"{_WHERE_RESERVED[ref]}")
        return text

    def expand_value(self, value: Any, loc: tuple[str, ...], allow: Collection[str] = ()) -> Any:
        """Macros in every string inside `value` (lists and mappings too). A string that is exactly one
        macro of a number or boolean takes that value's type, as llama-swap's metadata does."""
        if isinstance(value, str):
            whole = MACRO_REF.fullmatch(value.strip())
            if whole and whole.group(1) in self.typed and not isinstance(self.typed[whole.group(1)], str):
                return self.typed[whole.group(1)]
            return self.expand(value, loc, allow)
        if isinstance(value, dict):
            return {k: self.expand_value(v, loc + (str(k),), allow) for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand_value(v, loc + (str(i),), allow) for i, v in enumerate(value)]
        return value
