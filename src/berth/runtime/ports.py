"""Free ports for `${PORT}`, chosen when a model starts.

A port is taken from `startPort` upwards, skipping every port another program
listens on and every port one of berth's own model processes holds, from its
start until its whole process group is gone. So two berth instances on one
machine, a model still draining after a reload, or anything else on 5800 never
make a start fail for a port clash.
"""

from __future__ import annotations

import errno
import socket

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
    """Hands out free ports from `start` upwards; a port stays taken until released."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._held: dict[int, str] = {}  # port -> model id

    def acquire(self, model_id: str, host: str = "127.0.0.1") -> int:
        for port in range(self.start, MAX_PORT + 1):
            if port not in self._held and not port_in_use(host, port):
                self._held[port] = model_id
                return port
        raise NoFreePort(f"no free port from startPort {self.start} to {MAX_PORT} for model {model_id!r}; "
                         "lower startPort in the config or stop programs holding those ports")

    def release(self, port: int) -> None:
        self._held.pop(port, None)

    def held(self) -> dict[int, str]:
        return dict(self._held)
