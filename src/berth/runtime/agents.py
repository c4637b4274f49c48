"""The gateway's side of `berth agent`: what each agent offers, and the rpc servers one run leases.

A model with `rpc:` leases one rpc server from each of its agents before its llama-server starts,
renews the leases while it runs (an agent stops a server whose lease is not renewed), and releases
them when it stops. A renewal that fails means the agent or the way to it is gone: the model is
stopped, and the error its requests get names the agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import aiohttp

from berth.config import RpcSpec
from berth.core.errors import BerthError
from berth.core.units import format_bytes, rpc_device
from berth.engine.rpc import RpcTargets

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
        raise AgentFailure(f"rpc agent {agent} refused the key: give rpc.apiKey (or apiKeys) the key its "
                           "`berth agent` was started with")
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


class AgentLeases:
    """The rpc servers of one run of one model, one per agent."""

    def __init__(self, session: aiohttp.ClientSession, model: str, rpc: RpcSpec) -> None:
        self._session, self.model, self.rpc = session, model, rpc
        self.leases: dict[str, tuple[str, int]] = {}  # agent -> (lease id, relay port)
        self.renew_seconds = 5.0

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Where llama-server reaches each agent's rpc server (`--rpc`), in rpc.agents order."""
        return tuple(f"{agent.rpartition(':')[0]}:{self.leases[agent][1]}" for agent in self.rpc.agents)

    async def acquire(self, needs: dict[str, int]) -> None:
        """Lease a server from every agent (or none: a refusal releases the others)."""
        results = await asyncio.gather(*(self._lease(agent, needs.get(rpc_device(agent), 0))
                                         for agent in self.rpc.agents), return_exceptions=True)
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
        self.leases[agent] = (str(body["id"]), int(body["port"]))
        self.renew_seconds = min(self.renew_seconds, float(body.get("renew_seconds", 5.0)))
        log.info(f"{self.model}: rpc agent {agent} lent a server at port {body['port']} ({format_bytes(need)})")

    async def until_lost(self) -> str:
        """Renew the leases until one cannot be renewed; return what happened (naming the agent)."""
        while True:
            await asyncio.sleep(self.renew_seconds)
            for agent, (lease_id, _) in list(self.leases.items()):
                try:
                    async with self._session.post(_url(agent, f"{LEASES_PATH}/{lease_id}/renew"),
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
        async def end(agent: str, lease_id: str) -> None:
            try:
                async with self._session.delete(_url(agent, f"{LEASES_PATH}/{lease_id}"), headers=_headers(self.rpc),
                                                timeout=PROBE_TIMEOUT):
                    pass
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass  # an agent that cannot be told stops the server when the lease runs out

        leases, self.leases = self.leases, {}
        await asyncio.gather(*(end(agent, lease_id) for agent, (lease_id, _) in leases.items()))
