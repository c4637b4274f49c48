"""berth serves on either event loop (core/eventloop.py), and the model servers it spawns get the same
private umask on both: asyncio's loop sets it through subprocess' `umask`, uvloop's through the child."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.harness import stand_in_cmd

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(importlib.util.find_spec("uvloop") is None,
                                                                    reason="uvloop is not installed"))]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_model_server_is_spawned_private_and_answers_on_either_loop(berth, start_port, loop):
    b = berth(f"""
startPort: {start_port}
models:
  m:
    cmd: {stand_in_cmd('--alias', 'm', '--token-ms', '0.2')}
""", env={"BERTH_EVENT_LOOP": loop})
    client = OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "tok0 tok1 tok2 "
    pid = b.pid_of("m")
    assert pid is not None
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Umask"].strip() == "0077"
