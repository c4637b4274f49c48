"""The shell around the pure scheduler: performs its actions and feeds back events.

All calls happen on the event loop thread, so each scheduler step is atomic.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from berth.config import BerthConfig
from berth.config.loader import DEFAULT_GROUP
from berth.engine.launch import Launch
from berth.errors import BerthError, UnknownModel
from berth.gateway.metrics import Metrics
from berth.memory.devices import Device, inventory, measure_group, parse_buffer_log
from berth.memory.planner import MemoryLedger, MemoryPlanner, ModelMemory
from berth.runtime.janitor import Janitor
from berth.runtime.logs import LogHub
from berth.runtime.process import ModelProcess, ProcessEvent, Started, StartFailedEvent, Stopped, Warmup
from berth.scheduler import (
    Action, Admit, GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, Reject, Scheduler, Start, Stop,
)
from berth.store.store import berth_home

log = logging.getLogger("berth.pool")

LaunchBuilder = Callable[..., Launch]  # (spec, cancel=threading.Event) -> Launch


KEEPALIVE_SECONDS = 4.0
MEASURE_INTERVAL = 30.0  # seconds between measurements of running models (peak usage grows with use)


def _policies(config: BerthConfig, plans: dict[str, ModelMemory], budgets: dict[str, int],
              ) -> tuple[dict[str, ModelPolicy], dict[str, GroupPolicy], MemoryPolicy]:
    persistent_groups = {g.name for g in config.groups.values() if g.persistent}
    models = {m.id: ModelPolicy(group=m.group, ttl=m.ttl, concurrency_limit=m.concurrency_limit,
                                memory=plans[m.id].planned, pinned=m.persistent or m.group in persistent_groups)
              for m in config.models.values()}
    groups = {g.name: GroupPolicy(swap=g.swap, exclusive=g.exclusive, persistent=g.persistent)
              for g in config.groups.values()}
    scheduled = DEFAULT_GROUP if config.memory.scheduled else None
    if scheduled in groups:  # without groups, memory decides who runs together instead of swapping
        groups[scheduled] = GroupPolicy(swap=False, exclusive=False)
    return models, groups, MemoryPolicy(budgets, scheduled, config.memory.eviction)


@dataclass
class Lease:
    """Permission to send one request to a ready model; release it when the response ends."""

    request_id: int
    process: ModelProcess
    _pool: "ModelPool"
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._apply(self._pool._scheduler.finished(self.request_id, self._pool._now()))


class ModelPool:
    def __init__(self, config: BerthConfig, logs: LogHub, metrics: Metrics,
                 launch_builder: LaunchBuilder, warmup: Warmup | None = None) -> None:
        self.config = config
        self.logs = logs
        self.metrics = metrics
        self._launch_builder = launch_builder
        self._warmup = warmup
        self.planner = MemoryPlanner(inventory(), MemoryLedger(berth_home() / "memory.json"),
                                     lambda spec: launch_builder(spec, fetch=False))
        self.memory: dict[str, ModelMemory] = {}  # planned memory per model
        self.measured: dict[str, dict[str, int]] = {}  # peak usage per running model
        self._scheduler = Scheduler.build(*self._plan_all(config))
        self._janitor = Janitor()
        self._processes: dict[str, ModelProcess] = {}
        self._waiters: dict[int, asyncio.Future[str]] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._timer: asyncio.TimerHandle | None = None
        self._session: aiohttp.ClientSession | None = None
        self._proxy_session: aiohttp.ClientSession | None = None
        self._measuring: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        self._janitor.start()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # The proxy passes bodies through as sent (a gzip body stays gzip, with its header).
        # Idle connections are dropped before llama-server's (cpp-httplib's) 5 s keep-alive timeout closes
        # them from its side, so a request rarely meets a connection that is already gone.
        self._proxy_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS), auto_decompress=False)
        for model_id in self.config.preload:
            asyncio.create_task(self._preload(model_id))
        self._measuring = asyncio.create_task(self._measure_periodically())

    async def _preload(self, model_id: str) -> None:
        try:
            await self.load(model_id)
        except BerthError as exc:
            log.info(f"preload of {model_id} failed: {exc.message}")

    async def close(self) -> None:
        """Stop every model (in-flight requests are cut) and wait until all are gone."""
        self._apply(self._scheduler.shutdown(self._now()))
        if self._measuring:
            self._measuring.cancel()
        await asyncio.gather(*(p.wait_closed() for p in list(self._processes.values())), return_exceptions=True)
        if self._timer:
            self._timer.cancel()
        for session in (self._session, self._proxy_session):
            if session:
                await session.close()
        self._janitor.close()

    # -- requests ---------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        model_id = self.config.resolve(name)
        if model_id is None:
            raise UnknownModel(name, self.listed_ids())
        return model_id

    def listed_ids(self) -> list[str]:
        return [m.id for m in self.config.models.values() if not m.unlisted]

    async def acquire(self, model_id: str) -> Lease:
        """Wait until `model_id` is ready and admits this request (raises the typed error otherwise)."""
        request_id = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        self._apply(self._scheduler.request(request_id, model_id, self._now()))
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
        return Lease(request_id, self._processes[model_id], self)

    async def load(self, model_id: str) -> None:
        (await self.acquire(model_id)).release()

    async def unload(self, model_id: str | None = None, force: bool = False) -> None:
        """Stop one model (or all) once idle and wait until stopped."""
        targets = [model_id] if model_id else list(self._scheduler.models)
        self._apply(self._scheduler.unload(model_id, self._now(), force=force))
        async with self._changed:
            await self._changed.wait_for(lambda: all(
                m not in self._scheduler.models
                or self._scheduler.state(m) in (ModelState.STOPPED, ModelState.FAILED)
                for m in targets))

    def reload(self, new: BerthConfig) -> list[str]:
        """Adopt a new config; restart only models whose definition changed. Returns those ids."""
        old = self.config
        changed = [m for m in old.models if m in new.models and old.models[m] != new.models[m]]
        removed = [m for m in old.models if m not in new.models]
        self.config = new
        self._scheduler.configure(*self._plan_all(new))
        for model_id in changed:
            if self._scheduler.state(model_id) in (ModelState.READY, ModelState.STARTING):
                self._apply(self._scheduler.unload(model_id, self._now(), reason="reload"))
        self._apply(self._scheduler.tick(self._now()))
        log.info(f"config reloaded: changed {changed or 'none'}, removed {removed or 'none'}")
        return changed + removed

    # -- views ------------------------------------------------------------------------

    def state(self, model_id: str) -> ModelState:
        return self._scheduler.state(model_id)

    def view(self, model_id: str):
        return self._scheduler.view(model_id)

    def process(self, model_id: str) -> ModelProcess | None:
        return self._processes.get(model_id)

    @property
    def session(self) -> aiohttp.ClientSession:
        """For berth's own calls to model servers (health, warmup, slots)."""
        assert self._session is not None
        return self._session

    @property
    def proxy_session(self) -> aiohttp.ClientSession:
        """For forwarding client requests: never decompresses."""
        assert self._proxy_session is not None
        return self._proxy_session

    # -- memory -----------------------------------------------------------------------

    def _plan_all(self, config: BerthConfig):
        self.memory = {spec.id: self.planner.plan(spec) for spec in config.models.values()}
        for model_id, plan in self.memory.items():
            log.debug(f"{model_id}: memory {plan.source} {plan.planned} {plan.detail}")
        return _policies(config, self.memory, self.planner.budgets(config))

    async def _measure(self, model_id: str, process: ModelProcess) -> None:
        """Read what a running model really uses; later plans for the same settings start from it."""
        if process.pid is None:
            return
        usage = await asyncio.to_thread(measure_group, process.pid)
        if self._processes.get(model_id) is not process or not usage.get("host"):
            return  # stopped meanwhile
        for device, amount in parse_buffer_log(self._lines_of_this_run(model_id)).items():
            usage.setdefault(device, amount)  # GPUs NVML does not see; the host's RSS is the fuller figure
        self.measured[model_id] = usage
        spec = self.config.models.get(model_id)
        if spec is None or spec.argv != process.spec.argv:
            return  # reloaded with other settings meanwhile
        plan = self.planner.learn(spec, process.argv, usage)
        if plan.planned != self.memory[model_id].planned:
            log.info(f"{model_id}: planned memory now {plan.planned} ({plan.source})")
        self.memory[model_id] = plan
        self._apply(self._scheduler.set_memory(model_id, plan.planned, self._now()))

    def _lines_of_this_run(self, model_id: str) -> list[str]:
        lines = [line.text for line in self.logs.tail(model_id)]
        starts = [i for i, text in enumerate(lines) if text.startswith("[berth] launching:")]
        return lines[starts[-1]:] if starts else lines

    def devices(self, live: dict[str, Device]) -> dict[str, dict[str, int]]:
        """Per device: total and free now (`live`, from `inventory()`), berth's budget, and what running
        models are planned to hold."""
        budgets = self.planner.budgets(self.config)
        result = {}
        for name in sorted(set(live) | set(budgets)):
            planned = sum((self.memory[m].planned or {}).get(name, 0) for m in self._scheduler.models
                          if m in self.memory and self._scheduler.state(m) in
                          (ModelState.STARTING, ModelState.READY, ModelState.STOPPING))
            device = live.get(name)
            result[name] = {"total_bytes": device.total_bytes if device else 0,
                            "free_bytes": device.free_bytes if device else 0,
                            "budget_bytes": budgets.get(name, 0), "planned_in_use_bytes": planned}
        return result

    async def _measure_periodically(self) -> None:
        while True:
            await asyncio.sleep(MEASURE_INTERVAL)
            for model_id, process in list(self._processes.items()):
                if self._scheduler.state(model_id) is ModelState.READY:
                    await self._measure(model_id, process)

    # -- the shell --------------------------------------------------------------------

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Admit):
                future = self._waiters.get(action.request_id)
                if future is not None and not future.done():
                    future.set_result(action.model)
                else:  # the client left in the same instant: give the slot back
                    self._apply(self._scheduler.finished(action.request_id, self._now()))
            elif isinstance(action, Reject):
                future = self._waiters.get(action.request_id)
                if future is not None and not future.done():
                    future.set_exception(action.error)
            elif isinstance(action, Start):
                self._start(action.model)
            elif isinstance(action, Stop):
                log.info(f"stopping {action.model} ({action.reason})")
                if action.reason in ("swap", "memory"):
                    self.metrics.swaps.inc()
                process = self._processes.get(action.model)
                if process is not None:
                    process.request_stop()
        self.metrics.queue_depth.set(self._scheduler.queue_depth())
        if any(isinstance(a, (Start, Stop)) for a in actions):
            self._update_state_gauges()
        self._arm_timer()

    async def _notify_state_change(self) -> None:
        self._update_state_gauges()
        async with self._changed:
            self._changed.notify_all()

    def _start(self, model_id: str) -> None:
        spec = self.config.models[model_id]
        log.info(f"starting {model_id}")
        process: ModelProcess

        def on_event(event: ProcessEvent) -> None:
            self._on_process_event(model_id, process, event)

        process = ModelProcess(spec, self._launch_builder, self.logs, self._janitor, self.session, on_event,
                               self._warmup, self.metrics)
        self._processes[model_id] = process
        process.launch()

    def _on_process_event(self, model_id: str, process: ModelProcess, event: ProcessEvent) -> None:
        now = self._now()
        if isinstance(event, Started):
            self.metrics.load_seconds.labels(model_id).observe(process.load_seconds or 0.0)
            self._apply(self._scheduler.started(model_id, now))
            loop = asyncio.get_running_loop()
            loop.create_task(self._notify_state_change())
            loop.create_task(self._measure(model_id, process))
            return
        if self._processes.get(model_id) is process:
            del self._processes[model_id]
            self.measured.pop(model_id, None)
        if isinstance(event, StartFailedEvent):
            self.metrics.start_failures.labels(model_id).inc()
            log.info(event.error.message)
            self._apply(self._scheduler.start_failed(model_id, event.error, now))
        elif isinstance(event, Stopped):
            if event.crashed:
                self.metrics.crashes.labels(model_id).inc()
                log.info(f"{model_id} crashed (exit code {event.exit_code}); "
                                         "the next request starts it again")
            self._apply(self._scheduler.stopped(model_id, now))
        asyncio.get_running_loop().create_task(self._notify_state_change())

    def _arm_timer(self) -> None:
        deadline = self._scheduler.next_deadline()
        if self._timer is not None and self._timer.when() == deadline:
            return  # most requests leave the next TTL deadline as it was
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        # asyncio may run this a clock tick before the deadline; with the handle cleared first,
        # _arm_timer sets a fresh one for the same deadline instead of keeping this spent one.
        self._timer = None
        self._apply(self._scheduler.tick(self._now()))

    def _update_state_gauges(self) -> None:
        for model_id in self._scheduler.models:
            current = self._scheduler.state(model_id)
            for state in ModelState:
                self.metrics.model_state.labels(model_id, state.value).set(1 if state is current else 0)
