"""`berth agent`: lends this machine's memory to gateways as llama.cpp RPC servers.

A gateway leases an rpc server for one run of one model: the agent starts `ggml-rpc-server` in a
network namespace of its own where the OS allows it (agent/rpc_host.py) and opens a relay port on
its own address. llama.cpp's RPC protocol has no authentication, so the relay connects only
connections from the address that asked for the lease which begin with the lease's secret
(runtime/relay.py; README "Security"). Only that address may renew or release the lease. A lease
lives while the gateway renews it; one that is released, or not renewed in time (the gateway died
or lost the network), has its server stopped. Every rpc server is registered with a janitor, so
none outlives the agent, SIGKILL included.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from berth.agent.rpc_host import ISOLATED, RpcHost, RpcServerFailed
from berth.core.credentials import same_secret
from berth.core.errors import (
    BadRequest, BerthError, ForeignHost, LeaseLimit, LeaseNotFound, NotJson, NotTheLessee, Unauthorized,
)
from berth.core.hosts import LOCAL_NAMES, host_name
from berth.core.units import format_bytes
from berth.memory.devices import inventory
from berth.runtime.agents import LEASES_PATH, INVENTORY_PATH, AgentRefused
from berth.runtime.janitor import Janitor
from berth.runtime.ports import unused_port
from berth.runtime.relay import SECRET_BYTES, read_secret, splice

log = logging.getLogger("berth.agent")

PORT_ATTEMPTS = 3
MAX_MODEL_NAME = 200


@dataclass
class RpcLease:
    """One rpc server lent to one gateway for one run of one model."""

    id: str
    model: str
    peer: str  # the only address its relay accepts, and the only one that may renew or release it
    need_bytes: int
    host: RpcHost
    secret: bytes  # what a connection to the relay must begin with
    expires_at: float
    relay: asyncio.base_events.Server | None = None
    relay_port: int = 0
    bytes_to_server: int = 0
    bytes_from_server: int = 0
    refused_connections: int = 0
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    def moved(self, count: int, to_server: bool) -> None:
        if to_server:
            self.bytes_to_server += count
        else:
            self.bytes_from_server += count

    def describe(self) -> dict:
        return {"id": self.id, "model": self.model, "peer": self.peer, "need_bytes": self.need_bytes,
                "port": self.relay_port, "rpc_server_pid": self.host.server_pid, "isolation": self.host.isolation,
                "bytes_to_server": self.bytes_to_server, "bytes_from_server": self.bytes_from_server,
                "refused_connections": self.refused_connections,
                "expires_in": round(max(self.expires_at - time.monotonic(), 0.0), 1)}


class Agent:
    def __init__(self, rpc_server: str, listen_host: str, api_key: str, offer_bytes: int, lease_seconds: float,
                 threads: int | None = None, max_leases: int = 8, max_leases_per_address: int = 4) -> None:
        self.rpc_server, self.listen_host, self.api_key = rpc_server, listen_host, api_key
        self.offer_bytes, self.lease_seconds, self.threads = offer_bytes, lease_seconds, threads
        self.max_leases, self.max_leases_per_address = max_leases, max_leases_per_address
        self.leases: dict[str, RpcLease] = {}
        self._janitor = Janitor()
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one lease decision at a time: two gateways must not both fit
        self._warned_unisolated = False

    # -- lifecycle ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._guard, self._auth])
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
            for lease in [l for l in self.leases.values() if l.host.process.returncode is not None]:
                await self._end(lease, f"its rpc server exited with code {lease.host.process.returncode}")

    # -- HTTP ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BerthError as exc:
            return web.json_response(exc.to_openai(), status=exc.status)

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """What a web page could otherwise do to an agent on this machine: without a key, reach it under
        a name of its own (DNS rebinding); with or without one, send a form or text/plain POST, which
        browsers send anywhere without asking."""
        host = host_name(request.headers.get("Host", ""))
        if not self.api_key and host and host not in LOCAL_NAMES and host != self.listen_host:
            raise ForeignHost(f"this agent has no key, so it answers only to localhost names, not to Host {host!r}; "
                              "start it with --api-key to reach it under another name")
        if request.method == "POST" and request.content_type != "application/json":
            raise NotJson(f"{request.path} takes a JSON body (Content-Type: application/json), not "
                          f"{request.content_type}")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/health" and self.api_key:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            given = given or request.headers.get("X-Api-Key", "")
            if not same_secret(given, self.api_key):
                raise Unauthorized("missing or wrong key for this agent: send the key the agent was started with "
                                   "(--api-key; the gateway's rpc.apiKey) as Authorization: Bearer KEY")
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
            "max_leases": self.max_leases,
            "max_leases_per_address": self.max_leases_per_address,
            "devices": {name: {"description": d.description, "total_bytes": d.total_bytes,
                               "free_bytes": d.free_bytes} for name, d in devices.items()},
            "leases": [lease.describe() for lease in self.leases.values()],
        })

    @staticmethod
    async def _lease_request(request: web.Request) -> tuple[str, int]:
        """(model, need_bytes) of a lease request; BadRequest naming what is wrong."""
        shape = 'a lease request is JSON {"model": NAME, "need_bytes": N} with N a whole number of bytes above 0'
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest(f"the body is not JSON; {shape}") from None
        if not isinstance(body, dict):
            raise BadRequest(shape)
        model, need = body.get("model"), body.get("need_bytes")
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_NAME:
            raise BadRequest(f"model must be a name of 1 to {MAX_MODEL_NAME} characters, not {model!r:.80}; {shape}")
        if isinstance(need, bool) or not isinstance(need, int):
            raise BadRequest(f"need_bytes must be a whole number of bytes, not {need!r:.80}; {shape}")
        if need <= 0:
            raise BadRequest(f"need_bytes must be above 0, not {need} (a gateway leases only from agents its "
                             "plan puts something on); " + shape)
        return model, need

    async def _lease(self, request: web.Request) -> web.Response:
        model, need = await self._lease_request(request)
        peer = request.remote or ""
        async with self._lock:
            if len(self.leases) >= self.max_leases:
                raise LeaseLimit(f"this agent already lends {len(self.leases)} rpc servers, its limit (--max-leases "
                                 f"{self.max_leases}); wait for one to be released, or raise --max-leases")
            held = sum(1 for lease in self.leases.values() if lease.peer == peer)
            if held >= self.max_leases_per_address:
                raise LeaseLimit(f"{peer} already holds {held} rpc servers of this agent, the limit per address "
                                 f"(--max-leases-per-address {self.max_leases_per_address}); release one, or raise "
                                 "the limit")
            free = self.offer_bytes - self.leased_bytes()
            if need > free:
                raise AgentRefused(f"this agent offers {format_bytes(self.offer_bytes)}, of which "
                                   f"{format_bytes(max(free, 0))} are not leased; {model!r} needs "
                                   f"{format_bytes(need)} here")
            lease = await self._start(model, peer, need)
        log.info(f"lease {lease.id}: {model} for {peer}, rpc server pid {lease.host.server_pid} "
                 f"({lease.host.isolation}), relay port {lease.relay_port}, {format_bytes(need)}")
        if lease.host.isolation != ISOLATED and not self._warned_unisolated:
            self._warned_unisolated = True
            log.warning(f"rpc servers are not isolated: {lease.host.isolation}")
        return web.json_response({"id": lease.id, "port": lease.relay_port, "secret": lease.secret.hex(),
                                  "renew_seconds": self.lease_seconds / 3, "lease_seconds": self.lease_seconds},
                                 status=201)

    def _held_lease(self, request: web.Request) -> RpcLease:
        """The lease the path names, if the caller is its lessee (no one else may renew or end it)."""
        lease_id = request.match_info["id"]
        lease = self.leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(f"no lease {lease_id} (it expired, or the agent restarted)")
        if request.remote != lease.peer:
            raise NotTheLessee(f"lease {lease_id} belongs to {lease.peer}; {request.remote} may not renew or "
                               "release it")
        return lease

    async def _renew(self, request: web.Request) -> web.Response:
        lease = self._held_lease(request)
        lease.expires_at = time.monotonic() + self.lease_seconds
        return web.json_response(lease.describe())

    async def _release(self, request: web.Request) -> web.Response:
        lease = self._held_lease(request)
        await self._end(lease, "released by its gateway")
        return web.json_response(lease.describe())

    # -- rpc servers and relays ---------------------------------------------------

    def rpc_server_argv(self, port: int) -> list[str]:
        """The one place an rpc server's command line is written: loopback only, the relay fronts it."""
        return [self.rpc_server, "-H", "127.0.0.1", "-p", str(port), *(["-t", str(self.threads)] if self.threads else [])]

    async def _start(self, model: str, peer: str, need: int) -> RpcLease:
        lease_id = f"{next(self._ids)}-{secrets.token_hex(4)}"
        for attempt in range(PORT_ATTEMPTS):
            # ggml-rpc-server takes no port 0. In a namespace of its own any port is free; on this machine's
            # loopback a port the kernel just handed out is rarely taken again at once, and a server that
            # lost the race exits: try another port then
            port = unused_port()
            try:
                host = await RpcHost.spawn(self.rpc_server_argv(port), port)
            except OSError as exc:
                raise AgentRefused(f"cannot run the rpc server {self.rpc_server!r}: {exc}", status=500) from None
            self._janitor.register(host.process.pid)
            lease = RpcLease(lease_id, model, peer, need, host, secrets.token_bytes(SECRET_BYTES),
                             time.monotonic() + self.lease_seconds)
            self.leases[lease_id] = lease
            try:
                await host.wait_ready()
                lease.relay = await asyncio.start_server(lambda r, w: self._relay(lease, r, w), self.listen_host, 0)
                lease.relay_port = lease.relay.sockets[0].getsockname()[1]
                return lease
            except RpcServerFailed as exc:
                await self._end(lease, "its rpc server did not start")
                if attempt == PORT_ATTEMPTS - 1:
                    raise AgentRefused(str(exc), status=500) from None
            except BaseException:
                await self._end(lease, "its rpc server did not start")
                raise
        raise AssertionError("unreachable")

    async def _relay(self, lease: RpcLease, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        if peer != lease.peer:
            self._refuse(lease, writer, f"refused a connection from {peer}; it belongs to {lease.peer}")
            return
        if not same_secret(await read_secret(reader), lease.secret):
            self._refuse(lease, writer, f"refused a connection from {peer} that did not begin with the lease's secret")
            return
        try:
            server = await lease.host.connect()
        except OSError as exc:
            log.warning(f"lease {lease.id}: cannot reach its rpc server: {exc}")
            writer.close()
            return
        await splice((reader, writer), server, lease.connections, lease.moved)

    @staticmethod
    def _refuse(lease: RpcLease, writer: asyncio.StreamWriter, why: str) -> None:
        lease.refused_connections += 1
        log.warning(f"lease {lease.id}: {why}")
        writer.close()

    async def _end(self, lease: RpcLease, why: str) -> None:
        if self.leases.pop(lease.id, None) is None:
            return
        if lease.relay is not None:
            lease.relay.close()
        for task in list(lease.connections):
            task.cancel()  # a lease that ends cuts its connections: the gateway's llama-server sees it at once
        await lease.host.stop()
        self._janitor.unregister(lease.host.process.pid)
        log.info(f"lease {lease.id} ({lease.model}) ended: {why}; moved {lease.bytes_to_server} bytes to and "
                 f"{lease.bytes_from_server} bytes from its rpc server")
