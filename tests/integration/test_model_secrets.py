"""What model processes get of berth's secrets (real berth, fake model servers): no credentials from berth's
environment unless the config passes them, and no secret on any command line berth logs or shows."""

from __future__ import annotations

import requests

from tests.support.harness import fake_cmd, wait_until

KEY = "client-key-0001"
SECRETS = {"BERTH_API_KEY": KEY, "HF_TOKEN": "hf-token-0002", "OPENAI_API_KEY": "openai-key-0003",
           "BERTH_AGENT_KEY": "agent-key-0004", "AWS_SECRET_ACCESS_KEY": "aws-secret-0005"}
IN_CMD, IN_CMD_STOP = "shell-secret-0006", "stop-secret-0007"
AUTH = {"Authorization": f"Bearer {KEY}"}


def environment(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_model_processes_get_no_credentials_of_berths_and_no_secret_is_shown(berth, start_port, tmp_path):
    config = f"""
startPort: {start_port}
apiKeys: ["${{env.BERTH_API_KEY}}"]
models:
  plain:
    cmd: sh -c "exec {fake_cmd('plain')} --api-key {IN_CMD}"
    cmdStop: sh -c "kill ${{PID}}; exec true --api-key {IN_CMD_STOP}"
  passes-token:
    cmd: {fake_cmd('passes-token')}
    env: ["HF_TOKEN=${{env.HF_TOKEN}}"]
"""
    b = berth(config, env={**SECRETS, "FAKE_PLAIN_SETTING": "kept"})
    running, envs = {}, {}
    for model in ("passes-token", "plain"):  # one after the other: each may swap the other out
        answer = requests.post(b.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                               json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text
        running[model] = next(r for r in requests.get(b.url + "/running", headers=AUTH, timeout=5).json()["running"]
                              if r["model"] == model)
        envs[model] = environment(running[model]["pid"])
    plain, passed = envs["plain"], envs["passes-token"]
    assert plain["FAKE_PLAIN_SETTING"] == "kept" and "PATH" in plain  # the rest of berth's environment
    assert not set(SECRETS) & set(plain), sorted(set(SECRETS) & set(plain))
    assert passed["HF_TOKEN"] == SECRETS["HF_TOKEN"]  # the config passes this one on purpose
    assert not (set(SECRETS) - {"HF_TOKEN"}) & set(passed)
    assert requests.post(b.url + "/models/unload", json={"model": "plain"}, headers=AUTH, timeout=30).ok
    wait_until(lambda: "running cmdStop" in b.output(), 10, "cmdStop to run")
    shown = b.output() + requests.get(b.url + "/logs", headers=AUTH, timeout=5).text + str(running)
    assert "--api-key <redacted>" in running["plain"]["cmd"]
    assert IN_CMD not in shown and IN_CMD_STOP not in shown
    assert f"sh -c kill {running['plain']['pid']}; exec true --api-key <redacted>" in b.output()
