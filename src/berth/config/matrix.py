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
    parser = _Parser(expression, resolve_name, resolve_ref)
    result = parser.expr()
    if parser.peek() is not None:
        raise MatrixSyntaxError(f"{expression!r}: unexpected {parser.peek()!r}")
    unique: Sets = []
    for candidate in result:
        if candidate not in unique:
            unique.append(candidate)
    return unique


class _Parser:
    """Recursive descent over the tokens, one method per rule of the grammar."""

    def __init__(self, expression: str, resolve_name: Callable[[str], str],
                 resolve_ref: Callable[[str], Sets]) -> None:
        self.expression = expression
        self.tokens = _tokenize(expression)
        self.position = 0
        self.resolve_name = resolve_name
        self.resolve_ref = resolve_ref

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise MatrixSyntaxError(f"{self.expression!r} ends too early")
        self.position += 1
        return token

    def expr(self) -> Sets:
        found = self.term()
        while self.peek() == "|":
            self.take()
            found = found + self.term()
        return found

    def term(self) -> Sets:
        found = self.factor()
        while self.peek() == "&":
            self.take()
            right = self.factor()
            found = [a | b for a in found for b in right]
        return found

    def factor(self) -> Sets:
        token = self.take()
        if token == "(":
            inner = self.expr()
            if self.take() != ")":
                raise MatrixSyntaxError(f"{self.expression!r}: a '(' is not closed")
            return inner
        if token == "+":
            name = self.take()
            if name in _OPERATORS:
                raise MatrixSyntaxError(f"{self.expression!r}: '+' must be followed by a set name")
            return self.resolve_ref(name)
        if token in _OPERATORS:
            raise MatrixSyntaxError(f"{self.expression!r}: unexpected {token!r}")
        return [frozenset([self.resolve_name(token)])]


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
