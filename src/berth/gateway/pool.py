"""The shell around the pure scheduler: carries out its actions and feeds back events.

All calls happen on the event loop thread, so each scheduler step is atomic. Processes
come from an injected `spawn` (the runtime's factory, or a fake in tests) and memory
plans from the `MemoryService`; the pool owns no ports, sessions or measurements.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping

from berth.config import DEFAULT_GROUP, BerthConfig, ModelSpec
from berth.core.errors import BerthError, StartFailed, UnknownModel
from berth.core.units import RPC_PREFIX
from berth.engine.launch import Launch, key_headers, server_slots
from berth.gateway.events import EventKind, EventLog
from berth.gateway.memory import MemoryService
from berth.gateway.metrics import Metrics
from berth.gateway.snapshots import Snapshots
from berth.gateway.upstream import Upstream
from berth.memory.planner import ModelMemory
from berth.runtime.factory import SpawnProcess
from berth.runtime.gauges import GaugeCollector
from berth.runtime.process import ModelProcess, ProcessEvent, Slept, Started, StartFailedEvent, Woke
from berth.runtime.snapshot import ModelSnapshot
from berth.scheduler import (
    Action, Admit, Client, Eviction, GroupPolicy, MatrixPolicy, MemoryPolicy, ModelPolicy, ModelState, ModelView,
    QueuePolicy, Reject, Scheduler, Start, Stop, StopReason, Wake,
)

log = logging.getLogger("berth.pool")

Policies = tuple[dict[str, ModelPolicy], dict[str, GroupPolicy], MemoryPolicy, MatrixPolicy | None, QueuePolicy]


def policies(config: BerthConfig, plans: dict[str, ModelMemory], budgets: dict[str, int]) -> Policies:
    """What the scheduler needs to know of a config and its memory plans."""
    persistent_groups = {g.name for g in config.groups.values() if g.persistent}
    models = {m.id: ModelPolicy(group=m.group, ttl=m.ttl, concurrency_limit=m.concurrency_limit,
                                memory=_countable(plans[m.id].planned, budgets), pinned=m.persistent or m.group in persistent_groups,
                                priority=m.priority, return_to=m.return_to,
                                parallel=m.parallel if m.parallel is not None else server_slots(m))
              for m in config.models.values()}
    matrix = MatrixPolicy(config.matrix.sets, config.matrix.evict_costs) if config.matrix else None
    groups = {g.name: GroupPolicy(swap=g.swap, exclusive=g.exclusive, persistent=g.persistent)
              for g in config.groups.values()}
    scheduled = DEFAULT_GROUP if config.memory.scheduled else None
    if scheduled in groups:  # without groups, memory decides who runs together instead of swapping
        groups[scheduled] = GroupPolicy(swap=False, exclusive=False)
    return (models, groups, MemoryPolicy(budgets, scheduled, Eviction(config.memory.eviction)), matrix,
            QueuePolicy(config.max_wait, config.min_residency))


def _countable(planned: dict[str, int] | None, budgets: dict[str, int]) -> dict[str, int] | None:
    """The devices of a plan the scheduler can count: an rpc agent that has not answered yet has no
    budget; the model's start asks it directly, and fails naming it if it is still away."""
    if planned is None:
        return None
    return {d: b for d, b in planned.items() if not d.startswith(RPC_PREFIX) or d in budgets}


class DeadlineTimer:
    """Calls back at the scheduler's next deadline (a TTL); re-armed after every step."""

    def __init__(self, on_deadline: Callable[[], None]) -> None:
        self._on_deadline = on_deadline
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, deadline: float | None) -> None:
        if self._handle is not None and self._handle.when() == deadline:
            return  # most requests leave the next TTL deadline as it was
        self.cancel()
        if deadline is not None:
            self._handle = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        # asyncio may run this a clock tick before the deadline; with the handle cleared first,
        # `arm` sets a fresh one for the same deadline instead of keeping this spent one.
        self._handle = None
        self._on_deadline()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Lease:
    """Permission to send one request to a ready model; release it when the response ends."""

    def __init__(self, process: ModelProcess, on_release: Callable[[], None]) -> None:
        self.process = process
        self._on_release: Callable[[], None] | None = on_release

    def upstream(self) -> Upstream:
        """Where the leased request goes; taken once per request (it claims the first request after a
        KV slot restore). The process's spec, not a reloaded config's, says where it listens."""
        process = self.process
        return Upstream(process.spec.id, process.spec.proxy, process.spec.timeouts,
                        tuple(key_headers(process.key).items()), takes_client_credentials=process.key is None,
                        restore_hit=process.take_restore_hit(),
                        explain=process.explain_failure if process.spec.rpc is not None else None,
                        spare_path=process.spec.check_endpoint)

    def release(self) -> None:
        if self._on_release is not None:
            on_release, self._on_release = self._on_release, None
            on_release()


Prefetch = Callable[[ModelSpec, str], None]  # read a model's files into the page cache (why, in words)


class ModelPool:
    def __init__(self, config: BerthConfig, spawn: SpawnProcess, memory: MemoryService, metrics: Metrics,
                 gauges: GaugeCollector | None = None, prefetch: Prefetch | None = None,
                 planned_launch: Callable[[ModelSpec], Launch] | None = None,
                 events: EventLog | None = None) -> None:
        self.config = config
        self.events = events or EventLog()  # what happened to each model, with the scheduler's reasons
        self.memory = memory
        self.metrics = metrics
        self._gauges = gauges  # told of every process from spawn to exit; None: no gauges (tests of the pool)
        self._spawn = spawn
        self._prefetch = prefetch
        self._snapshots = Snapshots(memory, gauges, planned_launch)  # what handlers may know of a model
        self._scheduler = Scheduler.build(*self._policies(config))
        self._processes: dict[str, ModelProcess] = {}
        self._waiters: dict[int, asyncio.Future[str]] = {}
        self._ids = itertools.count(1)
        self._timer = DeadlineTimer(lambda: self._apply(self._scheduler.tick(self._now())))
        self.preloaded = asyncio.Event()  # hooks.on_startup.preload has run (each load done or failed)

    async def open(self) -> None:
        preloads = [asyncio.create_task(self._preload(model_id)) for model_id in self.config.preload]
        asyncio.gather(*preloads).add_done_callback(lambda _: self.preloaded.set())
        self.memory.start_measuring(
            lambda: [(m, p) for m, p in self._processes.items() if self.state(m) is ModelState.READY],
            lambda: self.config.models, self._set_plan)
        if self._gauges is not None:
            self._gauges.start()

    async def _preload(self, model_id: str) -> None:
        try:
            await self.load(model_id)
        except BerthError as exc:
            log.info(f"preload of {model_id} failed: {exc.message}")

    async def drain(self, timeout: float, force: asyncio.Event) -> int:
        """Refuse new and waiting requests and let in-flight ones finish, for at most `timeout` seconds or
        until `force` is set. Returns how many were still in flight."""
        self._apply(self._scheduler.drain(self._now()))
        deadline = self._now() + timeout
        while self._scheduler.in_flight() and self._now() < deadline and not force.is_set():
            await asyncio.sleep(0.05)
        return self._scheduler.in_flight()

    async def close(self) -> None:
        """Stop every model (in-flight requests are cut) and wait until all are gone."""
        self._apply(self._scheduler.shutdown(self._now()))
        self.memory.stop_measuring()
        if self._gauges is not None:
            self._gauges.stop()
        await asyncio.gather(*(p.wait_closed() for p in list(self._processes.values())), return_exceptions=True)
        self._timer.cancel()

    # -- requests ---------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        model_id = self.config.resolve(name)
        if model_id is None:
            raise UnknownModel(name, self.listed_ids())
        return model_id

    def listed_ids(self) -> list[str]:
        return [m.id for m in self.config.models.values() if not m.unlisted]

    async def acquire(self, model_id: str, client: Client = Client(), uses_slot: bool = True) -> Lease:
        """Wait until `model_id` is ready and admits this request (raises the typed error otherwise).
        `client` takes turns with other clients waiting for the model; a request that takes no slot of its
        server (`uses_slot` False: it only reads it, or sends nothing) does not wait for one."""
        request_id = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        self._apply(self._scheduler.request(request_id, model_id, self._now(), client, uses_slot))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._apply(self._scheduler.finished(request_id, self._now()))
            else:
                self._apply(self._scheduler.cancel(request_id, self._now()))
            raise
        finally:
            self._waiters.pop(request_id, None)
        # Admitted means ready, so a process exists; its spec (not a reloaded config's) says where it listens.
        return Lease(self._processes[model_id],
                     lambda: self._apply(self._scheduler.finished(request_id, self._now())))

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """How long `model_id` stays loaded once idle, for its current (or next) run: `0` unloads it as soon
        as no request runs on it (at once when none does), `math.inf` never, None its config's TTL again
        (Ollama's keep_alive; serving.answer sets it once a request is admitted)."""
        self._apply(self._scheduler.keep_alive(model_id, seconds, self._now()))

    async def load(self, model_id: str) -> None:
        (await self.acquire(model_id, uses_slot=False)).release()

    async def unload(self, model_id: str | None = None, force: bool = False) -> dict[str, str]:
        """Stop one model (or all) once its requests are done; wait until the processes that ran when
        this was asked are gone, not for a quiet moment (traffic may start a model again at once).
        Returns per model: "stopped", "not running", or "stopped, then restarted by new requests"."""
        targets = [model_id] if model_id else list(self._scheduler.models)
        ran = {m: p for m in targets if (p := self._processes.get(m)) is not None}
        self._apply(self._scheduler.unload(model_id, self._now(), force=force))
        await asyncio.gather(*(p.wait_closed() for p in ran.values()))
        return {m: "not running" if m not in ran else
                "stopped, then restarted by new requests" if self._processes.get(m) is not None else "stopped"
                for m in targets}

    async def reload(self, new: BerthConfig) -> list[str]:
        """Adopt a new config; restart only models whose definition changed. Returns those ids."""
        planned = await asyncio.to_thread(self._policies, new)  # reads GGUF headers
        old = self.config
        changed = [m for m in old.models if m in new.models and old.models[m] != new.models[m]]
        removed = [m for m in old.models if m not in new.models]
        self.config = new
        self._scheduler.configure(*planned)
        for model_id in changed:  # the scheduler stops only those that run; the rest start anew when asked
            self._scheduler.forgive(model_id)
            self._apply(self._scheduler.unload(model_id, self._now(), reason=StopReason.RELOAD))
        self._apply(self._scheduler.tick(self._now()))
        log.info(f"config reloaded: changed {changed or 'none'}, removed {removed or 'none'}")
        return changed + removed

    # -- views ------------------------------------------------------------------------

    def state(self, model_id: str) -> ModelState:
        return self._scheduler.state(model_id)

    def view(self, model_id: str) -> ModelView:
        return self._scheduler.view(model_id)

    def process(self, model_id: str) -> ModelProcess | None:
        return self._processes.get(model_id)

    def reads_images(self, model_id: str) -> bool | None:
        """Whether a configured model takes images (Snapshots.reads_images)."""
        return self._snapshots.reads_images(self.config.models[model_id], self._processes.get(model_id))

    def snapshot(self, model_id: str, gauges: bool = False) -> ModelSnapshot:
        """What handlers may know of a configured model now; they never see its process. With `gauges`,
        its KV cache use and saved slots as last gathered (asking keeps the gathering going)."""
        return self._snapshots.of(self.config.models[model_id], self._scheduler.view(model_id),
                                  self._processes.get(model_id), self._now(), gauges)

    def snapshots(self, gauges: bool = False) -> dict[str, ModelSnapshot]:
        """Every configured model's snapshot, in the config's order."""
        return {model_id: self.snapshot(model_id, gauges) for model_id in self.config.models}

    def held_memory(self) -> dict[str, Mapping[str, int]]:
        """What each live model (starting, ready, sleeping or stopping) holds by the scheduler's count:
        its plan, or what it keeps while sleeping."""
        return {m: self._scheduler.held(m) for m in self._scheduler.running()}

    # -- the shell --------------------------------------------------------------------

    def _policies(self, config: BerthConfig) -> Policies:
        return policies(config, self.memory.plan_all(config), self.memory.budgets(config))

    def _set_plan(self, model_id: str, plan: ModelMemory) -> None:
        self._apply(self._scheduler.set_memory(model_id, plan.planned, self._now()))

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, (Admit, Reject)):
                future = self._waiters.get(action.request_id)
                if future is None or future.done():
                    if isinstance(action, Admit):  # the client left in the same instant: give the slot back
                        self._apply(self._scheduler.finished(action.request_id, self._now()))
                elif isinstance(action, Admit):
                    future.set_result(action.model)
                else:
                    future.set_exception(action.error)
            elif isinstance(action, Start):
                self.events.record(action.model, EventKind.START)
                self._start(action.model)
            elif isinstance(action, Wake):
                self.events.record(action.model, EventKind.WAKE)
                log.info(f"waking {action.model}")
                process = self._processes.get(action.model)
                if process is not None:
                    process.wake()
            elif isinstance(action, Stop):
                event = self.events.stop(action.model, action.reason, action.why)
                # the reason first, as before the reasons became data (operators grep for "stopping m (ttl)")
                log.info(f"stopping {action.model} ({action.reason.value})" + (f": {event.text}" if event.text else ""))
                if action.reason in (StopReason.SWAP, StopReason.MEMORY):
                    self.metrics.swaps.inc()
                elif action.reason is StopReason.TTL:
                    self._prefetch_return(action.model)
                process = self._processes.get(action.model)
                if process is not None:
                    process.request_stop()
        self.metrics.queue_depth.set(self._scheduler.queue_depth())
        if any(isinstance(a, (Start, Wake, Stop)) for a in actions):
            self._publish_states()
        self._timer.arm(self._scheduler.next_deadline())

    def _prefetch_return(self, model_id: str) -> None:
        """A TTL stop of a model with `returnTo`: its baseline is likely next, so its files are read now,
        unless it runs already or could never fit."""
        spec = self.config.models.get(model_id)
        target = self.config.models.get(spec.return_to) if spec and spec.return_to else None
        if (self._prefetch is not None and target is not None
                and self.state(target.id) in (ModelState.STOPPED, ModelState.FAILED)
                and self._scheduler.too_big(target.id) is None):
            self._prefetch(target, f"{model_id}'s TTL stop returns to it")

    def _start(self, model_id: str) -> None:
        log.info(f"starting {model_id}")
        process: ModelProcess | None = None

        def on_event(event: ProcessEvent) -> None:
            assert process is not None
            self._on_process_event(model_id, process, event)

        try:
            process = self._spawn(self.config.models[model_id], on_event)
        except BerthError as exc:  # no free port, for one
            self.events.record(model_id, EventKind.FAILED, why={"error": exc.message}, text=exc.message)
            self._apply(self._scheduler.start_failed(model_id, StartFailed(model_id, exc.message), self._now()))
            return
        self._processes[model_id] = process
        if self._gauges is not None:
            self._gauges.watch(model_id, process)

    def _on_process_event(self, model_id: str, process: ModelProcess, event: ProcessEvent) -> None:
        now = self._now()
        if isinstance(event, Started):
            self.events.record(model_id, EventKind.READY, why={"load_s": round(process.load_seconds or 0.0, 2)},
                               text=f"ready after {process.load_seconds or 0.0:.1f} s")
            self.metrics.load_seconds.labels(model_id).observe(process.load_seconds or 0.0)
            self._apply(self._scheduler.started(model_id, now))
            if self._gauges is not None and self._processes.get(model_id) is process:
                self._gauges.ready(model_id)
            asyncio.create_task(self._measure(model_id, process))
        elif isinstance(event, Slept):
            self._apply(self._scheduler.slept(model_id, event.observed_at, now))
            if self.state(model_id) is ModelState.SLEEPING:
                self.events.record(model_id, EventKind.SLEEP, text="its server unloaded the model (idle)")
                log.info(f"{model_id} is sleeping (its model left memory; the next request wakes it)")
                asyncio.create_task(self._measure_sleeping(model_id, process))
        elif isinstance(event, Woke):
            self.events.record(model_id, EventKind.READY, text="woke")
            self._apply(self._scheduler.started(model_id, now))
            asyncio.create_task(self._measure(model_id, process))
        else:  # the process is gone
            if self._processes.get(model_id) is process:
                del self._processes[model_id]
                self.memory.forget(model_id)
                if self._gauges is not None:
                    self._gauges.forget(model_id)
            if isinstance(event, StartFailedEvent):
                self.events.record(model_id, EventKind.FAILED, why={"error": event.error.message},
                                   text=event.error.message)
                self.metrics.start_failures.labels(model_id).inc()
                log.info(event.error.message)
                self._apply(self._scheduler.start_failed(model_id, event.error, now))
            else:
                if event.crashed:
                    self.events.record(model_id, EventKind.CRASHED, why={"exit_code": event.exit_code},
                                       text=f"crashed (exit code {event.exit_code})")
                    self.metrics.crashes.labels(model_id).inc()
                    log.info(f"{model_id} crashed (exit code {event.exit_code}); the next request starts it again")
                else:
                    self.events.record(model_id, EventKind.STOPPED)
                self._apply(self._scheduler.stopped(model_id, now))
        self._publish_states()  # every event changes a state, with or without actions to apply

    def _publish_states(self) -> None:
        self.metrics.set_states({m: self.state(m) for m in self._scheduler.models})

    async def _measure_sleeping(self, model_id: str, process: ModelProcess) -> None:
        usage = await self.memory.measure_sleeping(process)
        if usage is not None and process.asleep and self._processes.get(model_id) is process:
            log.info(f"{model_id} keeps {usage} while sleeping")
            self._apply(self._scheduler.set_sleeping_memory(model_id, usage, self._now()))

    async def _measure(self, model_id: str, process: ModelProcess) -> None:
        plan = await self.memory.measure(self.config.models.get(model_id), process,
                                         lambda: self._processes.get(model_id) is process)
        if plan is not None:
            self._set_plan(model_id, plan)
