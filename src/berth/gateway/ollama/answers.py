"""Ollama's answers, made from llama-server's OpenAI-shaped ones as they arrive (the proxy's `Reframe`s).

A streamed answer is NDJSON: one object per text delta, the tool calls once they are whole, then the final
object (`done: true`) with `done_reason` and the counts and durations of llama-server's own `timings` for
the request (Ollama's durations are nanoseconds: `prompt_ms` x 10^6 is `prompt_eval_duration`). A whole
answer is one object. `total_duration` runs from the moment berth took the request, `load_duration` to the
moment it went to the model server (the wait for a lease: loading, queueing).
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from berth.core.errors import BerthError
from berth.gateway.ledger import RequestRecord

NDJSON = "application/x-ndjson"
NS_PER_MS = 1_000_000
_BODY_LIMIT = 64 * 1024 * 1024  # a whole (not streamed) answer is read before it is rewritten


def iso(moment: datetime) -> str:
    """A moment as Ollama writes times (RFC 3339, UTC)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def created_at() -> str:
    return iso(datetime.now(UTC))


def ndjson(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def error_object(status: int, message: str) -> web.Response:
    """An error answer in Ollama's shape."""
    return web.json_response({"error": message}, status=status)


def _ns(seconds: float) -> int:
    return max(round(seconds * 1e9), 0)


def stats(timings: dict[str, Any] | None, usage: dict[str, Any] | None, record: RequestRecord) -> dict[str, Any]:
    """The final object's counts and durations: llama-server's `timings` for the request when it sent them
    (prompt_n / prompt_ms, predicted_n / predicted_ms), else the `usage` counts of other servers."""
    sent = record.sent if record.sent is not None else record.began
    result: dict[str, Any] = {"total_duration": _ns(time.perf_counter() - record.began),
                              "load_duration": _ns(sent - record.began)}
    if timings:
        result.update(prompt_eval_count=timings.get("prompt_n", 0),
                      prompt_eval_duration=round(timings.get("prompt_ms", 0) * NS_PER_MS),
                      eval_count=timings.get("predicted_n", 0),
                      eval_duration=round(timings.get("predicted_ms", 0) * NS_PER_MS))
    elif usage:
        result.update(prompt_eval_count=usage.get("prompt_tokens", 0), eval_count=usage.get("completion_tokens", 0))
    return result


def done_reason(finish_reason: Any) -> str:
    """Ollama says `stop` for an answer that ends in tool calls, and `length` at the token limit."""
    return "length" if finish_reason == "length" else "stop"


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls (arguments as JSON text) as Ollama's (arguments as an object); ValueError when
    the model wrote arguments that are not a JSON object."""
    result = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError(f"the model called {function.get('name')!r} with arguments that are not a JSON "
                             f"object: {str(arguments)[:200]}")
        entry: dict[str, Any] = {"function": {"index": index, "name": function.get("name", ""), "arguments": parsed}}
        if call.get("id"):
            entry["id"] = call["id"]
        result.append(entry)
    return result


class _Events:
    """Server-sent events in, their JSON data out (`[DONE]` and comments skipped), across chunk borders."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        events = []
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


class WholeBody:
    """A JSON body read whole, within a limit."""

    def __init__(self) -> None:
        self._body = bytearray()
        self._too_large = False

    def feed(self, chunk: bytes) -> bytes:
        if len(self._body) + len(chunk) > _BODY_LIMIT:
            self._too_large = True
        else:
            self._body += chunk
        return b""

    def parsed(self) -> dict[str, Any]:
        if self._too_large:
            raise ValueError(f"the model server's answer is larger than {_BODY_LIMIT} bytes; ask with stream: true")
        try:
            value = json.loads(self._body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError(f"the model server answered something other than a JSON object: "
                             f"{bytes(self._body[:200]).decode(errors='replace')}")
        return value


class Generation:
    """/api/chat (`chat`) and /api/generate answers, streamed or whole."""

    def __init__(self, model: str, stream: bool, chat: bool) -> None:
        self.model, self.stream, self.chat = model, stream, chat
        self.content_type = NDJSON if stream else "application/json"
        self._events = _Events()
        self._whole = WholeBody()
        self._calls: dict[int, dict[str, Any]] = {}  # streamed tool calls, put together by index
        self._finish: Any = None
        self._timings: dict[str, Any] | None = None
        self._usage: dict[str, Any] | None = None
        self._broke = False  # an error line has been sent: no final object follows

    def refused(self, status: int, message: str) -> web.Response:
        return error_object(status, message)

    def failed(self, error: BerthError) -> bytes:
        self._broke = True
        return ndjson({"error": error.message})

    def feed(self, chunk: bytes) -> bytes:
        if not self.stream:
            return self._whole.feed(chunk)
        out = b""
        for event in self._events.feed(chunk):
            out += self._event(event)
        return out

    def _event(self, event: dict[str, Any]) -> bytes:
        if self._broke:
            return b""
        if "error" in event:
            error = event["error"]
            self._broke = True
            return ndjson({"error": error.get("message", str(error)) if isinstance(error, dict) else str(error)})
        self._timings = event.get("timings") or self._timings
        self._usage = event.get("usage") or self._usage
        out = b""
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            for call in delta.get("tool_calls") or []:
                self._add_call(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            text = delta.get("content") or choice.get("text") or ""
            thought = delta.get("reasoning_content") or ""
            if text or thought:
                out += ndjson(self._object(text, thought, done=False))
        return out

    def _add_call(self, delta: dict[str, Any]) -> None:
        call = self._calls.setdefault(delta.get("index", len(self._calls)), {"function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def _object(self, text: str, thought: str, done: bool, calls: list[dict[str, Any]] | None = None
                ) -> dict[str, Any]:
        value: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            if calls:
                message["tool_calls"] = calls
            value["message"] = message
        else:
            value["response"] = text
            if thought:
                value["thinking"] = thought
        value["done"] = done
        return value

    def close(self, record: RequestRecord) -> bytes:
        if self._broke:
            return b""
        try:
            return self._streamed_end(record) if self.stream else self._whole_answer(record)
        except ValueError as exc:
            return ndjson({"error": str(exc)})

    def _streamed_end(self, record: RequestRecord) -> bytes:
        out = b""
        if self._calls:
            calls = tool_calls([self._calls[i] for i in sorted(self._calls)])
            out += ndjson(self._object("", "", done=False, calls=calls))
        final = self._object("", "", done=True)
        final.update(done_reason=done_reason(self._finish), **stats(self._timings, self._usage, record))
        return out + ndjson(final)

    def _whole_answer(self, record: RequestRecord) -> bytes:
        answer = self._whole.parsed()
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        text = message.get("content") if message else choice.get("text")
        calls = tool_calls(message.get("tool_calls") or [])
        final = self._object(text or "", message.get("reasoning_content") or "", done=True, calls=calls)
        final.update(done_reason=done_reason(choice.get("finish_reason")),
                     **stats(answer.get("timings"), answer.get("usage"), record))
        return json.dumps(final).encode()


class Embeddings:
    """/api/embed (`embeddings` as a list, cut to `dimensions` and normalized again) and the older
    /api/embeddings (`embedding`, one vector)."""

    content_type = "application/json"

    def __init__(self, model: str, legacy: bool, dimensions: int | None) -> None:
        self.model, self.legacy, self.dimensions = model, legacy, dimensions
        self._whole = WholeBody()

    def refused(self, status: int, message: str) -> web.Response:
        return error_object(status, message)

    def failed(self, error: BerthError) -> bytes:
        return json.dumps({"error": error.message}).encode()

    def feed(self, chunk: bytes) -> bytes:
        return self._whole.feed(chunk)

    def close(self, record: RequestRecord) -> bytes:
        try:
            answer = self._whole.parsed()
        except ValueError as exc:
            return json.dumps({"error": str(exc)}).encode()
        vectors = [item.get("embedding") or [] for item in sorted(answer.get("data") or [],
                                                                   key=lambda item: item.get("index", 0))]
        if self.legacy:
            return json.dumps({"embedding": vectors[0] if vectors else []}).encode()
        if self.dimensions is not None:
            vectors = [_normalized(v[:self.dimensions]) for v in vectors]
        result = {"model": self.model, "embeddings": vectors, **stats(None, None, record)}
        usage = answer.get("usage") or {}
        if "prompt_tokens" in usage:
            result["prompt_eval_count"] = usage["prompt_tokens"]
        return json.dumps(result).encode()


def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector
