"""Request and response bodies kept for the dashboard's detail view (`captureBodies`, off by default).

Bounded twice: each body to its first `BODY_LIMIT` bytes, and only the newest `KEEP` requests keep theirs.
Secrets are redacted before anything is kept: values of JSON fields whose names say they hold one, and the
payload of data URLs (images) is replaced by its size. A body that is not JSON (an upload) is kept as its
size and type only."""

from __future__ import annotations

import json
import re
from typing import Any

BODY_LIMIT = 16 * 1024  # bytes kept of each body
KEEP = 100  # requests whose bodies are kept
REDACTED = "[redacted]"
_SECRET_FIELD = re.compile(r"(api[_-]?key|secret|password|passwd|authorization|access[_-]?token|refresh[_-]?token|"
                           r"^token$|^key$|credential)", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.DOTALL)


def redact(value: Any) -> Any:
    """`value` (parsed JSON) with secrets and inline data replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_FIELD.search(str(k)) and isinstance(v, (str, int)) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        match = _DATA_URL.match(value)
        if match:
            return f"data:{match.group(1)};base64,[{len(match.group(2)) * 3 // 4} bytes]"
    return value


def request_text(body: bytes | None, content_type: str) -> str | None:
    """What is kept of a request body: redacted JSON, cut to BODY_LIMIT; other bodies by size and type."""
    if not body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return f"({len(body)} bytes of {content_type or 'unknown type'}, not kept)"
    return _cut(json.dumps(redact(parsed), indent=1, ensure_ascii=False))


def response_text(head: bytes, total: int) -> str:
    """What is kept of an answer: its first bytes (an event stream's events, a JSON body), JSON redacted."""
    try:
        return _cut(json.dumps(redact(json.loads(head)), indent=1, ensure_ascii=False))
    except (ValueError, RecursionError):  # a stream, or a body cut short: its text as it came
        text = head.decode("utf-8", errors="replace")
        return _cut(text) + (f"\n… ({total} bytes in all)" if total > len(head) else "")


def _cut(text: str) -> str:
    return text if len(text) <= BODY_LIMIT else text[:BODY_LIMIT] + f"\n… (cut at {BODY_LIMIT} characters)"
