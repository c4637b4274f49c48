"""README's quickstart as a new user runs it: a clean clone, a clean venv, README's own commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from berth.engine.embedded import SMOLLM2_STORE_NAME
from berth.store import ModelStore
from tests.support.harness import children_of, free_port, pid_alive, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _sh_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.DOTALL)


def readme_quickstart() -> tuple[str, str, str, dict[str, str], str]:
    """(install command, serve command, request path, request headers, request body) exactly as README shows
    them."""
    readme = (ROOT / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):]
    install_and_serve = _sh_blocks(quickstart)[0].strip()
    install, sep, serve = install_and_serve.partition(" && ")
    assert sep and serve.startswith("berth serve"), install_and_serve
    curl = next(block for block in _sh_blocks(quickstart) if block.lstrip().startswith("curl"))
    words = shlex.split(curl.replace("\\\n", " "))
    url = next(w for w in words if w.startswith("http://"))
    body = words[words.index("-d") + 1]
    json.loads(body)
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    assert url.startswith("http://127.0.0.1:8080/"), url  # berth serve's default address
    return install, serve, url.removeprefix("http://127.0.0.1:8080"), headers, body


def _index_reachable(python: Path, scratch: Path) -> bool:
    probe = subprocess.run([str(python), "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", str(scratch),
                            "click"], capture_output=True, text=True, timeout=300)
    return probe.returncode == 0


def test_readme_quickstart_on_a_fresh_clone_and_venv(tmp_path):
    install, serve, path, headers, body = readme_quickstart()
    clone = tmp_path / "berth"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # Only the venv and the system: no llama-server from this machine's other environments.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "BERTH_HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE", "SSL_CERT_FILE"):
        if name in os.environ:  # the user's own pip settings carry over, as they would on their machine
            env[name] = os.environ[name]
    installed = subprocess.run(install, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    if installed.returncode != 0:
        if not _index_reachable(venv / "bin" / "python", tmp_path / "probe"):
            pytest.skip("the package index is unreachable from here, so README's install command cannot run")
        raise AssertionError(f"`{install}` failed:\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(shlex.split(serve) + ["--listen", f"127.0.0.1:{port}"], cwd=clone, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return requests.get(url + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 600, "berth serve to answer /health")  # the first start fetches the default model
        # fetched before berth listens, so README's first request has no download to wait for
        assert ModelStore(tmp_path / "home" / "models").entry(SMOLLM2_STORE_NAME) is not None
        reply = requests.post(url + path, data=body.encode(), headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"].strip()
        assert reply.json()["model"] == "smollm2-135m"
    finally:
        descendants = children_of(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for pid in descendants:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert not any(pid_alive(pid) for pid in descendants)
