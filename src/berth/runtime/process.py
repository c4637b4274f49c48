"""One supervised model server process: spawn, drain logs, wait for health, stop.

A `ModelProcess` is owned by exactly one asyncio task (`_run`). Other code only
calls `request_stop()` (and `wake()`) and receives events through the `on_event`
callback: `Started`, then exactly one of `StartFailedEvent` or `Stopped`, with
`Slept` and `Woke` in between for a server that sleeps when idle. The output of
this run (the child's lines only) is kept on the process itself, so facts
taken from it (out-of-memory evidence, buffer sizes) never depend on how
berth words its own log lines.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from berth.config import ModelSpec
from berth.engine.launch import Launch, key_headers, server_args
from berth.engine.rpc import RpcTargets
from berth.engine.redact import child_environment, redact_argv
from berth.engine.slots import SlotPlan
from berth.core.errors import BerthError, StartFailed
from berth.core.procfs import group_alive, oom_kill_count
from berth.runtime.agents import AgentDirectory, AgentFailure, AgentLeases
from berth.runtime.janitor import Janitor, signal_group
from berth.runtime.logs import LogHub
from berth.runtime.pagecache import PageWarmer, launch_files
from berth.runtime.readiness import wait_healthy
from berth.runtime.sleep import SleepWatch
from berth.runtime.slots import SlotKeeper

log = logging.getLogger("berth.runtime")

GROUP_GONE_TIMEOUT = 5.0
LIVENESS_MISSES = 3  # health checks missed in a row before a ready model counts as hung
RUN_OUTPUT_LINES = 2000  # the child's last lines kept per run (buffer sizes come early, failures late)
CHILD_UMASK = 0o077  # what a model server writes (saved KV slots hold users' tokens) is for berth's user alone


def _child_umask() -> dict[str, Any]:
    """The spawn argument that gives the child CHILD_UMASK. asyncio's loop passes `umask` to subprocess,
    which sets it in C between fork and exec; uvloop's (core/eventloop.py) refuses that argument, so there
    the child calls os.umask itself before exec (a preexec_fn: one system call, no lock taken)."""
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        return {"umask": CHILD_UMASK}
    return {"preexec_fn": functools.partial(os.umask, CHILD_UMASK)}


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class StartFailedEvent:
    error: StartFailed


@dataclass(frozen=True)
class Stopped:
    crashed: bool
    exit_code: int | None


@dataclass(frozen=True)
class Slept:
    """The ready server fell asleep (its model left memory); seen by a check sent at `observed_at`
    (the event loop's clock)."""

    observed_at: float


@dataclass(frozen=True)
class Woke:
    """The sleeping server has its model loaded again (berth woke it, or a request from elsewhere did)."""


ProcessEvent = Started | StartFailedEvent | Stopped | Slept | Woke


@dataclass(frozen=True)
class ProcessFacts:
    """One run of a model server as others may see it: a copy, safe to hand out and keep."""

    model: str
    proxy: str  # where it listens
    port: int | None
    pid: int | None  # None until spawned
    argv: tuple[str, ...]  # as launched (the config's until then); secrets included: redact before showing
    slots: SlotPlan | None  # where its KV slots are saved, when they are
    sleeps: bool = False  # launched to sleep when idle: no work may be sent to it that it does not need
    projector: bool | None = None  # whether its launch gave it a multimodal projector (None: unknown, not launched)
    key: str | None = None  # what to present to its server (Launch.key); never shown


Warmup = Callable[[ModelSpec, str | None, aiohttp.ClientSession], Awaitable[None]]  # (spec, server key, session)
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


# What llama.cpp (CPU, CUDA, HIP, Vulkan) and C++ print when an allocation fails.
_OUT_OF_MEMORY = re.compile(r"out of memory|failed to allocate|unable to allocate|cudaMalloc failed|hipMalloc failed|"
                            r"std::bad_alloc|ErrorOutOfDeviceMemory", re.IGNORECASE)


def looks_out_of_memory(returncode: int | None, lines: list[str], oom_kills_meanwhile: int) -> bool:
    """An exit before ready that an allocation failure explains, or a SIGKILL while the kernel's OOM
    killer killed something (its counters moved). A SIGKILL alone is not evidence: anyone may send one."""
    killed_by_oom = returncode == -signal.SIGKILL and oom_kills_meanwhile > 0
    return killed_by_oom or any(_OUT_OF_MEMORY.search(line) for line in lines)


async def wait_exit(proc: asyncio.subprocess.Process) -> int:
    """The child's exit code, as soon as it exits. `Process.wait()` (Python 3.11) also waits until every
    holder of the child's pipes has closed them, so a grandchild that keeps stdout open (a wrapper
    script's background job, a multi-process engine) would hide a crash; a pidfd does not."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): the reaper's exit code, polled
        while proc.returncode is None:
            await asyncio.sleep(0.1)
        return proc.returncode
    gone: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, exited)
    try:
        await gone
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    while proc.returncode is None:  # asyncio's child watcher reaps it a moment later
        await asyncio.sleep(0.005)
    return proc.returncode


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
        begun = time.monotonic()
        try:
            await self._spawn()
        except StartFailed as exc:
            await self._release_agents()
            report(StartFailedEvent(exc))
            return
        assert self._proc is not None
        drain = asyncio.create_task(self._drain(self._proc))
        exited = asyncio.create_task(wait_exit(self._proc))
        stop_wanted = asyncio.create_task(self._stop_requested.wait())
        agent_lost = self._rpc_lost or asyncio.create_task(_never())
        try:
            outcome = await self._become_ready(exited, stop_wanted, agent_lost)
            if outcome is None:
                if self._slot_keeper is not None:
                    self._restore_hit_pending = await self._slot_keeper.restore() > 0
                    self._slot_keeper.mark_running()
                self.load_seconds = time.monotonic() - begun
                self._log(f"ready after {self.load_seconds:.2f}s")
                report(Started())
                unresponsive = asyncio.create_task(self._until_unresponsive())
                sleep_trouble = asyncio.create_task(self._watch_sleep(report))
                await asyncio.wait({exited, stop_wanted, unresponsive, agent_lost, sleep_trouble},
                                   return_when=asyncio.FIRST_COMPLETED)
                # a server whose rpc agent is gone may wait on its socket for good: as good as hung
                hung = (unresponsive.done() or agent_lost.done() or sleep_trouble.done()) and not exited.done()
                unresponsive.cancel()
                sleep_trouble.cancel()
                crashed = (exited.done() or hung) and not stop_wanted.done()
                if agent_lost.done() and crashed:
                    self.failure = agent_lost.result()
                    self._log(f"stopping it: {self.failure} (the next request starts it again)")
                elif sleep_trouble.done() and crashed:
                    self._log(f"stopping it: it {sleep_trouble.result()} (the next request starts it again)")
                elif exited.done() and crashed:
                    self.failure = await self._agent_trouble()
                    self._log(f"exited unexpectedly with code {self._proc.returncode}"
                              + (f": {self.failure}" if self.failure else ""))
                elif (not crashed and self._slot_keeper is not None and self._proc.returncode is None
                      and not self.asleep):  # a sleeping server has no KV cache, and a save would wake it
                    await self._slot_keeper.save()  # a planned stop: in-flight requests have finished
                await self._terminate(hung=hung)
                report(Stopped(crashed=crashed, exit_code=self._proc.returncode))
            elif isinstance(outcome, StartFailed):
                await self._terminate()
                report(StartFailedEvent(outcome))
            else:  # a stop was asked for before it was ready
                await self._terminate()
                report(Stopped(crashed=False, exit_code=self._proc.returncode))
        finally:
            stop_wanted.cancel()
            exited.cancel()
            agent_lost.cancel()
            await drain

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
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=child_environment(os.environ, (*spec.env, *launch.env)),  # launch.env: its server key
                start_new_session=True,  # own process group: a stop reaches every descendant
                **_child_umask(),
            )
        except FileNotFoundError:
            raise StartFailed(spec.id, f"command not found: {self.argv[0]!r}; fix `cmd` in the config") from None
        except PermissionError:
            raise StartFailed(spec.id, f"command is not executable: {self.argv[0]!r}; "
                                       "fix `cmd` in the config") from None
        except OSError as exc:
            raise StartFailed(spec.id, f"cannot run {self.argv[0]!r}: {exc}") from None
        self._spawned = asyncio.get_running_loop().time()
        self._oom_kills_at_spawn = await asyncio.to_thread(oom_kill_count)
        self._janitor.register(self._proc.pid)
        self._log(f"started pid {self._proc.pid}")

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

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        """Read the child's output continuously so it never blocks on a full pipe."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                line = await proc.stdout.read(65536)
            if not line:
                return
            self._output_arrived.set()  # a hint to check readiness now; the text is never read for it
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            self.output.append(text)
            self._logs.write(self.spec.id, text, upstream=True)

    async def _become_ready(self, exited: asyncio.Task, stop_wanted: asyncio.Task,
                            agent_lost: asyncio.Task) -> StartFailed | str | None:
        """None when ready; "stopped" when a stop was asked for first; else the failure."""
        health = asyncio.create_task(self._wait_healthy())
        try:
            done, _ = await asyncio.wait(
                {health, exited, stop_wanted, agent_lost}, timeout=self.spec.health_check_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            health.cancel()
        if stop_wanted in done:
            return "stopped"
        if agent_lost in done:
            return StartFailed(self.spec.id, agent_lost.result(), self.last_lines())
        if exited in done:
            await asyncio.sleep(0)  # let the drain task take the last lines
            lines = self.last_lines()
            code = exited.result()
            oom_kills = await asyncio.to_thread(oom_kill_count) - self._oom_kills_at_spawn
            trouble = await self._agent_trouble()
            return StartFailed(self.spec.id, f"process exited with code {code} before it was ready"
                               + (f": {trouble}" if trouble else ""),
                               lines, out_of_memory=looks_out_of_memory(code, lines, oom_kills))
        if health in done:
            failure = health.exception()
            if failure is None:
                return None
            if isinstance(failure, StartFailed):
                return failure
            return StartFailed(self.spec.id, f"readiness check failed: {failure!r}", self.last_lines())
        return StartFailed(self.spec.id, f"not healthy after healthCheckTimeout ({self.spec.health_check_timeout:g}s) "
                                         f"at {self.spec.proxy}{self.spec.check_endpoint}", self.last_lines())

    async def _wait_healthy(self) -> None:
        if self.spec.check_endpoint is not None:
            assert self._spawned is not None
            await wait_healthy(self._session, self.spec.proxy + self.spec.check_endpoint, key_headers(self.key),
                               self._output_arrived, self._spawned)
        if self._warmup is not None and self.spec.warmup:
            await self._warmup(self.spec, self.key, self._session)

    async def _watch_sleep(self, report: Callable[[ProcessEvent], None]) -> str:
        """For a server launched with --sleep-idle-seconds: report each sleep and wake (runtime/sleep.py).
        Returns only when a wake failed (why); otherwise waits for good."""
        if not self.sleeps:
            return await _never()
        self._sleep = SleepWatch(self.spec.proxy, self._session, self.key,
                                 lambda observed_at: report(Slept(observed_at)), lambda: report(Woke()),
                                 self.spec.health_check_timeout)
        return await self._sleep.run()

    async def _until_unresponsive(self) -> None:
        """Return once the ready server has missed LIVENESS_MISSES health checks in a row (a deadlock, a
        SIGSTOP, a wedged GPU): its requests would otherwise wait forever. Never returns without checks."""
        interval, endpoint = self.spec.health_check_interval, self.spec.check_endpoint
        if not interval or endpoint is None:
            await asyncio.Event().wait()
            return
        url = self.spec.proxy + endpoint
        timeout = aiohttp.ClientTimeout(total=min(interval, 5.0))
        misses = 0
        while misses < LIVENESS_MISSES:
            await asyncio.sleep(interval)
            try:
                async with self._session.get(url, timeout=timeout, headers=key_headers(self.key)) as resp:
                    healthy = resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                healthy = False
            misses = 0 if healthy else misses + 1
        self._log(f"missed {LIVENESS_MISSES} health checks in a row ({interval:g}s apart); stopping it as hung "
                  "(the next request starts it again)")

    async def _terminate(self, hung: bool = False) -> None:
        """Stop the whole process group: cmdStop or SIGTERM, then SIGKILL after unloadTimeout; a hung
        server, which would not act on a polite request, gets SIGKILL at once."""
        proc = self._proc
        assert proc is not None
        pgid = proc.pid
        if hung:
            signal_group(pgid, signal.SIGKILL)
        if proc.returncode is None or await asyncio.to_thread(group_alive, pgid):
            if self.spec.stop_argv and proc.returncode is None:
                await self._run_stop_command(proc.pid)
            else:
                signal_group(pgid, signal.SIGTERM)
                signal_group(pgid, signal.SIGCONT)  # a stopped (hung) process acts on SIGTERM only then
            if not await self._wait_group_gone(proc, self.spec.unload_timeout):
                self._log(f"still running {self.spec.unload_timeout:g}s after the stop request; sending SIGKILL")
                signal_group(pgid, signal.SIGKILL)
                if not await self._wait_group_gone(proc, GROUP_GONE_TIMEOUT):
                    self._log(f"process group {pgid} survived SIGKILL")
        self._janitor.unregister(pgid)
        await self._release_agents()  # before the stop is reported: a restart leases afresh
        self._log(f"stopped (exit code {proc.returncode})")

    async def _run_stop_command(self, pid: int) -> None:
        argv = [arg.replace("${PID}", str(pid)) for arg in self.spec.stop_argv]
        self._log(f"running cmdStop: {' '.join(redact_argv(argv))}")
        try:
            stopper = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, env=child_environment(os.environ, self.spec.env),
                start_new_session=True)
            await asyncio.wait_for(stopper.wait(), self.spec.unload_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self._log(f"cmdStop failed ({exc!r}); sending SIGTERM")
            signal_group(pid, signal.SIGTERM)

    async def _wait_group_gone(self, proc: asyncio.subprocess.Process, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if proc.returncode is not None and not await asyncio.to_thread(group_alive, proc.pid):
                return True
            if time.monotonic() >= deadline:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), delay)
            except asyncio.TimeoutError:
                pass
            else:
                if await asyncio.to_thread(group_alive, proc.pid):
                    await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
