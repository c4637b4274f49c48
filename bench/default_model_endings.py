"""How often the default chat model ends its answers, with and without the repeat penalty berth sets.

Runs the real llama-server on SmolLM2-135M-Instruct (fetched into the store as `berth serve` does) with
the embedded model's flags, once with `--repeat-penalty 1.1` and once without, and sends the same
questions to both; prints how each answer finished (`stop`: the model ended it; `length`: it ran to
the token limit) and the tokens per answer.

    python bench/default_model_endings.py [--rounds 5] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _berth import free_port, llama_server_binary, wait_healthy  # noqa: E402

from berth.engine.embedded import default_model_path  # noqa: E402
from berth.store import ModelStore  # noqa: E402

QUESTIONS = ("Hello", "What is the capital of France?", "Name three colors.", "Tell me a joke.", "Hi!",
             "What is 2+2?", "Write a haiku about the sea.", "Explain what a CPU is in one sentence.",
             "Who wrote Hamlet?", "Say something nice.")
FLAGS = ["-c", "4096", "--parallel", "2", "--jinja", "--temp", "0.2", "--top-p", "0.9"]  # as embedded, less the penalty


def measure(binary: str, model: Path, penalty: bool, rounds: int, max_tokens: int) -> tuple[dict, list[int]]:
    port = free_port()
    argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *FLAGS]
    if penalty:
        argv += ["--repeat-penalty", "1.1"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, "llama-server")
        endings: collections.Counter[str] = collections.Counter()
        tokens = []
        for _ in range(rounds):
            for question in QUESTIONS:
                answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
                    "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}).json()
                endings[answer["choices"][0]["finish_reason"]] += 1
                tokens.append(answer["usage"]["completion_tokens"])
        return dict(endings), tokens
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=1024)
    args = parser.parse_args()
    binary = llama_server_binary()
    with tempfile.TemporaryDirectory() as scratch:
        model = default_model_path(ModelStore(Path(scratch) / "models"))
        print(f"{'repeat penalty':16} {'answers':>8} {'stop':>6} {'length':>7} {'tokens p50':>11} {'max':>6}")
        for penalty in (False, True):
            endings, tokens = measure(binary, model, penalty, args.rounds, args.max_tokens)
            tokens.sort()
            print(f"{'1.1' if penalty else 'none (1.0)':16} {len(tokens):>8} {endings.get('stop', 0):>6} "
                  f"{endings.get('length', 0):>7} {tokens[len(tokens) // 2]:>11} {tokens[-1]:>6}")


if __name__ == "__main__":
    main()
