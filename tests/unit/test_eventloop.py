"""The event loop berth serves on (core/eventloop.py): uvloop when installed, asyncio's own on request,
a clear error for a name it does not know."""

from __future__ import annotations

import asyncio

import pytest

from berth.core import eventloop
from berth.core.errors import BerthError


def test_an_unknown_loop_name_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("BERTH_EVENT_LOOP", "tokio")
    with pytest.raises(BerthError, match="'tokio' is not an event loop berth knows; use one of: uvloop, asyncio"):
        eventloop.loop_factory()


def test_asyncio_chosen_runs_on_asyncio_own_loop(monkeypatch):
    monkeypatch.setenv("BERTH_EVENT_LOOP", "asyncio")
    factory = eventloop.loop_factory()
    assert factory is None

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert issubclass(eventloop.run(loop_type(), factory), asyncio.BaseEventLoop)


def test_uvloop_is_the_default_when_installed(monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("BERTH_EVENT_LOOP", raising=False)

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert eventloop.run(loop_type(), eventloop.loop_factory()) is uvloop.Loop
