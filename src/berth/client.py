"""A small client of berth's own HTTP API for the terminal commands (`run`, `ps`, `stop`).

Standard library only: these commands must work in any environment berth installs into.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(Exception):
    """berth answered with an error (`status` set) or could not be reached (`status` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class BerthClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, payload: Any = None, timeout: float | None = None):
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise ClientError(_error_message(exc.read(), exc.code), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"no berth answers at {self.url} ({reason})") from None

    def alive(self) -> bool:
        try:
            with self._request("GET", "/health", timeout=2) as response:
                return response.status == 200
        except ClientError:
            return False

    def get(self, path: str) -> Any:
        with self._request("GET", path) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: Any = None) -> bytes:
        with self._request("POST", path, payload if payload is not None else {}) as response:
            return response.read()

    def stream_chat(self, model: str, messages: list[dict[str, str]]) -> Iterator[str]:
        """Yield the answer's text as it streams (reasoning text too, as llama.cpp sends it)."""
        payload = {"model": model, "messages": messages, "stream": True}
        with self._request("POST", "/v1/chat/completions", payload) as response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ClientError(_error_message(data.encode(), None))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or delta.get("reasoning_content")
                    if text:
                        yield text


def _error_message(body: bytes, status: int | None) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = message if isinstance(message, str) and message else body.decode("utf-8", errors="replace").strip()
    return f"{text} (HTTP {status})" if status else text
