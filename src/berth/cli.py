"""berth's command line. Errors a user can fix exit with code 2 and a message naming the fix."""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import sys
import time

import click
from rich.console import Console
from rich.markup import escape

from berth.config import BerthConfig, load_config
from berth.engine.launch import build_launch, store_reference
from berth.engine.redact import redact_argv
from berth.engine.slots import SLOTS_DIR, slot_usage
from berth.errors import BadRequest, BerthError, ConfigError
from berth.store import ModelStore, parse_ref
from berth.store.store import BadSelection, NotInStore

USAGE_ERROR = 2
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = USAGE_ERROR) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
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
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
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
        launch_builder = functools.partial(build_launch, store=_store(config), fetch=True)
        asyncio.run(run_gateway(config, host, port, launch_builder, warmup=chat_warmup,
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
    store = _store(config)
    for spec in config.models.values():
        click.echo(spec.id)
        launch = build_launch(spec, store)
        click.echo(f"  argv:    {' '.join(redact_argv(launch.argv))}")
        click.echo(f"  port:    {spec.port or '-'}")
        click.echo(f"  aliases: {', '.join(spec.aliases) or '-'}")
        click.echo(f"  group:   {spec.group}")
        click.echo(f"  ttl:     {f'{spec.ttl}s' if spec.ttl else 'never'}")
        if launch.slots is not None:
            note = " (--swa-full added: sliding-window model, restored slots need it)" \
                if launch.slots.swa_full_added else ""
            click.echo(f"  kv:      slots saved in {launch.slots.directory}{note}")
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


def _store(config: BerthConfig | None = None) -> ModelStore:
    return ModelStore(config.store_dir) if config and config.store_dir else ModelStore.default()


@main.command()
@click.argument("ref", required=False)
@click.option("--mmproj", is_flag=True, help="Also fetch the repo's projector (mmproj*.gguf, F16 preferred).")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option("--sha256", default=None, help="Expected sha256 of a single-file model (default: the hub's LFS hash).")
@click.option("--name", default=None, help="Store name (default: derived from REF).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(1, 100), help="Attempts per request.")
@click.option("--retry-delay", default=1.0, show_default=True, type=click.FloatRange(0), help="First backoff, s.")
@click.option("--all", "pull_all", is_flag=True, help="Pull every store model of the config given with -c.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def pull(ref: str | None, mmproj: bool, revision: str | None, sha256: str | None, name: str | None, retries: int,
         retry_delay: float, pull_all: bool, config_path: str | None) -> None:
    """Download a model into the store: owner/repo:QUANT, owner/repo/path/file.gguf or hf://..."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.progress import TransferSpeedColumn

    from berth.store.pull import RetryPolicy
    from berth.store.pull import pull as pull_model

    config = _load(config_path) if config_path else None
    store = _store(config)
    if pull_all:
        if config is None:
            _fail("--all needs the config: berth pull --all -c config.yaml")
        wanted = [w for w in (store_reference(s) for s in config.models.values()) if w is not None]
    elif ref:
        try:
            wanted = [(parse_ref(ref, revision), True if mmproj else False)]
        except BadRequest as exc:
            _fail(exc.message)
    else:
        _fail("name a model: berth pull owner/repo:QUANT (or --all -c config.yaml)")
    retry = RetryPolicy(attempts=retries, first_delay=retry_delay)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=False) as progress:
        for model_ref, projector in wanted:
            try:
                entry = pull_model(store, model_ref, name=name if not pull_all else None, mmproj=projector,
                                   sha256=sha256, retry=retry, progress=progress)
            except (BadSelection, NotInStore) as exc:
                _fail(exc.message)
            except BerthError as exc:
                _fail(exc.message, 1)
            click.echo(f"{entry.name}: {entry.model_path} ({entry.size / 2**20:.1f} MiB, verified)")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def models(config_path: str | None) -> None:
    """List the models in the store."""
    config = _load(config_path) if config_path else None
    store = _store(config)
    entries = store.entries()
    if not entries:
        click.echo(f"no models in {store.root}")
    click.echo(f"{'NAME':40} {'SIZE':>10} {'QUANT':12} {'VERIFIED':8} LAST USED")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
        click.echo(f"{e.name:40} {e.size / 2**20:>7.1f}MiB {e.quant or '-':12} {'yes' if e.verified else 'no':8} "
                   f"{used}")
    slots_root = store.root / SLOTS_DIR
    models_with_slots = sorted(d for d in slots_root.iterdir() if d.is_dir()) if slots_root.is_dir() else []
    if models_with_slots:
        click.echo(f"\n{'SAVED KV SLOTS (model)':40} {'FILES':>6} {'SIZE':>10}")
        for directory in models_with_slots:
            files, size = slot_usage(directory)
            click.echo(f"{directory.name:40} {files:>6} {size / 2**20:>7.1f}MiB")


@main.command()
@click.argument("name")
@click.option("--slots", "slots_only", is_flag=True, help="Delete the model's saved KV slots (NAME is a model id).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
def rm(name: str, slots_only: bool, config_path: str | None) -> None:
    """Delete a model from the store, or with --slots its saved KV slots."""
    store = _store(_load(config_path) if config_path else None)
    if slots_only:
        directory = store.root / SLOTS_DIR / name
        if not directory.is_dir() or "/" in name or name.startswith("."):
            _fail(f"no saved slots for model {name!r} in {store.root / SLOTS_DIR}")
        shutil.rmtree(directory)
        click.echo(f"removed saved slots of {name}")
        return
    try:
        store.remove(name)
    except NotInStore as exc:
        _fail(exc.message)
    click.echo(f"removed {name}")


if __name__ == "__main__":
    main()
