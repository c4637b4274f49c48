"""The latest gauges of each model server, gathered on a cadence of their own so that no reader waits on a
model server: the KV cache in use (llama-server's `GET /slots`) and the saved KV slot files on disk.

Readers (`/metrics`, `/running`) get the values of the last round. A model's first round runs as soon as it
is ready; after that a round runs every `REFRESH_INTERVAL` seconds while somebody has read within
`DEMAND_WINDOW`. So a scraper, even one on the keyless metrics socket, causes at most one `/slots` request
per model per interval however often it asks; and a model nobody watches is not asked at all, which matters
because llama-server counts `/slots` as activity: polling it would keep a model started with
`--sleep-idle-seconds` from ever sleeping (and wake it when it does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any
from dataclasses import dataclass

import aiohttp

from berth.engine.launch import key_headers, server_args
from berth.engine.slots import SlotPlan, slot_usage
from berth.runtime.process import ModelProcess, ProcessFacts

log = logging.getLogger("berth.runtime")

REFRESH_INTERVAL = 2.0  # seconds between rounds while the gauges are read
DEMAND_WINDOW = 300.0  # rounds continue this long after the last read (longer than any usual scrape interval)
KV_SCRAPE_TIMEOUT = 3.0  # seconds a model server may take to list its slots


@dataclass(frozen=True)
class KvUse:
    used: int  # tokens held by requests being processed
    capacity: int  # tokens the slots can hold


@dataclass(frozen=True)
class SlotFiles:
    directory: str  # where this run saves its slots
    files: int  # saved slot files of the model (every settings' directory)
    bytes: int


def kv_tokens_in_use(slots: object) -> tuple[int, int] | None:
    """(tokens held by requests being processed, tokens all slots can hold) from llama-server's `/slots`,
    or None when the answer is not that list. An idle slot's cached prompt is not counted: the next
    request may reuse or overwrite it."""
    if not isinstance(slots, list) or not slots:
        return None
    used = capacity = 0
    for slot in slots:
        if not isinstance(slot, dict) or not isinstance(slot.get("n_ctx"), int):
            return None
        capacity += slot["n_ctx"]
        if slot.get("is_processing"):
            decoded = sum(t.get("n_decoded", 0) for t in slot.get("next_token") or [] if isinstance(t, dict))
            used += int(slot.get("n_prompt_tokens", 0)) + int(decoded)
    return min(used, capacity), capacity


def kv_use(slots: object, argv: tuple[str, ...]) -> KvUse | None:
    """The KV cache a server's `/slots` answer says is in use; None when it is not llama-server's list."""
    found = kv_tokens_in_use(slots)
    if found is None:
        return None
    used, capacity = found
    args = server_args(list(argv))
    if args is not None and args.sequences()[1] and isinstance(slots, list):
        capacity //= len(slots)  # every slot reports the whole shared buffer as its own
    return KvUse(used, capacity)


def slot_files(plan: SlotPlan) -> SlotFiles:
    """What a model's saved slots hold on disk (walks its directory: run it off the event loop)."""
    files, size = slot_usage(plan.model_root)
    return SlotFiles(str(plan.directory), files, size)


class GaugeCollector:
    """Watches model processes from spawn to exit (told by the pool) and keeps their latest gauges."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession], interval: float = REFRESH_INTERVAL) -> None:
        self._session = session  # opened with the app, after this is made
        self._interval = interval
        self._processes: dict[str, ModelProcess] = {}
        self._ready: set[str] = set()
        self._kv: dict[str, KvUse] = {}
        self._slot_files: dict[str, SlotFiles] = {}
        self._read_at: float | None = None
        self._wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._spawn(self._run())

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- told by the pool ---------------------------------------------------------------

    def watch(self, model_id: str, process: ModelProcess) -> None:
        """A process was spawned for `model_id` (its slot files count from now)."""
        self.forget(model_id)
        self._processes[model_id] = process

    def ready(self, model_id: str) -> None:
        """It is ready: its KV cache is read from now on, the first time at once."""
        self._ready.add(model_id)
        process = self._processes.get(model_id)
        if process is not None:
            self._spawn(self._refresh(model_id, process))

    def forget(self, model_id: str) -> None:
        """Its process is gone."""
        self._processes.pop(model_id, None)
        self._ready.discard(model_id)
        self._kv.pop(model_id, None)
        self._slot_files.pop(model_id, None)

    # -- read by the gateway ------------------------------------------------------------

    def wanted(self) -> None:
        """Somebody shows the gauges: keep the rounds going (for DEMAND_WINDOW seconds from now)."""
        self._read_at = asyncio.get_running_loop().time()
        self._wanted.set()

    def kv(self, model_id: str) -> KvUse | None:
        """The model server's KV cache use as last reported; None if it is not ready or did not say."""
        return self._kv.get(model_id)

    def slots_on_disk(self, model_id: str) -> SlotFiles | None:
        return self._slot_files.get(model_id)

    # -- the rounds -------------------------------------------------------------------

    def _in_demand(self) -> bool:
        return self._read_at is not None and asyncio.get_running_loop().time() - self._read_at <= DEMAND_WINDOW

    async def _run(self) -> None:
        while True:
            if not self._in_demand():
                self._wanted.clear()
                await self._wanted.wait()
            rounds = await asyncio.gather(*(self._refresh(m, p) for m, p in list(self._processes.items())),
                                          return_exceptions=True)
            for failure in (r for r in rounds if isinstance(r, Exception)):  # a bug: the rounds go on
                log.error("gathering a model's gauges failed", exc_info=failure)
            await asyncio.sleep(self._interval)

    async def _refresh(self, model_id: str, process: ModelProcess) -> None:
        facts = process.facts()
        files = await self._read_slot_files(facts)
        # a server that may sleep is never asked: /slots would keep it awake, and wake it when it sleeps
        kv = await self._scrape_kv(facts) if model_id in self._ready and not facts.sleeps else None
        if self._processes.get(model_id) is not process:
            return  # gone (or replaced) meanwhile: these figures describe nothing running
        if files is not None:
            self._slot_files[model_id] = files
        if kv is not None:
            self._kv[model_id] = kv
        else:
            self._kv.pop(model_id, None)

    @staticmethod
    async def _read_slot_files(facts: ProcessFacts) -> SlotFiles | None:
        if facts.slots is None:
            return None
        try:
            return await asyncio.to_thread(slot_files, facts.slots)
        except OSError as exc:  # a file deleted while the directory was walked: the next round counts again
            log.debug("%s: reading saved slots failed: %r", facts.model, exc)
            return None

    async def _scrape_kv(self, facts: ProcessFacts) -> KvUse | None:
        """None when the server does not say (another server, `--no-slots`, busy past KV_SCRAPE_TIMEOUT)."""
        try:
            async with self._session().get(facts.proxy + "/slots", headers=key_headers(facts.key),
                                           timeout=aiohttp.ClientTimeout(total=KV_SCRAPE_TIMEOUT)) as response:
                slots = await response.json(content_type=None) if response.status == 200 else None
            return kv_use(slots, facts.argv)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError):  # TypeError: odd slot fields
            return None

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
