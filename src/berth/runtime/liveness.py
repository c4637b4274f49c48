"""Noticing that a ready model server has hung (a deadlock, a SIGSTOP, a wedged GPU): its requests would
otherwise wait forever, so the process stops it and the next request starts it again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import aiohttp

from berth.config import ModelSpec

LIVENESS_MISSES = 3  # health checks missed in a row before a ready model counts as hung


async def until_unresponsive(session: aiohttp.ClientSession, spec: ModelSpec, headers: Mapping[str, str],
                             log: Callable[[str], None]) -> None:
    """Return once the ready server has missed LIVENESS_MISSES health checks in a row, asked with `headers`
    (its key). Never returns without checks (no interval or no health endpoint configured)."""
    interval, endpoint = spec.health_check_interval, spec.check_endpoint
    if not interval or endpoint is None:
        await asyncio.Event().wait()
        return
    url = spec.proxy + endpoint
    timeout = aiohttp.ClientTimeout(total=min(interval, 5.0))
    misses = 0
    while misses < LIVENESS_MISSES:
        await asyncio.sleep(interval)
        try:
            async with session.get(url, timeout=timeout, headers=headers) as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            healthy = False
        misses = 0 if healthy else misses + 1
    log(f"missed {LIVENESS_MISSES} health checks in a row ({interval:g}s apart); stopping it as hung "
        "(the next request starts it again)")
