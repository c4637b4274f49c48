"""`berth agent`: lends this machine's memory to gateways as llama.cpp RPC servers.

A gateway leases an rpc server for one run of one model: the agent starts `ggml-rpc-server` on a
loopback port and opens a relay port on its own address that accepts connections only from the
address the lease was asked from, because llama.cpp's RPC protocol has no authentication of its
own (README "Across machines", threat model). A lease lives while the gateway renews it; one that
is released, or not renewed in time (the gateway died or lost the network), has its server
stopped. Every rpc server is registered with a janitor, so none outlives the agent, SIGKILL
included.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web

from berth.core.errors import BadRequest, BerthError, Unauthorized
from berth.core.procfs import group_alive, listens_on
from berth.core.units import format_bytes
from berth.memory.devices import inventory
from berth.runtime.agents import LEASES_PATH, INVENTORY_PATH, AgentRefused
from berth.runtime.janitor import Janitor, signal_group
from berth.runtime.ports import unused_port

log = logging.getLogger("berth.agent")

RELAY_CHUNK = 1 << 20
PORT_ATTEMPTS = 3
SERVER_READY_TIMEOUT = 20.0
STOP_GRACE = 3.0


@dataclass
class RpcLease:
    """One rpc server lent to one gateway for one run of one model."""

    id: str
    model: str
    peer: str  # the only address its relay accepts
    need_bytes: int
    server_port: int  # ggml-rpc-server on 127.0.0.1
    process: asyncio.subprocess.Process
    expires_at: float
    relay: asyncio.base_events.Server | None = None
    relay_port: int = 0
    bytes_to_server: int = 0
    bytes_from_server: int = 0
    refused_connections: int = 0
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "peer": self.peer, "need_bytes": self.need_bytes,
                "port": self.relay_port, "rpc_server_pid": self.process.pid,
                "bytes_to_server": self.bytes_to_server, "bytes_from_server": self.bytes_from_server,
                "refused_connections": self.refused_connections,
                "expires_in": round(max(self.expires_at - time.monotonic(), 0.0), 1)}


class Agent:
    def __init__(self, rpc_server: str, listen_host: str, api_key: str, offer_bytes: int, lease_seconds: float,
                 threads: int | None = None) -> None:
        self.rpc_server, self.listen_host, self.api_key = rpc_server, listen_host, api_key
        self.offer_bytes, self.lease_seconds, self.threads = offer_bytes, lease_seconds, threads
        self.leases: dict[str, RpcLease] = {}
        self._janitor = Janitor()
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one lease decision at a time: two gateways must not both fit

    # -- lifecycle ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get(INVENTORY_PATH, self._inventory)
        app.router.add_post(LEASES_PATH, self._lease)
        app.router.add_post(LEASES_PATH + "/{id}/renew", self._renew)
        app.router.add_delete(LEASES_PATH + "/{id}", self._release)
        app.on_startup.append(self._open)
        app.on_shutdown.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self._janitor.start()
        self._reaper = asyncio.create_task(self._reap_expired())

    async def _close(self, _app: web.Application) -> None:
        if self._reaper:
            self._reaper.cancel()
        await asyncio.gather(*(self._end(lease, "the agent is stopping") for lease in list(self.leases.values())))
        self._janitor.close()

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for lease in [l for l in self.leases.values() if l.expires_at < now]:
                await self._end(lease, f"not renewed for {self.lease_seconds:g}s (its gateway is gone or "
                                       "cannot reach this agent)")
            for lease in [l for l in self.leases.values() if l.process.returncode is not None]:
                await self._end(lease, f"its rpc server exited with code {lease.process.returncode}")

    # -- HTTP ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BerthError as exc:
            return web.json_response(exc.to_openai(), status=exc.status)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/health" and self.api_key:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            given = given or request.headers.get("X-Api-Key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                raise Unauthorized("missing or wrong key for this agent: send the gateway's key (rpc.apiKey, "
                                   "or the first of apiKeys) as Authorization: Bearer KEY")
        return await handler(request)

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def leased_bytes(self) -> int:
        return sum(lease.need_bytes for lease in self.leases.values())

    async def _inventory(self, _request: web.Request) -> web.Response:
        devices = await asyncio.to_thread(inventory)
        return web.json_response({
            "offer_bytes": self.offer_bytes,
            "leased_bytes": self.leased_bytes(),
            "lease_seconds": self.lease_seconds,
            "devices": {name: {"description": d.description, "total_bytes": d.total_bytes,
                               "free_bytes": d.free_bytes} for name, d in devices.items()},
            "leases": [lease.describe() for lease in self.leases.values()],
        })

    async def _lease(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            model, need = str(body["model"]), int(body.get("need_bytes", 0))
        except (ValueError, KeyError, TypeError):
            raise BadRequest('a lease request is JSON {"model": ID, "need_bytes": N}') from None
        peer = request.remote or ""
        async with self._lock:
            free = self.offer_bytes - self.leased_bytes()
            if need > free:
                raise AgentRefused(f"this agent offers {format_bytes(self.offer_bytes)}, of which "
                                   f"{format_bytes(max(free, 0))} are not leased; {model!r} needs "
                                   f"{format_bytes(need)} here")
            lease = await self._start(model, peer, need)
        log.info(f"lease {lease.id}: {model} for {peer}, rpc server pid {lease.process.pid} on "
                 f"127.0.0.1:{lease.server_port}, relay port {lease.relay_port}, {format_bytes(need)}")
        return web.json_response({"id": lease.id, "port": lease.relay_port, "renew_seconds": self.lease_seconds / 3,
                                  "lease_seconds": self.lease_seconds}, status=201)

    def _lease_of(self, request: web.Request) -> RpcLease:
        lease = self.leases.get(request.match_info["id"])
        if lease is None:
            raise web.HTTPNotFound(text=f"no lease {request.match_info['id']} (it expired, or the agent restarted)")
        return lease

    async def _renew(self, request: web.Request) -> web.Response:
        lease = self._lease_of(request)
        lease.expires_at = time.monotonic() + self.lease_seconds
        return web.json_response(lease.describe())

    async def _release(self, request: web.Request) -> web.Response:
        lease = self._lease_of(request)
        await self._end(lease, "released by its gateway")
        return web.json_response(lease.describe())

    # -- rpc servers and relays ---------------------------------------------------

    def rpc_server_argv(self, port: int) -> list[str]:
        """The one place an rpc server's command line is written: loopback only, the relay fronts it."""
        return [self.rpc_server, "-H", "127.0.0.1", "-p", str(port), *(["-t", str(self.threads)] if self.threads else [])]

    async def _start(self, model: str, peer: str, need: int) -> RpcLease:
        lease_id = f"{next(self._ids)}-{secrets.token_hex(4)}"
        for attempt in range(PORT_ATTEMPTS):
            # ggml-rpc-server takes no port 0; a port the kernel just handed out is rarely taken again
            # at once, and a server that lost the race exits: try another port then
            port = unused_port()
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.rpc_server_argv(port), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise AgentRefused(f"cannot run the rpc server {self.rpc_server!r}: {exc}", status=500) from None
            self._janitor.register(process.pid)
            lease = RpcLease(lease_id, model, peer, need, port, process, time.monotonic() + self.lease_seconds)
            self.leases[lease_id] = lease
            asyncio.create_task(self._drain(lease))
            try:
                await self._wait_listening(lease)
                lease.relay = await asyncio.start_server(lambda r, w: self._relay(lease, r, w), self.listen_host, 0)
                lease.relay_port = lease.relay.sockets[0].getsockname()[1]
                return lease
            except AgentRefused:
                await self._end(lease, "its rpc server did not start")
                if attempt == PORT_ATTEMPTS - 1:
                    raise
            except BaseException:
                await self._end(lease, "its rpc server did not start")
                raise
        raise AssertionError("unreachable")

    async def _drain(self, lease: RpcLease) -> None:
        assert lease.process.stdout is not None
        while line := await lease.process.stdout.readline():
            lease.output.append(line.decode(errors="replace").rstrip())

    async def _wait_listening(self, lease: RpcLease) -> None:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while time.monotonic() < deadline:
            if lease.process.returncode is not None:
                raise AgentRefused(f"the rpc server exited with code {lease.process.returncode}: "
                                   + " / ".join(list(lease.output)[-5:]), status=500)
            if await asyncio.to_thread(listens_on, lease.process.pid, lease.server_port):
                return  # this very process listens (another one on the port would not do)
            await asyncio.sleep(0.05)
        raise AgentRefused(f"the rpc server did not listen within {SERVER_READY_TIMEOUT:g}s", status=500)

    async def _relay(self, lease: RpcLease, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if peer != lease.peer:
            lease.refused_connections += 1
            log.warning(f"lease {lease.id}: refused a connection from {peer}; it belongs to {lease.peer}")
            writer.close()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", lease.server_port)
        except OSError:
            writer.close()
            return
        for w in (writer, server_writer):  # RPC is one small message after another: no Nagle delays
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_server: bool) -> None:
            try:
                while chunk := await src.read(RELAY_CHUNK):
                    dst.write(chunk)
                    if to_server:
                        lease.bytes_to_server += len(chunk)
                    else:
                        lease.bytes_from_server += len(chunk)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        task = asyncio.current_task()
        assert task is not None
        lease.connections.add(task)
        try:
            await asyncio.gather(pipe(reader, server_writer, True), pipe(server_reader, writer, False))
        finally:
            lease.connections.discard(task)
            writer.close()  # a lease that ends cuts its connections: the gateway's llama-server sees it at once
            server_writer.close()

    async def _end(self, lease: RpcLease, why: str) -> None:
        if self.leases.pop(lease.id, None) is None:
            return
        if lease.relay is not None:
            lease.relay.close()
        for task in list(lease.connections):
            task.cancel()
        pgid = lease.process.pid
        signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(lease.process.wait(), STOP_GRACE)
        except asyncio.TimeoutError:
            pass
        if await asyncio.to_thread(group_alive, pgid):
            signal_group(pgid, signal.SIGKILL)
            await lease.process.wait()
        self._janitor.unregister(pgid)
        log.info(f"lease {lease.id} ({lease.model}) ended: {why}; moved {lease.bytes_to_server} bytes to and "
                 f"{lease.bytes_from_server} bytes from its rpc server")
