"""The way from a gateway's llama-server to an agent's rpc server: byte pipes, and the lease's secret.

llama.cpp's RPC protocol has no authentication of its own, so every connection to an agent's relay
begins with the lease's secret: the gateway's forwarder (which llama-server's `--rpc` points at)
writes it first, and the relay connects nothing until it has read and compared it (README
"Security").
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

SECRET_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0  # seconds a relay waits for the secret before it closes the connection
CHUNK = 1 << 20

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def no_delay(writer: asyncio.StreamWriter) -> None:
    """RPC is one small message after another: no Nagle delays."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def read_secret(reader: asyncio.StreamReader) -> bytes:
    """The first SECRET_BYTES of a connection (b"" when they do not come in time or the peer closes)."""
    try:
        return await asyncio.wait_for(reader.readexactly(SECRET_BYTES), HANDSHAKE_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
        return b""


async def splice(client: Stream, server: Stream, connections: set[asyncio.Task[None]],
                 moved: Callable[[int, bool], None] | None = None) -> None:
    """Copy bytes both ways until either side closes, then close both. The calling task is in
    `connections` meanwhile (cancelling it cuts both sides: how a lease that ends cuts its connections);
    `moved(count, to_server)` hears of every chunk."""

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_server: bool) -> None:
        try:
            while chunk := await src.read(CHUNK):
                dst.write(chunk)
                if moved is not None:
                    moved(len(chunk), to_server)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    for _, writer in (client, server):
        no_delay(writer)
    task = asyncio.current_task()
    assert task is not None
    connections.add(task)
    try:
        await asyncio.gather(pipe(client[0], server[1], True), pipe(server[0], client[1], False))
    finally:
        connections.discard(task)
        client[1].close()
        server[1].close()
