"""llama-swap's own example configs (tests/fixtures/llama-swap, copied unmodified with their origin and
license) through `berth check`, as a llama-swap user would bring them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llama-swap"
ENV = {"API_KEY_1": "k1", "API_KEY_2": "k2", "OPENROUTER_API_KEY": "k3"}  # the ${env.X} the reference uses


def check(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV, "BERTH_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_the_reference_config_loads_with_every_key_understood(tmp_path):
    reference = (FIXTURES / "config.example.yaml").read_text()
    # As written, its `unlisted-model` runs `some-upstream-server` with no port and no proxy, which
    # llama-swap's own loader refuses too ("proxy uses ${PORT} but cmd does not"): berth says the same.
    as_written = check(FIXTURES / "config.example.yaml", tmp_path)
    assert as_written.returncode == 2
    assert "models.unlisted-model.cmd: proxy uses ${PORT} but cmd does not" in as_written.stderr
    fixed = tmp_path / "config.yaml"
    fixed.write_text(reference.replace("cmd: some-upstream-server", "cmd: some-upstream-server --port ${PORT}"))
    result = check(fixed, tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert not [w for w in warnings if "not supported" in w or "ignored" in w], warnings
    # what remains: its illustrative names of models it does not define, each named with its line
    assert warnings and all(re.search(r"no model '[^']+' is defined under models:; .* is left out", w)
                            for w in warnings), warnings
    assert any("note:" in line and "captureBuffer, ui, performance" in line for line in result.stderr.splitlines())
    for model in ("gpt-oss-120b", "unlisted-model", "docker-llama"):
        assert re.search(rf"^{re.escape(model)}$", result.stdout, re.M)
    assert "config OK: 3 models" in result.stdout


def test_an_example_in_the_old_profile_form_is_refused_with_the_fix(tmp_path):
    result = check(FIXTURES / "aider-qwq-coder.yaml", tmp_path)
    assert result.returncode == 2
    assert "profiles.aider" in result.stderr and "move it under groups:" in result.stderr
