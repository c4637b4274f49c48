"""The `berth` command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def berth_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli", *args], capture_output=True, text=True, timeout=60,
                          env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})


def test_check_prints_resolved_argv_with_secrets_redacted(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("""\
startPort: 9100
models:
  chat:
    ttl: 60
    aliases: [default]
    cmd: /opt/llama-server --port ${PORT} -m /m/x.gguf --api-key hunter2
  embed:
    cmd: /opt/llama-server --port ${PORT} --embeddings --api-key=hunter3
    matrix: 1
""")
    result = berth_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "/opt/llama-server --port ${PORT} -m /m/x.gguf --api-key <redacted> --alias chat" in out
    assert "--api-key=<redacted>" in out
    assert "hunter" not in out + result.stderr
    assert out.count("first free from 9100, chosen at each start") == 2
    assert "60s" in out and "default" in out
    assert f"{config}:9: models.embed.matrix: not supported by berth; ignored" in result.stderr


def test_malformed_config_exits_2_naming_file_line_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  a:\n    cmd: x --port ${PORT}\n    unloadTimeout: -1\n")
    for command in ("check", "serve"):
        result = berth_cli(command, "-c", str(config))
        assert result.returncode == 2
        assert f"{config}:4: models.a.unloadTimeout" in result.stderr


def test_missing_config_file_and_bad_listen_exit_2(tmp_path):
    result = berth_cli("check", "-c", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "file not found" in result.stderr
    result = berth_cli("serve", "--listen", "nonsense")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


def test_fit_json_has_byte_fields_and_flags(tmp_path):
    import json
    import os

    from tests.support.ggufs import write_gguf

    model = write_gguf(tmp_path / "m.gguf", n_tensors=4)
    result = subprocess.run([sys.executable, "-m", "berth.cli", "fit", str(model), "--ctx", "512", "--json"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    host = report["devices"]["host"]
    assert host["weights_bytes"] == 4 * 4096 * 4
    assert host["total_bytes"] == sum(host[k] for k in ("weights_bytes", "kv_bytes", "compute_bytes", "runtime_bytes"))
    assert host["runtime_bytes"] >= 16 * 1024**2
    assert report["kv_cells_per_stream"] == 512 and report["flags"] == []
    too_small = subprocess.run([sys.executable, "-m", "berth.cli", "fit", str(model), "--budget", "ram=1KiB"],
                               capture_output=True, text=True, timeout=60)
    assert too_small.returncode == 1 and "does not fit ram=1KiB" in too_small.stderr
    missing = berth_cli("fit", str(tmp_path / "absent.gguf"))
    assert missing.returncode == 2 and "neither a GGUF file nor a model in the store" in missing.stderr
