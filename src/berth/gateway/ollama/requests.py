"""Ollama's requests as OpenAI-compatible requests to llama-server (pure: dicts in, dicts out).

`/api/chat` becomes `/v1/chat/completions`; `/api/generate` the same with its prompt as the user's message
(or `/v1/completions` with `raw`); `/api/embed` and `/api/embeddings` become `/v1/embeddings`. Field names
follow Ollama's api/types.go; every field Ollama accepts is either translated or refused by name.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from typing import Any

from berth.core.errors import BadRequest

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"

# Ollama's sampling options and the llama-server request fields they become, with the JSON type each needs.
SAMPLING: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "typical_p": ("typical_p", float), "seed": ("seed", int),
    "num_predict": ("n_predict", int), "stop": ("stop", list), "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float), "mirostat": ("mirostat", int),
    "mirostat_tau": ("mirostat_tau", float), "mirostat_eta": ("mirostat_eta", float), "num_keep": ("n_keep", int),
}
# Options Ollama applies when it loads a model. llama-server takes them as flags at its start, so here they
# come from the model's cmd in the config; a request's values are read (num_ctx is compared) but not applied.
LOAD_OPTIONS = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "use_mmap", "use_mlock", "num_thread", "numa",
    "vocab_only", "penalize_newline", "f16_kv", "logits_all", "embedding_only", "draft_num_predict",
})
THINK_LEVELS = ("high", "medium", "low", "max")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
                (b"BM", "image/bmp"))


@dataclass(frozen=True)
class Translated:
    """An Ollama request as the OpenAI-compatible request to send, and what shapes its answer."""

    path: str  # on the model server
    body: dict[str, Any]
    stream: bool
    num_ctx: int | None = None  # the context the client asked for (options.num_ctx), if any


def model_name(request: dict[str, Any]) -> str:
    """The model a request names (Ollama also takes the older `name`)."""
    name = request.get("model") or request.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("model is required: send {\"model\": \"<name>\", ...} (GET /api/tags lists them)")
    return name.strip()


def streams(request: dict[str, Any]) -> bool:
    """Ollama streams unless `stream` is false."""
    stream = request.get("stream", True)
    if not isinstance(stream, bool) and stream is not None:
        raise BadRequest("`stream` must be true or false")
    return stream is not False


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number or a Go duration ("5m", "1h30m", "0"); negative is forever
    (math.inf). None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("`keep_alive` must be a duration such as \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        return math.inf if value < 0 else float(value)
    if not isinstance(value, str):
        raise BadRequest("`keep_alive` must be a duration such as \"5m\" or a number of seconds")
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:  # a bare number in a string: seconds (Go's parser would want a unit; the meaning is plain)
        seconds = float(body)
    except ValueError:
        parts = _DURATION_PART.findall(body)
        if not body or "".join(number + unit for number, unit in parts) != body:
            raise BadRequest(f"`keep_alive` {value!r} is not a duration; write e.g. \"30s\", \"5m\", \"1h\", "
                             "0 to unload after the answer or -1 to keep the model loaded") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    return math.inf if sign < 0 and seconds > 0 else seconds


def sampling(options: Any) -> tuple[dict[str, Any], int | None]:
    """(llama-server's sampling fields, the num_ctx asked for) from Ollama's `options`. Load-time options
    are not applied per request (llama-server fixes them at its start); unknown ones are ignored, as Ollama
    ignores them."""
    if options is None:
        return {}, None
    if not isinstance(options, dict):
        raise BadRequest("`options` must be an object such as {\"temperature\": 0.2, \"num_predict\": 64}")
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if name in SAMPLING and value is not None:
            field, kind = SAMPLING[name]
            fields[field] = _typed(name, value, kind)
    num_ctx = options.get("num_ctx")
    return fields, _typed("num_ctx", num_ctx, int) if num_ctx is not None else None


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise BadRequest(f"options.{name} must be a string or a list of strings")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"options.{name} must be a number, not {value!r}")
    if kind is int:
        if value != int(value):
            raise BadRequest(f"options.{name} must be a whole number, not {value!r}")
        return int(value)
    return float(value)


def response_format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format` ("json" or a JSON schema) as OpenAI's response_format."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise BadRequest(f"`format` must be \"json\" or a JSON schema object, not {value!r}")


def thinking(value: Any) -> dict[str, Any]:
    """Ollama's `think` (true, false, or a level) as llama-server's template switch or reasoning effort."""
    if value is None:
        return {}
    if isinstance(value, bool):
        return {"chat_template_kwargs": {"enable_thinking": value}}
    if value in THINK_LEVELS:
        return {"reasoning_effort": value}
    raise BadRequest(f"`think` must be true, false or one of {', '.join(THINK_LEVELS)}, not {value!r}")


def image_part(data: Any, where: str) -> dict[str, Any]:
    """A base64 image of Ollama's as an OpenAI image part (a data URI; llama.cpp reads the format from the
    bytes, the media type only has to be an image's)."""
    if not isinstance(data, str):
        raise BadRequest(f"{where} must be a base64 string")
    try:
        head = base64.b64decode(data[:64], validate=True)
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not base64 data; send each image as a base64 string") from None
    media = next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)),
                 "image/webp" if head[8:12] == b"WEBP" else "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _content(text: Any, images: Any, where: str) -> Any:
    if text is not None and not isinstance(text, str):
        raise BadRequest(f"{where}.content must be a string")
    if not images:
        return text or ""
    if not isinstance(images, list):
        raise BadRequest(f"{where}.images must be a list of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return parts + [image_part(image, f"{where}.images[{i}]") for i, image in enumerate(images)]


def tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls (arguments as an object) in OpenAI's shape."""
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be a list")
    result = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}.tool_calls[{i}] must be "
                             "{\"function\": {\"name\": ..., \"arguments\": {...}}}")
        entry: dict[str, Any] = {"type": "function",
                                 "function": {"name": function["name"], "arguments": function.get("arguments") or {}}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        result.append(entry)
    return result


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama's messages (images as base64 lists, tool calls with object arguments, `tool_name`) in
    OpenAI's shape."""
    if not isinstance(messages, list):
        raise BadRequest("`messages` must be a list of {\"role\": ..., \"content\": ...} objects")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where} must be an object with a `role` and `content`")
        out: dict[str, Any] = {"role": message["role"],
                               "content": _content(message.get("content"), message.get("images"), where)}
        if message.get("thinking"):
            out["reasoning_content"] = message["thinking"]
        if message.get("tool_calls"):
            out["tool_calls"] = tool_calls(message["tool_calls"], where)
        if message.get("tool_name"):
            out["name"] = message["tool_name"]
        if message.get("tool_call_id"):
            out["tool_call_id"] = message["tool_call_id"]
        result.append(out)
    return result


def _refuse_unsupported(request: dict[str, Any], fields: dict[str, str]) -> None:
    for field, why in fields.items():
        if request.get(field) not in (None, "", [], False):
            raise BadRequest(f"`{field}` is not supported by berth's Ollama API: {why}")


_NOT_TRANSLATED = {
    "logprobs": "llama-server's log probabilities are not translated to Ollama's shape; "
                "ask /v1/chat/completions with logprobs instead",
    "top_logprobs": "see logprobs",
}


def _common(request: dict[str, Any], stream: bool) -> tuple[dict[str, Any], int | None]:
    """What chat and generate share: the model, streaming (with the usage berth counts), sampling."""
    fields, num_ctx = sampling(request.get("options"))
    body: dict[str, Any] = {"model": model_name(request), "stream": stream, **fields}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body, num_ctx


def chat(request: dict[str, Any]) -> Translated:
    """/api/chat as /v1/chat/completions."""
    _refuse_unsupported(request, _NOT_TRANSLATED)
    stream = streams(request)
    body, num_ctx = _common(request, stream)
    body["messages"] = chat_messages(request.get("messages"))
    tools = request.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("`tools` must be a list of {\"type\": \"function\", \"function\": {...}} objects")
        body["tools"] = tools
    fmt = response_format(request.get("format"))
    if fmt is not None:
        body["response_format"] = fmt
    body.update(thinking(request.get("think")))
    return Translated(CHAT_PATH, body, stream, num_ctx)


def generate(request: dict[str, Any]) -> Translated:
    """/api/generate: the prompt (and `system`, `images`) as a chat through the model's template, or with
    `raw` the prompt as written to /v1/completions."""
    _refuse_unsupported(request, {
        **_NOT_TRANSLATED,
        "template": "llama-server applies the model's own chat template; drop `template`, or format the prompt "
                    "yourself and send it with \"raw\": true",
        "context": "berth returns no `context`; keep the conversation as messages of /api/chat",
        "suffix": "fill-in-the-middle is llama-server's /infill, which berth serves as it is",
        "width": "image generation is not served through /api/generate",
        "height": "image generation is not served through /api/generate",
        "steps": "image generation is not served through /api/generate",
    })
    stream = streams(request)
    body, num_ctx = _common(request, stream)
    prompt = request.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("`prompt` must be a string")
    if request.get("raw"):
        if request.get("system") or request.get("images"):
            raise BadRequest("raw mode sends the prompt as written: it does not take `system` or `images`")
        body["prompt"] = prompt
        fmt = response_format(request.get("format"))
        if fmt is not None:  # /v1/completions takes llama-server's own field for a schema
            body["json_schema"] = fmt.get("json_schema", {}).get("schema", {"type": "object"})
        return Translated(COMPLETIONS_PATH, body, stream, num_ctx)
    system = request.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("`system` must be a string")
    body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _content(prompt, request.get("images"), "request")}]
    fmt = response_format(request.get("format"))
    if fmt is not None:
        body["response_format"] = fmt
    body.update(thinking(request.get("think")))
    return Translated(CHAT_PATH, body, stream, num_ctx)


def embed_inputs(request: dict[str, Any], legacy: bool) -> list[str]:
    """The texts to embed: `input` (a string or a list of strings), or the older endpoint's `prompt`."""
    value = request.get("prompt" if legacy else "input")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if legacy or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest("`prompt` must be a string" if legacy else "`input` must be a string or a list of strings")
    return value


def embed(request: dict[str, Any], inputs: list[str], legacy: bool) -> Translated:
    """/api/embed (normalized vectors, as Ollama's) or /api/embeddings (raw vectors) as /v1/embeddings.
    `truncate` is not sent: llama-server refuses an input longer than its batch with an error, as Ollama
    does with "truncate": false."""
    body: dict[str, Any] = {"model": model_name(request), "input": inputs}
    if legacy:
        body["embd_normalize"] = -1  # Ollama's older endpoint answers the raw vector
    return Translated(EMBEDDINGS_PATH, body, False)


def dimensions(request: dict[str, Any]) -> int | None:
    value = request.get("dimensions")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest("`dimensions` must be a positive whole number")
    return value
