"""Fairness between API keys: does a busy key starve a quiet one at a shared model? (issue 27)

One model whose server works on 4 requests at a time (the test suite's stand-in with `--at-once 4`)
behind berth with two keys. Key B sends one request at a time; first alone, then while key A keeps 16
requests going. B's wait is the time from sending a request to having its answer. Answers take
`--service` seconds each ("equal": A's four finish together, just before B's next request arrives, the
worst case for B), or a time drawn between 0.5x and 1.5x of it ("varied", seeded; answers of different
lengths). Two berths side by side in one run:

- `parallel: 4` (what berth does by default for a llama.cpp server: its `-np`): berth sends the server
  at most 4 requests and the rest wait in berth, where keys take turns;
- `parallel: 0`: berth sends every request on and the server queues them in arrival order.

    python bench/fairness.py [--service 0.25] [--requests 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _berth import running_berth

FAKE = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_model_server.py"
KEY_A, KEY_B = "bench-key-a", "bench-key-b"


def config(parallel: int, port: int) -> str:
    return f"""
startPort: {port}
apiKeys:
  - {{name: a, key: {KEY_A}}}
  - {{name: b, key: {KEY_B}}}
models:
  m:
    cmd: {sys.executable} {FAKE} --port ${{PORT}} --name m --at-once 4
    parallel: {parallel}
    concurrencyLimit: 100
"""


async def ask(session: aiohttp.ClientSession, url: str, key: str, service: float) -> float:
    began = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                  "sleep": service}) as response:
        await response.read()
        assert response.status == 200, (response.status, await response.text())
    return time.perf_counter() - began


async def b_waits(url: str, service: float, varied: bool, count: int, busy_a: bool) -> tuple[list[float], int]:
    """B's waits for `count` requests one at a time, with A at concurrency 16 or idle; and A's answers."""
    draw = random.Random(27)

    def service_time() -> float:
        return service * (0.5 + draw.random()) if varied else service

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await ask(session, url, KEY_B, 0)  # the model is loaded
        stop = asyncio.Event()
        a_answers = 0

        async def key_a() -> None:
            nonlocal a_answers
            while not stop.is_set():
                await ask(session, url, KEY_A, service_time())
                a_answers += 1

        a_tasks = [asyncio.create_task(key_a()) for _ in range(16 if busy_a else 0)]
        await asyncio.sleep(2 * service if busy_a else 0)  # A's queue fills up
        waits = [await ask(session, url, KEY_B, service_time()) for _ in range(count)]
        stop.set()
        await asyncio.gather(*a_tasks)
        return waits, a_answers


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", type=float, default=0.25, help="seconds the stand-in takes per answer")
    parser.add_argument("--requests", type=int, default=30, help="B's requests per phase")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; stand-in serves 4 "
          f"at a time, {args.service * 1000:.0f} ms per answer; B sends {args.requests} requests one at a time")
    print(f"{'answers':<8} {'berth':<34} {'B alone p50':>12} {'B beside A p50':>15} {'ratio':>6} "
          f"{'B p90 beside A':>15} {'A answers/s':>12}")
    with tempfile.TemporaryDirectory() as home:
        for varied in (False, True):
            for parallel, label in ((4, "parallel: 4 (keys take turns)"), (0, "parallel: 0 (server's own queue)")):
                path = Path(home) / f"config-{parallel}.yaml"
                path.write_text(config(parallel, 26000 + parallel * 10))
                with running_berth(path, {"BERTH_HOME": str(Path(home) / f"home-{parallel}")}) as url:
                    alone, _ = await b_waits(url, args.service, varied, args.requests, busy_a=False)
                    began = time.perf_counter()
                    beside, a_answers = await b_waits(url, args.service, varied, args.requests, busy_a=True)
                    a_rate = a_answers / (time.perf_counter() - began)
                p90 = statistics.quantiles(beside, n=10)[-1] * 1000
                print(f"{'varied' if varied else 'equal':<8} {label:<34} {p50(alone):>9.0f} ms {p50(beside):>12.0f} ms "
                      f"{p50(beside) / p50(alone):>6.2f} {p90:>12.0f} ms {a_rate:>12.1f}")


if __name__ == "__main__":
    asyncio.run(main())
