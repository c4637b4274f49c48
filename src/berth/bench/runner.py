"""Load generation against any OpenAI-compatible URL: one record per request, nothing aggregated here.

Timing is taken on the client: time to first token is the first chunk that
carries generated text (or the whole response without streaming); inter-token
latency is the gap between content chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aiohttp


class BenchSetupError(Exception):
    """Bad bench settings or an unusable target (rendered as exit code 2)."""


@dataclass
class BenchSettings:
    url: str  # base URL, without /v1
    models: list[str]
    requests: int
    concurrency: list[int]
    prompts: list[str]
    max_tokens: int
    stream: bool = True
    scenario: str = "warm"  # warm | cold | swap
    json_schema: dict | None = None
    api_key: str | None = None
    timeout: float = 300.0
    prompt_source: str = "--prompt"  # "built-in", "--prompt" or "--prompt-file PATH"


@dataclass
class RequestRecord:
    model: str
    concurrency: int
    scenario: str
    ok: bool
    error: str | None = None  # a type: http_503, insufficient_memory, timeout, connection, ...
    started: float = 0.0  # seconds since the run began
    e2e_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    json_valid: bool | None = None  # with a schema: parsed and validated

    def as_dict(self) -> dict:
        return asdict(self)


def _headers(settings: BenchSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


def _body(settings: BenchSettings, model: str, prompt: str) -> dict:
    body: dict = {"model": model, "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": settings.max_tokens, "stream": settings.stream}
    if settings.stream:
        body["stream_options"] = {"include_usage": True}
    if settings.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": settings.json_schema, "strict": True}}
    return body


def _error_type(status: int, text: str) -> str:
    try:
        error = json.loads(text).get("error", {})
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        code = None
    return str(code) if code else f"http_{status}"


def _validate(content: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(content), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def _send(session: aiohttp.ClientSession, settings: BenchSettings, model: str, prompt: str,
                record: RequestRecord) -> None:
    begun = time.perf_counter()
    content: list[str] = []
    url = settings.url + "/v1/chat/completions"
    try:
        async with session.post(url, json=_body(settings, model, prompt), headers=_headers(settings)) as resp:
            if resp.status != 200:
                record.error = _error_type(resp.status, await resp.text())
                return
            if not settings.stream:
                payload = await resp.json(content_type=None)
                record.ttft_s = time.perf_counter() - begun
                content.append(payload["choices"][0]["message"].get("content") or "")
                usage = payload.get("usage") or {}
            else:
                usage = await _read_stream(resp, begun, record, content)
            record.output_tokens = int(usage.get("completion_tokens") or len(record.itl_s) + bool(content))
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.ok = True
    except asyncio.TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientError as exc:
        record.error = "connection" if isinstance(exc, aiohttp.ClientConnectionError) else type(exc).__name__
    except (ValueError, KeyError, IndexError, TypeError):
        record.error = "bad_response"
    finally:
        record.e2e_s = time.perf_counter() - begun
    if record.ok and settings.json_schema is not None:
        record.json_valid = _validate("".join(content), settings.json_schema)


async def _read_stream(resp: aiohttp.ClientResponse, begun: float, record: RequestRecord,
                       content: list[str]) -> dict:
    usage: dict = {}
    last_token_at = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise ValueError(event["error"])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if not text:
                continue
            now = time.perf_counter()
            if last_token_at is None:
                record.ttft_s = now - begun
            else:
                record.itl_s.append(now - last_token_at)
            last_token_at = now
            content.append(text)
    return usage


async def _unload(session: aiohttp.ClientSession, settings: BenchSettings, model: str) -> None:
    """Through berth's (and llama-server router mode's) API: the next request loads the model cold."""
    async with session.post(settings.url + "/models/unload", json={"model": model},
                            headers=_headers(settings)) as resp:
        if resp.status != 200:
            raise BenchSetupError(f"--scenario cold needs berth's POST /models/unload; {settings.url} answered "
                                  f"{resp.status}: {(await resp.text())[:200]}")


async def check_target(settings: BenchSettings) -> None:
    """Fail early, naming the problem, when the URL or the model names are wrong."""
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(settings.url + "/v1/models", headers=_headers(settings)) as resp:
                if resp.status == 401:
                    raise BenchSetupError(f"{settings.url} wants an API key; pass --api-key or set OPENAI_API_KEY")
                if resp.status != 200:
                    return  # not every server lists models; requests will tell
                listed = {m.get("id") for m in (await resp.json(content_type=None)).get("data", [])}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise BenchSetupError(f"cannot reach {settings.url}/v1/models ({exc.__class__.__name__}: {exc}); "
                              "check --url") from None
    unknown = [m for m in settings.models if listed and m not in listed]
    if unknown:
        raise BenchSetupError(f"model(s) {', '.join(unknown)} not served at {settings.url}; "
                              f"it lists: {', '.join(sorted(str(m) for m in listed))}")


async def _closed_loop(one, model: str, concurrency: int, label: str, requests: int) -> None:
    """`concurrency` clients, each sending its next request as soon as its last one ended."""
    indexes = iter(range(requests))  # shared: each index is taken by exactly one client

    async def client() -> None:
        for index in indexes:
            await one(model, concurrency, index, label)

    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))


Progress = Callable[[str, int], None]  # (phase label, requests finished in it)


async def run(settings: BenchSettings, progress: Progress | None = None) -> list[RequestRecord]:
    """Every request of the run, in completion order."""
    records: list[RequestRecord] = []
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    origin = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(model: str, concurrency: int, index: int, label: str) -> None:
            record = RequestRecord(model, concurrency, settings.scenario, ok=False,
                                   started=time.perf_counter() - origin)
            await _send(session, settings, model, settings.prompts[index % len(settings.prompts)], record)
            records.append(record)
            if progress:
                progress(label, 1)

        if settings.scenario == "swap":
            # One request at a time, alternating: every request after the first pays a swap.
            label = "swap " + " <-> ".join(settings.models)
            for index in range(settings.requests * len(settings.models)):
                await one(settings.models[index % len(settings.models)], 1, index, label)
            return records
        for model in settings.models:
            for concurrency in settings.concurrency:
                label = f"{model} c={concurrency}"
                if settings.scenario == "cold":
                    for index in range(settings.requests):
                        await _unload(session, settings, model)
                        await one(model, 1, index, label)
                    continue
                warm = RequestRecord(model, concurrency, "warmup", ok=False)
                await _send(session, settings, model, settings.prompts[0], warm)  # loads the model; not counted
                await _closed_loop(one, model, concurrency, label, settings.requests)
    return records
