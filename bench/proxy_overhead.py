"""Proxy overhead: a trivial fast upstream reached directly vs through berth, in one run.

The upstream is the test suite's fake model server (aiohttp, answers a small
JSON body at once). For concurrency 1 and 32, requests alternate in blocks
between direct and through-berth, so machine noise hits both. Prints p50/p99
latency, the latency berth adds, and requests/s.

    python bench/proxy_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _berth import free_port, running_berth

FAKE = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_model_server.py"
BODY = {"model": "fast", "prompt": "hi", "max_tokens": 1}


async def run_block(session: aiohttp.ClientSession, url: str, count: int,
                    concurrency: int) -> tuple[list[float], float]:
    """(latencies of `count` POSTs at `concurrency`, wall seconds)."""
    latencies: list[float] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            async with session.post(url + "/v1/completions", json=BODY) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


async def measure(direct: str, berth: str, requests: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await run_block(session, berth, 200, 4)  # start the model and warm both paths
        await run_block(session, direct, 200, 4)
        print(f"{'concurrency':>11} {'path':>14} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for concurrency in (1, 32):
            results: dict[str, tuple[list[float], float]] = {"direct": ([], 0.0), "through berth": ([], 0.0)}
            block = max(requests // 10, concurrency)
            for _ in range(10):
                for name, url in (("direct", direct), ("through berth", berth)):
                    lat, wall = await run_block(session, url, block, concurrency)
                    results[name] = (results[name][0] + lat, results[name][1] + wall)
            for name, (lat, wall) in results.items():
                print(f"{concurrency:>11} {name:>14} {pct(lat, 50):>8.3f} {pct(lat, 99):>8.3f} {len(lat) / wall:>8.0f}")
            d, b = results["direct"], results["through berth"]
            print(f"{concurrency:>11} {'berth adds':>14} {pct(b[0], 50) - pct(d[0], 50):>8.3f} "
                  f"{pct(b[0], 99) - pct(d[0], 99):>8.3f} {len(b[0]) / b[1] / (len(d[0]) / d[1]):>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per path and concurrency")
    args = parser.parse_args()
    upstream_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="berth-proxybench-"))
    (workdir / "config.yaml").write_text(
        f"models:\n  fast:\n    concurrencyLimit: 1000\n    proxy: http://127.0.0.1:{upstream_port}\n"
        f"    cmd: {sys.executable} {FAKE} --port {upstream_port} --name fast\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load generator, berth and upstream share the machine")
    with running_berth(workdir / "config.yaml", None, "--log-level", "warning") as berth_url:
        asyncio.run(measure(f"http://127.0.0.1:{upstream_port}", berth_url, args.requests))


if __name__ == "__main__":
    main()
