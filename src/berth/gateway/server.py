"""Running the gateway: bind, serve, reload on SIGHUP or file change, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from berth.config import BerthConfig, ModelSpec, load_config
from berth.core.paths import berth_home
from berth.core.errors import BerthError, ConfigError, FlagsNotAccepted
from berth.engine.launch import Launch
from berth.gateway.accounts import KeyAccounts
from berth.gateway.app import Gateway
from berth.gateway.connections import GatewayRunner
from berth.gateway.exposure import open_without_keys
from berth.gateway.ledger import RequestLedger
from berth.gateway.memory import MemoryService
from berth.gateway.metrics import Metrics
from berth.gateway.pool import ModelPool
from berth.gateway.sessions import UpstreamSessions
from berth.gateway.usagedb import USAGE_FILE, UsageStore
from berth.memory.devices import host_device, inventory
from berth.memory.planner import MemoryLedger, MemoryPlanner
from berth.runtime.agents import AgentDirectory
from berth.runtime.factory import ProcessFactory
from berth.runtime.gauges import GaugeCollector
from berth.runtime.janitor import Janitor
from berth.runtime.logs import LogHub
from berth.runtime.pagecache import PageWarmer
from berth.runtime.process import LaunchBuilder, ProcessDeps, Warmup

log = logging.getLogger("berth")
WATCH_INTERVAL = 1.0
SETTLE_INTERVAL = 0.25


class _HubHandler(logging.Handler):
    """Copies berth's own log records into the log hub, so /logs shows them: a record about one
    model process (it carries `model`) into that model's log, the rest into berth's."""

    def __init__(self, hub: LogHub) -> None:
        super().__init__()
        self.hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        model = getattr(record, "model", None)
        if model is not None:
            self.hub.write(model, f"[berth] {getattr(record, 'text', record.getMessage())}")
        else:
            self.hub.write("berth", self.format(record))


@dataclass(frozen=True)
class _Parts:
    """One gateway's parts, made before it serves."""

    log_handler: _HubHandler  # added to berth's logger; removed at the end
    agents: AgentDirectory
    planned_launch: Callable[[ModelSpec], Launch]  # each model's launch as a start would run it, nothing pulled
    factory: ProcessFactory
    ledger: RequestLedger
    pool: ModelPool
    gateway: Gateway
    runner: GatewayRunner


async def _assemble(config: BerthConfig, host: str, launch_builder: LaunchBuilder, warmup: Warmup | None,
                    metrics_port: int | None) -> _Parts:
    logs = LogHub()
    if config.log_to_stdout in ("upstream", "both"):  # llama-swap's logToStdout: models' output on stdout
        logs.echo_upstream = lambda line: print(f"[{line.source}] {line.text}", flush=True)
    handler = _HubHandler(logs)
    logging.getLogger("berth").addHandler(handler)
    metrics = Metrics()
    accounts = KeyAccounts(metrics, UsageStore(berth_home() / USAGE_FILE))
    await accounts.open()
    ledger = RequestLedger(metrics, config.metrics_max_in_memory, config.log_requests, on_end=accounts.finished,
                           capture_bodies=config.capture_bodies)
    sessions = UpstreamSessions()
    agents = AgentDirectory()
    await ask_agents(agents, config)

    def planned_launch(spec: ModelSpec) -> Launch:
        return launch_builder(spec, fetch=False, rpc=agents.planned_targets(spec.rpc))

    await asyncio.to_thread(_report_refused_flags, config, planned_launch)
    planner = await asyncio.to_thread(  # reads /proc, NVML and the ledger file
        lambda: MemoryPlanner(inventory(), MemoryLedger(berth_home() / "memory.json"), planned_launch))
    memory = MemoryService(planner, agents)
    warmer = PageWarmer(lambda: host_device().free_bytes, config.memory.headroom_bytes)
    factory = ProcessFactory(ProcessDeps(launch_builder, logs, Janitor(), lambda: sessions.control, warmup, metrics,
                                         agents, memory.planned_bytes, warmer), config)
    gauges = GaugeCollector(lambda: sessions.control)
    pool = await asyncio.to_thread(ModelPool, config, factory.spawn, memory, metrics, gauges, factory.prefetch,
                                   planned_launch)
    gateway = Gateway(pool, memory, logs, ledger, accounts, sessions, listen_host=host, metrics_port=metrics_port)
    runner = GatewayRunner(gateway.app, config.max_connections, config.client_header_timeout,
                           handler_cancellation=True, access_log=None)
    return _Parts(handler, agents, planned_launch, factory, ledger, pool, gateway, runner)


async def run_gateway(
    config: BerthConfig,
    host: str,
    port: int,
    launch_builder: LaunchBuilder,
    warmup: Warmup | None = None,
    config_path: str | None = None,
    watch_config: bool = False,
    on_ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    metrics_address: tuple[str, int] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or, when given, until `stop` is set), then stop every model and return.

    `metrics_address` opens a second socket answering only /metrics, /health and /ready, without a key."""
    parts = await _assemble(config, host, launch_builder, warmup, metrics_address[1] if metrics_address else None)
    pool, runner = parts.pool, parts.runner
    await runner.setup()  # opens the sessions
    parts.factory.open()
    await pool.open()
    loop = asyncio.get_running_loop()
    handle_signals = stop is None  # an embedded gateway leaves the process's signals to its owner
    stop = stop or asyncio.Event()
    force = asyncio.Event()  # a second signal: stop without waiting for in-flight requests

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    try:
        await web.TCPSite(runner, host, port).start()
        if metrics_address:
            await web.TCPSite(runner, *metrics_address).start()
            log.info("metrics, /health and /ready without a key on http://%s:%d", *metrics_address)
        reload = _reloader(config_path, parts)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal)
            loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = asyncio.create_task(_watch(config_path, reload)) if watch_config and config_path else None
        log.info("berth listening on http://%s:%d (%d models)", host, port, len(config.models))
        _warn_if_open(host, config, port)
        if on_ready:
            on_ready()
        await stop.wait()
        if watcher:
            watcher.cancel()
        await _drain(parts, force)
    finally:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await _stop_serving(runner)
        await pool.close()
        parts.factory.close()
        await runner.cleanup()  # closes the client sessions last: stopping models saves their slots
        await parts.gateway.context.accounts.close()  # the last counts go to the usage database
        logging.getLogger("berth").removeHandler(parts.log_handler)


def _reloader(config_path: str | None, parts: _Parts) -> Callable[[], None]:
    """What SIGHUP and the file watcher call: a reload, run after any reload asked for before it."""
    reloading = asyncio.Lock()

    async def reload_now() -> None:
        async with reloading:
            await _reload(config_path, parts)

    def reload() -> None:
        asyncio.ensure_future(reload_now())

    return reload


async def _drain(parts: _Parts, force: asyncio.Event) -> None:
    parts.gateway.context.draining = True
    grace = parts.pool.config.shutdown_timeout  # the config in force now, reloads included
    log.info(f"draining: no new requests; in-flight ones may take up to shutdownTimeout ({grace:g}s); "
             "a second signal stops at once")
    left = await parts.pool.drain(grace, force)
    if left:
        log.warning(f"shutting down with {left} requests still in flight; they are cut")
    log.info("shutting down: stopping all models")


CUT_GRACE_SECONDS = 0.5


async def _stop_serving(runner: GatewayRunner) -> None:
    """Close the listening sockets and every client connection; requests still running after the drain
    are cancelled, which cancels their upstream requests too, so models are not kept busy while they
    are asked to stop."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
        await runner.server.shutdown(CUT_GRACE_SECONDS)


async def ask_agents(agents: AgentDirectory, config: BerthConfig) -> None:
    """What the config's rpc agents offer, before models are planned (their shares and budgets)."""
    specs = [m.rpc for m in config.models.values() if m.rpc is not None]
    if specs:
        async with aiohttp.ClientSession() as session:
            await agents.refresh(session, specs)


def _report_refused_flags(config: BerthConfig, planned_launch: Callable[[ModelSpec], Launch]) -> None:
    """Log each model whose cmd has flags its llama-server would refuse: its starts are refused with
    the same message, so it is said at load and reload rather than at the first request."""
    for spec in config.models.values():
        try:
            planned_launch(spec)
        except FlagsNotAccepted as exc:
            log.error(exc.message)
        except BerthError:
            continue  # anything else is said when the model starts


async def _reload(config_path: str | None, parts: _Parts) -> None:
    if config_path is None:
        log.warning("reload asked for, but berth runs without a config file")
        return
    try:
        new = await asyncio.to_thread(load_config, config_path)
    except ConfigError as exc:
        log.error("config reload failed, keeping the running config: %s", exc.message)
        return
    for warning in new.warnings:
        log.warning(warning)
    parts.factory.ports.follow(new)
    await ask_agents(parts.agents, new)
    await asyncio.to_thread(_report_refused_flags, new, parts.planned_launch)
    parts.ledger.configure(new.metrics_max_in_memory, new.log_requests, new.capture_bodies)
    await parts.pool.reload(new)
    _warn_if_open(parts.gateway.context.listen_host, new)


def _warn_if_open(host: str, config: BerthConfig, port: int | None = None) -> None:
    exposed = open_without_keys(host, config, port)
    if exposed:
        log.warning(exposed)


async def _watch(path: str, reload: Callable[[], None]) -> None:
    """Reload when the file's mtime or size changes (polling: works on every filesystem and ConfigMaps)."""

    def stamp() -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)  # follows symlinks: a Kubernetes ConfigMap swap changes the inode
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    last = stamp()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        current = stamp()
        if current is None or current == last:
            continue
        # An editor or `echo >` may still be writing: a half-written file can parse as a valid
        # config (an empty one has no models), so reload only once the file has stopped changing.
        while True:
            await asyncio.sleep(SETTLE_INTERVAL)
            settled = stamp()
            if settled == current:
                break
            current = settled
        if current is not None:
            last = current
            reload()


class InProcessGateway:
    """A gateway on its own thread and event loop, for a command that needs one only while it runs
    (`berth run` with no berth to talk to). `stop()` stops every model it started."""

    def __init__(self, config: BerthConfig, host: str, port: int, launch_builder: LaunchBuilder,
                 warmup: Warmup | None = None) -> None:
        self.url = f"http://{host}:{port}"
        self._args = (config, host, port, launch_builder, warmup)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="berth-gateway", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            config, host, port, launch_builder, warmup = self._args
            await run_gateway(config, host, port, launch_builder, warmup, on_ready=self._ready.set, stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the caller of start()
            self._failure = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> "InProcessGateway":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the in-process berth did not start listening within {timeout:g}s")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
