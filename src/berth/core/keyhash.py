"""API keys as berth keeps them: a SHA-256 digest, never the key itself.

One place hashes a key, writes and reads the `sha256:<hex>` form of the config's `keyHash`, and makes new
keys, for the config (which hashes keys written in plain text as it loads), the gateway (which hashes what
a client presents) and `berth key`. A plain hash suits keys made by `berth key new` (256 random bits);
a short key a person chose could be guessed from its hash, so the config should not hold such a one.
"""

from __future__ import annotations

import hashlib
import re
import secrets

HASH_PREFIX = "sha256:"
_HASH_FORM = re.compile(r"^sha256:([0-9a-f]{64})$")
NEW_KEY_PREFIX = "berth-"


def key_digest(key: str) -> bytes:
    """The digest of a key as a client sends it (UTF-8; a header's stray bytes hash like any others)."""
    return hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()


def format_hash(digest: bytes) -> str:
    return HASH_PREFIX + digest.hex()


def parse_hash(text: str) -> bytes | None:
    """The digest in `sha256:<64 hex digits>` (lower case), or None when `text` is not of that form."""
    match = _HASH_FORM.match(text.strip())
    return bytes.fromhex(match.group(1)) if match else None


def new_key() -> str:
    """A new random key: 256 bits, URL-safe, recognisable by its prefix."""
    return NEW_KEY_PREFIX + secrets.token_urlsafe(32)
