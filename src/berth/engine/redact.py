"""Secrets on a model's command line and in its environment: hidden before anything is logged or
printed, and kept from model processes that were not given them on purpose."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from berth.engine.llama_args import FLAGS

REDACTED = "<redacted>"
_SECRET_FLAGS = {name for spec in FLAGS if spec.secret for name in spec.names}
# Environment names that hold credentials by convention: BERTH_API_KEY, HF_TOKEN, OPENAI_API_KEY,
# AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN, DB_PASSWORD... (a word of the name, not a part of one: not TOKENIZERS_*)
_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?)(_|$)|(^|_)(API_?)?KEY$|APIKEY",
                          re.IGNORECASE)
_VALUE = r"""('[^']*'|"[^"]*"|[^\s'"]+)"""
_FLAG_IN_TEXT = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(_SECRET_FLAGS, key=len, reverse=True)))
                           + r")(=|\s+)" + _VALUE)
_ASSIGNMENT = re.compile(r"(?<![\w$])([A-Za-z_][A-Za-z0-9_]*)=" + _VALUE)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a credential by convention."""
    return bool(_SECRET_NAME.search(name))


def _redact_text(text: str) -> str:
    """Secrets inside one argument: `NAME=value` of a secret name, and secret flags inside a shell
    string (`sh -c "llama-server --api-key K"`)."""
    text = _FLAG_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _ASSIGNMENT.sub(lambda m: f"{m.group(1)}={REDACTED}" if is_secret_name(m.group(1)) else m.group(0), text)


def redact_argv(argv: list[str] | tuple[str, ...]) -> list[str]:
    """Copy of argv with the values of secret-bearing flags replaced (`--flag v`, `--flag=v`, and inside
    shell strings), and those of secret environment assignments (`env HF_TOKEN=v ...`)."""
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
        out.append(_redact_text(arg))
    return out


def child_environment(parent: Mapping[str, str], configured: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A model process's environment: berth's own without its credentials (BERTH_API_KEY, HF_TOKEN and the
    like), then the model's `env` from the config, which may pass any of them on on purpose."""
    env = {name: value for name, value in parent.items() if not is_secret_name(name)}
    env.update(configured)
    return env
