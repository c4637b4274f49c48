"""Running the gateway: bind, serve, reload on SIGHUP or file change, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from berth.config import BerthConfig, load_config
from berth.errors import ConfigError
from berth.gateway.app import Gateway
from berth.gateway.metrics import Metrics
from berth.gateway.pool import LaunchBuilder, ModelPool
from berth.runtime.logs import LogHub
from berth.runtime.process import Warmup

log = logging.getLogger("berth")
WATCH_INTERVAL = 1.0
SETTLE_INTERVAL = 0.25


class _HubHandler(logging.Handler):
    """Copies berth's own log records into the log hub, so /logs shows them."""

    def __init__(self, hub: LogHub) -> None:
        super().__init__()
        self.hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("berth.runtime"):  # those are already in the model's own log
            self.hub.write("berth", self.format(record))


async def run_gateway(
    config: BerthConfig,
    host: str,
    port: int,
    launch_builder: LaunchBuilder,
    warmup: Warmup | None = None,
    config_path: str | None = None,
    watch_config: bool = False,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop every model and return."""
    logs = LogHub()
    handler = _HubHandler(logs)
    logging.getLogger("berth").addHandler(handler)
    metrics = Metrics()
    pool = ModelPool(config, logs, metrics, launch_builder, warmup)
    await pool.open()
    gateway = Gateway(pool, metrics)
    runner = web.AppRunner(gateway.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await web.TCPSite(runner, host, port).start()

        def reload() -> None:
            if config_path is None:
                log.warning("reload asked for, but berth runs without a config file")
                return
            try:
                new = load_config(config_path)
            except ConfigError as exc:
                log.error("config reload failed, keeping the running config: %s", exc.message)
                return
            for warning in new.warnings:
                log.warning(warning)
            pool.reload(new)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        watcher = asyncio.create_task(_watch(config_path, reload)) if watch_config and config_path else None
        log.info("berth listening on http://%s:%d (%d models)", host, port, len(config.models))
        if on_ready:
            on_ready()
        await stop.wait()
        log.info("shutting down: stopping all models")
        if watcher:
            watcher.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await pool.close()
        await runner.cleanup()
        logging.getLogger("berth").removeHandler(handler)


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
