"""A berth that anyone on the network may use: listening on an address other machines reach, without apiKeys.
Said loudly where an operator looks: on stderr at start, in the log (at start and after a reload), and as a
banner on the dashboard."""

from __future__ import annotations

from berth.config import BerthConfig
from berth.core.hosts import is_loopback

_EVERY_ADDRESS = ("0.0.0.0", "::")


def open_without_keys(listen_host: str, config: BerthConfig, port: int | None = None) -> str | None:
    """The warning for a berth reachable from other machines without a key; None when it is not."""
    if config.api_keys or is_loopback(listen_host):
        return None
    where = f"[{listen_host}]" if ":" in listen_host else listen_host
    where += f":{port}" if port is not None else ""
    reach = "every address of this machine" if listen_host in _EVERY_ADDRESS else "an address other machines reach"
    return (f"berth listens on {where} ({reach}) without apiKeys: anyone who can reach it can use, load and "
            "unload every model and read the logs. Set apiKeys in the config (README, \"Security\"), or listen "
            "on 127.0.0.1")
