"""What berth says about itself: probes (/health, /ready), what runs (/running), Prometheus' /metrics and
what happened to each model and why (/api/events). Figures come from model snapshots, the memory service and
the pool's event log; nothing here asks a model server (the KV gauges are gathered by the runtime's collector)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from berth.core.errors import BadRequest
from berth.gateway.access import KEYLESS, METRICS, scope
from berth.gateway.context import GatewayContext, Routes, memory_entry
from berth.memory.devices import inventory
from berth.runtime.snapshot import ModelSnapshot
from berth.scheduler import ModelState


def register(router: web.UrlDispatcher, context: GatewayContext) -> None:
    routes = Observability(context)
    router.add_get("/health", routes.health)
    router.add_get("/v1/health", routes.health)  # llama-server answers both
    router.add_get("/ready", routes.ready)
    router.add_get("/running", routes.running)
    router.add_get("/ui/api/running", routes.running)
    router.add_get("/metrics", routes.prometheus)
    router.add_get("/api/events", routes.events)
    router.add_get("/ui/api/events", routes.events)


class Observability(Routes):
    @scope(KEYLESS)
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    @scope(KEYLESS)
    async def ready(self, request: web.Request) -> web.Response:
        """For readiness probes: 200 once berth routes (its preloads have run), 503 from the first SIGTERM."""
        if self.context.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.context.pool.preloaded.is_set():
            return web.json_response({"status": "preloading", "models": list(self.context.config.preload)},
                                     status=503)
        return web.json_response({"status": "ready"})

    @scope(METRICS)
    async def running(self, request: web.Request) -> web.Response:
        """Models that run, start, sleep, stop, back off or have requests waiting, with where they listen,
        their load and memory."""
        running = [self._running_entry(snapshot) for snapshot in self.context.pool.snapshots(gauges=True).values()
                   if snapshot.queued  # listed while requests wait for it (its turn may not have come yet)
                   or not (snapshot.state is ModelState.STOPPED
                           or (snapshot.state is ModelState.FAILED and snapshot.retry_in_s is None))]
        return web.json_response({"running": running, "devices": await self._devices()})

    def _running_entry(self, snapshot: ModelSnapshot) -> dict[str, Any]:
        files = snapshot.slots_on_disk
        return {
            "model": snapshot.model, "state": snapshot.state.value, "proxy": snapshot.proxy, "port": snapshot.port,
            "ttl": self.context.config.models[snapshot.model].ttl, "ttl_remaining_s": snapshot.ttl_remaining_s,
            "pid": snapshot.pid, "in_flight": snapshot.in_flight, "queued": snapshot.queued,
            "cmd": " ".join(snapshot.command), "start_failures": snapshot.start_failures,
            "retry_in_s": snapshot.retry_in_s, "vision": snapshot.reads_images,
            "kv_slots": None if files is None else {"directory": files.directory, "files": files.files,
                                                    "bytes": files.bytes},
            "memory": memory_entry(snapshot),
        }

    @scope(METRICS)
    async def prometheus(self, request: web.Request) -> web.Response:
        context = self.context
        metrics, memory = context.metrics, context.memory
        snapshots = context.pool.snapshots(gauges=True)
        metrics.set_backoff({m: s.retry_in_s or 0.0 for m, s in snapshots.items()})
        planned = {m: (p.source, p.planned) for m, p in memory.plans.items() if p.planned}
        metrics.set_memory(planned, dict(memory.measured), await self._devices())
        metrics.set_load(snapshots)
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def _devices(self) -> dict[str, dict[str, int]]:
        live = await asyncio.to_thread(inventory)
        return self.context.memory.devices(live, self.context.config, self.context.pool.held_memory())

    @scope(METRICS)
    async def events(self, request: web.Request) -> web.Response:
        """Starts, stops (with the scheduler's reason as data), sleeps, wakes and failures after event number
        `since` (0: all kept), oldest first; `model` keeps one model's."""
        raw = request.query.get("since", "0")
        if not raw.isdigit():
            raise BadRequest(f"since={raw!r} is not an event number; pass the `last` of the previous answer "
                             "(or 0 for every event kept)")
        events, dropped = self.context.pool.events.since(int(raw))
        model = request.query.get("model")
        chosen = [e.as_json() for e in events if model is None or e.model == model]
        return web.json_response({"events": chosen, "last": self.context.pool.events.last_seq(),
                                  "dropped": dropped})
