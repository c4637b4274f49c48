"""Memory sizes and device names as users write them (`20GiB`, `ram`, `gpu1`), and as berth prints them."""

from __future__ import annotations

import re

HOST = "host"
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
          "t": 1024**4, "tib": 1024**4, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_HOST_NAMES = ("ram", "host", "cpu")


class SizeError(ValueError):
    pass


def parse_size(value: str | int | float) -> int:
    """`24GiB`, `512 MiB`, `1.5g` or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise SizeError(f"{value} is negative; give a size such as 4GiB")
        return int(value)
    match = re.fullmatch(r"([\d.]+)\s*([a-zA-Z]*)", str(value).strip())
    if match is None or match.group(2).lower() not in _UNITS:
        raise SizeError(f"{value!r} is not a size; write for example 24GiB, 512MiB or a number of bytes")
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    except ValueError:
        raise SizeError(f"{value!r} is not a size; write for example 24GiB") from None


def device_key(name: str) -> str:
    """`ram`/`host`/`cpu` -> "host"; `gpu` -> "gpu0"; `gpuN` and `rpc:HOST:PORT` stay."""
    key = name.strip().lower()
    if key in _HOST_NAMES:
        return HOST
    if key == "gpu":
        return "gpu0"
    if re.fullmatch(r"gpu\d+", key) or re.fullmatch(r"rpc:[^\s:]+:\d+", key):
        return key
    raise SizeError(f"unknown device {name!r}; use ram (the host), gpu0, gpu1, ... or rpc:HOST:PORT (an agent)")


RPC_PREFIX = "rpc:"


def rpc_device(agent: str) -> str:
    """The device name of the memory an RPC agent (`host:port`) offers: `rpc:host:port`."""
    return RPC_PREFIX + agent.lower()


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
