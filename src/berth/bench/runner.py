"""Load generation against any OpenAI-compatible URL: one record per request, nothing aggregated here.

Timing is taken on the client: time to first token is the first chunk that
carries generated text (or the whole response without streaming); inter-token
latency is the gap between content chunks.

Every run sends one request list (`planned_requests`), built once and, with a
second target (`--compare`), sent to both: the same prompts in the same order,
so the machine's noise falls on both. `warm` sends target A the whole list at
the concurrency level, then B, round after round; `cold` and `swap`, which send
one request at a time, alternate A and B request by request.

Connections are pooled and kept alive. A server may close one the client still
holds: llama-server (cpp-httplib) after every streamed answer though it
announces keep-alive, and after 5 s idle; uvicorn after 5 s idle. The next
request on it fails before any answer arrives. Such a request is sent again on
another connection and counted as a retry, not as an error: it failed on the
client's stale connection, not on the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace

import aiohttp

from berth.bench.images import BenchImage
from berth.core import pooled


class BenchSetupError(Exception):
    """Bad bench settings or an unusable target (rendered as exit code 2)."""


@dataclass(frozen=True)
class Target:
    """One server the run measures: A is --url, B is --compare."""

    label: str
    url: str  # base URL, without /v1
    models: tuple[str, ...]  # the name it is sent for each of BenchSettings.models, in order


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
    compare_url: str | None = None  # a second target sent the same request list
    compare_models: list[str] | None = None  # its names for `models` (None: the same names)
    rounds: int = 1  # the request list is sent this many times (per target, interleaved)
    images: list[BenchImage] = field(default_factory=list)  # --images: one per request, with the prompt
    score_field: str | None = None  # --score-field: the number each answer's JSON holds under this key

    def targets(self) -> list[Target]:
        targets = [Target("A", self.url, tuple(self.models))]
        if self.compare_url is not None:
            targets.append(Target("B", self.compare_url, tuple(self.compare_models or self.models)))
        return targets

    def phases(self) -> int:
        """Progress phases: one per (model, concurrency), or one for the whole swap run."""
        return 1 if self.scenario == "swap" else len(self.models) * len(self.concurrency)

    def total_requests(self) -> int:
        """Measured requests in the whole run, every target and round included (warm-ups excluded)."""
        per_list = self.requests * len(self.models) if self.scenario == "swap" else self.requests * self.phases()
        return per_list * self.rounds * len(self.targets())


@dataclass(frozen=True)
class PlannedRequest:
    """One entry of the run's request list, the same for every target and round."""

    index: int
    prompt_index: int
    prompt: str
    image: BenchImage | None = None  # with --images


def planned_requests(settings: BenchSettings) -> list[PlannedRequest]:
    """The request list: `requests` entries (swap: per model), taking the prompts in turn, and the images
    in name order: every model gets them in the same order (swap: each image once per model in a row)."""
    per_image = len(settings.models) if settings.scenario == "swap" else 1
    count = settings.requests * per_image
    images = settings.images
    return [PlannedRequest(i, i % len(settings.prompts), settings.prompts[i % len(settings.prompts)],
                           images[i // per_image % len(images)] if images else None)
            for i in range(count)]


def request_body(settings: BenchSettings, model: str, planned: PlannedRequest) -> dict:
    """The chat request sent for `planned` as `model`: the one place a bench request is built."""
    content: str | list[dict] = planned.prompt
    if planned.image is not None:
        content = [{"type": "text", "text": planned.prompt},
                   {"type": "image_url", "image_url": {"url": planned.image.data_url}}]
    body: dict = {"model": model, "messages": [{"role": "user", "content": content}],
                  "max_tokens": settings.max_tokens, "stream": settings.stream}
    if settings.stream:
        body["stream_options"] = {"include_usage": True}
    if settings.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": settings.json_schema, "strict": True}}
    return body


@dataclass
class RequestRecord:
    model: str  # the --model name (target B may be sent another name for it)
    concurrency: int
    scenario: str
    ok: bool
    error: str | None = None  # a kind: http_503, insufficient_memory, timeout, disconnected, ...
    started: float = 0.0  # seconds since the run began
    e2e_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    json_valid: bool | None = None  # with a schema: parsed and validated
    target: str = "A"
    round: int = 0
    index: int = 0  # the entry of the request list
    prompt_index: int = 0
    retries: int = 0  # sent again after a pooled connection turned out closed
    image: str | None = None  # with --images: the image's file name
    answer: str | None = None  # the answer's text, kept with --images or --score-field
    score: float | None = None  # with --score-field: the number the answer's JSON holds there

    def as_dict(self) -> dict:
        return asdict(self)


def _headers(settings: BenchSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


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


class StreamError(Exception):
    """An error event inside a stream that had started (the answer was cut short by the server)."""


async def _post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str],
                record: RequestRecord, origin: float) -> tuple[aiohttp.ClientResponse, float]:
    """POST and wait for the answer's headers, sending again while a pooled connection proves closed
    (core/pooled.py). Returns the answer and when the attempt that got it began (also set as
    `record.started`): the failed attempts never reached the server, so their time is the client's and
    is not measured."""
    begun = time.perf_counter()

    def again() -> None:
        nonlocal begun
        record.retries += 1
        begun = time.perf_counter()
        record.started = begun - origin

    record.started = begun - origin
    return await pooled.request(session, "POST", url, json=body, headers=headers, on_retry=again), begun


def _connection_error_kind(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection"
    return type(exc).__name__


async def _send(session: aiohttp.ClientSession, settings: BenchSettings, target: Target, model: str,
                planned: PlannedRequest, record: RequestRecord, origin: float) -> None:
    begun = time.perf_counter()
    content: list[str] = []
    url = target.url + "/v1/chat/completions"
    try:
        resp, begun = await _post(session, url, request_body(settings, model, planned), _headers(settings), record,
                                  origin)
        async with resp:
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
    except TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientError as exc:
        record.error = _connection_error_kind(exc)
    except StreamError:
        record.error = "stream_error"
    except (ValueError, KeyError, IndexError, TypeError):
        record.error = "bad_response"
    finally:
        record.e2e_s = time.perf_counter() - begun
    if record.ok and settings.json_schema is not None:
        record.json_valid = _validate("".join(content), settings.json_schema)
    if record.ok and (settings.images or settings.score_field):
        record.answer = "".join(content)
        record.score = score_of(record.answer, settings.score_field) if settings.score_field else None


def score_of(answer: str, field_name: str) -> float | None:
    """The number an answer's JSON object holds under `field_name`; None when it is not JSON, not an object,
    lacks the field, or holds no number there (true and false are not numbers)."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return None
    value = parsed.get(field_name) if isinstance(parsed, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


async def _read_stream(resp: aiohttp.ClientResponse, begun: float, record: RequestRecord,
                       content: list[str]) -> dict:
    """Read the server-sent events to the end of the body (so the connection can be reused); time the
    chunks that carry generated text."""
    usage: dict = {}
    last_token_at: float | None = None

    def event(line: bytes, now: float) -> None:
        nonlocal usage, last_token_at
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        parsed = json.loads(data)
        if "error" in parsed:
            raise StreamError(parsed["error"])
        if parsed.get("usage"):
            usage = parsed["usage"]
        for choice in parsed.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if not text:
                continue
            if last_token_at is None:
                record.ttft_s = now - begun
            else:
                record.itl_s.append(now - last_token_at)
            last_token_at = now
            content.append(text)

    pending = b""
    async for block in resp.content.iter_any():
        now = time.perf_counter()  # every event in this block arrived now
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for line in lines:
            event(line, now)
    event(pending, time.perf_counter())
    return usage


async def _unload(session: aiohttp.ClientSession, settings: BenchSettings, target: Target, model: str) -> None:
    """Through berth's (and llama-server router mode's) API: the next request loads the model cold."""
    async with session.post(target.url + "/models/unload", json={"model": model},
                            headers=_headers(settings)) as resp:
        if resp.status != 200:
            raise BenchSetupError(f"--scenario cold needs berth's POST /models/unload; {target.url} answered "
                                  f"{resp.status}: {(await resp.text())[:200]}")


def listed_names(listing: dict) -> set[str]:
    """Every name a /v1/models answer says is served: ids, and the aliases berth and llama-swap list
    under meta.llamaswap.aliases and llama-server under aliases."""
    names: set[str] = set()
    for entry in listing.get("data") or []:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("id"), str):
            names.add(entry["id"])
        meta = entry.get("meta")
        swap = meta.get("llamaswap") if isinstance(meta, dict) else None
        for aliases in (entry.get("aliases"), swap.get("aliases") if isinstance(swap, dict) else None):
            if isinstance(aliases, list):
                names.update(a for a in aliases if isinstance(a, str))
    return names


async def _refusal(session: aiohttp.ClientSession, settings: BenchSettings, target: Target, model: str) -> str | None:
    """Ask the target whether it routes `model` (a one-token request, as the warm-up would send): what it
    answered if it says no such model (404, or the code model_not_found), else None. Any other failure
    is the run's to measure, not a wrong name."""
    asking = replace(settings, max_tokens=1, stream=False, json_schema=None)
    body = request_body(asking, model, PlannedRequest(0, 0, "hi"))
    try:
        async with session.post(target.url + "/v1/chat/completions", json=body, headers=_headers(settings)) as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return None
    _check_key(resp.status, target)
    if resp.status != 404 and _error_type(resp.status, text) != "model_not_found":
        return None
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status}: {text[:200]}"


def _check_key(status: int, target: Target) -> None:
    if status == 401:
        raise BenchSetupError(f"{target.url} wants an API key; pass --api-key or set OPENAI_API_KEY")


async def _listed(session: aiohttp.ClientSession, settings: BenchSettings, target: Target) -> set[str]:
    """The names the target's /v1/models lists (none when it lists nothing readable)."""
    async with session.get(target.url + "/v1/models", headers=_headers(settings)) as resp:
        _check_key(resp.status, target)
        try:
            listing = await resp.json(content_type=None) if resp.status == 200 else {}
        except ValueError:
            listing = {}
    return listed_names(listing) if isinstance(listing, dict) else set()


async def check_target(settings: BenchSettings) -> None:
    """Fail early, naming the problem, when a URL or a model name is wrong. A name the target lists
    (an id or an alias) is taken at its word; another one is asked for once."""
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    for target in settings.targets():
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                listed = await _listed(session, settings, target)
                refused = {}
                for model in target.models:
                    if model not in listed and (answer := await _refusal(session, settings, target, model)):
                        refused[model] = answer
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BenchSetupError(f"cannot reach {target.url} ({exc.__class__.__name__}: {exc}); "
                                  f"check --{'url' if target.label == 'A' else 'compare'}") from None
        if refused:
            lists = f"; it lists: {', '.join(sorted(listed))}" if listed else ""
            raise BenchSetupError(f"model(s) {', '.join(refused)} not served at {target.url}{lists} "
                                  f"(it answered: {' / '.join(refused.values())})")


Progress = Callable[[str, int], None]  # (phase label, requests finished in it)
SendOne = Callable[[Target, int, int, PlannedRequest, str, int], Awaitable[None]]


async def _closed_loop(one: SendOne, target: Target, model_index: int, concurrency: int,
                       requests: list[PlannedRequest], label: str, round_: int) -> None:
    """`concurrency` clients, each sending its next request as soon as its last one ended."""
    entries = iter(requests)  # shared: each entry is taken by exactly one client

    async def client() -> None:
        for planned in entries:
            await one(target, model_index, concurrency, planned, label, round_)

    await asyncio.gather(*(client() for _ in range(min(concurrency, len(requests)))))


async def run(settings: BenchSettings, progress: Progress | None = None) -> list[RequestRecord]:
    """Every request of the run, in completion order."""
    records: list[RequestRecord] = []
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    origin = time.perf_counter()
    targets = settings.targets()
    requests = planned_requests(settings)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                     trace_configs=[pooled.reuse_tracing()]) as session:

        async def one(target: Target, model_index: int, concurrency: int, planned: PlannedRequest, label: str,
                      round_: int) -> None:
            record = RequestRecord(settings.models[model_index], concurrency, settings.scenario, ok=False,
                                   target=target.label, round=round_, index=planned.index,
                                   prompt_index=planned.prompt_index,
                                   image=planned.image.name if planned.image is not None else None)
            await _send(session, settings, target, target.models[model_index], planned, record, origin)
            records.append(record)
            if progress:
                progress(label, 1)

        if settings.scenario == "swap":
            # One request at a time, alternating models: every request after the first pays a swap.
            label = "swap " + " <-> ".join(settings.models)
            for round_ in range(settings.rounds):
                for planned in requests:
                    for target in targets:
                        await one(target, planned.index % len(settings.models), 1, planned, label, round_)
            return records
        for model_index, model in enumerate(settings.models):
            for concurrency in settings.concurrency:
                label = f"{model} c={concurrency}"
                if settings.scenario == "cold":
                    for round_ in range(settings.rounds):
                        for planned in requests:
                            for target in targets:
                                await _unload(session, settings, target, target.models[model_index])
                                await one(target, model_index, 1, planned, label, round_)
                    continue
                for target in targets:  # loads the model; not counted
                    warm = RequestRecord(model, concurrency, "warmup", ok=False)
                    await _send(session, settings, target, target.models[model_index], requests[0], warm, origin)
                for round_ in range(settings.rounds):
                    for target in targets:
                        await _closed_loop(one, target, model_index, concurrency, requests, label, round_)
    return records
