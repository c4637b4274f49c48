"""The config and the model store a command works on; a config's problems exit with the fix."""

from __future__ import annotations

from rich.markup import escape

from berth.cli.common import err_console, fail
from berth.config import BerthConfig, load_config
from berth.core.errors import ConfigError
from berth.store import ModelStore


def load(path: str) -> BerthConfig:
    """The config at `path`, its warnings printed; a ConfigError exits with code 2."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        fail(exc.message)
    print_warnings(config)
    return config


def print_warnings(config: BerthConfig) -> None:
    for warning in config.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    for note in config.notes:
        err_console.print(f"note: {escape(note)}", highlight=False)


def store_for(config: BerthConfig | None = None) -> ModelStore:
    """The config's `modelStore`, else $BERTH_HOME/models."""
    return ModelStore.at(config.store_dir if config else None)
