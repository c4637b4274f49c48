"""A model start from a cold page cache, with berth's read-ahead, and from a warm cache.

Writes a llama-architecture GGUF of random f16 weights large enough to matter (about 1.1 GB by
default; bench/tiny_models.py), then starts llama-server on it (`-c 512 -np 1`, its own warmup on, so
the start reads every weight) and times spawn to a healthy `/health`, in three ways, interleaved:

- cold: the file's pages dropped from the page cache first (POSIX_FADV_DONTNEED on the file, which
  needs no root and leaves the rest of the machine's cache alone; the mincore count of cached bytes
  is printed before each start to show it worked);
- read-ahead at spawn: cold as above, then what berth does before every start of a GGUF:
  `PageWarmer.warm` (posix_fadvise WILLNEED in a background thread) right before the spawn;
- warm: the file read ahead completely before the spawn, as berth does for the returnTo model at a
  TTL stop (the model most likely to be needed next).

    python bench/page_cache_start.py [--layers 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _berth import free_port, llama_server_binary, wait_healthy
from tiny_models import write_big_llama

from berth.memory.devices import host_device
from berth.runtime.pagecache import PageWarmer, cached_bytes, drop, read_ahead

GiB = 1024**3


def time_to_ready(binary: str, model: Path) -> float:
    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "512",
                               "-np", "1", "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, "llama-server", timeout=600)
        return time.perf_counter() - began
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def made_cold(model: Path) -> None:
    drop(model)
    left = cached_bytes(model)
    if left > model.stat().st_size // 100:
        raise SystemExit(f"could not drop {model} from the page cache ({left} bytes stay cached)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (about 90 MB each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    binary = llama_server_binary()
    with tempfile.TemporaryDirectory(prefix="berth-pagecache-") as tmp:
        model = write_big_llama(Path(tmp) / "big.gguf", args.layers)
        size = model.stat().st_size
        warmer = PageWarmer(lambda: host_device().free_bytes, headroom_bytes=GiB)
        times: dict[str, list[float]] = {"cold": [], "read-ahead at spawn": [], "warm": []}
        cached: dict[str, list[float]] = {name: [] for name in times}  # fraction cached at the spawn
        for round_ in range(args.rounds):
            made_cold(model)
            cached["cold"].append(cached_bytes(model) / size)
            times["cold"].append(time_to_ready(binary, model))
            made_cold(model)
            cached["read-ahead at spawn"].append(cached_bytes(model) / size)
            warmer.warm("big", lambda: [model], "bench")
            times["read-ahead at spawn"].append(time_to_ready(binary, model))
            made_cold(model)
            read_ahead([model])
            deadline = time.monotonic() + 120
            while cached_bytes(model) < 0.99 * size and time.monotonic() < deadline:
                time.sleep(0.2)
            cached["warm"].append(cached_bytes(model) / size)
            times["warm"].append(time_to_ready(binary, model))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s (cached at spawn {cached[k][-1]:.0%})"
                                                     for k, v in times.items()), flush=True)
    cold = statistics.median(times["cold"])
    print(f"\nllama-server on a {size / GiB:.2f} GiB GGUF (random f16 weights), spawn to healthy, "
          f"median of {args.rounds}:\n")
    print("| page cache | cached at spawn | time to ready | vs cold |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        speedup = f"{cold / median:.1f}x faster" if name != "cold" else "-"
        print(f"| {name} | {statistics.median(cached[name]):.0%} | {median:.2f} s | {speedup} |")


if __name__ == "__main__":
    main()
