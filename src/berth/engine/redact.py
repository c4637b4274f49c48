"""Hiding secrets in command lines before they are logged or printed."""

from __future__ import annotations

from berth.engine.llama_args import FLAGS

REDACTED = "<redacted>"
_SECRET_FLAGS = {name for spec in FLAGS if spec.secret for name in spec.names}


def redact_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """Copy of argv with the values of secret-bearing flags replaced (`--flag v` and `--flag=v`)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out
