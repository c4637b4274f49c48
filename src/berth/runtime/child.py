"""The model server as an OS child: how it is spawned (its own session, umask and environment), how its
output is read, and how its exit is noticed."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

from berth.core.errors import StartFailed

CHILD_UMASK = 0o077  # what a model server writes (saved KV slots hold users' tokens) is for berth's user alone


def child_umask() -> dict[str, Any]:
    """The spawn argument that gives the child CHILD_UMASK. asyncio's loop passes `umask` to subprocess,
    which sets it in C between fork and exec; uvloop's (core/eventloop.py) refuses that argument, so there
    the child calls os.umask itself before exec (a preexec_fn: one system call, no lock taken)."""
    if isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        return {"umask": CHILD_UMASK}
    return {"preexec_fn": functools.partial(os.umask, CHILD_UMASK)}


async def spawn_child(model: str, argv: Sequence[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start `argv` for `model` with its output on one pipe; a command that cannot run is a StartFailed
    that says how to fix the config."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: a stop reaches every descendant
            **child_umask(),
        )
    except FileNotFoundError:
        raise StartFailed(model, f"command not found: {argv[0]!r}; fix `cmd` in the config") from None
    except PermissionError:
        raise StartFailed(model, f"command is not executable: {argv[0]!r}; fix `cmd` in the config") from None
    except OSError as exc:
        raise StartFailed(model, f"cannot run {argv[0]!r}: {exc}") from None


async def drain_output(proc: asyncio.subprocess.Process, on_line: Callable[[str], None]) -> None:
    """Read the child's output continuously so it never blocks on a full pipe; each line to `on_line`."""
    assert proc.stdout is not None
    while True:
        try:
            line = await proc.stdout.readline()
        except ValueError:  # a line longer than the stream limit: take what is there
            line = await proc.stdout.read(65536)
        if not line:
            return
        on_line(line.decode("utf-8", errors="replace").rstrip("\n"))


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
