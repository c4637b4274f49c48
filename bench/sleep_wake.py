"""Wake from sleep versus a cold start of the same model, through berth, on the real llama-server.

One berth serves two models with `sleepAfter: 1`: the embedded Gemma 3 270M and a generated
llama-architecture GGUF of about 1 GB (random f16 weights, bench/tiny_models.py). Per round and
model, the time of one short completion request (send to answer), from three states:

- ready: the model is loaded (the answer alone);
- sleeping: llama-server freed the model after a second idle; the request wakes the same process;
- stopped: unloaded through the API; the request starts a new process (the file is in the page
  cache, as it is for the wake: both read it from memory).

Also prints what the process holds awake (peak resident) and asleep (resident), as berth measured.

    python bench/sleep_wake.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests
from _berth import llama_server_binary, running_berth
from tiny_models import write_big_llama

from berth.engine.embedded import embedded_model_path

MiB = 1024**2


def complete(url: str, model: str) -> float:
    began = time.perf_counter()
    r = requests.post(url + "/v1/completions", timeout=600,
                      json={"model": model, "prompt": "The lighthouse keeper", "max_tokens": 4})
    r.raise_for_status()
    return time.perf_counter() - began


def state(url: str, model: str) -> dict:
    return {r["model"]: r for r in requests.get(url + "/running", timeout=10).json()["running"]}.get(model, {})


def wait_for(url: str, model: str, wanted: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (entry := state(url, model)).get("state") != wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"{model} did not become {wanted} (it is {entry.get('state', 'stopped')})")
        time.sleep(0.1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    binary = llama_server_binary()
    with tempfile.TemporaryDirectory(prefix="berth-sleep-") as tmp:
        files = {"gemma-3-270m": embedded_model_path(),
                 "llama-1gb": write_big_llama(Path(tmp) / "big.gguf")}
        models = "".join(f"  {name}:\n    cmd: {binary} -m {path} --port ${{PORT}} -c 512 -np 1 -t 2\n"
                         f"    sleepAfter: 1\n    kvPersistence: false\n" for name, path in files.items())
        config = Path(tmp) / "berth.yaml"
        config.write_text(f"healthCheckTimeout: 300\nmodels:\n{models}")
        times = {name: {"ready": [], "sleeping": [], "stopped": []} for name in files}
        held = {name: {"awake": 0, "asleep": 0} for name in files}
        with running_berth(config, {"BERTH_HOME": str(Path(tmp) / "home")}) as url:
            for round_ in range(args.rounds):
                for name in files:
                    requests.post(f"{url}/api/models/unload/{name}", timeout=120).raise_for_status()
                    times[name]["stopped"].append(complete(url, name))
                    times[name]["ready"].append(complete(url, name))
                    awake = state(url, name)["memory"]["measured_bytes"]["host"]
                    asleep = wait_for(url, name, "sleeping")["memory"]["measured_bytes"]["host"]
                    held[name] = {"awake": awake, "asleep": asleep}
                    times[name]["sleeping"].append(complete(url, name))
                    print(f"round {round_ + 1} {name}: " + ", ".join(f"from {k} {v[-1]:.2f}s"
                                                                     for k, v in times[name].items()), flush=True)
    print(f"\nOne 4-token completion, send to answer: median (fastest) of {args.rounds} (llama-server build "
          "11434, 2 threads):\n")
    print("| model | from ready | from sleeping (wake) | from stopped (cold start) | cold start / wake (medians) | "
          "held awake | held asleep |")
    print("|---|---|---|---|---|---|---|")
    for name, by_state in times.items():
        ready, wake, cold = (f"{statistics.median(by_state[k]):.2f} s ({min(by_state[k]):.2f})"
                             for k in ("ready", "sleeping", "stopped"))
        ratio = statistics.median(by_state["stopped"]) / statistics.median(by_state["sleeping"])
        print(f"| {name} | {ready} | {wake} | {cold} | {ratio:.2f} | "
              f"{held[name]['awake'] / MiB:.0f} MiB | {held[name]['asleep'] / MiB:.0f} MiB |")


if __name__ == "__main__":
    main()
