"""Running real berth and fake model server processes for tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import requests

from berth.core.procfs import descendants as children_of
from berth.core.procfs import pid_alive

__all__ = ["BerthServer", "children_of", "closed_by_server", "fake_cmd", "free_port", "free_port_block", "healthy",
           "kill_quietly", "pid_alive", "server_key_headers", "stand_in_cmd", "start_log_lines", "start_stand_in",
           "wait_until"]

FAKE_SERVER = Path(__file__).with_name("fake_model_server.py")
GPU_SPEED_SERVER = Path(__file__).with_name("gpu_speed_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int = 8) -> int:
    """The first of `count` consecutive free ports, below Linux's ephemeral range (32768+).

    berth gives the models of a config consecutive ports from startPort; in the ephemeral
    range the ports after a free one can belong to any client connection of the test run.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - count)
        if all(_bindable(port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no block of {count} free ports between 20000 and 32000")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def fake_cmd(name: str, *flags: str) -> str:
    return " ".join([sys.executable, str(FAKE_SERVER), "--port", "${PORT}", "--name", name, *flags])


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def healthy(url: str) -> bool:
    """Whether the server at `url` answers 200 on /health now."""
    try:
        return requests.get(url + "/health", timeout=1).ok
    except requests.ConnectionError:
        return False


def stand_in_cmd(*flags: str) -> str:
    """A config's `cmd` that runs the GPU-speed stand-in on the model's ${PORT}."""
    return " ".join([sys.executable, str(GPU_SPEED_SERVER), "--port", "${PORT}", *flags])


def start_stand_in(*flags: str) -> tuple[subprocess.Popen, str]:
    """The GPU-speed stand-in on a free port, answering: (its process, its URL). The caller stops it."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(GPU_SPEED_SERVER), "--port", str(port), *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(url), 20, "the GPU-speed stand-in")
    except AssertionError:
        process.kill()
        process.wait()
        raise
    return process, url


class BerthServer:
    """A real `berth serve` subprocess on a free port."""

    def __init__(self, tmp_path: Path, config: str | None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, argv: list[str] | None = None, port: int | None = None) -> None:
        """`config` None runs berth without -c (the embedded default model). `argv` runs that command
        instead of `berth serve -c CONFIG --listen 127.0.0.1:PORT`, listening on `port`."""
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "config.yaml"
        if config is not None:
            self.config_path.write_text(textwrap.dedent(config))
        self.config_args = ["-c", str(self.config_path)] if config is not None else []
        self.env = {**os.environ, **(env or {})}
        self.argv = argv
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "berth.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "BerthServer":
        self._log = open(self.log_path, "ab")
        argv = self.argv or [sys.executable, "-m", "berth.cli", "serve", *self.config_args,
                             "--listen", f"127.0.0.1:{self.port}", *self.extra_args]
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"berth exited with {self.proc.returncode}:\n{self.output()}")
            try:
                return requests.get(self.url + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(up, timeout, "berth to listen")
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"berth did not exit within {timeout}s of signal {sig}") from None
        self._log.close()
        return self.proc.returncode

    def running(self) -> dict[str, dict]:
        return {r["model"]: r for r in requests.get(self.url + "/running", timeout=5).json()["running"]}

    def pid_of(self, model: str) -> int | None:
        entry = self.running().get(model)
        return entry["pid"] if entry else None


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the other side closes `sock` within `wait` seconds without sending anything more."""
    sock.settimeout(wait)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def server_key_headers(pid: int) -> dict[str, str]:
    """What a direct call to a llama.cpp model server berth started must send: the key berth gave that run,
    from its environment (which its own user can read)."""
    return {"Authorization": f"Bearer {psutil.Process(pid).environ()['LLAMA_API_KEY']}"}


def start_log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
