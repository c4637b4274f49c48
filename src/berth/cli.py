"""berth's command line. Errors a user can fix exit with code 2 and a message naming the fix."""

from __future__ import annotations

import asyncio
import logging
import sys

import click
from rich.console import Console

from berth.config import BerthConfig, load_config
from berth.engine.launch import build_launch_argv
from berth.engine.redact import redact_argv
from berth.errors import BerthError, ConfigError

USAGE_ERROR = 2
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = USAGE_ERROR) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    sys.exit(code)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 < int(port) < 65536):
        raise click.BadParameter(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def _load(path: str) -> BerthConfig:
    try:
        config = load_config(path)
    except ConfigError as exc:
        _fail(exc.message)
    for warning in config.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """berth: one OpenAI-compatible endpoint in front of many llama.cpp model servers."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="llama-swap style YAML config.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to bind.")
@click.option("--watch-config", is_flag=True, help="Reload the config when the file changes (SIGHUP also reloads).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Overrides the config's logLevel.")
def serve(config_path: str | None, listen: str, watch_config: bool, log_level: str | None) -> None:
    """Serve the models of a config (or the embedded default model) on one endpoint."""
    from berth.engine.warmup import chat_warmup
    from berth.gateway.server import run_gateway

    host, port = _parse_listen(listen)
    if config_path is None:
        from berth.engine.embedded import EmbeddedModelError, embedded_config

        try:
            config = embedded_config()
        except EmbeddedModelError as exc:
            _fail(str(exc), 1)
    else:
        config = _load(config_path)
    level = {"warn": "warning"}.get(log_level or config.log_level, log_level or config.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(run_gateway(config, host, port, build_launch_argv, warmup=chat_warmup,
                                config_path=config_path, watch_config=watch_config))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another address with --listen")
    except BerthError as exc:
        _fail(exc.message, 1)


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate a config without starting anything; print what each model would run."""
    config = _load(config_path)
    for spec in config.models.values():
        click.echo(spec.id)
        click.echo(f"  argv:    {' '.join(redact_argv(build_launch_argv(spec)))}")
        click.echo(f"  port:    {spec.port or '-'}")
        click.echo(f"  aliases: {', '.join(spec.aliases) or '-'}")
        click.echo(f"  group:   {spec.group}")
        click.echo(f"  ttl:     {f'{spec.ttl}s' if spec.ttl else 'never'}")
    click.echo(f"config OK: {len(config.models)} models, {len(config.warnings)} warnings")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                "help_option_names": []})
@click.argument("llama_server_flags", nargs=-1, type=click.UNPROCESSED)
def worker(llama_server_flags: tuple[str, ...]) -> None:
    """Run llama.cpp's server in-process (xllamacpp) with llama-server flags."""
    from berth.engine.worker import WorkerUsageError, run_worker

    try:
        sys.exit(run_worker(list(llama_server_flags)))
    except WorkerUsageError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
