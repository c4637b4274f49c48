"""What handlers may know of a configured model, assembled for the pool: its snapshot (the scheduler's
view, its process's facts, its memory and gauges) and whether it reads images. Handlers never see a
process; this is the one place that reads one for them."""

from __future__ import annotations

from collections.abc import Callable

from berth.config import ModelSpec
from berth.core.errors import BerthError
from berth.engine.launch import Launch
from berth.engine.redact import redact_argv
from berth.gateway.memory import MemoryService
from berth.runtime.gauges import GaugeCollector
from berth.runtime.process import ModelProcess
from berth.runtime.snapshot import ModelSnapshot
from berth.scheduler import ModelState, ModelView


class Snapshots:
    def __init__(self, memory: MemoryService, gauges: GaugeCollector | None,
                 planned_launch: Callable[[ModelSpec], Launch] | None) -> None:
        self._memory = memory
        self._gauges = gauges  # None: no gauges (tests of the pool)
        self._planned_launch = planned_launch  # a model's launch as a start would run it, nothing pulled
        self._projectors: dict[str, tuple[ModelSpec, bool]] = {}  # what planned launches said, once known

    def reads_images(self, spec: ModelSpec, process: ModelProcess | None) -> bool | None:
        """Whether a configured model takes images (and the audio or video a projector reads): declared in its
        capabilities, or a projector in its launch (the running one's, else as a start would launch it).
        None when nothing says: another engine without a declaration, or a projector that may come with the
        first pull."""
        projector = process.facts().projector if process is not None else None
        if projector is None:
            projector = self._planned_projector(spec)
        return spec.capabilities.reads_images(projector)

    def _planned_projector(self, spec: ModelSpec) -> bool | None:
        known = self._projectors.get(spec.id)
        if known is not None and known[0] == spec:
            return known[1]
        if self._planned_launch is None:
            return None
        try:
            projector = self._planned_launch(spec).projector
        except (BerthError, OSError):  # a cmd that cannot start says so at its start, not here
            return None
        if projector is not None:  # an unknown answer is asked again: a pull may settle it
            self._projectors[spec.id] = (spec, projector)
        return projector

    def of(self, spec: ModelSpec, view: ModelView, process: ModelProcess | None, now: float,
           gauges: bool = False) -> ModelSnapshot:
        """`spec`'s model now, as the scheduler sees it (`view`) with its process (None: none runs). With
        `gauges`, its KV cache use and saved slots as last gathered (asking keeps the gathering going)."""
        model_id = spec.id
        facts = process.facts() if process is not None else None
        collector = self._gauges if gauges else None
        if collector is not None:
            collector.wanted()
        measured = self._memory.measured.get(model_id)
        return ModelSnapshot(
            model=model_id, state=view.state, in_flight=view.in_flight, queued=view.queued,
            start_failures=view.start_failures,
            ttl_remaining_s=None if view.ttl_deadline is None else max(view.ttl_deadline - now, 0.0),
            retry_in_s=None if view.retry_at is None else max(view.retry_at - now, 0.0),
            proxy=facts.proxy if facts else spec.proxy, port=facts.port if facts else None,
            pid=facts.pid if facts else None, command=tuple(redact_argv(facts.argv if facts else spec.argv)),
            plan=self._memory.plans.get(model_id), measured=dict(measured) if measured is not None else None,
            kv=collector.kv(model_id) if collector is not None and view.state is ModelState.READY else None,
            slots_on_disk=collector.slots_on_disk(model_id) if collector is not None and facts else None,
            reads_images=self.reads_images(spec, process))
