"""Noticing at once that a starting model server has become ready, for little work.

A model server tells whether it is ready only on its health endpoint (200 once its model is loaded), so
berth asks; the question is when. Two things decide it:

- The server's output. A server writes as its state changes: llama-server writes "model loaded" right
  after its /health turns 200 (tools/server/server.cpp), the GPU-speed stand-in its two lines right after
  it is ready. So output that arrives is a reason to ask again at once (at most every
  `OUTPUT_CHECK_SPACING`, for a server that writes without pause while it loads). Only the arrival of
  output counts: what it says is never read; the fact comes from the health endpoint.
- The time the start has taken so far. Between outputs berth asks again after a twentieth of it, at least
  `MIN_INTERVAL` and at most `MAX_INTERVAL` apart: a server that is ready 40 ms after its spawn is
  noticed within 5 ms, one that loads for 10 s (and says nothing at the end) within 50 ms (0.5%), and a
  long load costs 20 checks a second. berth polled at 0, 50 and 125 ms, then every 100 ms before: a
  fast start waited up to 75 ms to be noticed.

A check meets a refused connect until the server listens (tens of microseconds), then, for llama-server,
a short 503 while it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import aiohttp

MIN_INTERVAL = 0.005
MAX_INTERVAL = 0.05
INTERVAL_FRACTION = 0.05  # of the time since spawn: how late a start may be noticed, at most
OUTPUT_CHECK_SPACING = 0.002  # output-prompted checks are at least this far apart
CHECK_TIMEOUT = 5.0


def check_interval(elapsed: float) -> float:
    """Seconds from one check to the next when the server writes nothing, `elapsed` seconds after spawn."""
    return min(max(elapsed * INTERVAL_FRACTION, MIN_INTERVAL), MAX_INTERVAL)


async def wait_healthy(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], output: asyncio.Event,
                       spawned: float) -> None:
    """Return once `url` answers 200, asked with `headers` (the server's key, when it has one). `output` is set
    whenever the server writes (this clears it); `spawned` is when the server was spawned, on the event loop's
    clock."""
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
    while True:
        asked = loop.time()
        output.clear()  # what the server writes from now on may be news
        try:
            async with session.get(url, timeout=timeout, headers=headers) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        next_check = asked + check_interval(asked - spawned)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(output.wait(), max(next_check - loop.time(), 0))
        await asyncio.sleep(max(asked + OUTPUT_CHECK_SPACING - loop.time(), 0))
