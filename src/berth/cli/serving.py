"""Serving and talking to a running berth: `serve`, `run`, `ps`, `stop`."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterable, Iterator

import click
from rich.markup import escape

from berth.cli.common import USAGE_ERROR, err_console, fail, parse_listen, print_error
from berth.cli.loading import load, print_warnings, store_for
from berth.cli.logformat import configure_logging
from berth.client import BerthClient, ClientError
from berth.config import BerthConfig
from berth.core import eventloop
from berth.core.errors import BerthError
from berth.engine.embedded import EmbeddedModelError, embedded_config
from berth.engine.launch import Launch, build_launch
from berth.engine.warmup import chat_warmup
from berth.gateway.exposure import open_without_keys
from berth.gateway.server import InProcessGateway, run_gateway
from berth.runtime.ports import unused_port

url_option = click.option("--url", default="http://127.0.0.1:8080", show_default=True, envvar="BERTH_URL",
                          help="The berth to talk to ($BERTH_URL).")
key_option = click.option("--api-key", envvar="BERTH_API_KEY", help="An API key of that berth ($BERTH_API_KEY).")


@click.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="llama-swap style YAML config.")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to bind.")
@click.option("--metrics-listen", default=None,
              help="HOST:PORT of a second socket that answers /metrics, /health and /ready without an API key "
                   "(for scrapers and load-aware routers).")
@click.option("--watch-config", is_flag=True, help="Reload the config when the file changes (SIGHUP also reloads).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Overrides the config's logLevel.")
def serve(config_path: str | None, listen: str, metrics_listen: str | None, watch_config: bool,
          log_level: str | None) -> None:
    """Serve the models of a config (or the embedded default model) on one endpoint."""
    host, port = parse_listen(listen)
    try:
        loop = eventloop.loop_factory()
    except BerthError as exc:
        fail(exc.message)
    metrics_address = parse_listen(metrics_listen) if metrics_listen else None
    if metrics_address and metrics_address[1] == port:
        fail(f"--metrics-listen {metrics_listen} uses the port of --listen {listen}; give it a port of its own")
    config = config_to_serve(config_path)
    exposed = open_without_keys(host, config, port)
    if exposed:
        err_console.print(f"[bold red]WARNING:[/] {escape(exposed)}", highlight=False)
    level = {"warn": "warning"}.get(log_level or config.log_level, log_level or config.log_level).upper()
    configure_logging(config, level)
    try:
        eventloop.run(run_gateway(config, host, port, _launch_builder(config), warmup=chat_warmup,
                                  config_path=config_path, watch_config=watch_config,
                                  metrics_address=metrics_address), loop)
    except OSError as exc:
        where = f"{host}:{port}" + (f" or {metrics_listen}" if metrics_listen else "")
        fail(f"cannot listen on {where}: {exc.strerror or exc}; choose another address with --listen"
             + (" or --metrics-listen" if metrics_listen else ""))
    except BerthError as exc:
        fail(exc.message, 1)


def config_to_serve(config_path: str | None) -> BerthConfig:
    """The config file given, or the embedded models; warnings printed, problems exit."""
    if config_path is not None:
        return load(config_path)
    try:
        config = embedded_config()
    except EmbeddedModelError as exc:
        fail(str(exc), 1)
    print_warnings(config)
    return config


def _launch_builder(config: BerthConfig) -> functools.partial[Launch]:
    """Builds each start's argv; pulls store models first, as a serving berth does."""
    return functools.partial(build_launch, store=store_for(config), fetch=True)


def _client(url: str, api_key: str | None) -> BerthClient:
    if not url.startswith(("http://", "https://")):
        fail(f"--url {url!r} must start with http:// or https://")
    return BerthClient(url, api_key)


@click.command()
@click.argument("model")
@click.argument("prompt", required=False)
@url_option
@key_option
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Config for the berth started here when none answers at --url (default: the embedded models).")
def run(model: str, prompt: str | None, url: str, api_key: str | None, config_path: str | None) -> None:
    """Chat with MODEL: print the answer to PROMPT and exit, or talk interactively (Ctrl-D ends).

    Talks to the berth at --url; when none answers there, starts one in this process for as long as the
    command runs (and stops its models on exit).
    """
    client = _client(url, api_key)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip() or fail("no prompt: stdin was empty")
    local = None
    if not client.alive():
        local = _start_local_berth(config_path)
        client = _client(local.url, None)
    try:
        _chat(client, model, prompt)
    finally:
        if local is not None:
            local.stop()


def _chat(client: BerthClient, model: str, prompt: str | None) -> None:
    """One answer to `prompt`, or a conversation from the terminal. A failed or interrupted turn is taken
    back; with a single prompt, its error ends the command."""
    messages: list[dict[str, str]] = []
    for line in [prompt] if prompt is not None else _interactive_lines(model):
        messages.append({"role": "user", "content": line})
        try:
            answer = "".join(_echo_stream(client.stream_chat(model, messages)))
        except ClientError as exc:
            messages.pop()
            if prompt is not None:
                fail(exc.message, USAGE_ERROR if exc.status in (400, 404) else 1)
            print_error(exc.message)
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            click.echo()
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


def _interactive_lines(model: str) -> Iterator[str]:
    click.echo(f"chatting with {model}; Ctrl-D to end, Ctrl-C stops an answer", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo(err=True)
            return
        if line.strip():
            yield line


def _echo_stream(pieces: Iterable[str]) -> Iterator[str]:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        yield piece
    sys.stdout.write("\n")


def _start_local_berth(config_path: str | None) -> InProcessGateway:
    config = config_to_serve(config_path)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    port = unused_port()
    err_console.print(f"no berth answers; starting one here on 127.0.0.1:{port} until this command ends",
                      highlight=False)
    return InProcessGateway(config, "127.0.0.1", port, _launch_builder(config), chat_warmup).start()


_VISION_SHOWN = {True: "yes", False: "-", None: "?"}  # /running's `vision`: a projector, none, nothing says


@click.command()
@url_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="Print /running as JSON.")
def ps(url: str, api_key: str | None, as_json: bool) -> None:
    """Show the models a running berth has loaded: state, memory, TTL left, requests in flight."""
    try:
        running = _client(url, api_key).get("/running")
    except ClientError as exc:
        fail(exc.message + ("" if exc.status else "; start one with `berth serve`"), 1)
    if as_json:
        click.echo(json.dumps(running, indent=2))
        return
    models = running.get("running", [])
    if not models:
        click.echo("no models loaded")
        return
    mib = 2**20
    click.echo(f"{'MODEL':28} {'STATE':9} {'PID':>7} {'PORT':>6} {'VISION':>6} {'PLANNED':>10} {'MEASURED':>10} "
               f"{'TTL LEFT':>9} {'IN FLIGHT':>9} {'QUEUED':>6}")
    for m in models:
        memory = m.get("memory") or {}
        planned = sum((memory.get("planned_bytes") or {}).values())
        measured = sum((memory.get("measured_bytes") or {}).values())
        ttl = m.get("ttl_remaining_s")
        vision = _VISION_SHOWN[m.get("vision")]
        click.echo(f"{m['model']:28} {m['state']:9} {m.get('pid') or '-':>7} {m.get('port') or '-':>6} {vision:>6} "
                   f"{f'{planned / mib:.0f} MiB' if planned else '?':>10} "
                   f"{f'{measured / mib:.0f} MiB' if measured else '-':>10} "
                   f"{'never' if ttl is None else f'{ttl:.0f}s':>9} {m.get('in_flight', 0):>9} "
                   f"{m.get('queued', 0):>6}")


@click.command()
@click.argument("model", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Unload every model.")
@url_option
@key_option
def stop(model: str | None, stop_all: bool, url: str, api_key: str | None) -> None:
    """Unload MODEL (or every model with --all) from a running berth, once its requests finish."""
    if bool(model) == stop_all:
        fail("name one model, or give --all: berth stop MODEL | berth stop --all")
    client = _client(url, api_key)
    try:
        if stop_all:
            client.post("/unload")
            click.echo("stopped every model")
            return
        answer = json.loads(client.post("/models/unload", {"model": model}))
    except ClientError as exc:
        fail(exc.message + ("" if exc.status else "; is `berth serve` running?"),
             USAGE_ERROR if exc.status in (400, 404) else 1)
    for model_id, outcome in (answer.get("unloaded") or {model: "stopped"}).items():
        click.echo(f"{model_id}: {outcome}")
