"""A stand-in for llama-server at GPU speed, so a proxy's own cost shows on a machine without a GPU.

    python tests/support/gpu_speed_server.py --port 8081 --ttft-ms 5 --token-ms 1 [--events FILE]

It answers as llama-server (build 11434, its cpp-httplib front end) answers, byte for byte where
a client or a proxy could tell: the same status lines and headers in the same order (`Server:
llama.cpp`, an empty `Access-Control-Allow-Origin`, `Keep-Alive: timeout=5, max=100`, no
TCP_NODELAY), chunked server-sent events with the first content token in the same HTTP chunk as the
role delta, one HTTP chunk per token, a final chunk with `finish_reason` and, with
`stream_options.include_usage`, a usage chunk carrying `timings`, then `data: [DONE]`. Its
connection handling is llama-server's too: an idle keep-alive connection is closed after 5 s, the
100th answer on one says `Connection: close`, an error answer closes it, and a streamed answer
closes it after its last byte without saying so (cpp-httplib counts the end of a chunked stream as
a failed write), which is what a client's pooled connection meets in practice.

Generation is simulated like a GPU batch: every request gets its first token `--ttft-ms` after it
arrived and then one token every `--token-ms`, independently of how many run at once (up to
`--parallel`; more wait for a slot, as llama-server's do). One timer drives all running streams, so
the stand-in's own CPU cost stays small next to a proxy's (a raw asyncio protocol, no framework).

`--events FILE` appends JSON lines with `time.monotonic()` stamps (comparable across processes on
Linux): start (the script's first line), listening, ready, the first chat request and its first byte
written, each request (its method, path and the number of the connection it came on), each reset of
--stale-after-answer (with the request line it cut off), exit (on SIGTERM or SIGINT, which it obeys at once). With
--start-probe it writes the start stamp and exits, so a caller can tell the interpreter's own start
from its parent's delay.

Any other llama-server flag (-m, -c, --jinja ...) is accepted and ignored, so a config's `cmd` for
llama-server can run it unchanged.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: as close to the process's start as a script gets

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
from collections import deque  # noqa: E402
from typing import IO  # noqa: E402

BUILD = "b11434-gpu-speed"
MAX_HEADER_BYTES = 64 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-a", "--alias", default="gpu-speed", help="the model id it lists and answers with")
    p.add_argument("--ttft-ms", type=float, default=5.0, help="from a request's arrival to its first token")
    p.add_argument("--token-ms", type=float, default=1.0, help="between tokens")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated when a request sets no max_tokens")
    p.add_argument("-np", "--parallel", type=int, default=0, help="requests generating at once (0: no limit)")
    p.add_argument("--load-ms", type=float, default=0.0,
                   help="after it listens, answer 503 'Loading model' this long (llama-server loading its model)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle connection is kept")
    p.add_argument("--keep-alive-max", type=int, default=100, help="answers on one connection")
    p.add_argument("--keep-streams-open", action="store_true",
                   help="keep the connection after a streamed answer (llama-server closes it)")
    p.add_argument("--stale-after-answer", action="store_true",
                   help="after every answer, keep the connection until the next request on it arrives, then "
                        "reset it unanswered: what a client meets, as timing falls, when its next request crosses "
                        "the server's close of a pooled connection; here every time")
    p.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY (llama-server does not)")
    p.add_argument("--events", help="append lifecycle stamps (JSON lines, time.monotonic()) to this file")
    p.add_argument("--start-probe", action="store_true",
                   help="write the start stamp and exit: how long Python takes to reach this script's first line")
    args, _ = p.parse_known_args(argv)
    return args


class Events:
    """The lifecycle stamps of --events; nothing when not asked for."""

    def __init__(self, path: str | None) -> None:
        self._file: IO[str] | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._seen: set[str] = set()

    def write(self, event: str, at: float | None = None, **facts: object) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": event, "t": time.monotonic() if at is None else at,
                                         "pid": os.getpid(), **facts}) + "\n")

    def once(self, event: str) -> None:
        """`event` stamped the first time it happens only (the first request, its first byte)."""
        if event not in self._seen:
            self._seen.add(event)
            self.write(event)


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk, as cpp-httplib frames each write of a chunked answer."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _prompt_tokens(payload: dict) -> int:
    """One "token" per word of the messages, so a client can tell prompts apart by their usage."""
    words = 0
    for message in payload.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
        elif isinstance(content, list):
            words += sum(len(str(part.get("text", "")).split()) for part in content if isinstance(part, dict))
    return words or 1


class Generation:
    """One request being answered: its token schedule and the bytes it writes."""

    def __init__(self, server: Server, conn: Connection, payload: dict, arrived: float) -> None:
        self.conn = conn
        self.stream = bool(payload.get("stream"))
        limit = payload.get("max_tokens", payload.get("max_completion_tokens", payload.get("n_predict")))
        self.total = int(limit) if isinstance(limit, int) and limit > 0 else server.args.tokens
        self.prompt_tokens = _prompt_tokens(payload)
        self.include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        self.sent = 0
        self.token_s = server.args.token_ms / 1000
        self.ttft_s = server.args.ttft_ms / 1000
        self.next_at = arrived + self.ttft_s  # set again when a slot frees, if it had to wait
        self.created = int(time.time())
        self.id = f"chatcmpl-{os.getpid()}-{id(self):x}"
        self.headed = False  # the answer's headers are written with its first token, as llama-server's are
        model = _json(server.args.alias)  # llama-server answers with its own name, whatever was asked
        self._tail = (b'],"created":%d,"id":"%s","model":%s,"system_fingerprint":"%s",'
                      b'"object":"chat.completion.chunk"}\n\n' % (self.created, self.id.encode(), model,
                                                                  BUILD.encode()))

    def _event(self, choice: bytes) -> bytes:
        return b'data: {"choices":[' + choice + self._tail

    def _token(self, k: int) -> bytes:
        return self._event(b'{"finish_reason":null,"index":0,"delta":{"content":"tok%d "}}' % k)

    def _usage(self) -> dict:
        return {"completion_tokens": self.total, "prompt_tokens": self.prompt_tokens,
                "total_tokens": self.total + self.prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0}}

    def _timings(self) -> dict:
        prompt_ms, predicted_ms = self.ttft_s * 1000, max(self.total - 1, 1) * self.token_s * 1000
        return {"cache_n": 0, "prompt_n": self.prompt_tokens, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / self.prompt_tokens,
                "prompt_per_second": self.prompt_tokens / prompt_ms * 1000 if prompt_ms else 0.0,
                "predicted_n": self.total, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / self.total,
                "predicted_per_second": self.total / predicted_ms * 1000 if predicted_ms else 0.0}

    def due(self, now: float) -> bytes:
        """The bytes of every token due by `now` (the first with its role delta), and the end when done."""
        out = []
        while self.sent < self.total and self.next_at <= now:
            if self.stream:
                event = self._token(self.sent)
                if self.sent == 0:
                    event = self._event(b'{"finish_reason":null,"index":0,"delta":{"role":"assistant",'
                                        b'"content":null}}') + event
                out.append(_chunk(event))
            self.sent += 1
            self.next_at += self.token_s
        if self.sent == self.total:
            out.append(self._end())
        return b"".join(out)

    def done(self) -> bool:
        return self.sent == self.total

    def _end(self) -> bytes:
        if not self.stream:
            return b""  # the connection writes the whole JSON answer
        def extended(event: bytes, fields: bytes) -> bytes:  # more fields before the event's closing brace
            return event[:-len(b"}\n\n")] + fields + b"}\n\n"

        timings = b',"timings":' + _json(self._timings())
        finish = self._event(b'{"finish_reason":"length","index":0,"delta":{}}')
        if self.include_usage:  # OpenAI's usage chunk: no choices; llama-server puts the timings on the last event
            last = finish + extended(self._event(b""), b',"usage":' + _json(self._usage()) + timings)
        else:
            last = extended(finish, timings)
        return _chunk(last) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    def answer(self) -> dict:
        """The non-streamed answer."""
        return {"choices": [{"finish_reason": "length", "index": 0,
                             "message": {"role": "assistant",
                                         "content": "".join(f"tok{k} " for k in range(self.total))}}],
                "created": self.created, "model": self.conn.server.args.alias, "system_fingerprint": BUILD,
                "object": "chat.completion", "usage": self._usage(), "id": self.id, "timings": self._timings()}


class Server:
    """What all connections share: the settings, the readiness, the slots and the one decode timer."""

    def __init__(self, args: argparse.Namespace, events: Events) -> None:
        self.args = args
        self.events = events
        self.loop = asyncio.get_running_loop()
        self.ready = args.load_ms <= 0
        self.connections = 0  # opened so far: each connection's number
        self.running: list[Generation] = []
        self.waiting: deque[Generation] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def models(self) -> dict:
        alias = self.args.alias
        return {"models": [{"name": alias, "model": alias, "modified_at": "", "size": "", "digest": "",
                            "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                            "parameters": "", "details": {"parent_model": "", "format": "gguf", "family": "",
                                                          "families": [""], "parameter_size": "",
                                                          "quantization_level": ""}}],
                "object": "list",
                "data": [{"id": alias, "aliases": [alias], "tags": [], "object": "model",
                          "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                          "created": int(time.time()), "owned_by": "llamacpp", "meta": {"n_ctx": 4096}}]}

    def start(self, generation: Generation) -> None:
        if self.args.parallel and len(self.running) >= self.args.parallel:
            self.waiting.append(generation)
            return
        self.running.append(generation)
        self._schedule()

    def cancel(self, generation: Generation) -> None:
        if generation in self.running:
            self.running.remove(generation)
            self._admit()
        elif generation in self.waiting:
            self.waiting.remove(generation)

    def _admit(self) -> None:
        while self.waiting and (not self.args.parallel or len(self.running) < self.args.parallel):
            generation = self.waiting.popleft()
            generation.next_at = self.loop.time() + generation.ttft_s  # its prompt is processed now
            self.running.append(generation)
        self._schedule()

    def _schedule(self) -> None:
        if not self.running:
            return
        wake = min(g.next_at for g in self.running)
        if self._timer is not None:
            if self._timer.when() <= wake:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(wake, self._tick)

    def _tick(self) -> None:
        self._timer = None
        # the loop wakes on a millisecond grid: serve what falls due within the next half millisecond too,
        # as one decode step serves every slot
        now = self.loop.time() + 0.0005
        finished = False
        for generation in list(self.running):
            if generation.next_at <= now:
                generation.conn.write_generation(generation, generation.due(now))
                if generation.done():
                    self.running.remove(generation)
                    finished = True
        if finished:
            self._admit()
        else:
            self._schedule()


class Connection(asyncio.Protocol):
    """One client connection, HTTP/1.1 as cpp-httplib serves it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.answered = 0
        self.busy: Generation | None = None  # the answer being generated; later requests wait in the buffer
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closing_asked = False  # the request being answered said Connection: close
        self.close_after_stream = False
        self.stale = False  # --stale-after-answer: the next request on it meets a reset
        server.connections += 1
        self.number = server.connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio turns Nagle off for every TCP transport; cpp-httplib leaves it on
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if self.server.args.nodelay else 0)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.busy is not None:
            self.server.cancel(self.busy)
            self.busy = None

    def data_received(self, data: bytes) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.stale and self.transport is not None:  # a socket closed with SO_LINGER 0 sends a reset
            self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                struct.pack("ii", 1, 0))
            self.transport.abort()
            self.server.events.write("reset", request=data.split(b"\r\n", 1)[0].decode("latin-1"))
            return
        self.buffer += data
        self._serve_buffered()

    def _arm_idle_timer(self) -> None:
        if self.transport is not None:
            self.idle_timer = self.server.loop.call_later(self.server.args.keep_alive_timeout, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _serve_buffered(self) -> None:
        while self.busy is None and self.transport is not None and not self.transport.is_closing():
            request = self._take_request()
            if request is None:
                if b"\r\n\r\n" not in self.buffer and len(self.buffer) > MAX_HEADER_BYTES:
                    self._respond(431, _json({"error": {"code": 431, "message": "Request Header Fields Too Large",
                                                        "type": "invalid_request_error"}}))
                return
            self._handle(*request)
            # after the answer (or its start): the stamps of the swap measurement come first
            self.server.events.write("request", method=request[0], path=request[1], connection=self.number)

    def _take_request(self) -> tuple[str, str, dict[str, str], bytes] | None:
        """The next whole request in the buffer (method, path, lower-cased headers, body), taken out of it."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        method, target, _ = (head[0].split(" ", 2) + ["", ""])[:3]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = self.buffer[end + 4:]
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoded = _dechunk(rest)
            if decoded is None:
                return None
            body, used = decoded
        else:
            used = int(headers.get("content-length") or 0)
            if len(rest) < used:
                return None
            body = rest[:used]
        self.buffer = rest[used:]
        return method, target.split("?", 1)[0], headers, body

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        arrived = self.server.loop.time()
        self.closing_asked = "close" in headers.get("connection", "").lower()
        if path in ("/health", "/v1/health") and method == "GET":
            if self.server.ready:
                self._respond(200, b'{"status":"ok"}')
            else:
                self._loading()
            return
        if not self.server.ready:
            self._loading()
            return
        if path in ("/v1/models", "/models") and method == "GET":
            self._respond(200, _json(self.server.models()))
            return
        if path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                self._respond(400, _json({"error": {"code": 400, "message": "request body is not a JSON object",
                                                    "type": "invalid_request_error"}}))
                return
            self.server.events.once("first_request")
            self.busy = Generation(self.server, self, payload, arrived)
            self.server.start(self.busy)
            return
        self._respond(404, b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}')

    def _loading(self) -> None:
        self._respond(503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}')

    def _keep_alive_header(self, status: int) -> tuple[bytes, bool]:
        """The connection header of the next answer, and whether the connection closes after it."""
        self.answered += 1
        if status >= 400 or self.closing_asked or self.answered >= self.server.args.keep_alive_max:
            return b"Connection: close\r\n", True
        return b"Keep-Alive: timeout=%s, max=%d\r\n" % (f"{self.server.args.keep_alive_timeout:g}".encode(),
                                                         self.server.args.keep_alive_max), False

    def _respond(self, status: int, body: bytes) -> None:
        assert self.transport is not None
        connection, close = self._keep_alive_header(status)
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 431: b"Request Header Fields Too Large",
                  503: b"Service Unavailable"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
                             b"Content-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (status, reason, len(body), connection, body))
        self._answered(close)

    def _answered(self, close: bool) -> None:
        if close:
            self._close()
            return
        self.stale = self.server.args.stale_after_answer
        self._arm_idle_timer()
        self.server.loop.call_soon(self._serve_buffered)  # a pipelined request waits in the buffer

    def write_generation(self, generation: Generation, data: bytes) -> None:
        """Called by the decode timer with the bytes of the tokens now due."""
        if self.transport is None:
            return
        if not generation.stream:
            if generation.done():
                self.busy = None
                self._respond(200, _json(generation.answer()))
            return
        if not generation.headed:
            generation.headed = True
            connection, self.close_after_stream = self._keep_alive_header(200)
            data = (b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
                    b"X-Accel-Buffering: no\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                    b"%s\r\n" % connection) + data
            self.server.events.once("first_byte")
        self.transport.write(data)
        if generation.done():
            self.busy = None
            # cpp-httplib ends a chunked answer by failing its write loop, and so closes the connection
            keeps = self.server.args.keep_streams_open or self.server.args.stale_after_answer
            self._answered(self.close_after_stream or not keeps)


def _dechunk(data: bytes) -> tuple[bytes, int] | None:
    """A chunked request body decoded, and the bytes it took; None while incomplete."""
    body, at = [], 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(data[at:line_end].split(b";")[0] or b"0", 16)
        start = line_end + 2
        if size == 0:  # then any trailer fields, and an empty line
            end = data.find(b"\r\n\r\n", line_end)
            return (b"".join(body), end + 4) if end >= 0 else None
        if len(data) < start + size + 2:
            return None
        body.append(data[start:start + size])
        at = start + size + 2


async def serve(args: argparse.Namespace, events: Events) -> None:
    server = Server(args, events)
    loop = server.loop
    listener = await loop.create_server(lambda: Connection(server), args.host, args.port, reuse_address=True)
    events.write("listening")

    def become_ready() -> None:
        server.ready = True
        events.write("ready")
        print("srv  llama_server: model loaded", flush=True)
        print(f"srv  llama_server: listening on http://{args.host}:{args.port}", flush=True)

    if server.ready:
        become_ready()
    else:
        loop.call_later(args.load_ms / 1000, become_ready)

    def stop() -> None:
        events.write("exit")
        os._exit(0)  # stops at once, as a stand-in for a model that frees its memory instantly

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    async with listener:
        await listener.serve_forever()


def main() -> None:
    args = parse_args()
    events = Events(args.events)
    events.write("start", STARTED)
    if not args.start_probe:
        asyncio.run(serve(args, events))


if __name__ == "__main__":
    main()
