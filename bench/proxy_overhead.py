"""Proxy overhead: a trivial fast upstream reached directly, through berth and through LiteLLM, in one run.

The upstream is the test suite's fake model server (aiohttp, answers a small
chat completion at once). For concurrency 1 and 32, requests alternate in
blocks between the paths, so machine noise hits all of them. Prints p50/p99
latency, the latency each proxy adds, and requests/s relative to direct.

LiteLLM's proxy runs from its own virtual environment (its pins clash with
berth's), with its remote cost map and telemetry off:

    python -m venv .litellm && .litellm/bin/pip install 'litellm[proxy]'
    python bench/proxy_overhead.py [--requests 2000] [--litellm .litellm/bin/litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from _berth import free_port, running_berth, wait_healthy

BENCH_KEY = "sk-berth-bench-" + "0123456789abcdef" * 2  # LiteLLM's master key; the others ignore it
HEADERS = {"Authorization": f"Bearer {BENCH_KEY}"}
FAKE = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_model_server.py"
BODY = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


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
            async with session.post(url + "/v1/chat/completions", json=BODY, headers=HEADERS) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


async def measure(paths: dict[str, str], requests: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # berth first: its request starts the upstream (berth owns that process)
        for name in sorted(paths, key=lambda n: n != "through berth"):
            await run_block(session, paths[name], 200, 4)
        print(f"{'concurrency':>11} {'path':>16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for concurrency in (1, 32):
            results: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in paths}
            block = max(requests // 10, concurrency)
            for _ in range(10):
                for name, url in paths.items():
                    lat, wall = await run_block(session, url, block, concurrency)
                    results[name] = (results[name][0] + lat, results[name][1] + wall)
            for name, (lat, wall) in results.items():
                print(f"{concurrency:>11} {name:>16} {pct(lat, 50):>8.3f} {pct(lat, 99):>8.3f} {len(lat) / wall:>8.0f}")
            d = results["direct"]
            for name in list(paths)[1:]:
                p = results[name]
                print(f"{concurrency:>11} {name.replace('through ', '') + ' adds':>16} "
                      f"{pct(p[0], 50) - pct(d[0], 50):>8.3f} {pct(p[0], 99) - pct(d[0], 99):>8.3f} "
                      f"{len(p[0]) / p[1] / (len(d[0]) / d[1]):>7.2f}x")


@contextmanager
def running_litellm(binary: str | None, upstream: str, workdir: Path) -> Iterator[str | None]:
    if binary is None:
        yield None
        return
    config = workdir / "litellm.yaml"
    config.write_text("model_list:\n  - model_name: fast\n    litellm_params:\n      model: openai/fast\n"
                      f"      api_base: {upstream}/v1\n      api_key: none\n")
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_MASTER_KEY": BENCH_KEY}
    proxy = subprocess.Popen([binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/health/liveliness", proxy, "LiteLLM", 120)
        yield url
    finally:
        proxy.terminate()
        proxy.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per path and concurrency")
    parser.add_argument("--litellm", help="the `litellm` proxy executable (e.g. .litellm/bin/litellm)")
    args = parser.parse_args()
    upstream_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="berth-proxybench-"))
    (workdir / "config.yaml").write_text(
        f"models:\n  fast:\n    concurrencyLimit: 1000\n    proxy: http://127.0.0.1:{upstream_port}\n"
        f"    cmd: {sys.executable} {FAKE} --port {upstream_port} --name fast\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load generator, berth and upstream share the machine")
    direct = f"http://127.0.0.1:{upstream_port}"
    with running_berth(workdir / "config.yaml", None, "--log-level", "warning") as berth_url:
        paths = {"direct": direct, "through berth": berth_url}
        with running_litellm(args.litellm, direct, workdir) as litellm_url:
            if litellm_url:
                paths["through LiteLLM"] = litellm_url
            asyncio.run(measure(paths, args.requests))


if __name__ == "__main__":
    main()
