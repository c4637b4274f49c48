"""What every command shares: the error console and failing with a message that names the fix.

Kept to click and rich, so that `berth worker` imports nothing heavier through it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

USAGE_ERROR = 2
err_console = Console(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    print_error(message)
    sys.exit(code)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    return (host.strip("[]") or "127.0.0.1"), int(port)
