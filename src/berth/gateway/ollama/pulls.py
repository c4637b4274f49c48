"""/api/pull and /api/delete on berth's model store (the code of `berth pull` and `berth rm`).

A pull streams Ollama's progress objects (`status`, `digest`, `total`, `completed`) as NDJSON while the
store downloads, resumes and verifies in a thread; a client that leaves cancels it, and the partial file
stays for the next pull to resume. berth serves the models of its config: a pulled model that no config
model names waits in the store until one does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from berth.core.errors import BadRequest, BerthError
from berth.core.refs import ModelRef
from berth.engine.launch import store_reference
from berth.gateway.context import GatewayContext
from berth.gateway.ollama.answers import NDJSON, error_object, ndjson
from berth.gateway.ollama.names import hub_reference, local_name, store_models
from berth.store import ModelStore
from berth.store.pull import pull
from berth.store.store import NotInStore

log = logging.getLogger("berth.gateway")

Emit = Callable[[dict[str, Any]], None]


@dataclass
class _File:
    digest: str
    total: int | None
    completed: int = 0
    reported_at: float = 0.0


@dataclass
class PullProgress:
    """What `store.pull` tells a rich Progress (add_task, update, advance, from the pull's thread), as
    Ollama's progress objects; at most one per file every `interval` seconds, and each file's last."""

    emit: Emit
    interval: float = 0.25
    _files: list[_File] = field(default_factory=list)

    def add_task(self, description: str, total: int | None = None, sha256: str | None = None, **_: Any) -> int:
        self._files.append(_File(f"sha256:{sha256}" if sha256 else "", total))
        self._report(len(self._files) - 1, force=True)
        return len(self._files) - 1

    def update(self, task: int, completed: int | None = None, **_: Any) -> None:
        if completed is not None:
            self._files[task].completed = completed
            self._report(task, force=False)

    def advance(self, task: int, advance: float) -> None:
        self._files[task].completed += int(advance)
        self._report(task, force=False)

    def _report(self, task: int, force: bool) -> None:
        file = self._files[task]
        done = file.total is not None and file.completed >= file.total
        now = time.monotonic()
        if not (force or done or now - file.reported_at >= self.interval):
            return
        file.reported_at = now
        progress: dict[str, Any] = {"status": f"pulling {file.digest[7:19] or 'file'}", "completed": file.completed}
        if file.digest:
            progress["digest"] = file.digest
        if file.total is not None:
            progress["total"] = file.total
        self.emit(progress)
        if done and not force:
            self.emit({"status": "verifying sha256 digest"})  # the store checks the file as soon as it is in


@dataclass(frozen=True)
class PullTarget:
    """What an Ollama name asks to pull: a Hugging Face GGUF (with the projector wish of the config model
    that runs it), and the config models that run it."""

    ref: ModelRef
    mmproj: bool | None
    models: tuple[str, ...]


def pull_target(context: GatewayContext, name: str) -> PullTarget | str:
    """The store model `name` means, or (for a configured model that runs a file of its own) that file."""
    config = context.config
    model_id = config.resolve(local_name(config, name))
    if model_id is not None:
        spec = config.models[model_id]
        wanted = store_reference(spec)
        if wanted is None:
            return f"{model_id} runs {spec.argv[0]} as its config says; there is nothing to pull"
        return PullTarget(wanted[0], wanted[1], (model_id,))
    ref = hub_reference(name)
    return PullTarget(ref, False, tuple(store_models(config, ref.default_name)))


def _store(context: GatewayContext) -> ModelStore:
    return ModelStore.at(context.config.store_dir)


async def answer_nothing_to_pull(request: web.Request, note: str, stream: bool) -> web.StreamResponse:
    """A configured model that runs a file of its own: the pull succeeds at once, and says so."""
    if not stream:
        return web.json_response({"status": "success"})
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    await response.write(ndjson({"status": note}) + ndjson({"status": "success"}))
    await response.write_eof()
    return response


async def stream_pull(context: GatewayContext, request: web.Request, target: PullTarget,
                      stream: bool) -> web.StreamResponse:
    """Pull, streaming progress (or, with stream false, answering once it is done)."""
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def emit(event: dict[str, Any]) -> None:  # called in the pull's thread
        loop.call_soon_threadsafe(events.put_nowait, event)

    job = asyncio.ensure_future(asyncio.to_thread(pull, _store(context), target.ref, mmproj=target.mmproj,
                                                  progress=PullProgress(emit), cancel=cancel))
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    try:
        if stream:
            await response.prepare(request)
            await response.write(ndjson({"status": "pulling manifest"}))
        while not job.done() or not events.empty():
            getting = asyncio.ensure_future(events.get())
            await asyncio.wait({getting, job}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
            elif stream:
                await response.write(ndjson(getting.result()))
        try:
            entry = job.result()
        except Exception as exc:  # the store's typed errors, and whatever the hub's client raised
            status, message = (exc.status, exc.message) if isinstance(exc, BerthError) else (502, f"pull failed: {exc}")
            if not stream:
                return error_object(status, message)
            await response.write(ndjson({"error": message}))
            return response
        if not stream:
            return web.json_response({"status": "success"})
        if not target.models:
            await response.write(ndjson({"status": f"stored as {entry.name} in {entry.directory.parent}; berth "
                                                   f"serves it once a model of the config names it "
                                                   f"(model: {target.ref})"}))
        await response.write(ndjson({"status": "success"}))
        await response.write_eof()
        return response
    finally:
        if not job.done():  # the client left: the pull stops at its next block, the .partial file stays
            cancel.set()
            await asyncio.gather(job, return_exceptions=True)


async def delete(context: GatewayContext, name: str) -> web.Response:
    """Remove a store model (named by a config model that runs it, by its store name, or as a pull names it),
    after unloading the config's models that run it; 404 when the store has no such model."""
    config = context.config
    store = _store(context)
    model_id = config.resolve(local_name(config, name))
    if model_id is not None:
        wanted = store_reference(config.models[model_id])
        if wanted is None:
            raise BadRequest(f"{model_id} runs {config.models[model_id].argv[0]} as its config says, not a model "
                             "of berth's store: take it out of the config instead")
        stored = wanted[0].default_name
    else:
        stored = name if store.entry(name) is not None else hub_reference(name).default_name
    if store.entry(stored) is None:
        raise NotInStore(f"model '{name}' not found in berth's store at {store.root} (`berth models` lists it)")
    for model in store_models(config, stored):  # its files go: the models that run them stop first
        await context.pool.unload(model)
    await asyncio.to_thread(store.remove, stored)
    log.info("deleted %s from the store (asked as %r)", stored, name)
    return web.Response(status=200)
