"""The event loop berth serves on: uvloop when it is installed, asyncio's own otherwise.

uvloop's loop (libuv) spends less time per wakeup and per send than asyncio's selector loop, and a
streamed answer costs the proxy one wakeup and one send per chunk (docs/performance.md has the figures).
`BERTH_EVENT_LOOP=asyncio` chooses asyncio's loop even when uvloop is installed (to compare, or to rule
uvloop out when something misbehaves); `uvloop` requires it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from berth.core.errors import BerthError

T = TypeVar("T")
CHOICES = ("uvloop", "asyncio")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes berth's loop: uvloop's, or None for asyncio's own."""
    wanted = os.environ.get("BERTH_EVENT_LOOP", "").strip().lower()
    if wanted and wanted not in CHOICES:
        raise BerthError(f"BERTH_EVENT_LOOP={wanted!r} is not an event loop berth knows; use one of: "
                         f"{', '.join(CHOICES)} (or unset it)")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            raise BerthError("BERTH_EVENT_LOOP=uvloop, but uvloop is not installed: pip install uvloop "
                             "(or unset BERTH_EVENT_LOOP)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], factory: Callable[[], asyncio.AbstractEventLoop] | None) -> T:
    """`asyncio.run(main)` on the loop `factory` makes (asyncio's own with None): `loop_factory()`'s."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
