"""The pool (the scheduler's shell) in-process: fake processes report events, no subprocess, no sleeps."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from berth.config import ModelSpec, parse_config
from berth.core.errors import StartFailed
from berth.gateway.memory import MemoryService
from berth.gateway.metrics import Metrics
from berth.gateway.pool import Lease, ModelPool
from berth.memory.devices import Device
from berth.memory.planner import MemoryLedger, MemoryPlanner
from berth.runtime.ports import NoFreePort
from berth.runtime.process import ProcessFacts, Started, StartFailedEvent, Stopped
from berth.scheduler import ModelState

GIB = 1024**3


class FakeProcess:
    """Stands where a ModelProcess would; the test says when it is ready, fails or exits."""

    def __init__(self, spec: ModelSpec, on_event) -> None:
        self.spec, self.on_event = spec, on_event
        self.argv, self.output, self.slots, self.pid, self.load_seconds = list(spec.argv), deque(), None, None, 0.0
        self.stop_requested = False
        self.projector: bool | None = None  # what its launch said of a projector
        self.closed = asyncio.Event()

    def request_stop(self) -> None:
        self.stop_requested = True

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def take_restore_hit(self) -> bool:
        return False

    def facts(self) -> ProcessFacts:
        return ProcessFacts(self.spec.id, "http://127.0.0.1:5999", 5999, 4242, tuple(self.argv), None,
                            projector=self.projector)

    def ready(self) -> None:
        self.on_event(Started())

    def exit(self, crashed: bool = False) -> None:
        self.closed.set()
        self.on_event(Stopped(crashed=crashed, exit_code=0 if not crashed else -9))

    def fail(self, reason: str = "boom") -> None:
        self.closed.set()
        self.on_event(StartFailedEvent(StartFailed(self.spec.id, reason)))


class FakeFactory:
    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.refuse = False

    def spawn(self, spec: ModelSpec, on_event) -> FakeProcess:
        if self.refuse:
            raise NoFreePort("no free port from startPort 5800")
        process = FakeProcess(spec, on_event)
        self.spawned.append(process)
        return process

    def of(self, model: str) -> list[FakeProcess]:
        return [p for p in self.spawned if p.spec.id == model]


def config_text(scheduling: bool = True, ttl: int = 0, extra_b: str = "") -> str:
    return (f"memory: {{budget: {{ram: 8GiB}}, headroom: 0, scheduling: {str(scheduling).lower()}}}\n"
            "models:\n"
            f"  a: {{cmd: 'srv-a --port ${{PORT}}', memory: {{ram: 2GiB}}, ttl: {ttl}, concurrencyLimit: 50}}\n"
            f"  b: {{cmd: 'srv-b --port ${{PORT}}', memory: {{ram: 2GiB}}{extra_b}}}\n")


@pytest.fixture
async def pool(tmp_path):
    made: list[tuple[ModelPool, FakeFactory]] = []

    async def make(text: str = config_text(), planned_launch=None) -> tuple[ModelPool, FakeFactory]:
        factory = FakeFactory()
        planner = MemoryPlanner({"host": Device("host", "RAM", 16 * GIB, 16 * GIB)},
                                MemoryLedger(tmp_path / "memory.json"), lambda spec: None)
        created = ModelPool(parse_config(text), factory.spawn, MemoryService(planner), Metrics(),
                            planned_launch=planned_launch)
        await created.open()
        made.append((created, factory))
        return created, factory

    yield make
    for created, factory in made:
        for process in factory.spawned:  # a fake exits as soon as it is told to
            process.closed.set()
        await asyncio.wait_for(created.close(), 5)


async def start_with_lease(p: ModelPool, factory: FakeFactory, model: str) -> Lease:
    """Start `model` through one request and return that request's lease (the model is ready and busy)."""
    first = asyncio.create_task(p.acquire(model))
    await settle()
    factory.of(model)[-1].ready()
    return await first


async def serve_once(p: ModelPool, factory: FakeFactory, model: str) -> FakeProcess:
    """Start `model` through one request, which ends at once; returns its process, now ready and idle."""
    (await start_with_lease(p, factory, model)).release()
    return factory.of(model)[-1]


async def settle() -> None:
    """Let every task that is ready to run take its turn (no clock involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_for_a_stopped_model_share_one_start(pool):
    p, factory = await pool()
    waiting = [asyncio.create_task(p.acquire("a")) for _ in range(20)]
    await settle()
    assert len(factory.of("a")) == 1 and not any(w.done() for w in waiting)
    assert p.state("a") is ModelState.STARTING
    factory.of("a")[0].ready()
    leases = await asyncio.gather(*waiting)
    assert {lease.process for lease in leases} == {factory.of("a")[0]}
    assert p.view("a").in_flight == 20
    for lease in leases:
        lease.release()
        lease.release()  # a second release changes nothing
    assert p.view("a").in_flight == 0


async def test_a_failed_start_answers_every_waiter_with_the_same_error_and_the_next_request_retries(pool):
    p, factory = await pool()
    waiting = [asyncio.create_task(p.acquire("a")) for _ in range(3)]
    await settle()
    factory.of("a")[0].fail("exited with code 1")
    errors = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(e, StartFailed) and "exited with code 1" in e.message for e in errors)
    assert len({id(e) for e in errors}) == 1
    retry = asyncio.create_task(p.acquire("a"))
    await settle()
    assert len(factory.of("a")) == 2  # failed is not stuck: the next request starts it again
    factory.of("a")[1].ready()
    (await retry).release()


async def test_a_spawn_that_cannot_happen_fails_the_start_instead_of_hanging(pool):
    p, factory = await pool()
    factory.refuse = True
    with pytest.raises(StartFailed, match="no free port"):
        await asyncio.wait_for(p.acquire("a"), 5)
    assert p.state("a") is ModelState.FAILED


async def test_a_busy_model_is_not_stopped_by_a_swap_until_its_request_ends(pool):
    p, factory = await pool(config_text(scheduling=False))  # llama-swap's one-at-a-time swap
    lease_a = await start_with_lease(p, factory, "a")
    for_b = asyncio.create_task(p.acquire("b"))
    await settle()
    assert not factory.of("a")[0].stop_requested and factory.of("b") == []
    lease_a.release()
    await settle()
    assert factory.of("a")[0].stop_requested and factory.of("b") == []  # b waits for a's process to go
    factory.of("a")[0].exit()
    await settle()
    factory.of("b")[0].ready()
    (await for_b).release()
    assert p.state("a") is ModelState.STOPPED


async def test_a_request_for_a_ready_model_is_not_held_up_by_another_models_start(pool):
    p, factory = await pool()
    await serve_once(p, factory, "a")
    loading_b = asyncio.create_task(p.acquire("b"))
    await settle()
    lease = await asyncio.wait_for(p.acquire("a"), 1)  # b is still starting
    assert not loading_b.done()
    lease.release()
    factory.of("b")[0].ready()
    (await loading_b).release()


async def test_a_client_that_leaves_while_waiting_holds_nothing(pool):
    p, factory = await pool()
    waiting = asyncio.create_task(p.acquire("a"))
    await settle()
    waiting.cancel()
    await settle()
    factory.of("a")[0].ready()
    await settle()
    assert p.view("a").in_flight == 0 and p.view("a").queued == 0
    lease = await asyncio.wait_for(p.acquire("a"), 1)
    assert p.view("a").in_flight == 1
    lease.release()


async def test_unload_waits_for_in_flight_requests_then_for_the_process(pool):
    p, factory = await pool()
    lease = await start_with_lease(p, factory, "a")
    unloading = asyncio.create_task(p.unload("a"))
    await settle()
    assert not factory.of("a")[0].stop_requested and not unloading.done()
    lease.release()
    await settle()
    assert factory.of("a")[0].stop_requested and not unloading.done()
    factory.of("a")[0].exit()
    await asyncio.wait_for(unloading, 1)
    assert p.state("a") is ModelState.STOPPED


async def test_a_crash_after_ready_is_noticed_and_the_next_request_starts_it_again(pool):
    p, factory = await pool()
    (await serve_once(p, factory, "a")).exit(crashed=True)
    await settle()
    assert p.state("a") is ModelState.STOPPED and p.process("a") is None
    again = asyncio.create_task(p.acquire("a"))
    await settle()
    assert len(factory.of("a")) == 2
    factory.of("a")[1].ready()
    (await again).release()


async def test_reload_restarts_only_the_models_whose_definition_changed(pool):
    p, factory = await pool()
    for model in ("a", "b"):
        await serve_once(p, factory, model)
    changed = await p.reload(parse_config(config_text(extra_b=", ttl: 60")))
    assert changed == ["b"]
    await settle()
    assert factory.of("b")[0].stop_requested and not factory.of("a")[0].stop_requested


async def test_a_snapshot_shows_the_run_without_its_secrets_and_the_ttl_left(pool):
    p, factory = await pool("models:\n  a: {cmd: 'srv-a --port ${PORT} --api-key sekrit', memory: {ram: 1GiB}, "
                            "ttl: 60}\n")
    stopped = p.snapshot("a")
    assert (stopped.state, stopped.port, stopped.pid, stopped.ttl_remaining_s) == (ModelState.STOPPED, None, None, None)
    assert "sekrit" not in stopped.command and stopped.plan is not None and stopped.plan.planned == {"host": 2**30}
    lease = await start_with_lease(p, factory, "a")
    busy = p.snapshot("a")
    assert (busy.state, busy.port, busy.pid, busy.in_flight) == (ModelState.READY, 5999, 4242, 1)
    assert busy.proxy == "http://127.0.0.1:5999" and "sekrit" not in busy.command and "--api-key" in busy.command
    lease.release()
    idle = p.snapshots()["a"]
    assert idle.in_flight == 0 and idle.ttl_remaining_s is not None and 0 < idle.ttl_remaining_s <= 60
    assert idle.kv is None and idle.slots_on_disk is None  # no gauges were asked for (nor gathered here)


async def test_whether_a_model_reads_images_comes_from_its_launch_or_its_declaration(pool, tmp_path, monkeypatch):
    from berth.engine.launch import build_launch
    from berth.store import ModelStore

    monkeypatch.setenv("BERTH_LLAMA_SERVER", "/opt/llama-server")
    store, planned = ModelStore(tmp_path / "models"), []

    def planned_launch(spec: ModelSpec):
        planned.append(spec.id)
        return build_launch(spec, store)

    models = {"vl": "cmd: 'llama-server -m a.gguf --mmproj p.gguf", "text": "cmd: 'llama-server -m a.gguf",
              "other": "cmd: 'srv", "said": "capabilities: {in: [text, image]}, cmd: 'srv",
              "hf": "cmd: 'llama-server -hf acme/vl-GGUF:Q4_K_M"}
    p, factory = await pool("models:\n" + "".join(f"  {m}: {{{fields} --port ${{PORT}}', memory: {{ram: 1GiB}}}}\n"
                                                  for m, fields in models.items()), planned_launch)
    assert {m: p.reads_images(m) for m in models} == {"vl": True, "text": False, "other": None, "said": True,
                                                      "hf": None}
    assert {m: s.reads_images for m, s in p.snapshots().items()} == {m: p.reads_images(m) for m in models}
    asked = len(planned)
    assert p.reads_images("vl") and p.reads_images("text") is False and len(planned) == asked  # known: kept
    # a run's own launch settles what the planned one could not (its pull brought a projector)
    first = asyncio.create_task(p.acquire("hf"))
    await settle()
    factory.of("hf")[-1].projector = True
    factory.of("hf")[-1].ready()
    (await first).release()
    assert p.reads_images("hf") is True
