"""The `berth` command line as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests


def berth_cli(*args: str) -> subprocess.CompletedProcess:
    # a bare environment (no llama-server on PATH), but the berth under test: PYTHONPATH picks a worktree's
    env = {"COLUMNS": "250", "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "berth.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


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
    # llama-swap's ${PORT}: startPort upwards in the order of the model ids
    chat, embed = out.split("\nembed\n")
    assert "port:    9100 when free at the start, else the first free from 9100" in chat
    assert "port:    9101 when free at the start, else the first free from 9100" in embed
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
    assert host["total_bytes"] == sum(host[k] for k in ("weights_bytes", "kv_bytes", "compute_bytes", "output_bytes",
                                                                "runtime_bytes"))
    assert host["runtime_bytes"] >= 16 * 1024**2
    assert report["kv_cells_per_stream"] == 512 and report["flags"] == []
    too_small = subprocess.run([sys.executable, "-m", "berth.cli", "fit", str(model), "--budget", "ram=1KiB"],
                               capture_output=True, text=True, timeout=60)
    assert too_small.returncode == 1 and "does not fit ram=1KiB" in too_small.stderr
    missing = berth_cli("fit", str(tmp_path / "absent.gguf"))
    assert missing.returncode == 2 and "neither a GGUF file nor a model in the store" in missing.stderr


def test_fit_of_a_launch_without_a_model_file_names_the_fix(tmp_path):
    import os

    config = tmp_path / "config.yaml"
    config.write_text('models:\n  a: {cmd: "vllm serve org/model --port ${PORT}"}\n')
    result = subprocess.run([sys.executable, "-m", "berth.cli", "fit", "a", "-c", str(config)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "BERTH_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr
    assert "the launch settings of a name no model file (-m)" in result.stderr and "Traceback" not in result.stderr


def test_the_worker_command_is_found_without_importing_the_gateway_config_or_store():
    """`berth worker` starts with every model of the built-in engine: finding it imports its own module only."""
    probe = ("import sys, click\n"
             "from berth.cli import main\n"
             "command = main.get_command(click.Context(main), 'worker')\n"
             "print(command.name, *sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'aiohttp')\n"
             "      or m.startswith(('berth.gateway', 'berth.config', 'berth.store', 'berth.memory'))))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["worker"]


@pytest.mark.parametrize(("setting", "berth_lines", "model_lines"), [
    ("logToStdout: upstream", False, True),
    ("logToStdout: both\nlogTimeFormat: rfc3339", True, True),
    ("logToStdout: none", False, False),
])
def test_log_to_stdout_chooses_what_reaches_stdout(tmp_path, start_port, setting, berth_lines, model_lines):
    from tests.support.harness import fake_cmd, free_port, wait_until

    config = tmp_path / "config.yaml"
    config.write_text(f"{setting}\nstartPort: {start_port}\nmodels:\n  a: {{cmd: \"{fake_cmd('a')}\"}}\n")
    port = free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "berth.cli", "serve", "-c", str(config), "--listen",
                                 f"127.0.0.1:{port}"], stdout=stdout, stderr=stderr)
        try:
            def answered() -> bool:
                try:
                    return requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                         json={"model": "a", "messages": []}).status_code == 200
                except requests.ConnectionError:
                    return False

            wait_until(answered, 20, "berth to serve a")
        finally:
            proc.terminate()
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert code == 0
    printed = out.read_text()
    assert ("berth listening on" in printed) is berth_lines, printed
    assert ("[a] fake server a starting" in printed) is model_lines, printed
    if "rfc3339" in setting:  # 2026-11-23T20:30:01+00:00 (or Z): Go's RFC 3339 layout
        first = next(line for line in printed.splitlines() if "berth listening on" in line)
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) INFO ", first), first
