"""Ports for `${PORT}`, bound when a model starts.

Each model has a stable preferred port from the config (llama-swap's: startPort
upwards in the order of the model ids), taken when it is free at the start.
Otherwise the first port from `startPort` upwards that is free and no model's
preferred port is taken. Free means nothing else listens there and none of
berth's own model processes holds it, from its start until its whole process
group is gone. So two berth instances on one machine, a model still draining
after a reload, or anything else on 5800 never make a start fail for a port
clash.
"""

from __future__ import annotations

import errno
import socket

from berth.config import BerthConfig
from berth.core.errors import BerthError

MAX_PORT = 65535


class NoFreePort(BerthError):
    status = 503
    error_type = "server_error"
    code = "no_free_port"


def port_in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails because something listens there (or holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the model servers do: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def unused_port(host: str = "127.0.0.1") -> int:
    """A port the kernel hands out as free on `host` now (for a server that cannot bind port 0 itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PortAllocator:
    """Hands out a model's preferred port when it is free, else a free port from `start` upwards that is
    no model's preferred one (so that model finds its own free later); a port stays taken until released."""

    def __init__(self, config: BerthConfig) -> None:
        self._held: dict[int, str] = {}  # port -> model id
        self.follow(config)

    def follow(self, config: BerthConfig) -> None:
        """Take a config's startPort and its models' preferred ports (at start and at each reload)."""
        self.start = config.start_port
        self.preferred = frozenset(spec.preferred_port for spec in config.models.values()
                                   if spec.preferred_port is not None)

    def acquire(self, model_id: str, host: str = "127.0.0.1", preferred: int | None = None) -> int:
        if preferred is not None and self._take(preferred, model_id, host):
            return preferred
        for port in range(self.start, MAX_PORT + 1):
            if port not in self.preferred and self._take(port, model_id, host):
                return port
        raise NoFreePort(f"no free port from startPort {self.start} to {MAX_PORT} for model {model_id!r}; "
                         "lower startPort in the config or stop programs holding those ports")

    def _take(self, port: int, model_id: str, host: str) -> bool:
        if port in self._held or port_in_use(host, port):
            return False
        self._held[port] = model_id
        return True

    def release(self, port: int) -> None:
        self._held.pop(port, None)

    def held(self) -> dict[int, str]:
        return dict(self._held)
