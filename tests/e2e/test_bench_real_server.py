"""`berth bench` against the real llama-server (a tiny generated model), and the GPU-speed stand-in held
to what llama-server sends on the wire."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import llama_server_binary
from tests.integration.test_bench import bench, results
from tests.support.harness import free_port, healthy, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_models import write_llama  # noqa: E402

# greedy: the random model then answers one token over and over, so every answer has the same shape
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("bench") / "tiny.gguf")


@pytest.fixture
def llama_server(tiny_gguf) -> Iterator[str]:
    """The real llama-server alone on a free port, 8 slots: yields its URL."""
    port = free_port()
    server = subprocess.Popen([llama_server_binary(), "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", str(port),
                               "-c", "4096", "-np", "8", "-t", "2", "--no-jinja", "--chat-template", "chatml"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: healthy(url), 60, "llama-server")
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_bench_against_a_bare_llama_server_has_no_errors_of_its_own(llama_server, tiny_gguf, tmp_path):
    """llama-server closes the connection after each streamed answer though it announces keep-alive: bench
    sends a request that met such a connection again, as a retry, instead of reporting it as an error."""
    out = tmp_path / "out"
    run = bench("--url", llama_server, "--model", str(tiny_gguf), "--requests", "100", "--concurrency", "1,8",
                "--max-tokens", "8", "--prompt", "hi there", "--out", str(out), timeout=300)
    assert run.returncode == 0, run.stderr
    rows = results(out)["summary"]
    assert [(row["concurrency"], row["succeeded"], row["errors"]) for row in rows] == [(1, 100, {}), (8, 100, {})]
    assert sum(row["retries"] for row in rows) > 0  # the closed connections were met, and survived


def _exchange(url: str, request: bytes) -> tuple[str, list[tuple[str, str]], list[bytes], bool]:
    """One request on a raw connection: the status line, the headers in order, the body's HTTP chunks
    (or the whole body), and whether the server closed the connection after it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        status, *lines = head.decode().split("\r\n")
        headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        if ("Transfer-Encoding", "chunked") in headers:
            while (chunks := _chunks(body)) is None:
                body += sock.recv(65536)
        else:
            length = int(dict(headers)["Content-Length"])
            while len(body) < length:
                body += sock.recv(65536)
            chunks = [body]
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
    return status, headers, chunks, closed


def _chunks(body: bytes) -> list[bytes] | None:
    """The chunks of a whole chunked body; None while its terminating chunk has not arrived."""
    chunks, at = [], 0
    while (line_end := body.find(b"\r\n", at)) >= 0:
        size = int(body[at:line_end], 16)
        if size == 0:  # the last chunk, then the empty line that ends the body
            return chunks if body[line_end + 2:] == b"\r\n" else None
        if len(body) < line_end + 2 + size + 2:
            return None
        chunks.append(body[line_end + 2:line_end + 2 + size])
        at = line_end + 2 + size + 2
    return None


def _post(body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))


def _shape(chunk: bytes) -> list[tuple[str, ...]]:
    """What the events of one HTTP chunk are, without their values: the keys of each event, and what its
    first choice's delta holds."""
    shapes = []
    for event in chunk.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: "), event
        if event == b"data: [DONE]":
            shapes.append(("[DONE]",))
            continue
        parsed = json.loads(event[6:])
        choices = parsed["choices"]
        delta = tuple(sorted(choices[0]["delta"])) if choices else ()
        finish = ("finish",) if choices and choices[0]["finish_reason"] else ()
        timings = tuple(sorted(parsed["timings"])) if "timings" in parsed else ()
        shapes.append((*sorted(parsed), "|", *delta, *finish, "|", *timings))
    return shapes


def test_gpu_speed_stand_in_answers_and_closes_like_llama_server(llama_server, stand_in):
    stand_in_url = stand_in()
    answers = {name: _exchange(url, _post(CHAT)) for name, url in (("real", llama_server), ("stand-in", stand_in_url))}
    real, fake = answers["real"], answers["stand-in"]
    assert fake[0] == real[0] == "HTTP/1.1 200 OK"
    assert fake[1] == real[1]  # the same headers, in the same order, with the same values
    real_shapes, fake_shapes = [_shape(c) for c in real[2]], [_shape(c) for c in fake[2]]
    assert fake_shapes[0] == real_shapes[0] and len(real_shapes[0]) == 2  # the role delta, then the first token
    assert fake_shapes[-2:] == real_shapes[-2:]  # finish and usage with timings; then [DONE]
    assert {s for c in fake_shapes[1:-2] for s in c} == {s for c in real_shapes[1:-2] for s in c}  # a token a chunk
    assert all(len(c) == 1 for c in fake_shapes[1:-2] + real_shapes[1:-2])
    assert fake[3] is real[3] is True  # closed after a streamed answer, without saying so
    for request in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
                    _post({**CHAT, "stream": False})):
        real, fake = (_exchange(url, request) for url in (llama_server, stand_in_url))
        assert (fake[0], [name for name, _ in fake[1]], fake[3]) == (real[0], [name for name, _ in real[1]], real[3])
        assert sorted(json.loads(fake[2][0])) == sorted(json.loads(real[2][0]))
