"""The estimate on the CUDA backend against what llama.cpp and NVML reported on an NVIDIA H200
(tests/fixtures/cuda-h200: five `-lv 4` load logs and measurements.json). The models are generated again
here as headers of the same shapes (sparse files of the reference's exact sizes: the estimate reads only
the header), so every launch of the reference is re-estimated with the same GGUF and flags."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from berth.config import parse_config
from berth.core.gguf import read_gguf_header
from berth.engine.launch import Launch
from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.devices import Device, parse_buffer_log
from berth.memory.estimate import GPU, estimate
from berth.memory.planner import MemoryLedger, MemoryPlanner, PlanSource
from berth.scheduler import GroupPolicy, MemoryPolicy, ModelPolicy, ModelState, Scheduler
from tests.support.scheduling import random_events

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_models import write_llama  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "cuda-h200"
MEASURED = json.loads((REFERENCE / "measurements.json").read_text())
MIB = 1024**2
PRINTED = int(0.02 * MIB)  # llama.cpp prints MiB with two decimals: closer than this is the same figure
CUDA = GpuRuntime.default(Backend.CUDA)
# measurements.json's model_shapes, as write_llama's arguments
SHAPES = {"tiny-llama": {}, "tiny-moe": {"n_expert": 8},
          "mid-dense": {"n_layer": 16, "n_embd": 2048, "n_head": 16, "n_head_kv": 4, "n_ff": 5632},
          "mid-moe": {"n_layer": 12, "n_embd": 1024, "n_head": 16, "n_head_kv": 4, "n_ff": 768, "n_expert": 16,
                      "n_expert_used": 4}}
H200 = Device(GPU, "NVIDIA H200", 143771 * MIB, 142629 * MIB, Backend.CUDA, "580.159.04")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("reference-models")
    found = {name: write_llama(directory / f"{name}.gguf", weights=False, **shape) for name, shape in SHAPES.items()}
    # the same files as the reference's, byte for byte in size
    assert {name: os.path.getsize(path) for name, path in found.items()} == MEASURED["models"]
    return found


def cuda_estimate(models: dict[str, Path], model: str, flags: str):
    return estimate(read_gguf_header(models[model]), LlamaServerArgs.parse(["llama-server", *flags.split()]), CUDA)


def close(ours: int, theirs: int, tolerance: float) -> bool:
    return abs(ours - theirs) <= max(tolerance * theirs, PRINTED)


def test_every_reference_launch_is_estimated_per_device_on_cuda(models):
    """Weights, KV and output as llama.cpp allocated them on the GPU and the host; compute within 10%."""
    launches = MEASURED["buffers_llama_cpp_vs_estimate"]
    assert len(launches) == 18
    misses = []
    for launch in launches:
        result = cuda_estimate(models, launch["model"], launch["flags"])
        gpu, host = result.devices[GPU], result.devices["host"]
        theirs = {"gpu": launch["real_device"],
                  "host": {kind: launch["real"][kind] - launch["real_device"].get(kind, 0) for kind in launch["real"]}}
        ours = {"gpu": gpu, "host": host}
        for device in ("gpu", "host"):
            for kind, tolerance in (("kv", 0.0), ("compute", 0.10), ("output", 0.0)):
                mine = getattr(ours[device], f"{kind}_bytes")
                if not close(mine, theirs[device].get(kind, 0), tolerance):
                    misses.append(f"{launch['model']} {launch['flags']} {device} {kind}: llama.cpp "
                                  f"{theirs[device].get(kind, 0) / MIB:.2f} MiB, estimate {mine / MIB:.2f} MiB")
        # the GPU's weights exactly; the host's as far as llama.cpp reports them apart (below)
        if not close(gpu.weights_bytes, theirs["gpu"]["weights"], 0.0):
            misses.append(f"{launch['model']} {launch['flags']} gpu weights")
    assert not misses, "\n".join(misses)


def test_host_weights_are_the_host_tensors_and_llama_cpp_maps_the_range_around_them(models):
    """With -ngl 8 the host's tensors are the first ones in the file and llama.cpp's CPU_Mapped buffer is
    them exactly; with experts on the host it maps the range from the first to the last, the attention
    tensors uploaded to the GPU included, and the estimate counts the host's tensors alone (those pages
    stay; the others were read once for the upload)."""
    by_flags = {(r["model"], r["flags"]): r for r in MEASURED["buffers_llama_cpp_vs_estimate"]}
    partial = by_flags[("mid-dense", "-c 8192 -ngl 8")]
    host = cuda_estimate(models, "mid-dense", "-c 8192 -ngl 8").devices["host"]
    assert close(host.weights_bytes, partial["real"]["weights"] - partial["real_device"]["weights"], 0.0)
    experts = by_flags[("mid-moe", "-c 8192 -ot exps=CPU -ngl 99")]
    result = cuda_estimate(models, "mid-moe", "-c 8192 -ot exps=CPU -ngl 99")
    expert_bytes = 12 * 3 * 16 * 768 * 1024 * 2
    assert result.devices["host"].weights_bytes - expert_bytes < 4 * MIB  # the experts and the token embedding
    assert result.host_mapped_bytes == result.devices["host"].weights_bytes
    mapped_range = experts["real"]["weights"] - experts["real_device"]["weights"]
    assert result.devices["host"].weights_bytes < mapped_range < result.devices["host"].weights_bytes * 1.1


def test_the_plans_gpu_total_with_the_runtime_is_within_10_percent_of_nvml(models):
    """NVML's figure per process (eight launches) against the estimate's GPU total, runtime overhead included;
    without the overhead the plan was 29-98% short."""
    launches = [(r["model"], r["flags"], r["nvml_bytes"]) for r in MEASURED["nvml_per_process_vs_estimated_device_total"]]
    log_models = {"0": "tiny-llama", "1": "mid-dense", "2": "mid-dense", "3": "mid-moe", "4": "mid-dense"}
    launches += [(log_models[r["log"][0]], r["flags"], r["nvml_mib"] * MIB) for r in MEASURED["host_memory_after_one_request"]]
    assert len(launches) == 8
    for model, flags, nvml in launches:
        gpu = cuda_estimate(models, model, flags).devices[GPU]
        assert gpu.runtime_bytes == CUDA.runtime_bytes
        assert close(gpu.total_bytes, nvml, 0.10), (model, flags, gpu.total_bytes / MIB, nvml / MIB)
        assert gpu.total_bytes - gpu.runtime_bytes < 0.75 * nvml  # the buffers alone fall well short


def reference_log(name: str) -> tuple[str, list[str]]:
    """(the flags of the launch, the log's lines)."""
    lines = (REFERENCE / name).read_text().splitlines()
    return lines[0].split(".gguf ", 1)[1].removesuffix(" -lv 4"), lines[1:]


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE.glob("*.log")))
def test_flash_attention_is_resolved_as_llama_cpp_did(models, name):
    flags, lines = reference_log(name)
    model = re.search(r"-m (\S+)\.gguf", (REFERENCE / name).read_text().splitlines()[0]).group(1)
    text = "\n".join(lines)
    expected = "Flash Attention not supported, set to disabled" not in text
    assert ("Flash Attention enabled" in text or "flash_attn            = enabled" in text) == expected
    assert cuda_estimate(models, model, flags).flash_attention == expected


def test_the_runtime_overhead_is_learned_from_nvml_less_the_logged_buffers(models, tmp_path):
    """What the first measured run teaches: NVML's figure for the process less llama.cpp's buffers on the
    GPU (from its log), kept per GPU model and driver; the next plans on that GPU carry it."""
    flags, lines = reference_log("4-mid-dense.log")
    logged = parse_buffer_log(lines)
    assert abs(logged[GPU] - (1378.26 + 256.00 + 57.01) * MIB) < 4  # CUDA0 model, KV and compute
    nvml = next(r["nvml_mib"] for r in MEASURED["host_memory_after_one_request"] if r["log"].startswith("4-")) * MIB
    argv = ["llama-server", "-m", str(models["mid-dense"]), *flags.split()]
    ledger_path = tmp_path / "memory.json"
    planner = MemoryPlanner({"host": Device("host", "RAM", 128 << 30, 120 << 30), GPU: H200},
                            MemoryLedger(ledger_path), lambda spec: Launch(argv))
    spec = parse_config("models:\n  m: {cmd: 'llama-server --port ${PORT}'}\n").models["m"]
    before = planner.plan(spec)
    assert "700.0 MiB of cuda runtime (the cuda default until a run is measured)" in before.detail
    learned = planner.learn_gpu_runtime(spec, argv, GPU, nvml, logged[GPU])
    assert learned == nvml - logged[GPU] and 686 * MIB < learned < 693 * MIB
    again = MemoryPlanner(planner.devices, MemoryLedger(ledger_path), lambda spec: Launch(argv))  # a restart
    plan = again.plan(spec)
    assert plan.source is PlanSource.ESTIMATED and "measured on NVIDIA H200 (driver 580.159.04)" in plan.detail
    assert close(plan.planned[GPU], nvml, 0.01)
    other_driver = Device(GPU, "NVIDIA H200", H200.total_bytes, H200.free_bytes, Backend.CUDA, "590.1")
    elsewhere = MemoryPlanner(dict(planner.devices, gpu0=other_driver), MemoryLedger(ledger_path),
                              lambda spec: Launch(argv))
    assert elsewhere.gpu_runtime().runtime_bytes == CUDA.runtime_bytes  # another driver: not measured there
    # a smaller figure later (another model's run) does not lower it
    assert again.learn_gpu_runtime(spec, argv, GPU, nvml - 50 * MIB, logged[GPU]) == learned - 50 * MIB
    assert MemoryLedger(ledger_path).gpu_runtime(H200.model_and_driver) == learned


def co_resident_nvml(plans: dict[str, dict[str, int]], budget: int, seed: int, nvml: dict[str, int]) -> list[int]:
    """Drive the scheduler with random requests for models of these plans under a GPU budget; after every
    event, the sum of what NVML measured for the models alive together (starting, ready or stopping)."""
    group = "(default)"
    scheduler = Scheduler.build({m: ModelPolicy(group, concurrency_limit=100, memory=plan) for m, plan in plans.items()},
                                {group: GroupPolicy(swap=False, exclusive=False)},
                                MemoryPolicy({"host": 64 << 30, GPU: budget}, group))
    live = (ModelState.STARTING, ModelState.READY, ModelState.STOPPING)
    return [sum(nvml[m] for m in plans if scheduler.state(m) in live)
            for _ in random_events(scheduler, sorted(plans), seed, 200)]


def test_co_residence_under_a_gpu_budget_never_exceeds_it_once_the_runtime_is_counted(models, tmp_path):
    """Three models NVML measured on the H200 (tiny-llama -c 4096, mid-dense and mid-moe -c 8192, all layers on
    the GPU), planned by the planner on a simulated H200 under a 3 GiB GPU budget: whatever the order of
    requests, the models it keeps together never held more than the budget by NVML's figures. Planned
    without the runtime (the buffers alone) the scheduler put mid-dense beside mid-moe: 4,126 MiB."""
    nvml = {r["model"]: r["nvml_bytes"] for r in MEASURED["nvml_per_process_vs_estimated_device_total"]}
    flags = {r["model"]: r["flags"] for r in MEASURED["nvml_per_process_vs_estimated_device_total"]}
    text = "memory: {budget: {gpu0: 3GiB, ram: 64GiB}, headroom: 0}\nmodels:\n" + "".join(
        f"  {m}: {{cmd: 'llama-server -m {models[m]} {flags[m]} --port ${{PORT}}'}}\n" for m in nvml)
    config = parse_config(text)
    planner = MemoryPlanner({"host": Device("host", "RAM", 128 << 30, 120 << 30), GPU: H200},
                            MemoryLedger(tmp_path / "memory.json"), lambda spec: Launch(spec.argv))
    plans = {m: planner.plan(spec).planned for m, spec in config.models.items()}
    budget = planner.budgets(config)[GPU]
    assert budget == 3 << 30
    totals = [total for seed in range(20) for total in co_resident_nvml(plans, budget, seed, nvml)]
    assert max(totals) <= budget
    assert nvml["tiny-llama"] + nvml["mid-moe"] in totals  # the two that fit did run together
    buffers_only = {m: {**plan, GPU: plan[GPU] - CUDA.runtime_bytes} for m, plan in plans.items()}
    assert any(total > budget for seed in range(20) for total in co_resident_nvml(buffers_only, budget, seed, nvml))
