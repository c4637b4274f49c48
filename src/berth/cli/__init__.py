"""berth's command line: the `berth` group, one module per command family.

Errors a user can fix exit with code 2 and a message naming the fix (`common.fail`).
"""

from __future__ import annotations

import importlib

import click

# command -> the module of its family, which defines a click command of the same name
_COMMANDS = {
    "serve": "serving", "run": "serving", "ps": "serving", "stop": "serving",
    "pull": "store", "models": "store", "rm": "store",
    "fit": "planning", "check": "planning",
    "bench": "bench",
    "agent": "agent",
    "key": "keys",
    "worker": "worker",
}


class _Commands(click.Group):
    """Imports a command's module when the command is looked up, not all of them at start: `berth worker`
    is started for each model the built-in engine runs, and must not first import the gateway, pydantic
    and the store (about a second on a small machine) to serve one model."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        family = _COMMANDS.get(cmd_name)
        if family is None:
            return None
        command: click.Command = getattr(importlib.import_module(f"{__name__}.{family}"), cmd_name)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """berth: one OpenAI-compatible endpoint in front of many llama.cpp model servers."""
