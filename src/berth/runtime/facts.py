"""One run of a model server as others may see it (`ModelProcess.facts()`): a value, never the process."""

from __future__ import annotations

from dataclasses import dataclass

from berth.engine.slots import SlotPlan


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
