"""The event loop berth serves on (core/eventloop.py): asyncio's own unless uvloop is asked for, a clear
error for a name it does not know or a uvloop that is not installed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from berth.core import eventloop
from berth.core.errors import BerthError


def test_an_unknown_loop_name_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv("BERTH_EVENT_LOOP", "tokio")
    with pytest.raises(BerthError, match="'tokio' is not an event loop berth knows; use one of: asyncio, uvloop"):
        eventloop.loop_factory()


@pytest.mark.parametrize("setting", [None, "asyncio"])
def test_asyncio_own_loop_is_the_default(monkeypatch, setting):
    if setting is None:
        monkeypatch.delenv("BERTH_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("BERTH_EVENT_LOOP", setting)
    factory = eventloop.loop_factory()
    assert factory is None

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert issubclass(eventloop.run(loop_type(), factory), asyncio.BaseEventLoop)


def test_uvloop_when_asked_for(monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setenv("BERTH_EVENT_LOOP", "uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert eventloop.run(loop_type(), eventloop.loop_factory()) is uvloop.Loop


def test_uvloop_asked_for_but_missing_names_the_fix(monkeypatch):
    monkeypatch.setenv("BERTH_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an import of a package that is not installed meets
    with pytest.raises(BerthError, match="uvloop is not installed: pip install uvloop"):
        eventloop.loop_factory()
