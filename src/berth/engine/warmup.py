"""Warmup: a model counts as ready only once it has answered a short chat request."""

from __future__ import annotations

import asyncio

import aiohttp

from berth.config import ModelSpec
from berth.engine.launch import key_headers
from berth.core.errors import StartFailed

WARMUP_TIMEOUT = 120.0
WARMUP_BODY = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}


async def chat_warmup(spec: ModelSpec, key: str | None, session: aiohttp.ClientSession) -> None:
    """Send one short chat request (with the server's `key`); raise StartFailed unless the answer has content."""
    url = spec.proxy + "/v1/chat/completions"
    try:
        async with session.post(url, json=WARMUP_BODY, headers=key_headers(key),
                                timeout=aiohttp.ClientTimeout(total=WARMUP_TIMEOUT)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise StartFailed(spec.id, f"warmup chat request answered HTTP {resp.status}: {text[:300]}")
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise StartFailed(spec.id, f"warmup chat request failed: {exc!r}") from None
    except ValueError:
        raise StartFailed(spec.id, f"warmup answer is not JSON: {text[:300]}") from None
    try:
        message = data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise StartFailed(spec.id, f"warmup answer has no choices[0].message: {text[:300]}") from None
    if not (message.get("content") or message.get("reasoning_content") or message.get("tool_calls")):
        raise StartFailed(spec.id, "warmup answer was empty (no content, reasoning_content or tool_calls); "
                                   "check the model file and its chat template")
