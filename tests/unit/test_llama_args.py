"""llama-server argv <-> typed description, on command lines from real deployments."""

from __future__ import annotations

import pytest

from berth.config import parse_config
from berth.engine.llama_args import ArgvError, LlamaServerArgs
from tests.unit.test_config import SEED_000, SEED_001

# Seed 003's Modal deployment and seed 004's MoE expert server, as llama-server flags.
MODAL_CMD = ("llama-server -m /models/model.gguf --host 0.0.0.0 --port 8000 -c 32768 -np 4 -ngl 999 -fa on "
             "--jinja --metrics --slots --cache-type-k q8_0 --cache-type-v q8_0 --no-warmup --api-key s3cret")
MOE_CMD = ("llama-server -m /m/qwen3-30b-a3b.gguf --n-cpu-moe 20 -ot blk\\.(2[0-9])\\.ffn_.*_exps=CPU "
           "-ot token_embd\\.weight=CUDA0 -ngl 99 -ub 2048 -b 4096 -t 8 --mlock --no-mmap --temp 0.7 "
           "--top-k 20 --top-p 0.8 --min-p 0")


@pytest.mark.parametrize("config_text", [SEED_000, SEED_001])
def test_seed_commands_round_trip(config_text):
    for spec in parse_config(config_text).models.values():
        args = LlamaServerArgs.parse(spec.argv)
        assert args.to_argv() == list(spec.argv)


def test_seed_000_typed_values():
    config = parse_config(SEED_000)
    gemma = LlamaServerArgs.parse(config.models["gemma-4"].with_port(5800).argv)
    assert gemma.get("hf_repo") == "unsloth/gemma-4-26B-A4B-it-GGUF:UD-Q3_K_XL"
    assert gemma.get("parallel") == 2 and gemma.get("swa_full") and gemma.get("no_mmap")
    assert gemma.get("cache_type_k") == "q8_0" and gemma.get("temp") == 0.6 and gemma.get("top_k") == 20
    assert gemma.get("fit_ctx") == 100000 and gemma.get("slot_save_path") == "/cache/slots"
    assert gemma.get("min_p") == 0.0 and gemma.get("port") == 5800
    qwen = LlamaServerArgs.parse(config.models["qwen-3.5"].argv)
    assert qwen.get("ctx_size") == 160000
    assert qwen.get("override_tensor") == ["token_embd\\.weight=CUDA0"]
    assert qwen.get("no_context_shift")


def test_modal_and_moe_commands():
    modal = LlamaServerArgs.parse(MODAL_CMD.split())
    assert (modal.get("ctx_size"), modal.get("parallel"), modal.get("n_gpu_layers")) == (32768, 4, "999")
    assert modal.get("flash_attn") == "on" and modal.get("metrics") and modal.get("slots", True)
    assert modal.unsupported_by_worker() == []
    moe = LlamaServerArgs.parse(MOE_CMD.split())
    assert moe.get("n_cpu_moe") == 20
    assert moe.get("override_tensor") == ["blk\\.(2[0-9])\\.ffn_.*_exps=CPU", "token_embd\\.weight=CUDA0"]
    assert (moe.get("ubatch_size"), moe.get("batch_size"), moe.get("threads")) == (2048, 4096, 8)
    assert moe.get("mlock") and moe.get("no_mmap") and moe.get("min_p") == 0.0
    assert moe.to_argv() == MOE_CMD.split()


def test_inline_values_negations_unknown_flags_and_set():
    args = LlamaServerArgs.parse(["llama-server", "--ctx-size=8192", "--slots", "--no-slots", "--future-flag", "7",
                                  "--lonely-switch", "-fa", "--temp", "-1", "-c", "1024"])
    assert args.get("ctx_size") == 1024  # the last one wins, as in llama-server
    assert args.get("slots", True) is False
    assert args.get("flash_attn") == "on"  # -fa alone
    assert args.get("temp") == -1.0  # a negative number is a value, not a flag
    assert args.unsupported_by_worker() == ["--future-flag", "--lonely-switch"]
    assert args.to_argv()[1:6] == ["--ctx-size=8192", "--slots", "--no-slots", "--future-flag", "7"]
    args.set("ctx_size", 4096)
    assert args.get("ctx_size") == 4096 and "--ctx-size=8192" not in args.to_argv()
    args.set("swa_full", True)
    assert args.to_argv()[-1] == "--swa-full"


@pytest.mark.parametrize(("argv", "message"), [
    (["llama-server", "-c"], "-c needs a value"),
    (["llama-server", "-c", "big"], "-c expects an integer, got 'big'"),
    (["llama-server", "--temp", "hot"], "--temp expects a number"),
])
def test_bad_argv_names_the_flag(argv, message):
    with pytest.raises(ArgvError, match=message):
        LlamaServerArgs.parse(argv)
