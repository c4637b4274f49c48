"""`apiKeys` resolved into `ApiKey` records: each key hashed as it is read (only digests leave this module),
names and globs checked."""

from __future__ import annotations

import re

from berth.config import schema
from berth.config.macros import expand_env
from berth.config.reading import Reading
from berth.config.records import ApiKey, KeyLimits
from berth.core.keyhash import key_digest, parse_hash

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def resolve_api_keys(reading: Reading) -> tuple[ApiKey, ...]:
    keys: list[ApiKey] = []
    seen_names: dict[str, int] = {}
    seen_digests: dict[bytes, str] = {}
    for i, entry in enumerate(reading.parsed.api_keys):
        loc = ("apiKeys", str(i))
        key = _resolve_entry(reading, entry, i, loc)
        if key.name in seen_names:
            raise reading.error(loc + ("name",), f"the name {key.name!r} is taken by apiKeys entry "
                                                 f"{seen_names[key.name]}; give each key its own name")
        if key.digest in seen_digests:
            raise reading.error(loc, f"this key is the same as {seen_digests[key.digest]!r}; each key must be "
                                     "different so that requests are counted under one name")
        seen_names[key.name], seen_digests[key.digest] = i, key.name
        keys.append(key)
    return tuple(keys)


def _resolve_entry(reading: Reading, entry: schema.ApiKeyConfig, index: int, loc: tuple[str, ...]) -> ApiKey:
    if entry.name is None:  # llama-swap's plain string: full access under a name from its place in the list
        plain = expand_env(reading, entry.key, loc)
        if not plain.strip():
            raise reading.error(loc, "API key is empty; remove it or set a value")
        return ApiKey(f"key-{index + 1}", key_digest(plain))
    if not KEY_NAME.match(entry.name):
        raise reading.error(loc + ("name",), f"key name {entry.name!r} must be 1-64 letters, digits, '_', '.', "
                                             "'@' or '-', starting with a letter or digit")
    if entry.key and entry.key_hash:
        raise reading.error(loc + ("keyHash",), "give either key or keyHash, not both")
    if entry.key_hash:
        digest = parse_hash(entry.key_hash)
        if digest is None:
            raise reading.error(loc + ("keyHash",), "keyHash must be sha256: and 64 lower-case hex digits, as "
                                                    "`berth key hash` prints it")
    elif entry.key:
        text = expand_env(reading, entry.key, loc + ("key",))
        if not text.strip():
            raise reading.error(loc + ("key",), "the key is empty; set a value (or give keyHash instead)")
        digest = key_digest(text)
    else:
        raise reading.error(loc, f"key {entry.name!r} needs `key:` (for example ${{env.KEY}}) or `keyHash:` "
                                 "(from `berth key hash` or `berth key new`)")
    for j, pattern in enumerate(entry.models):
        if not pattern.strip():
            raise reading.error(loc + ("models", str(j)), "an empty model pattern matches nothing; remove it")
    limits = entry.limits
    return ApiKey(entry.name, digest, tuple(p.strip() for p in entry.models), frozenset(entry.scopes),
                  KeyLimits(limits.requests_per_minute, limits.tokens_per_day, limits.concurrency), entry.weight)
