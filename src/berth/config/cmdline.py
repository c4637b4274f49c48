"""Turning a `cmd` string from a config into an argv list.

Configs in the wild write commands as YAML block scalars with one flag per
line, full-line `#` comments, shell-style trailing backslashes and quoted
arguments. Backslash is *not* an escape character here: Windows paths
(`C:\\models\\x.gguf`) and regexes (`token_embd\\.weight=CUDA0`) must reach the
program unchanged, as they would through llama-swap on Windows.
"""

from __future__ import annotations

import shlex


class CommandSyntaxError(ValueError):
    pass


def join_command_lines(cmd: str) -> str:
    """Drop comment lines and join continuation lines into one line."""
    parts = []
    for raw in cmd.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            line = line[:-1].rstrip()
        parts.append(line)
    return " ".join(parts)


def split_command(cmd: str) -> list[str]:
    """Split a config `cmd` into argv; raises CommandSyntaxError on unbalanced quotes."""
    lexer = shlex.shlex(join_command_lines(cmd), posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise CommandSyntaxError(f"{exc} (check the quotes)") from None
