"""Watching a llama-server that may sleep (`--sleep-idle-seconds`): seeing it fall asleep, waking it.

How llama.cpp sleeps (build 11434, tools/server/server-context.cpp and server-queue.cpp): once no task
has come for that many seconds, the task loop frees the model, its context and KV cache (`destroy()`)
and waits; the process, its HTTP server and its port stay. `/health` and `GET /props` answer at once
while it sleeps (`/props` from a copy made when it fell asleep, with `"is_sleeping": true`) and are no
tasks, so they neither wake it nor keep it awake. Every other route (completions, `/tokenize`,
`/slots`) first waits until the model is loaded again: the first such request wakes it and is
answered when the load is done. A reload that fails aborts the process.

So berth polls `/props` (never `/slots`, which is a task: it would keep the model awake) and wakes
the server with a `/tokenize` request, which returns once the model is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from berth.engine.launch import key_headers

SLEEP_POLL_SECONDS = 1.0  # how soon berth sees a sleep (or a wake nobody asked for)
PROPS_TIMEOUT = 5.0


class SleepWatch:
    """Owned by the model's supervisor task while the model is ready; `run` reports each change."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, api_key: str | None,
                 on_slept: Callable[[float], None], on_woke: Callable[[], None], wake_timeout: float) -> None:
        self._base_url, self._session = base_url, session
        self._headers = key_headers(api_key)
        self._on_slept, self._on_woke = on_slept, on_woke
        self._wake_timeout = wake_timeout
        self._wake_wanted = asyncio.Event()
        self.asleep = False

    def wake(self) -> None:
        """Wake the sleeping server (the watch reports `on_woke` once its model is loaded)."""
        self._wake_wanted.set()

    async def run(self) -> str:
        """Watch until cancelled. Returns only when a wake failed (why, in words): the server is as good as
        hung, or gone (a reload that fails aborts it)."""
        loop = asyncio.get_running_loop()
        while True:
            observed_at = loop.time()
            sleeping = await self._is_sleeping()
            if sleeping and not self.asleep:
                self.asleep = True
                self._wake_wanted.clear()
                self._on_slept(observed_at)
            elif sleeping is False and self.asleep:  # woken by a request that did not come through berth
                self.asleep = False
                self._on_woke()
            if not self.asleep:
                await asyncio.sleep(SLEEP_POLL_SECONDS)
                continue
            try:
                await asyncio.wait_for(self._wake_wanted.wait(), SLEEP_POLL_SECONDS)
            except asyncio.TimeoutError:
                continue
            failure = await self._wake()
            if failure is not None:
                return failure
            self.asleep = False
            self._on_woke()

    async def _is_sleeping(self) -> bool | None:
        """What `/props` says; None when it does not answer (the liveness check judges that)."""
        try:
            async with self._session.get(self._base_url + "/props", headers=self._headers,
                                         timeout=aiohttp.ClientTimeout(total=PROPS_TIMEOUT)) as response:
                if response.status != 200:
                    return None
                props = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return bool(props.get("is_sleeping")) if isinstance(props, dict) else None

    async def _wake(self) -> str | None:
        """A request that waits for the model to be loaded again; None once it has been answered."""
        try:
            async with self._session.post(self._base_url + "/tokenize", json={"content": ""},
                                          headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=self._wake_timeout)) as response:
                await response.read()
                return None
        except asyncio.TimeoutError:
            return f"did not wake within {self._wake_timeout:g}s (healthCheckTimeout)"
        except aiohttp.ClientError as exc:
            return f"the request that wakes it failed: {exc!r}"
