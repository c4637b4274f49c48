"""Stopping a model server's whole process group: cmdStop or SIGTERM, then SIGKILL after unloadTimeout,
and waiting until every process of the group is gone (not only the child berth spawned)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

from berth.config import ModelSpec
from berth.core.procfs import group_alive
from berth.engine.redact import child_environment, redact_argv
from berth.runtime.janitor import signal_group

GROUP_GONE_TIMEOUT = 5.0


async def stop_group(proc: asyncio.subprocess.Process, spec: ModelSpec, log: Callable[[str], None],
                     hung: bool = False) -> None:
    """Stop `proc`'s process group and wait for it to be gone; a hung server, which would not act on a
    polite request, gets SIGKILL at once."""
    pgid = proc.pid
    if hung:
        signal_group(pgid, signal.SIGKILL)
    if proc.returncode is None or await asyncio.to_thread(group_alive, pgid):
        if spec.stop_argv and proc.returncode is None:
            await run_stop_command(spec, proc.pid, log)
        else:
            signal_group(pgid, signal.SIGTERM)
            signal_group(pgid, signal.SIGCONT)  # a stopped (hung) process acts on SIGTERM only then
        if not await wait_group_gone(proc, spec.unload_timeout):
            log(f"still running {spec.unload_timeout:g}s after the stop request; sending SIGKILL")
            signal_group(pgid, signal.SIGKILL)
            if not await wait_group_gone(proc, GROUP_GONE_TIMEOUT):
                log(f"process group {pgid} survived SIGKILL")


async def run_stop_command(spec: ModelSpec, pid: int, log: Callable[[str], None]) -> None:
    """Run the config's cmdStop with ${PID} filled in; SIGTERM when it cannot run or takes too long."""
    argv = [arg.replace("${PID}", str(pid)) for arg in spec.stop_argv]
    log(f"running cmdStop: {' '.join(redact_argv(argv))}")
    try:
        stopper = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env=child_environment(os.environ, spec.env),
            start_new_session=True)
        await asyncio.wait_for(stopper.wait(), spec.unload_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        log(f"cmdStop failed ({exc!r}); sending SIGTERM")
        signal_group(pid, signal.SIGTERM)


async def wait_group_gone(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """True once the child is reaped and its group is empty; False after `timeout` seconds."""
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
