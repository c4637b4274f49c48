"""Comparing a presented secret with the expected one."""

from __future__ import annotations

import hmac


def _as_bytes(value: str | bytes) -> bytes:
    # A header the client sent as bytes that are not UTF-8 reaches Python as surrogate escapes: they
    # encode back to those bytes, which simply do not match, instead of raising (a 500).
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def same_secret(presented: str | bytes, expected: str | bytes) -> bool:
    """Whether `presented` is `expected`, in time that does not depend on where they differ."""
    return hmac.compare_digest(_as_bytes(presented), _as_bytes(expected))
