"""`berth pull` / `models` / `rm` against a local fake hub, through the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.fake_hub import FakeHub
from tests.support.ggufs import write_gguf

REPO = "acme/tiny-llm-GGUF"


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "berth-home"


def berth_cli(home: Path, hub: FakeHub | None, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "BERTH_HOME": str(home), "HF_HOME": str(home / "hf"), "COLUMNS": "200"}
    env.pop("HF_HUB_OFFLINE", None)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "berth.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def publish(hub: FakeHub, tmp_path: Path, *names: str, elements: int = 4096, repo: str = REPO) -> dict:
    files = {}
    for name in names:
        split = None
        if "-of-" in name:
            index, count = name.rsplit("-", 3)[-3], name.rsplit("-", 3)[-1].split(".")[0]
            split = (int(index), int(count))
        files[name] = hub.add(repo, name, write_gguf(tmp_path / "upstream" / name, elements=elements, split=split))
    return files


def test_quant_tag_selection_is_case_insensitive_and_names_alternatives(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny-UD-Q3_K_XL.gguf")
    result = berth_cli(home, hub, "pull", f"{REPO}:q8_0", "--retry-delay", "0.05")
    assert result.returncode == 0, result.stderr
    entry = home / "models" / "tiny-llm-q8_0"
    assert os.readlink(entry / "model.gguf") == "files/tiny-Q8_0.gguf"
    assert hub.gets == {"tiny-Q8_0.gguf": 1}
    marker = json.loads((entry / "berth-model.json").read_text())
    assert marker["files"][0]["sha256"] == hub.repos[REPO]["tiny-Q8_0.gguf"].sha256
    missing = berth_cli(home, hub, "pull", f"{REPO}:Q5_K_S")
    assert missing.returncode == 2
    assert "no GGUF file for quant 'Q5_K_S'" in missing.stderr and "Q4_K_M" in missing.stderr
    bad = berth_cli(home, hub, "pull", "not a ref")
    assert bad.returncode == 2 and "owner/repo:QUANT" in bad.stderr


def test_split_model_and_mmproj(hub, home, tmp_path):
    publish(hub, tmp_path, "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf",
            "mmproj-big-F32.gguf", "mmproj-big-F16.gguf", "big-Q8_0.gguf")
    result = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--mmproj")
    assert result.returncode == 0, result.stderr
    entry = home / "models" / "tiny-llm-q4_k_m"
    assert sorted(p.name for p in (entry / "files").iterdir()) == [
        "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf", "mmproj-big-F16.gguf"]
    assert os.readlink(entry / "model.gguf") == "files/big-Q4_K_M-00001-of-00002.gguf"
    assert os.readlink(entry / "mmproj.gguf") == "files/mmproj-big-F16.gguf"
    listing = berth_cli(home, None, "models")
    assert "tiny-llm-q4_k_m" in listing.stdout and "Q4_K_M" in listing.stdout and "yes" in listing.stdout
    one_hash = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--sha256", "0" * 64, "--name", "other")
    assert one_hash.returncode == 2 and "has 2 parts" in one_hash.stderr


@pytest.mark.parametrize("files, quant, model, projector", [
    # unsloth / Qwen style: the projector named after the model, in several precisions, the model at F16 too
    (("Qwen3-VL-4B-Instruct-Q4_K_M.gguf", "Qwen3-VL-4B-Instruct-F16.gguf", "mmproj-Qwen3-VL-4B-Instruct-BF16.gguf",
      "mmproj-Qwen3-VL-4B-Instruct-F16.gguf", "mmproj-Qwen3-VL-4B-Instruct-F32.gguf",
      "mmproj-Qwen3-VL-4B-Instruct-Q8_0.gguf"),
     "F16", "Qwen3-VL-4B-Instruct-F16.gguf", "mmproj-Qwen3-VL-4B-Instruct-F16.gguf"),
    # ggml-org / MiniCPM style: one name for the projector, whatever the model
    (("ggml-model-Q4_K_M.gguf", "ggml-model-Q8_0.gguf", "mmproj-model-f16.gguf", "mmproj-model-bf16.gguf"),
     "Q4_K_M", "ggml-model-Q4_K_M.gguf", "mmproj-model-f16.gguf"),
    # `*.mmproj.gguf` beside a model of the same precision: the projector is no candidate for the model
    (("vl-Q4_K_M.gguf", "vl-F16.gguf", "vl-F32.mmproj.gguf", "vl-F16.mmproj.gguf"), "f16", "vl-F16.gguf",
     "vl-F16.mmproj.gguf"),
    # projectors of two models in one repo: the one named like the model pulled
    (("Vis-4B-Q4_K_M.gguf", "Vis-8B-Q4_K_M.gguf", "mmproj-Vis-4B-F16.gguf", "mmproj-Vis-8B-F16.gguf"),
     "Q4_K_M", None, None),
    (("llava-v1.5-7b-Q4_K.gguf", "llava-v1.5-7b-mmproj-model-f16.gguf"), "Q4_K", "llava-v1.5-7b-Q4_K.gguf",
     "llava-v1.5-7b-mmproj-model-f16.gguf"),
])
def test_projectors_are_found_as_real_repos_name_them(hub, home, tmp_path, files, quant, model, projector):
    publish(hub, tmp_path, *files)
    result = berth_cli(home, hub, "pull", f"{REPO}:{quant}", "--mmproj")
    if model is None:  # two models match the quant: named by file, each gets its own projector
        assert result.returncode == 2 and "matches several models" in result.stderr
        for size in ("4B", "8B"):
            named = berth_cli(home, hub, "pull", f"{REPO}/Vis-{size}-Q4_K_M.gguf", "--mmproj")
            assert named.returncode == 0, named.stderr
            entry = home / "models" / f"vis-{size.lower()}-q4_k_m"
            assert os.readlink(entry / "mmproj.gguf") == f"files/mmproj-Vis-{size}-F16.gguf"
        return
    assert result.returncode == 0, result.stderr
    entry = home / "models" / f"tiny-llm-{quant.lower()}"
    assert os.readlink(entry / "model.gguf") == f"files/{model}"
    assert os.readlink(entry / "mmproj.gguf") == f"files/{projector}"
    assert sorted(hub.gets) == sorted([model, projector])  # nothing else was downloaded
    listing = berth_cli(home, None, "models").stdout.splitlines()
    assert "PROJECTOR (vision)" in listing[0]
    row = next(line for line in listing if line.startswith(f"tiny-llm-{quant.lower()} "))
    assert projector in row.split()
    plain = berth_cli(home, hub, "pull", f"{REPO}:{quant}", "--name", "without-projector")
    assert plain.returncode == 0, plain.stderr
    row = next(line for line in berth_cli(home, None, "models").stdout.splitlines() if line.startswith("without-"))
    assert row.split()[4] == "-"  # NAME SIZE QUANT VERIFIED PROJECTOR


def test_resume_after_connection_drop_transfers_little_twice(hub, home, tmp_path):
    files = publish(hub, tmp_path, "tiny-Q4_K_M.gguf", elements=1 << 19)  # 8 MiB
    size = files["tiny-Q4_K_M.gguf"].size
    hub.drop_after["tiny-Q4_K_M.gguf"] = size // 2
    result = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--retry-delay", "0.05")
    assert result.returncode == 0, result.stderr
    assert hub.gets["tiny-Q4_K_M.gguf"] >= 2  # it was cut and asked again
    assert hub.bytes_sent["tiny-Q4_K_M.gguf"] < 1.2 * size  # resumed, not restarted


def test_corrupted_bytes_are_detected_and_fetched_again(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf")
    hub.corrupt_once.add("tiny-Q4_K_M.gguf")
    result = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--retry-delay", "0.05")
    assert result.returncode == 0, result.stderr
    assert hub.gets["tiny-Q4_K_M.gguf"] == 2
    stored = home / "models" / "tiny-llm-q4_k_m" / "files" / "tiny-Q4_K_M.gguf"
    assert stored.read_bytes() == (tmp_path / "upstream" / "tiny-Q4_K_M.gguf").read_bytes()


def test_truncated_gguf_is_rejected_and_never_marked(hub, home, tmp_path):
    source = write_gguf(tmp_path / "upstream" / "cut-Q4_K_M.gguf", elements=1 << 16)
    with open(source, "r+b") as fh:
        fh.truncate(source.stat().st_size - 4096)  # upstream itself is broken: hash and size agree
    hub.add(REPO, "cut-Q4_K_M.gguf", source)
    result = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--retry-delay", "0.05")
    assert result.returncode == 1
    assert "not a valid GGUF" in result.stderr and "truncated" in result.stderr
    assert not (home / "models" / "tiny-llm-q4_k_m" / "berth-model.json").exists()
    assert "no models" in berth_cli(home, None, "models").stdout


def test_sha256_option_overrides_hub_hash(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf")
    result = berth_cli(home, hub, "pull", f"{REPO}/tiny-Q4_K_M.gguf", "--sha256", "0" * 64, "--retries", "2",
                       "--retry-delay", "0.05")
    assert result.returncode == 1 and "sha256 mismatch" in result.stderr


def test_disk_full_fails_before_downloading(hub, home, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        publish(hub, tmp_path, "tiny-Q4_K_M.gguf", elements=1 << 19)
        result = berth_cli(small, hub, "pull", f"{REPO}:Q4_K_M")
        assert result.returncode == 1
        assert "not enough disk space" in result.stderr
        assert hub.gets["tiny-Q4_K_M.gguf"] == 0
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_offline_mode_serves_the_store_and_names_berth_pull(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf")
    absent = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", offline=True)
    assert absent.returncode == 2 and f"run `berth pull {REPO}:Q4_K_M`" in absent.stderr
    assert berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M").returncode == 0
    hub.stop()
    again = berth_cli(home, None, "pull", f"{REPO}:Q4_K_M", offline=True)
    assert again.returncode == 0, again.stderr


def test_concurrent_pulls_download_once(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf", elements=1 << 18)
    results = []
    threads = [threading.Thread(target=lambda: results.append(berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0, 0]
    assert hub.gets["tiny-Q4_K_M.gguf"] == 1


def test_rm_and_unknown_repo(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf")
    assert berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M").returncode == 0
    gone = berth_cli(home, None, "rm", "nope")
    assert gone.returncode == 2 and "tiny-llm-q4_k_m" in gone.stderr
    assert berth_cli(home, None, "rm", "tiny-llm-q4_k_m").returncode == 0
    assert not (home / "models" / "tiny-llm-q4_k_m").exists()
    unknown = berth_cli(home, hub, "pull", "acme/missing:Q4_K_M", "--retry-delay", "0.05")
    assert unknown.returncode == 2 and "acme/missing was not found" in unknown.stderr


def test_pull_all_fetches_every_store_model_of_a_config(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
models:
  by-key:
    model: {REPO}:Q8_0
    cmd: /opt/llama-server --port ${{PORT}}
  by-hf:
    cmd: /opt/llama-server -hf {REPO}:Q4_K_M --port ${{PORT}}
  plain:
    cmd: /opt/llama-server -m /m/x.gguf --port ${{PORT}}
""")
    result = berth_cli(home, hub, "pull", "--all", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert hub.gets == {"tiny-Q8_0.gguf": 1, "tiny-Q4_K_M.gguf": 1}
    check = berth_cli(home, None, "check", "-c", str(config))
    assert f"--model {home}/models/tiny-llm-q4_k_m/model.gguf" in check.stdout
    assert f"-hf {REPO}" not in check.stdout


def test_shutdown_during_a_start_time_pull_cancels_it_and_keeps_the_partial_file(berth, hub, home, tmp_path,
                                                                                 start_port):
    from tests.support.harness import wait_until

    publish(hub, tmp_path, "tiny-Q4_K_M.gguf", elements=1 << 19)  # 8 MiB: 128 blocks
    hub.seconds_per_block = 0.5  # about a minute to download in full
    config = f"""
startPort: {start_port}
models:
  tiny:
    model: {REPO}:Q4_K_M
    cmd: /bin/false --port ${{PORT}}
"""
    b = berth(config, env={"BERTH_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf")})
    waiter = threading.Thread(target=lambda: _post_quietly(b.url))
    waiter.start()
    wait_until(lambda: hub.bytes_sent["tiny-Q4_K_M.gguf"] > 256 * 1024, 20, "the pull to be under way")
    assert b.stop(timeout=30) == 0  # a pull that could not be cancelled would hold shutdown for a minute
    waiter.join(30)
    partial = home / "models" / "tiny-llm-q4_k_m" / "files" / "tiny-Q4_K_M.gguf.partial"
    assert partial.exists() and 0 < partial.stat().st_size < hub.repos[REPO]["tiny-Q4_K_M.gguf"].size


def _post_quietly(url: str) -> None:
    import requests

    try:
        requests.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=60)
    except requests.RequestException:
        pass


@pytest.mark.parametrize("listed", ["../escaped-Q4_K_M.gguf", "files/../../../escaped-Q4_K_M.gguf",
                                    "{outside}/escaped-Q4_K_M.gguf", "..\\escaped-Q4_K_M.gguf"])
def test_a_hub_that_lists_a_path_outside_the_store_is_refused(hub, home, tmp_path, listed):
    """A lying hub: its listing names a file outside the model's directory (with a matching sha256, since
    the hash comes from the same hub). Nothing may be written there, linked or marked verified."""
    outside = tmp_path / "outside"
    listed = listed.format(outside=outside)
    hub.lies = True  # and serves the file at whatever URL the client makes of that name
    hub.add(REPO, listed, write_gguf(tmp_path / "upstream" / "escaped-Q4_K_M.gguf"))
    result = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--retry-delay", "0.05")
    assert result.returncode == 1, result.stderr
    assert "refusing to write it" in result.stderr and "escaped-Q4_K_M.gguf" in result.stderr
    assert sum(hub.gets.values()) == 0  # refused before any download
    written = [p for p in tmp_path.rglob("escaped-Q4_K_M.gguf*") if "upstream" not in p.parts]
    assert written == []
    assert not list((home / "models").rglob("berth-model.json"))


def test_store_names_are_one_plain_directory_name(hub, home, tmp_path):
    publish(hub, tmp_path, "tiny-Q4_K_M.gguf")
    for name in ("..", "../elsewhere", ".hidden", "a/b"):
        refused = berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M", "--name", name)
        assert refused.returncode == 2 and "is not a store name" in refused.stderr, (name, refused.stderr)
    assert sum(hub.gets.values()) == 0 and not (home / "files").exists() and not (home / "elsewhere").exists()
    bad_ref = berth_cli(home, hub, "pull", f"{REPO}/../tiny-Q4_K_M.gguf")
    assert bad_ref.returncode == 2 and "'..'" in bad_ref.stderr
    assert berth_cli(home, hub, "pull", f"{REPO}:Q4_K_M").returncode == 0
    escape = berth_cli(home, None, "rm", "tiny-llm-q4_k_m/../..")  # would be BERTH_HOME itself
    assert escape.returncode == 2 and "is not a store name" in escape.stderr
    assert (home / "models" / "tiny-llm-q4_k_m" / "berth-model.json").exists()
