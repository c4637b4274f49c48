"""KV slots survive swaps: saved before a planned stop, restored after the next start (real model, both engines)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.harness import BerthServer, fake_cmd, wait_until
from tests.support.ggufs import write_gguf

LONG = "Tell me everything about lighthouses, their keepers, lenses and storms. " * 40


def ask(b: BerthServer, model: str, content: str = LONG, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    r = requests.post(b.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def two_ids(engine: str, gguf: str, ctx_a: int = 2048, extra_a: str = "", persistence: str = "true") -> str:
    """Gemma 3 has sliding-window layers: its slots are saved when kvPersistence asks for it (with --swa-full)."""
    common = f"-m {gguf} --port ${{PORT}} --no-jinja --chat-template gemma -np 1"
    return f"""
memory: {{scheduling: false}}  # swap as llama-swap does: each request for the other id stops this one
models:
  a: {{cmd: "{engine} {common} -c {ctx_a} {extra_a}", kvPersistence: {persistence}}}
  b: {{cmd: "{engine} {common} -c 1024", kvPersistence: {persistence}}}
"""


def start(berth, tmp_path: Path, config: str) -> BerthServer:
    """Through the `berth` fixture, so the server is stopped whatever happens; the store is per test."""
    return berth(config, env={"BERTH_HOME": str(tmp_path / "home")})


def test_prefix_is_reused_after_a_swap(berth, tmp_path, engine, gemma_gguf):
    b = start(berth, tmp_path, two_ids(engine, gemma_gguf))
    try:
        first = ask(b, "a")
        prompt_tokens = first["usage"]["prompt_tokens"]
        assert prompt_tokens > 300
        assert "--swa-full" in b.running()["a"]["cmd"]  # Gemma 3 has sliding-window layers
        ask(b, "b", "hi")  # swap: a saves its slot and stops
        again = ask(b, "a")  # swap back: restored before a counts as ready
        assert again["timings"]["cache_n"] >= prompt_tokens - 8
        metrics = requests.get(b.url + "/metrics").text
        assert 'berth_kv_slot_saves_total{model="a",outcome="ok"} 1.0' in metrics
        assert 'berth_kv_slot_restores_total{model="a",outcome="ok"} 1.0' in metrics
        hit_metric = 'berth_kv_restore_hit_tokens_total{model="a"}'
        hits = [line for line in metrics.splitlines() if line.startswith(hit_metric)]
        assert hits and float(hits[0].split()[-1]) >= prompt_tokens - 8
        kv = b.running()["a"]["kv_slots"]
        assert kv["files"] == 1 and kv["bytes"] > 1_000_000
    finally:
        b.stop()
    env = {**os.environ, "BERTH_HOME": str(tmp_path / "home")}
    listing = subprocess.run([sys.executable, "-m", "berth.cli", "models"], capture_output=True, text=True, env=env)
    assert "SAVED KV SLOTS" in listing.stdout and any(
        line.split()[:2] == ["a", "1"] for line in listing.stdout.splitlines())
    removed = subprocess.run([sys.executable, "-m", "berth.cli", "rm", "--slots", "a"], capture_output=True, env=env)
    assert removed.returncode == 0
    assert not (tmp_path / "home" / "models" / ".slots" / "a").exists()


def test_saved_slots_and_the_ledger_are_for_berths_user_alone(berth, tmp_path, engine, gemma_gguf):
    """Saved slots hold users' token ids; the ledger says what runs here. Whatever the umask."""
    home = tmp_path / "home"  # not there yet: berth makes it
    b = start(berth, tmp_path, two_ids(engine, gemma_gguf))
    ask(b, "a")
    wait_until(lambda: (home / "memory.json").exists(), 30, "a's measured memory to be kept")
    ask(b, "b", "hi")  # a saves its slot and stops
    b.stop()

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    slots = home / "models" / ".slots"
    assert mode(home) == 0o700 and mode(home / "memory.json") == 0o600
    for directory in (slots, slots / "a", *(slots / "a").iterdir()):
        assert mode(directory) == 0o700, directory
    saved = list((slots / "a").rglob("slot-*.bin"))
    assert saved and all(mode(path) == 0o600 for path in saved), [(p, oct(mode(p))) for p in saved]


def test_incompatible_save_is_discarded_not_restored(berth, tmp_path, engine, gemma_gguf):
    b = start(berth, tmp_path, two_ids(engine, gemma_gguf, ctx_a=2048))
    ask(b, "a")
    ask(b, "b", "hi")
    b.stop()
    slots = tmp_path / "home" / "models" / ".slots" / "a"
    [old_dir] = list(slots.iterdir())
    assert list(old_dir.glob("slot-*.bin"))
    b = start(berth, tmp_path, two_ids(engine, gemma_gguf, ctx_a=3072))  # another context size: another layout
    try:
        fresh = ask(b, "a")
        assert fresh["timings"]["cache_n"] == 0
        assert not old_dir.exists()
        assert "made with other launch settings (ctx_size 2048 -> 3072)" in requests.get(b.url + "/logs").text
    finally:
        b.stop()


def test_disk_cap_deletes_least_recently_used(berth, tmp_path, engine, gemma_gguf):
    config = two_ids(engine, gemma_gguf).replace("models:", "kvPersistenceTotalMaxBytes: 1000\nmodels:", 1)
    b = start(berth, tmp_path, config)
    try:
        ask(b, "a")
        ask(b, "b", "hi")
        assert "over the 1000 byte cap" in requests.get(b.url + "/logs").text
        assert not list((tmp_path / "home" / "models" / ".slots").rglob("slot-*.bin"))
    finally:
        b.stop()


def test_failed_save_never_blocks_a_stop(berth, tmp_path, start_port):
    """A server whose slot API fails (here a fake one) still stops promptly, and the failure is counted."""
    gguf = write_gguf(tmp_path / "fake.gguf")
    config = f"""
startPort: {start_port}
models:
  a:
    kvPersistence: true
    cmd: {fake_cmd('a', '-m', str(gguf))}
"""
    b = start(berth, tmp_path, config)
    try:
        ask(b, "a", "x")
        pid = b.pid_of("a")
        requests.post(b.url + "/unload", timeout=30)
        assert b.running() == {}
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the model to exit")
        assert 'berth_kv_slot_saves_total{model="a",outcome="failed"} 1.0' in requests.get(b.url + "/metrics").text
    finally:
        b.stop()


def test_crash_restores_the_last_good_save_and_says_so(berth, tmp_path, engine, gemma_gguf):
    b = start(berth, tmp_path, two_ids(engine, gemma_gguf))
    try:
        first = ask(b, "a")
        ask(b, "b", "hi")
        ask(b, "a")  # restored; now running with the marker set
        os.kill(b.pid_of("a"), signal.SIGKILL)  # a crash: nothing is saved
        wait_until(lambda: "a" not in b.running(), 10, "crash to be noticed")
        again = ask(b, "a")
        assert again["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] - 8
        assert "ended without a planned stop; restoring the older save" in requests.get(b.url + "/logs").text
    finally:
        b.stop()


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    return subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(config)], capture_output=True,
                          text=True, env={**os.environ, "BERTH_HOME": str(tmp_path / "home")})


def argv_of(out: str, model: str) -> list[str]:
    lines = out.splitlines()
    return lines[lines.index(model) + 1].split()[1:]


def test_check_reports_persistence_and_swa_full(tmp_path, engine, gemma_gguf):
    out = check(tmp_path, two_ids(engine, gemma_gguf)).stdout
    assert "--swa-full" in argv_of(out, "a") and "--slot-save-path" in argv_of(out, "a")
    # what it costs: 15 of the 18 layers slide over a 512-token window, holding pad(512 + 512 ubatch) = 1024
    # cells without --swa-full and all 2048 with it, each cell 1 KV head x (256 + 256) x f16: 15 x 1024 x 1 KiB
    assert "--swa-full added for kvPersistence: true: 15.0 MiB more KV" in out
    assert json.dumps(str(tmp_path / "home" / "models" / ".slots" / "a"))[1:-1] in out


def test_defaults_cost_nothing_unasked(tmp_path, engine, gemma_gguf):
    """Without kvPersistence: true no --swa-full (the slots of a sliding-window model are then not saved, and
    check says why); an explicit --no-slots means no slot persistence, and it contradicts kvPersistence: true."""
    out = check(tmp_path, two_ids(engine, gemma_gguf, persistence="null")).stdout
    assert not {"--swa-full", "--slots", "--slot-save-path"} & set(argv_of(out, "a"))
    assert "slots not saved: sliding-window layers reuse a saved slot only with --swa-full" in out
    out = check(tmp_path, two_ids(engine, gemma_gguf, extra_a="--no-slots", persistence="null")).stdout
    assert "--no-slots" in argv_of(out, "a")
    assert not {"--swa-full", "--slots", "--slot-save-path"} & set(argv_of(out, "a"))
    assert "slots not saved: --no-slots in its cmd" in out
    both = check(tmp_path, two_ids(engine, gemma_gguf, extra_a="--no-slots"))
    assert both.returncode == 2 and "kvPersistence: true" in both.stderr and "--no-slots" in both.stderr
