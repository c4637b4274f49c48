from __future__ import annotations

import pytest

from tests.support.harness import BerthServer, children_of, free_port, kill_quietly


@pytest.fixture
def berth(tmp_path):
    """Start berth on a config: `berth(config_text, *extra_args)`. Everything is stopped afterwards."""
    servers: list[BerthServer] = []

    def start(config: str, *extra_args: str) -> BerthServer:
        server = BerthServer(tmp_path, config, extra_args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        leftovers = children_of(server.proc.pid) if server.proc and server.proc.poll() is None else []
        if server.proc and server.proc.poll() is None:
            server.stop()
        for pid in leftovers:
            kill_quietly(pid)


@pytest.fixture
def start_port() -> int:
    return free_port()
