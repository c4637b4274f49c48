"""`berth run`, `berth ps` and `berth stop` as a user types them, against fake model servers."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import requests

from tests.support.harness import fake_cmd, free_port, pid_alive


def cli(*args: str, stdin: str | None = None, timeout: float = 60, env: dict | None = None,
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def config(start_port: int, ttl: int = 0) -> str:
    return (f"startPort: {start_port}\nmodels:\n"
            f"  a: {{cmd: \"{fake_cmd('a')}\", ttl: {ttl}, aliases: [default]}}\n"
            f"  b: {{cmd: \"{fake_cmd('b')}\"}}\n")


def test_run_with_a_prompt_prints_the_streamed_answer_from_a_running_berth(berth, start_port):
    b = berth(config(start_port))
    result = cli("run", "a", "hello there", "--url", b.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tok0 tok1 tok2 tok3 tok4 \n"  # the fake server's five streamed chunks
    assert "a" in b.running()
    piped = cli("run", "b", "--url", b.url, stdin="from a pipe\n")  # no PROMPT: stdin is the prompt
    assert piped.returncode == 0 and piped.stdout.startswith("tok0"), piped.stderr


def test_run_names_the_problem_for_unknown_models(berth, start_port):
    b = berth(config(start_port))
    result = cli("run", "nope", "hi", "--url", b.url)
    assert result.returncode == 2
    assert "'nope' is not configured" in result.stderr and "a, b" in result.stderr


def test_ps_shows_what_runs_and_stop_unloads_it(berth, start_port):
    b = berth(config(start_port, ttl=300))
    assert cli("ps", "--url", b.url).stdout.strip() == "no models loaded"
    requests.post(b.url + "/v1/chat/completions", json={"model": "a", "messages": []}, timeout=30)
    shown = cli("ps", "--url", b.url)
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:4] == ["MODEL", "STATE", "PID", "PORT"]
    fields = row.split()
    assert fields[0] == "a" and fields[1] == "ready" and int(fields[2]) == b.pid_of("a")
    assert int(fields[3]) >= start_port and fields[-3].endswith("s")  # TTL left, counting down from 300
    stopped = cli("stop", "a", "--url", b.url)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "a: stopped", stopped.stderr
    assert "a" not in b.running()
    requests.post(b.url + "/v1/chat/completions", json={"model": "b", "messages": []}, timeout=30)
    assert cli("stop", "--all", "--url", b.url).returncode == 0
    assert b.running() == {}


def test_ps_stop_and_run_without_a_berth_or_with_bad_input(tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    for args in (("ps",), ("stop", "a")):
        result = cli(*args, "--url", nowhere)
        assert result.returncode == 1 and "no berth answers at" in result.stderr, result.stderr
    for args, message in ((("stop",), "name one model, or give --all"),
                          (("stop", "a", "--all"), "name one model, or give --all"),
                          (("ps", "--url", "127.0.0.1:8080"), "must start with http://")):
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_run_starts_berth_in_process_when_none_answers_and_leaves_nothing_behind(tmp_path, start_port):
    marker = f"inproc-{start_port}"
    (tmp_path / "c.yaml").write_text(f"startPort: {start_port}\nmodels:\n  {marker}: {{cmd: \"{fake_cmd(marker)}\"}}\n")
    result = cli("run", marker, "hi", "-c", str(tmp_path / "c.yaml"), "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "tok0 tok1 tok2 tok3 tok4 \n"
    assert "starting one here" in result.stderr
    leftovers = subprocess.run(["pgrep", "-f", f"--name {marker}"], capture_output=True, text=True).stdout.split()
    assert leftovers == []


def test_interactive_run_keeps_the_conversation_and_ends_on_ctrl_d(berth, start_port):
    b = berth(config(start_port))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "berth.cli", "run", "a", "--url", b.url], stdin=follower,
                            stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "200"})
    os.close(follower)
    seen = b""

    def read_until(text: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, f"no {text!r} in {seen!r}"
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                seen += os.read(leader, 4096)

    try:
        read_until(b">>> ")
        os.write(leader, b"first question\n")
        read_until(b"tok4")
        read_until(b">>> ", 10)
        os.write(leader, b"second\n")
        seen = b""
        read_until(b"tok4")
        os.write(leader, b"\x04")  # Ctrl-D
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert not pid_alive(proc.pid)
    # the second turn carried the whole conversation: "first question" + the answer's 5 words + "second"
    turns = [r["prompt_tokens"] for r in requests.get(b.url + "/api/requests", timeout=5).json()["requests"]]
    assert turns[:2] == [8, 2]
