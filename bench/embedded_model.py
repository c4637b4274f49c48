"""Benchmark on the embedded Gemma 3 270M, side by side in one run.

For each engine (the llama-server binary when one is found, and berth's
built-in worker): cold start to first token (model unloaded before each
request), warm time to first token, and streaming decode tokens/s measured
directly against the model server and through berth, alternating so drift
hits both equally. Prints a table and the through-berth/direct ratios.

    python bench/embedded_model.py [--runs 5] [--tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import requests
from _berth import running_berth

from berth.engine.binary import find_llama_server
from berth.engine.embedded import embedded_model_path

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def stream_timings(url: str, max_tokens: int, headers: dict[str, str] | None = None
                   ) -> tuple[float, float, int, list[float]]:
    """(time to first token, decode seconds from first to last token, tokens, inter-token gaps)."""
    began = time.perf_counter()
    first = last = None
    tokens = 0
    gaps: list[float] = []
    body = {"model": "gemma", "messages": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens += 1
    assert first is not None, "no token arrived"
    return first - began, last - first, tokens, gaps


def bench_engine(name: str, program: str, model: Path, runs: int, max_tokens: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    config = workdir / "config.yaml"
    config.write_text(
        f"models:\n  gemma:\n    cmd: {program} -m {model} --host 127.0.0.1 "
        f"--port ${{PORT}} -c 2048 --no-jinja --chat-template gemma\n")
    with running_berth(config) as url:
        cold = []
        for _ in range(runs):
            requests.post(url + "/unload", timeout=60)
            cold.append(stream_timings(url, 8)[0])
        model = requests.get(url + "/running", timeout=5).json()["running"][0]
        # berth gave the model server a key of its own, in its environment (README "Security")
        server_key = {"Authorization": f"Bearer {psutil.Process(model['pid']).environ()['LLAMA_API_KEY']}"}
        warm, via_berth, direct, gaps_berth, gaps_direct = [], [], [], [], []
        for _ in range(runs):
            ttft, decode, tokens, gaps = stream_timings(url, max_tokens)
            warm.append(ttft)
            via_berth.append(tokens / decode)
            gaps_berth += gaps
            _, decode, tokens, gaps = stream_timings(model["proxy"], max_tokens, server_key)
            direct.append(tokens / decode)
            gaps_direct += gaps
    return {
        "engine": name,
        "cold_start_to_first_token_s": statistics.median(cold),
        "warm_time_to_first_token_s": statistics.median(warm),
        "direct_tokens_per_s": statistics.median(direct),
        "through_berth_tokens_per_s": statistics.median(via_berth),
        "direct_inter_token_p50_s": statistics.median(gaps_direct),
        "through_berth_inter_token_p50_s": statistics.median(gaps_berth),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = embedded_model_path()
    engines = [("worker (xllamacpp)", "berth worker")]
    binary = find_llama_server()
    if binary:
        engines.insert(0, ("llama-server binary", binary))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.runs} runs, {args.tokens} tokens, medians")
    results = [bench_engine(name, program, model, args.runs, args.tokens) for name, program in engines]
    print(f"{'engine':22} {'cold→1st tok':>13} {'warm TTFT':>10} {'direct tok/s':>13} "
          f"{'via berth tok/s':>16} {'ratio':>6} {'ITL p50 direct':>15} {'ITL p50 berth':>14}")
    for r in results:
        ratio = r["through_berth_tokens_per_s"] / r["direct_tokens_per_s"]
        r["berth_over_direct"] = ratio
        print(f"{r['engine']:22} {r['cold_start_to_first_token_s']:12.3f}s {r['warm_time_to_first_token_s']:9.3f}s "
              f"{r['direct_tokens_per_s']:13.1f} {r['through_berth_tokens_per_s']:16.1f} {ratio:6.3f} "
              f"{r['direct_inter_token_p50_s'] * 1000:13.2f}ms {r['through_berth_inter_token_p50_s'] * 1000:12.2f}ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
