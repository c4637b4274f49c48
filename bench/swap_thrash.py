"""Swap thrash: two models that cannot be resident together, requests for them alternating.

Two stand-in model servers (tests/support/fake_model_server.py, a 1.5 s load before /health answers,
each answer takes --answer seconds) declared with 700 MiB each in a 1 GiB budget, so only one runs at
a time. Requests A, B, A, B, ... are sent every --every seconds whatever the answers (several users at
once, not one client waiting for each answer), a fixed count. One berth per queue policy, one after
another in this run:

- fifo: `maxWait: 0, minResidency: 0`, plain arrival order (berth before batching);
- batched: the defaults, `maxWait: 30, minResidency: 10`;
- short: `maxWait: 3, minResidency: 1`, where a model that keeps getting work must still yield.

Prints per policy the starts (from the stand-ins' own start log), p50 / p99 latency (send to answer),
the longest wait (latency less the answer's own time) and the bound a wait must stay under: maxWait
plus one swap (an answer in flight, the stop, a start), with the fresh model's residency where that
is longer (scheduler/DESIGN.md).

    python bench/swap_thrash.py [--requests 40] [--every 0.1] [--answer 0.5] [--load 1.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from _berth import running_berth

from berth.bench.stats import percentile

FAKE = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_model_server.py"
POLICIES = {"fifo": (0, 0), "batched": (30, 10), "short": (3, 1)}
STOP_ALLOWANCE = 1.0  # seconds a stand-in may take to exit after SIGTERM (it exits at once; generous)


def config(workdir: Path, max_wait: float, min_residency: float, load: float) -> Path:
    starts = workdir / "starts.log"
    models = "".join(
        f'  {name}:\n'
        f'    cmd: "{sys.executable} {FAKE} --port ${{PORT}} --name {name} --load-delay {load} --start-log {starts}"\n'
        f'    memory: {{ram: 700MiB}}\n'
        f'    kvPersistence: false\n'
        f'    concurrencyLimit: 1000\n'
        for name in ("a", "b"))
    path = workdir / f"berth-{max_wait:g}-{min_residency:g}.yaml"
    path.write_text(f"maxWait: {max_wait}\nminResidency: {min_residency}\nhealthCheckTimeout: 60\n"
                    f"memory: {{budget: {{ram: 1GiB}}, headroom: 0}}\nmodels:\n{models}")
    return path


def run(url: str, count: int, every: float, answer: float) -> list[float]:
    latencies: list[float] = [0.0] * count
    failures: list[str] = []

    def send(i: int) -> None:
        began = time.perf_counter()
        try:
            r = requests.post(url + "/v1/chat/completions", timeout=600, json={
                "model": "ab"[i % 2], "messages": [{"role": "user", "content": f"request {i}"}], "sleep": answer})
            r.raise_for_status()
        except requests.RequestException as exc:
            failures.append(f"request {i}: {exc}")
        latencies[i] = time.perf_counter() - began

    threads = []
    t0 = time.perf_counter()
    for i in range(count):
        time.sleep(max(0.0, t0 + i * every - time.perf_counter()))  # on the clock, whatever the answers
        thread = threading.Thread(target=send, args=(i,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit("requests failed:\n" + "\n".join(failures[:5]))
    return latencies


def load_seconds(url: str) -> float:
    """The mean start time berth measured (spawn to healthy), from its /metrics."""
    total = count = 0.0
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("berth_model_load_duration_seconds_sum"):
            total += float(line.split()[-1])
        elif line.startswith("berth_model_load_duration_seconds_count"):
            count += float(line.split()[-1])
    return total / count if count else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--every", type=float, default=0.1, help="seconds between requests")
    parser.add_argument("--answer", type=float, default=0.5, help="seconds each answer takes")
    parser.add_argument("--load", type=float, default=1.5, help="seconds a stand-in loads before it is healthy")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = parser.parse_args()
    results = {}
    for name in args.policies:
        max_wait, min_residency = POLICIES[name]
        with tempfile.TemporaryDirectory(prefix="berth-thrash-") as tmp:
            workdir = Path(tmp)
            berth_config = config(workdir, max_wait, min_residency, args.load)
            with running_berth(berth_config, {"BERTH_HOME": str(workdir)}) as url:
                latencies = run(url, args.requests, args.every, args.answer)
                start = load_seconds(url)
            starts = len((workdir / "starts.log").read_text().splitlines())
        swap = args.answer + STOP_ALLOWANCE + start
        bound = max(max_wait, swap + min_residency) + swap
        results[name] = {"max_wait": max_wait, "min_residency": min_residency, "starts": starts,
                         "p50": statistics.median(latencies), "p99": percentile(latencies, 99),
                         "max_wait_seen": max(latencies) - args.answer, "bound": bound, "start_s": start}
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(f"\n{args.requests} requests A,B,A,B... every {args.every:g}s, answers {args.answer:g}s, "
          f"stand-ins load {args.load:g}s (berth measured a start at "
          f"{statistics.mean(r['start_s'] for r in results.values()):.2f}s on average)\n")
    print("| policy | maxWait / minResidency | starts | p50 latency | p99 latency | longest wait | bound "
          "(maxWait + one swap) | starts vs fifo |")
    print("|---|---|---|---|---|---|---|---|")
    fifo = results.get("fifo")
    for name, r in results.items():
        ratio = f"{fifo['starts'] / r['starts']:.1f}x fewer" if fifo and name != "fifo" else "-"
        print(f"| {name} | {r['max_wait']:g} s / {r['min_residency']:g} s | {r['starts']} | {r['p50']:.1f} s | "
              f"{r['p99']:.1f} s | {r['max_wait_seen']:.1f} s | {r['bound']:.1f} s | {ratio} |")


if __name__ == "__main__":
    main()
