"""llama-swap's matrix set expressions: `(g | q) & v`, `+other & e`, expanded to concrete model sets.

Grammar (loosest first): expr = term ('|' term)* ; term = factor ('&' factor)* ;
factor = NAME | '+' SET | '(' expr ')'. `a | b` gives the alternatives [a], [b]; `a & b`
combines every alternative of one side with every alternative of the other; `+name` inlines
another set's expression. A NAME is a var (which wins) or a model id.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_TOKEN = re.compile(r"\s*(?:([&|()+])|([^\s&|()+]+))")
_OPERATORS = {"&", "|", "(", ")", "+"}


class MatrixSyntaxError(ValueError):
    pass


Sets = list[frozenset[str]]


def expand(expression: str, resolve_name: Callable[[str], str], resolve_ref: Callable[[str], Sets]) -> Sets:
    """The concrete sets an expression stands for, in order, without repeats.

    `resolve_name` maps a NAME to a model id and `resolve_ref` a `+SET` to that set's expansion;
    both raise MatrixSyntaxError for what they do not know."""
    tokens = _tokenize(expression)
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        token = peek()
        if token is None:
            raise MatrixSyntaxError(f"{expression!r} ends too early")
        position += 1
        return token

    def expr() -> Sets:
        found = term()
        while peek() == "|":
            take()
            found = found + term()
        return found

    def term() -> Sets:
        found = factor()
        while peek() == "&":
            take()
            right = factor()
            found = [a | b for a in found for b in right]
        return found

    def factor() -> Sets:
        token = take()
        if token == "(":
            inner = expr()
            if take() != ")":
                raise MatrixSyntaxError(f"{expression!r}: a '(' is not closed")
            return inner
        if token == "+":
            name = take()
            if name in _OPERATORS:
                raise MatrixSyntaxError(f"{expression!r}: '+' must be followed by a set name")
            return resolve_ref(name)
        if token in _OPERATORS:
            raise MatrixSyntaxError(f"{expression!r}: unexpected {token!r}")
        return [frozenset([resolve_name(token)])]

    result = expr()
    if peek() is not None:
        raise MatrixSyntaxError(f"{expression!r}: unexpected {peek()!r}")
    unique: Sets = []
    for candidate in result:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _tokenize(expression: str) -> list[str]:
    tokens, position = [], 0
    text = expression.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise MatrixSyntaxError(f"cannot read {expression!r} at {text[position:]!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    if not tokens:
        raise MatrixSyntaxError("the expression is empty")
    return tokens
