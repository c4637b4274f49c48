"""Making model processes: one place binds a start's port, spawns, and hands ports back.

The pool asks for a process per `Start` action and gets events back; it never
sees ports, the janitor or sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from berth.config import BerthConfig, ModelSpec
from berth.runtime.janitor import Janitor
from berth.runtime.pagecache import launch_files
from berth.runtime.ports import PortAllocator
from berth.runtime.process import ModelProcess, ProcessDeps, ProcessEvent, Started

SpawnProcess = Callable[[ModelSpec, Callable[[ProcessEvent], None]], ModelProcess]


class ProcessFactory:
    """Spawns supervised model processes; owns the janitor and the ports they hold."""

    def __init__(self, deps: ProcessDeps, config: BerthConfig) -> None:
        self._deps = deps
        self.ports = PortAllocator(config)

    @property
    def janitor(self) -> Janitor:
        return self._deps.janitor

    def open(self) -> None:
        self._deps.janitor.start()

    def close(self) -> None:
        self._deps.janitor.close()

    def prefetch(self, spec: ModelSpec, why: str) -> None:
        """Read the model's files into the page cache in the background (a start is likely soon)."""
        warmer, build = self._deps.warmer, self._deps.build_launch
        if warmer is not None:
            warmer.warm(spec.id, lambda: launch_files(build(spec, fetch=False).argv), why)

    def spawn(self, spec: ModelSpec, on_event: Callable[[ProcessEvent], None]) -> ModelProcess:
        """Start `spec` on its preferred port, or another free one (raises NoFreePort); the port is held
        until its group is gone."""
        port = None
        if spec.uses_port:
            host = urlsplit(spec.proxy).hostname or "127.0.0.1"
            port = self.ports.acquire(spec.id, "127.0.0.1" if host == "localhost" else host, spec.preferred_port)
            spec = spec.with_port(port)

        def relay(event: ProcessEvent) -> None:
            if port is not None and not isinstance(event, Started):
                self.ports.release(port)  # Stopped and StartFailedEvent come after the group is gone
            on_event(event)

        process = ModelProcess(spec, self._deps, relay)
        process.launch()
        return process
