"""A start's way to ready: the server's health (readiness.py), then warmup; or whatever ends the start
first (the child's exit, a stop asked for, an rpc agent lost, healthCheckTimeout), told as a StartFailed
that carries the child's last lines and whether running out of memory explains it."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from berth.config import ModelSpec
from berth.core.errors import StartFailed
from berth.core.procfs import oom_kill_count
from berth.engine.launch import key_headers
from berth.runtime.readiness import wait_healthy

Warmup = Callable[[ModelSpec, str | None, aiohttp.ClientSession], Awaitable[None]]  # (spec, server key, session)

# What llama.cpp (CPU, CUDA, HIP, Vulkan) and C++ print when an allocation fails.
_OUT_OF_MEMORY = re.compile(r"out of memory|failed to allocate|unable to allocate|cudaMalloc failed|hipMalloc failed|"
                            r"std::bad_alloc|ErrorOutOfDeviceMemory", re.IGNORECASE)


def looks_out_of_memory(returncode: int | None, lines: list[str], oom_kills_meanwhile: int) -> bool:
    """An exit before ready that an allocation failure explains, or a SIGKILL while the kernel's OOM
    killer killed something (its counters moved). A SIGKILL alone is not evidence: anyone may send one."""
    killed_by_oom = returncode == -signal.SIGKILL and oom_kills_meanwhile > 0
    return killed_by_oom or any(_OUT_OF_MEMORY.search(line) for line in lines)


async def wait_ready(spec: ModelSpec, session: aiohttp.ClientSession, key: str | None, output: asyncio.Event,
                     spawned: float, warmup: Warmup | None) -> None:
    """Return once the server answers its health check (asked with its `key`) and, when configured, its
    warmup is done. `output` is set by each line the child writes; `spawned` is on the loop's clock."""
    if spec.check_endpoint is not None:
        await wait_healthy(session, spec.proxy + spec.check_endpoint, key_headers(key), output, spawned)
    if warmup is not None and spec.warmup:
        await warmup(spec, key, session)


@dataclass(frozen=True)
class StartRace:
    """What a starting server races against, and what explains a start that failed."""

    spec: ModelSpec
    exited: asyncio.Task[int]  # the child's exit code
    stop_wanted: asyncio.Task[Any]  # a stop asked for
    agent_lost: asyncio.Task[str]  # an rpc agent gone, named
    last_lines: Callable[[], list[str]]  # the child's output so far
    agent_trouble: Callable[[], Awaitable[str | None]]  # an rpc agent that explains an exit
    oom_kills_at_spawn: int  # the kernel's OOM kill count when the child was spawned

    async def until_ready(self, ready: Coroutine[Any, Any, None]) -> StartFailed | str | None:
        """None when `ready` finished first; "stopped" when a stop was asked for first; else the failure."""
        spec = self.spec
        health = asyncio.create_task(ready)
        try:
            done, _ = await asyncio.wait(
                {health, self.exited, self.stop_wanted, self.agent_lost}, timeout=spec.health_check_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            health.cancel()
        if self.stop_wanted in done:
            return "stopped"
        if self.agent_lost in done:
            return StartFailed(spec.id, self.agent_lost.result(), self.last_lines())
        if self.exited in done:
            return await self._exit_failure(self.exited.result())
        if health in done:
            failure = health.exception()
            if failure is None:
                return None
            if isinstance(failure, StartFailed):
                return failure
            return StartFailed(spec.id, f"readiness check failed: {failure!r}", self.last_lines())
        return StartFailed(spec.id, f"not healthy after healthCheckTimeout ({spec.health_check_timeout:g}s) "
                                    f"at {spec.proxy}{spec.check_endpoint}", self.last_lines())

    async def _exit_failure(self, code: int) -> StartFailed:
        await asyncio.sleep(0)  # let the drain task take the last lines
        lines = self.last_lines()
        oom_kills = await asyncio.to_thread(oom_kill_count) - self.oom_kills_at_spawn
        trouble = await self.agent_trouble()
        return StartFailed(self.spec.id, f"process exited with code {code} before it was ready"
                           + (f": {trouble}" if trouble else ""),
                           lines, out_of_memory=looks_out_of_memory(code, lines, oom_kills))
