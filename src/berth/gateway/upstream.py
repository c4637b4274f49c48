"""Where one request goes: a leased model's server, or a peer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from berth.config import UpstreamTimeouts


@dataclass(frozen=True)
class Upstream:
    model: str  # the id metrics and messages name
    base_url: str  # the request's path is appended
    timeouts: UpstreamTimeouts
    headers: tuple[tuple[str, str], ...] = ()  # set on the request: the model server's key, or a peer's
    # a keyless berth passes the client's credentials on (a model server with a key of its own); never to a peer
    takes_client_credentials: bool = False
    restore_hit: bool = False  # the first request after a KV slot restore: count its cache hits
    explain: Callable[[], Awaitable[str | None]] | None = None  # why an answer broke off (an rpc agent gone)
    spare_path: str | None = None  # a local model server's health check: asked to open a spare connection

    async def failure_detail(self) -> str:
        """"; <why>" when something beyond the model server explains a failure, else ""."""
        why = await self.explain() if self.explain is not None else None
        return f"; {why}" if why else ""
