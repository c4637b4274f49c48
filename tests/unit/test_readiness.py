"""Noticing a starting model server's readiness (runtime/readiness.py): when berth asks, and that only the
health endpoint's answer decides."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from berth.runtime.readiness import MAX_INTERVAL, MIN_INTERVAL, check_interval, wait_healthy


def test_checks_come_fast_after_the_spawn_and_back_off_with_the_time_the_start_takes():
    assert check_interval(0.0) == MIN_INTERVAL
    assert check_interval(0.4) == 0.4 * 0.05  # a twentieth of the time so far
    assert check_interval(600.0) == MAX_INTERVAL
    intervals = [check_interval(t / 10) for t in range(200)]
    assert intervals == sorted(intervals)


async def test_output_is_only_a_reason_to_ask_again_a_200_from_the_health_endpoint_decides():
    answers: list[int] = []
    keys: set[str | None] = set()
    ready = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        keys.add(request.headers.get("Authorization"))
        answers.append(200 if ready.is_set() else 503)
        return web.Response(status=answers[-1])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    output = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            # spawned long ago: without output, the next check would be MAX_INTERVAL away
            waiting = asyncio.create_task(wait_healthy(session, f"http://127.0.0.1:{port}/health",
                                                       {"Authorization": "Bearer server-key"}, output,
                                                       loop.time() - 3600))
            while not answers:
                await asyncio.sleep(0.001)
            output.set()  # the server wrote something, but is not ready yet: a check, a 503, still waiting
            while len(answers) < 2:
                await asyncio.sleep(0.001)
            assert not waiting.done()
            ready.set()
            output.set()  # "model loaded"
            await asyncio.wait_for(waiting, 30)
    finally:
        await runner.cleanup()
    assert answers[:2] == [503, 503] and answers[-1] == 200
    assert keys == {"Bearer server-key"}  # the server's key on every check
