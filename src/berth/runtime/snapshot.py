"""What the gateway's handlers see of a model: an immutable view, never the process that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from berth.memory.planner import ModelMemory
from berth.runtime.gauges import KvUse, SlotFiles
from berth.scheduler import ModelState


@dataclass(frozen=True)
class ModelSnapshot:
    """One model at one moment: the scheduler's view, where its current run listens and what it holds."""

    model: str
    state: ModelState
    in_flight: int  # requests at its server now
    queued: int  # requests waiting for it
    start_failures: int  # starts that failed in a row
    ttl_remaining_s: float | None  # until an idle model is stopped; None without a TTL running
    retry_in_s: float | None  # until a start may be tried again, while backing off
    proxy: str  # where this run listens (the config's address when none runs)
    port: int | None  # None when no process runs
    pid: int | None
    command: tuple[str, ...]  # this run's argv (the config's when none runs), secrets redacted
    plan: ModelMemory | None  # the memory the scheduler counts for it
    measured: Mapping[str, int] | None  # what its running process used at most, per device
    # the gauges, as last gathered, in a snapshot asked for with them (None otherwise):
    kv: KvUse | None  # its KV cache in use; None unless it is ready and its server reported it
    slots_on_disk: SlotFiles | None  # its saved KV slots, when its run saves them
    reads_images: bool | None = None  # a projector or a declaration says it takes images; None: nothing says
