"""The gauge collector against a real HTTP server on 127.0.0.1 that answers llama-server's `/slots`: each
ready model is read at once, then only while somebody looks, and never more than once per interval."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from berth.engine.slots import SlotPlan
from berth.runtime import gauges
from berth.runtime.gauges import GaugeCollector, KvUse
from berth.runtime.process import ProcessFacts

INTERVAL = 0.05


class SlotsServer:
    """Answers `/slots` like a llama-server with two slots, one busy; counts the requests."""

    def __init__(self) -> None:
        self.hits = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def slots(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response([
            {"id": 0, "n_ctx": 1024, "is_processing": True, "n_prompt_tokens": 7, "next_token": [{"n_decoded": 3}]},
            {"id": 1, "n_ctx": 1024, "is_processing": False, "n_prompt_tokens": 12}])

    async def __aenter__(self) -> "SlotsServer":
        app = web.Application()
        app.router.add_get("/slots", self.slots)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class StandIn:
    """Stands where a ModelProcess would: the collector reads only its facts."""

    def __init__(self, url: str, slots: SlotPlan | None = None, sleeps: bool = False) -> None:
        self._facts = ProcessFacts("m", url, None, 4242, ("srv",), slots, sleeps)

    def facts(self) -> ProcessFacts:
        return self._facts


@pytest.fixture
async def served():
    async with SlotsServer() as server, aiohttp.ClientSession() as session:
        collector = GaugeCollector(lambda: session, interval=INTERVAL)
        collector.start()
        try:
            yield server, collector
        finally:
            collector.stop()


async def until(predicate, what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_ready_model_is_read_at_once_then_only_while_somebody_looks(served, monkeypatch):
    server, collector = served
    collector.watch("m", StandIn(server.url))
    collector.ready("m")
    await until(lambda: collector.kv("m") is not None, "the first reading")
    assert collector.kv("m") == KvUse(used=10, capacity=2048)  # the busy slot's prompt and decoded tokens
    await asyncio.sleep(10 * INTERVAL)
    assert server.hits == 1  # nobody looked: nobody asked the model server
    monkeypatch.setattr(gauges, "DEMAND_WINDOW", 4 * INTERVAL)
    collector.wanted()
    await until(lambda: server.hits >= 3, "rounds while somebody looks")
    await asyncio.sleep(10 * INTERVAL)  # the demand has lapsed
    settled = server.hits
    await asyncio.sleep(10 * INTERVAL)
    assert server.hits == settled


async def test_readers_however_frequent_cause_at_most_one_request_per_interval(served):
    server, collector = served
    collector.watch("m", StandIn(server.url))
    collector.ready("m")
    await until(lambda: server.hits == 1, "the first reading")
    loop = asyncio.get_running_loop()
    began = loop.time()
    reads = 0
    while loop.time() - began < 10 * INTERVAL:
        collector.wanted()
        assert collector.kv("m") is not None
        reads += 1
        await asyncio.sleep(0)
    elapsed = loop.time() - began
    assert reads > 20 * (server.hits - 1)  # many more reads than requests
    assert server.hits - 1 <= elapsed / INTERVAL + 1


async def test_saved_slots_are_counted_and_a_gone_process_leaves_no_figures(served, tmp_path: Path):
    server, collector = served
    directory = tmp_path / "m" / "settings"
    directory.mkdir(parents=True)
    (directory / "slot-0.bin").write_bytes(b"x" * 1000)
    plan = SlotPlan(directory, {}, False, 10**9, 10**9)
    collector.watch("m", StandIn(server.url, plan))
    collector.ready("m")
    await until(lambda: collector.slots_on_disk("m") is not None, "the first reading")
    files = collector.slots_on_disk("m")
    assert files is not None and (files.directory, files.files, files.bytes) == (str(directory), 1, 1000)
    collector.forget("m")
    assert collector.kv("m") is None and collector.slots_on_disk("m") is None


async def test_a_server_that_may_sleep_is_never_asked_for_its_slots(served):
    """llama-server counts /slots as work: asking would keep a model with sleepAfter awake for good."""
    server, collector = served
    collector.watch("m", StandIn(server.url, sleeps=True))
    collector.ready("m")
    collector.wanted()
    await asyncio.sleep(20 * INTERVAL)
    assert server.hits == 0 and collector.kv("m") is None
