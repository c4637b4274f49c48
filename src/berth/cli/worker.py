"""`berth worker`: llama.cpp's server in-process (xllamacpp), started by berth for the built-in engine.

It imports only what it needs (see `berth.cli._Commands`): it starts with every model start.
"""

from __future__ import annotations

import sys

import click

from berth.cli.common import fail
from berth.engine.worker import WorkerUsageError, run_worker


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("llama_server_flags", nargs=-1, type=click.UNPROCESSED)
def worker(llama_server_flags: tuple[str, ...]) -> None:
    """Run llama.cpp's server in-process (xllamacpp) with llama-server flags."""
    try:
        sys.exit(run_worker(list(llama_server_flags)))
    except WorkerUsageError as exc:
        fail(str(exc))
