"""The event loop berth serves on: asyncio's own, or uvloop's with `BERTH_EVENT_LOOP=uvloop`.

uvloop's loop (libuv) spends less CPU per wakeup and per send, and a streamed answer costs the proxy one
wakeup and one send per chunk: 5-20% less of berth's CPU per streamed token. But it always forks to
spawn a model server (CPython's subprocess uses vfork when it can), which adds milliseconds to every
start and swap, and it was no faster to the first token (docs/performance.md has the figures). So it is
a choice for deployments whose cores are busy streaming many answers at once, not the default.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from berth.core.errors import BerthError

T = TypeVar("T")
CHOICES = ("asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes berth's loop: uvloop's, or None for asyncio's own (the default)."""
    wanted = os.environ.get("BERTH_EVENT_LOOP", "").strip().lower() or "asyncio"
    if wanted not in CHOICES:
        raise BerthError(f"BERTH_EVENT_LOOP={wanted!r} is not an event loop berth knows; use one of: "
                         f"{', '.join(CHOICES)} (or unset it)")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise BerthError("BERTH_EVENT_LOOP=uvloop, but uvloop is not installed: pip install uvloop "
                         "(or unset BERTH_EVENT_LOOP)") from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> T:
    """`asyncio.run(main)` on the loop `factory` makes (asyncio's own with None): `loop_factory()`'s."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
