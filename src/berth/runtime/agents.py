"""The gateway's side of `berth agent`: what each agent offers, and the rpc servers one run leases.

A model with `rpc:` leases one rpc server from each agent its plan puts something on before its
llama-server starts, renews the leases while it runs (an agent stops a server whose lease is not
renewed), and releases them when it stops. llama-server reaches each server through a forwarder on
this machine's loopback that presents the lease's secret to the agent's relay (runtime/relay.py).
A renewal that fails means the agent or the way to it is gone: the model is stopped, and the error
its requests get names the agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp

from berth.config import RpcSpec
from berth.core.errors import BerthError
from berth.core.procfs import holds_connection
from berth.core.units import format_bytes, rpc_device
from berth.engine.rpc import RpcTargets
from berth.runtime.relay import splice

log = logging.getLogger("berth.runtime")

INVENTORY_PATH = "/v1/inventory"
LEASES_PATH = "/v1/leases"
ASK_TIMEOUT = aiohttp.ClientTimeout(total=5)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2)
LEASE_TIMEOUT = aiohttp.ClientTimeout(total=30)  # the agent starts its rpc server before it answers


class AgentRefused(BerthError):
    """An agent said no to a lease (not enough memory, or its rpc server would not start)."""

    error_type = "server_error"
    code = "rpc_agent_refused"

    def __init__(self, message: str, status: int = 507) -> None:
        super().__init__(message)
        self.status = status


class AgentFailure(Exception):
    """An agent that cannot be reached or refused; the message names it and says what to do."""


def _headers(rpc: RpcSpec) -> dict[str, str]:
    return {"Authorization": f"Bearer {rpc.api_key}"} if rpc.api_key else {}


def _url(agent: str, path: str) -> str:
    return f"http://{agent}{path}"


async def _answer(resp: aiohttp.ClientResponse, agent: str) -> dict:
    if resp.status == 401:
        raise AgentFailure(f"rpc agent {agent} refused the key: give rpc.apiKey the key its `berth agent` was "
                           "started with (--api-key)")
    body = await resp.json(content_type=None)
    if resp.status >= 400:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise AgentFailure(f"rpc agent {agent} answered HTTP {resp.status}: {message or body}")
    return body


def _unreachable(agent: str, exc: BaseException) -> AgentFailure:
    why = str(exc) or type(exc).__name__
    return AgentFailure(f"rpc agent {agent} is unreachable ({why}); start `berth agent --listen {agent}` there, "
                        "or check the network between this machine and it")


class AgentDirectory:
    """What each agent offers, as last asked (the planner's budgets and the placement's shares)."""

    def __init__(self) -> None:
        self.offers: dict[str, int] = {}

    async def refresh(self, session: aiohttp.ClientSession, specs: Iterable[RpcSpec]) -> None:
        """Ask every agent of `specs` once; an agent that does not answer keeps no offer."""
        wanted = {agent: rpc for rpc in specs for agent in rpc.agents}

        async def ask(agent: str, rpc: RpcSpec) -> None:
            try:
                async with session.get(_url(agent, INVENTORY_PATH), headers=_headers(rpc),
                                       timeout=ASK_TIMEOUT) as resp:
                    self.offers[agent] = int((await _answer(resp, agent))["offer_bytes"])
            except (AgentFailure, aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
                self.offers.pop(agent, None)
                log.warning(f"rpc agent {agent}: no inventory ({exc}); models on it start once it answers")

        await asyncio.gather(*(ask(agent, rpc) for agent, rpc in wanted.items()))

    def offers_for(self, rpc: RpcSpec) -> tuple[int, ...]:
        return tuple(self.offers.get(agent, 0) for agent in rpc.agents)

    def planned_targets(self, rpc: RpcSpec | None) -> RpcTargets | None:
        """A split as planned before anything is leased: each agent's address stands for its server,
        shares by what the agents offer; None for a model without `rpc:`."""
        return RpcTargets.as_configured(rpc, self.offers_for(rpc)) if rpc is not None else None

    def budgets(self) -> dict[str, int]:
        return {rpc_device(agent): offer for agent, offer in self.offers.items()}


@dataclass
class _Lease:
    """One agent's rpc server for this run, and the forwarder on this machine's loopback that llama-server's
    `--rpc` points at: it writes the lease's secret before anything else, then relays both ways."""

    id: str
    relay: tuple[str, int]  # the agent's relay (its host, the leased port)
    secret: bytes
    forwarder: asyncio.base_events.Server | None = None
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        assert self.forwarder is not None
        return f"127.0.0.1:{self.forwarder.sockets[0].getsockname()[1]}"


class AgentLeases:
    """The rpc servers of one run of one model: one from each agent its plan puts something on.

    `lessee` is the model server's pid once it runs: the forwarders connect only its own connections
    (any other process on this machine's loopback is refused, with a warning in the log).
    """

    def __init__(self, session: aiohttp.ClientSession, model: str, rpc: RpcSpec,
                 lessee: Callable[[], int | None]) -> None:
        self._session, self.model, self.rpc, self._lessee = session, model, rpc, lessee
        self.leases: dict[str, _Lease] = {}  # agent -> its lease
        self.renew_seconds = 5.0

    @property
    def endpoints(self) -> tuple[str | None, ...]:
        """Where llama-server reaches each agent's rpc server (`--rpc`), in rpc.agents order: the forwarder
        for it on this machine; None for an agent this run leases nothing from."""
        return tuple(lease.endpoint if (lease := self.leases.get(agent)) else None for agent in self.rpc.agents)

    async def acquire(self, needs: dict[str, int]) -> None:
        """Lease a server from every agent the plan puts bytes on (or none: a refusal releases the others)."""
        wanted = {agent: needs.get(rpc_device(agent), 0) for agent in self.rpc.agents}
        wanted = {agent: need for agent, need in wanted.items() if need > 0}
        if not wanted:
            raise AgentFailure(f"the memory plan of {self.model!r} puts nothing on its rpc agents "
                               f"({', '.join(self.rpc.agents)}), so there is nothing to lease; `berth fit "
                               f"{self.model}` shows the plan (a model file that could not be read leaves it "
                               "unknown)")
        results = await asyncio.gather(*(self._lease(agent, need) for agent, need in wanted.items()),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.release()
            raise AgentFailure("; ".join(map(str, failures)))

    async def _lease(self, agent: str, need: int) -> None:
        try:
            async with self._session.post(_url(agent, LEASES_PATH), json={"model": self.model, "need_bytes": need},
                                          headers=_headers(self.rpc), timeout=LEASE_TIMEOUT) as resp:
                body = await _answer(resp, agent)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _unreachable(agent, exc) from None
        if not isinstance(body.get("secret"), str):
            raise AgentFailure(f"rpc agent {agent} hands out no lease secret: it runs an older berth; update it")
        lease = _Lease(str(body["id"]), (agent.rpartition(":")[0].strip("[]"), int(body["port"])),
                       bytes.fromhex(body["secret"]))
        self.leases[agent] = lease
        lease.forwarder = await asyncio.start_server(lambda r, w: self._forward(lease, r, w), "127.0.0.1", 0)
        self.renew_seconds = min(self.renew_seconds, float(body.get("renew_seconds", 5.0)))
        log.info(f"{self.model}: rpc agent {agent} lent a server at port {body['port']} ({format_bytes(need)}), "
                 f"reached through {lease.endpoint}")

    async def _forward(self, lease: _Lease, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, ours = writer.get_extra_info("peername")[:2], writer.get_extra_info("sockname")[:2]
        lessee = self._lessee()
        if lessee is None or not await asyncio.to_thread(holds_connection, lessee, peer, ours):
            log.warning(f"{self.model}: refused a connection to the rpc forwarder {lease.endpoint} from "
                        f"{peer[0]}:{peer[1]}: not the model's own server process")
            writer.close()
            return
        try:
            server = await asyncio.open_connection(*lease.relay)
        except OSError:
            writer.close()
            return
        server[1].write(lease.secret)
        await splice((reader, writer), server, lease.connections)

    async def until_lost(self) -> str:
        """Renew the leases until one cannot be renewed; return what happened (naming the agent)."""
        while True:
            await asyncio.sleep(self.renew_seconds)
            for agent, lease in list(self.leases.items()):
                try:
                    async with self._session.post(_url(agent, f"{LEASES_PATH}/{lease.id}/renew"), json={},
                                                  headers=_headers(self.rpc), timeout=PROBE_TIMEOUT) as resp:
                        if resp.status == 404:
                            return (f"rpc agent {agent} no longer holds this model's rpc server (it restarted or "
                                    "its lease expired)")
                        await _answer(resp, agent)
                except AgentFailure as exc:
                    return str(exc)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    return str(_unreachable(agent, exc))

    async def diagnose(self) -> str | None:
        """Which agent is gone, if one is: asked when the model server fails."""
        for agent in self.rpc.agents:
            try:
                async with self._session.get(_url(agent, "/health"), timeout=PROBE_TIMEOUT) as resp:
                    if resp.status != 200:
                        return f"rpc agent {agent} answers HTTP {resp.status} to /health"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return str(_unreachable(agent, exc))
        return None

    async def release(self) -> None:
        async def end(agent: str, lease: _Lease) -> None:
            if lease.forwarder is not None:
                lease.forwarder.close()
            for task in list(lease.connections):
                task.cancel()
            try:
                async with self._session.delete(_url(agent, f"{LEASES_PATH}/{lease.id}"), headers=_headers(self.rpc),
                                                timeout=PROBE_TIMEOUT):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # an agent that cannot be told stops the server when the lease runs out

        leases, self.leases = self.leases, {}
        await asyncio.gather(*(end(agent, lease) for agent, lease in leases.items()))
