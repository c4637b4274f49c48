"""berth on asyncio's event loop against berth on uvloop's, side by side in one run.

    python bench/event_loop_ab.py [--rounds 6] [--concurrency 1,8,32]

Two berths, one with BERTH_EVENT_LOOP=asyncio (A) and one with BERTH_EVENT_LOOP=uvloop (B), each in
front of its own GPU-speed stand-in (the same settings as bench/proxy_speed.py's), are sent the same
request list interleaved by round (A, B, A, B ...: `berth bench --compare`'s runner), so the machine's
noise falls on both. Prints, per concurrency: TTFT p50 of each, out tok/s ratio B/A (median of the rounds,
min-max) and each berth's CPU time per streamed token (/proc/PID/stat over the phase).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _berth import berth_process, free_port
from proxy_speed import PROMPT, _load, _spread, cpu_seconds, ms, stand_in_cmd

from berth.bench import report
from berth.bench.runner import BenchSettings, run

LOOPS = ("asyncio", "uvloop")


async def phase(urls: dict[str, str], pids: dict[str, int], concurrency: int, args: argparse.Namespace) -> str:
    requests = max(20, 8 * concurrency)
    settings = BenchSettings(urls["asyncio"], ["gpu-speed"], requests, [concurrency], [PROMPT], args.max_tokens,
                             compare_url=urls["uvloop"], rounds=args.rounds, timeout=120)
    cpu = {loop: cpu_seconds(pid) for loop, pid in pids.items()}
    records = await run(settings)
    cpu = {loop: cpu_seconds(pid) - cpu[loop] for loop, pid in pids.items()}
    [compared] = report.compare(records)
    tokens = {t: sum(r.output_tokens for r in records if r.target == t and r.ok) for t in ("A", "B")}
    errors = sum(1 for r in records if not r.ok)
    per_token = [cpu[loop] / tokens[t] * 1e6 if tokens[t] else float("nan") for loop, t in zip(LOOPS, "AB")]
    return (f"| {concurrency} | {compared['pairs']}/{requests * args.rounds} | "
            f"{ms(compared['A']['ttft_p50']):.2f} / {ms(compared['B']['ttft_p50']):.2f} | "
            f"{_spread(compared['ratio']['output_tokens_per_s'])} | {per_token[0]:.1f} / {per_token[1]:.1f} | "
            f"{errors} |")


async def measure(args: argparse.Namespace) -> list[str]:
    lines = [f"berth on asyncio (A) and on uvloop (B), {args.rounds} rounds, {args.max_tokens} tokens per request", "",
             "| conc | pairs | TTFT p50 A / B (ms) | tok/s B/A | berth CPU µs/token A / B | errors |",
             "|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="berth-loops-") as tmp, ExitStack() as stack:
        urls, pids = {}, {}
        for loop in LOOPS:
            port = free_port()
            config = Path(tmp) / f"{loop}.yaml"
            config.write_text(f"models:\n  gpu-speed:\n    cmd: {stand_in_cmd(port, args, '--alias', 'gpu-speed')}\n"
                              f"    proxy: http://127.0.0.1:{port}\n    concurrencyLimit: 1000\n")
            urls[loop], pids[loop] = stack.enter_context(berth_process(
                config, {"BERTH_HOME": str(Path(tmp) / loop), "BERTH_EVENT_LOOP": loop}))
            await _load(urls[loop], "gpu-speed")
        for concurrency in args.concurrency:
            lines.append(await phase(urls, pids, concurrency, args))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 8, 32])
    parser.add_argument("--ttft-ms", type=float, default=5.0)
    parser.add_argument("--token-ms", type=float, default=1.0)
    args = parser.parse_args()
    began = time.perf_counter()
    lines = asyncio.run(measure(args))
    print("\n".join(lines) + f"\n\n({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
