"""One supervised model process: the one owner of its OS process, from spawn to reap.

A `ModelProcess` is owned by exactly one asyncio task (`_run`). Other code only
calls `request_stop()` (and `wake()`) and receives events through the `on_event`
callback (events.py): `Started`, then exactly one of `StartFailedEvent` or `Stopped`,
with `Slept` and `Woke` in between for a server that sleeps when idle. The output of
this run (the child's lines only) is kept on the process itself, so facts
taken from it (out-of-memory evidence, buffer sizes) never depend on how
berth words its own log lines.

The owner task runs named steps that live in modules of their own: spawning the child
(child.py), the race to ready (starting.py, over readiness.py), noticing a hang
(liveness.py), a sleeping server (sleep.py), KV slots (slots.py) and stopping the
process group (stopping.py). What others may see of a run is a `ProcessFacts` (facts.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from berth.config import ModelSpec
from berth.engine.launch import Launch, key_headers, server_args
from berth.engine.rpc import RpcTargets
from berth.engine.redact import child_environment, redact_argv
from berth.engine.slots import SlotPlan
from berth.core.errors import BerthError, StartFailed
from berth.core.procfs import oom_kill_count
from berth.runtime.agents import AgentDirectory, AgentFailure, AgentLeases
from berth.runtime.child import drain_output, spawn_child, wait_exit
from berth.runtime.events import ProcessEvent, Slept, Started, StartFailedEvent, Stopped, Woke
from berth.runtime.facts import ProcessFacts
from berth.runtime.janitor import Janitor, signal_group
from berth.runtime.liveness import until_unresponsive
from berth.runtime.logs import LogHub
from berth.runtime.pagecache import PageWarmer, launch_files
from berth.runtime.sleep import SleepWatch
from berth.runtime.slots import SlotKeeper
from berth.runtime.starting import StartRace, Warmup, looks_out_of_memory, wait_ready
from berth.runtime.stopping import stop_group

# the names callers import from here, wherever they live now
__all__ = [
    "LaunchBuilder",
    "ModelProcess",
    "ProcessDeps",
    "ProcessEvent",
    "ProcessFacts",
    "Slept",
    "StartFailedEvent",
    "Started",
    "Stopped",
    "Warmup",
    "Woke",
    "looks_out_of_memory",
    "wait_exit",
]

log = logging.getLogger("berth.runtime")

RUN_OUTPUT_LINES = 2000  # the child's last lines kept per run (buffer sizes come early, failures late)

LaunchBuilder = Callable[..., Launch]  # (spec, cancel=threading.Event, rpc=RpcTargets | None) -> Launch


@dataclass(frozen=True)
class ProcessDeps:
    """What every model process of one gateway shares."""

    build_launch: LaunchBuilder
    logs: LogHub
    janitor: Janitor
    session: Callable[[], aiohttp.ClientSession]  # for health, warmup and slots; opened with the app
    warmup: Warmup | None = None
    metrics: object | None = None
    agents: AgentDirectory | None = None  # what rpc agents offer (placement shares)
    rpc_needs: Callable[[ModelSpec], dict[str, int]] | None = None  # planned bytes per device, rpc:... included
    warmer: PageWarmer | None = None  # reads a model's files into the page cache before its start


async def _never() -> str:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class ModelProcess:
    def __init__(self, spec: ModelSpec, deps: ProcessDeps, on_event: Callable[[ProcessEvent], None]) -> None:
        self.spec = spec  # with its port bound: where this run listens
        self.slots: SlotPlan | None = None
        self.projector: bool | None = None  # set from its launch
        self.argv: list[str] = list(spec.argv)  # replaced by the resolved argv at spawn
        self.planned_argv: list[str] = self.argv  # the same, as planned (rpc agents' addresses for their ports)
        self.key: str | None = None  # this run's server key (Launch.key): on every request berth sends it
        self.output: deque[str] = deque(maxlen=RUN_OUTPUT_LINES)  # this run's child output
        self._build_launch = deps.build_launch
        self._logs = deps.logs
        self._janitor = deps.janitor
        self._session = deps.session()
        self._on_event = on_event
        self._warmup = deps.warmup
        self._metrics = deps.metrics
        self._slot_keeper: SlotKeeper | None = None
        self._sleep: SleepWatch | None = None  # while ready, for a server launched to sleep when idle
        self._agents, self._rpc_needs = deps.agents, deps.rpc_needs
        self._warmer = deps.warmer
        self._rpc: AgentLeases | None = None  # this run's rpc servers, with `rpc:`
        self._rpc_lost: asyncio.Task[str] | None = None  # ends, naming the agent, when a lease cannot be renewed
        self.failure: str | None = None  # why the last run ended badly, when an rpc agent explains it
        self.agent_endpoints: dict[str, str] = {}  # where this run's rpc servers listen -> their agent
        self._restore_hit_pending = False
        self._stop_requested = asyncio.Event()
        self._cancel_launch = threading.Event()  # tells a pull running in a worker thread to give up
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.load_seconds: float | None = None
        self._spawned: float | None = None  # on the event loop's clock
        self._output_arrived = asyncio.Event()  # set by each line the child writes (readiness.py)
        self._oom_kills_at_spawn = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def facts(self) -> ProcessFacts:
        return ProcessFacts(self.spec.id, self.spec.proxy, self.spec.port, self.pid, tuple(self.argv), self.slots,
                            self.sleeps, self.projector, self.key)

    def take_restore_hit(self) -> bool:
        """True once: for the first request after slots were restored (to measure the reuse)."""
        pending, self._restore_hit_pending = self._restore_hit_pending, False
        return pending

    def launch(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"model:{self.spec.id}")

    @property
    def sleeps(self) -> bool:
        """Launched to sleep when idle (llama-server's --sleep-idle-seconds)."""
        args = server_args(self.argv)
        return args is not None and (args.get("sleep_idle_seconds") or -1) > 0

    @property
    def asleep(self) -> bool:
        return self._sleep is not None and self._sleep.asleep

    def wake(self) -> None:
        """Wake the sleeping server; `Woke` follows once its model is loaded (or `Stopped` if that fails)."""
        if self._sleep is not None:
            self._sleep.wake()

    def request_stop(self) -> None:
        self._stop_requested.set()
        self._cancel_launch.set()

    async def wait_closed(self) -> None:
        if self._task:
            await asyncio.shield(self._task)

    def _log(self, text: str) -> None:
        # `model` routes the record to this model's log in the hub (gateway/server.py)
        log.info("%s: %s", self.spec.id, text, extra={"model": self.spec.id, "text": text})

    def last_lines(self, count: int = 30) -> list[str]:
        return list(self.output)[-count:]

    # -- the owner task ---------------------------------------------------------------

    async def _run(self) -> None:
        """Own the process from spawn to reap; report exactly one outcome event after `Started`."""
        started = ended = False

        def report(event: ProcessEvent) -> None:
            nonlocal started, ended
            started |= isinstance(event, Started)
            ended |= isinstance(event, (StartFailedEvent, Stopped))
            self._on_event(event)

        try:
            await self._supervise(report)
        except Exception as exc:  # a bug here must not leave the scheduler waiting forever
            log.exception("%s: supervisor failed", self.spec.id)
            await self._release_agents()
            if self._proc is not None:
                signal_group(self._proc.pid, signal.SIGKILL)
                self._janitor.unregister(self._proc.pid)
            if ended:
                return
            if started:
                self._on_event(Stopped(crashed=True, exit_code=None))
            else:
                self._on_event(StartFailedEvent(StartFailed(self.spec.id, f"internal error: {exc!r}")))

    async def _supervise(self, report: Callable[[ProcessEvent], None]) -> None:
        """Spawn, race to ready, serve until the end; each outcome is reported after the group is gone."""
        begun = time.monotonic()
        try:
            await self._spawn()
        except StartFailed as exc:
            await self._release_agents()
            report(StartFailedEvent(exc))
            return
        proc, spawned = self._proc, self._spawned
        assert proc is not None and spawned is not None
        drain = asyncio.create_task(drain_output(proc, self._take_line))
        exited = asyncio.create_task(wait_exit(proc))
        stop_wanted = asyncio.create_task(self._stop_requested.wait())
        agent_lost = self._rpc_lost or asyncio.create_task(_never())
        race = StartRace(self.spec, exited, stop_wanted, agent_lost, self.last_lines, self._agent_trouble,
                         self._oom_kills_at_spawn)
        try:
            ready = wait_ready(self.spec, self._session, self.key, self._output_arrived, spawned, self._warmup)
            outcome = await race.until_ready(ready)
            if outcome is None:
                await self._serve(report, race, begun)
            elif isinstance(outcome, StartFailed):
                await self._terminate()
                report(StartFailedEvent(outcome))
            else:  # a stop was asked for before it was ready
                await self._terminate()
                report(Stopped(crashed=False, exit_code=proc.returncode))
        finally:
            stop_wanted.cancel()
            exited.cancel()
            agent_lost.cancel()
            await drain

    async def _serve(self, report: Callable[[ProcessEvent], None], race: StartRace, begun: float) -> None:
        """The ready server: restore its slots, report `Started`, and watch it until it exits, hangs, loses
        an rpc agent, fails to wake or is asked to stop; then stop it and report `Stopped`."""
        if self._slot_keeper is not None:
            self._restore_hit_pending = await self._slot_keeper.restore() > 0
            self._slot_keeper.mark_running()
        self.load_seconds = time.monotonic() - begun
        self._log(f"ready after {self.load_seconds:.2f}s")
        report(Started())
        exited, stop_wanted, agent_lost = race.exited, race.stop_wanted, race.agent_lost
        unresponsive = asyncio.create_task(until_unresponsive(self._session, self.spec, key_headers(self.key),
                                                              self._log))
        sleep_trouble = asyncio.create_task(self._watch_sleep(report))
        await asyncio.wait({exited, stop_wanted, unresponsive, agent_lost, sleep_trouble},
                           return_when=asyncio.FIRST_COMPLETED)
        # a server whose rpc agent is gone may wait on its socket for good: as good as hung
        hung = (unresponsive.done() or agent_lost.done() or sleep_trouble.done()) and not exited.done()
        unresponsive.cancel()
        sleep_trouble.cancel()
        crashed = (exited.done() or hung) and not stop_wanted.done()
        await self._before_stop(crashed, race, sleep_trouble)
        await self._terminate(hung=hung)
        assert self._proc is not None
        report(Stopped(crashed=crashed, exit_code=self._proc.returncode))

    async def _before_stop(self, crashed: bool, race: StartRace, sleep_trouble: asyncio.Task[str]) -> None:
        """Say why a crashed server ends; a planned stop saves its KV slots (in-flight requests have finished)."""
        assert self._proc is not None
        if race.agent_lost.done() and crashed:
            self.failure = race.agent_lost.result()
            self._log(f"stopping it: {self.failure} (the next request starts it again)")
        elif sleep_trouble.done() and crashed:
            self._log(f"stopping it: it {sleep_trouble.result()} (the next request starts it again)")
        elif race.exited.done() and crashed:
            self.failure = await self._agent_trouble()
            self._log(f"exited unexpectedly with code {self._proc.returncode}"
                      + (f": {self.failure}" if self.failure else ""))
        elif (not crashed and self._slot_keeper is not None and self._proc.returncode is None
              and not self.asleep):  # a sleeping server has no KV cache, and a save would wake it
            await self._slot_keeper.save()

    async def _spawn(self) -> None:
        spec = self.spec
        targets = await self._lease_agents() if spec.rpc is not None else None
        try:  # may pull the model from the store first: minutes, so off the event loop
            launch = await asyncio.to_thread(self._build_launch, spec, cancel=self._cancel_launch, rpc=targets)
            self.argv, self.slots, self.projector, self.key = launch.argv, launch.slots, launch.projector, launch.key
            self.planned_argv = launch.planned_argv or launch.argv
        except BerthError as exc:
            raise StartFailed(spec.id, exc.message) from None
        self._log(f"launching: {' '.join(redact_argv(self.argv))}")
        if self.slots is not None:
            self._slot_keeper = SlotKeeper(spec.id, self.slots, spec.proxy, self._session, self._log, self._metrics,
                                           key_headers(self.key))
            await asyncio.to_thread(self._slot_keeper.prepare)  # may delete other settings' saves
        if self._warmer is not None:  # the kernel reads the weights while the server starts up
            argv = self.argv
            self._warmer.warm(spec.id, lambda: launch_files(argv), "before its start")
        env = child_environment(os.environ, (*spec.env, *launch.env))  # launch.env: its server key
        self._proc = await spawn_child(spec.id, self.argv, env)
        self._spawned = asyncio.get_running_loop().time()
        self._oom_kills_at_spawn = await asyncio.to_thread(oom_kill_count)
        self._janitor.register(self._proc.pid)
        self._log(f"started pid {self._proc.pid}")

    def _take_line(self, text: str) -> None:
        self._output_arrived.set()  # a hint to check readiness now; the text is never read for it
        self.output.append(text)
        self._logs.write(self.spec.id, text, upstream=True)

    async def _lease_agents(self) -> RpcTargets:
        """An rpc server from each agent (renewed from now on, while the model pulls, loads and runs)."""
        spec = self.spec
        assert spec.rpc is not None
        self._rpc = AgentLeases(self._session, spec.id, spec.rpc, lambda: self.pid)
        try:
            await self._rpc.acquire(self._rpc_needs(spec) if self._rpc_needs else {})
        except AgentFailure as exc:
            raise StartFailed(spec.id, str(exc)) from None
        self._rpc_lost = asyncio.create_task(self._rpc.until_lost())
        self.agent_endpoints = {endpoint: agent for endpoint, agent in zip(self._rpc.endpoints, spec.rpc.agents)
                                if endpoint is not None}
        offers = self._agents.offers_for(spec.rpc) if self._agents else (0,) * len(spec.rpc.agents)
        return RpcTargets(self._rpc.endpoints, offers)

    async def _agent_trouble(self) -> str | None:
        """When the model server failed: an rpc agent that is gone, named, if that explains it."""
        return await self._rpc.diagnose() if self._rpc is not None else None

    async def explain_failure(self) -> str | None:
        """For an answer cut short: the agent that is gone, if this model runs over rpc agents."""
        return self.failure or await self._agent_trouble()

    async def _release_agents(self) -> None:
        if self._rpc_lost is not None:
            self._rpc_lost.cancel()
        if self._rpc is not None:
            await self._rpc.release()

    async def _watch_sleep(self, report: Callable[[ProcessEvent], None]) -> str:
        """For a server launched with --sleep-idle-seconds: report each sleep and wake (runtime/sleep.py).
        Returns only when a wake failed (why); otherwise waits for good."""
        if not self.sleeps:
            return await _never()
        self._sleep = SleepWatch(self.spec.proxy, self._session, self.key,
                                 lambda observed_at: report(Slept(observed_at)), lambda: report(Woke()),
                                 self.spec.health_check_timeout)
        return await self._sleep.run()

    async def _terminate(self, hung: bool = False) -> None:
        """Stop the whole process group (stopping.py), then hand back what the run held."""
        proc = self._proc
        assert proc is not None
        await stop_group(proc, self.spec, self._log, hung=hung)
        self._janitor.unregister(proc.pid)
        await self._release_agents()  # before the stop is reported: a restart leases afresh
        self._log(f"stopped (exit code {proc.returncode})")
