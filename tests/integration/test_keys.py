"""Scoped API keys through the real openai client: each refusal (model, scope, each limit) with its body and
headers, usage per key against what the stand-in upstream reported (streamed and not, across a restart),
and the order keys are served in when they wait for the same model; the same keys through the real ollama
client on berth's Ollama routes."""

from __future__ import annotations

import threading

import ollama
import openai
import pytest
import requests
from openai import OpenAI

from tests.support.harness import fake_cmd, wait_until

ADMIN = "admin-secret"
KEYS = f"""
apiKeys:
  - {ADMIN}
  - name: alice
    key: alice-secret
    models: ["a*"]
    scopes: [inference]
  - name: watcher
    key: watcher-secret
    scopes: [metrics]
  - name: hasty
    key: hasty-secret
    limits: {{requestsPerMinute: 2}}
  - name: single
    key: single-secret
    limits: {{concurrency: 1}}
  - name: frugal
    key: frugal-secret
    limits: {{tokensPerDay: 5}}
"""


def config(start_port: int, extra: str = "", model_a: str = "") -> str:
    return f"""
startPort: {start_port}
{KEYS}
{extra}
models:
  a:
    cmd: {fake_cmd('a')}
    aliases: [alpha]
{model_a}
  b:
    cmd: {fake_cmd('b')}
"""


def serve(berth, start_port: int, home, **kwargs):
    """berth with this test's own BERTH_HOME: usage (and tokensPerDay) persist there."""
    return berth(config(start_port, **kwargs), env={"BERTH_HOME": str(home)})


def client(b, key: str) -> OpenAI:
    return OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)


def ask(c: OpenAI, model: str, text: str = "hello", **extra):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], extra_body=extra)


def metric(b, line_start: str) -> float:
    text = requests.get(b.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_key_outside_its_models_gets_403_naming_the_model_and_does_not_see_it_listed(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    alice = client(b, "alice-secret")
    assert ask(alice, "alpha").choices[0].message.content == "hello from a"  # "a*" matches a, asked by alias
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ask(alice, "b")
    error = caught.value
    assert error.status_code == 403 and error.type == "permission_error" and error.code == "model_not_allowed"
    assert "'b'" in error.message and "a*" in error.message
    assert [m.id for m in alice.models.list()] == ["a"]
    assert sorted(m.id for m in client(b, ADMIN).models.list()) == ["a", "b"]  # a plain key sees every model
    with pytest.raises(openai.NotFoundError) as unknown:  # the list of models it names is the key's own
        ask(alice, "nope")
    assert "available models: a" in unknown.value.message and "b" not in unknown.value.message.split(":")[-1]
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, {
        "type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]
    with pytest.raises(openai.PermissionDeniedError) as with_image:  # refused before berth takes its images
        alice.chat.completions.create(model="b", messages=image)
    assert with_image.value.code == "model_not_allowed"
    assert metric(b, 'berth_key_refusals_total{key="alice",reason="model"}') == 2


def test_a_key_outside_its_scopes_gets_403_naming_the_scope(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(b, "watcher-secret").models.list()  # metrics only
    error = caught.value
    assert error.code == "scope_not_allowed" and "'inference'" in error.message and "/v1/models" in error.message
    watcher = {"Authorization": "Bearer watcher-secret"}
    assert requests.get(b.url + "/metrics", headers=watcher, timeout=5).status_code == 200
    assert requests.get(b.url + "/running", headers=watcher, timeout=5).status_code == 200
    alice = {"Authorization": "Bearer alice-secret"}
    for method, path in (("GET", "/logs"), ("GET", "/api/requests"), ("GET", "/metrics"), ("POST", "/models/unload"),
                         ("GET", "/upstream/a/"), ("GET", "/slots?model=a")):
        refused = requests.request(method, b.url + path, headers=alice, json={"model": "a"}, timeout=5)
        assert refused.status_code == 403, path
        assert refused.json()["error"]["type"] == "permission_error"
    assert requests.get(b.url + "/props?model=a", headers=alice, timeout=5).status_code == 200
    assert requests.get(b.url + "/v1/nothing", headers=alice, timeout=5).status_code == 404  # no route, for anyone


def test_requests_per_minute_answers_429_with_retry_after(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    hasty = client(b, "hasty-secret")
    ask(hasty, "a")
    ask(hasty, "b")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(hasty, "a")
    error = caught.value
    assert error.status_code == 429 and error.type == "rate_limit_error" and error.code == "key_requests_per_minute"
    assert 1 <= int(error.response.headers["Retry-After"]) <= 60
    assert "requestsPerMinute limit (2)" in error.message


def test_concurrency_answers_429_while_the_keys_requests_run(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    single = client(b, "single-secret")
    ask(single, "a")  # loaded
    slow = threading.Thread(target=ask, args=(single, "a"), kwargs={"sleep": 3})
    slow.start()
    try:
        wait_until(lambda: metric(b, 'berth_key_requests_in_flight{key="single"}') == 1, 10, "the slow request")
        with pytest.raises(openai.RateLimitError) as caught:
            ask(single, "b")
        assert caught.value.code == "key_concurrency" and caught.value.response.headers["Retry-After"] == "1"
    finally:
        slow.join()
    ask(single, "b")  # its request ended: the next may run


def test_tokens_per_day_answers_429_until_midnight(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    frugal = client(b, "frugal-secret")
    first = ask(frugal, "a", "one two three")  # the stand-in counts a token per word, and answers 3
    assert first.usage is not None and first.usage.total_tokens == 6
    with pytest.raises(openai.RateLimitError) as caught:
        ask(frugal, "a")
    error = caught.value
    assert error.code == "key_tokens_per_day" and "used 6 tokens today" in error.message
    assert 1 <= int(error.response.headers["Retry-After"]) <= 86400


def usage_of(b, key: str, who: str = ADMIN, since: str = "1h") -> dict:
    response = requests.get(b.url + f"/api/usage?since={since}&key={key}", timeout=5,
                            headers={"Authorization": f"Bearer {who}"})
    assert response.status_code == 200, response.text
    [entry] = response.json()["keys"]
    return entry


def test_usage_per_key_equals_what_the_upstream_reported_streamed_and_not_and_survives_a_restart(
        berth, start_port, tmp_path):
    home = tmp_path / "home"
    b = serve(berth, start_port, home)
    alice = client(b, "alice-secret")
    prompt = completion = 0
    for words in ("one", "one two", "one two three four"):
        answer = ask(alice, "a", words)
        assert answer.usage is not None
        prompt, completion = prompt + answer.usage.prompt_tokens, completion + answer.usage.completion_tokens
        streamed = alice.chat.completions.create(model="a", messages=[{"role": "user", "content": words}],
                                                 stream=True, extra_body={"chunks": 4})
        [final] = [chunk.usage for chunk in streamed if chunk.usage is not None]
        prompt, completion = prompt + final.prompt_tokens, completion + final.completion_tokens
    with pytest.raises(openai.PermissionDeniedError):
        ask(alice, "b")
    assert (prompt, completion) == (14, 21)  # 7 words twice; 3 tokens each answer, 4 each stream

    seen = usage_of(b, "alice")
    assert (seen["requests"], seen["errors"], seen["prompt_tokens"], seen["completion_tokens"]) == (7, 1, 14, 21)
    assert [(m["model"], m["requests"], m["errors"]) for m in seen["models"]] == [("a", 6, 0), ("b", 1, 1)]
    assert usage_of(b, "alice", who="alice-secret") == seen  # a key sees its own usage
    refused = requests.get(b.url + "/api/usage?key=key-1", headers={"Authorization": "Bearer alice-secret"}, timeout=5)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    assert metric(b, 'berth_key_tokens_total{key="alice",kind="prompt",model="a"}') == 14
    assert metric(b, 'berth_key_tokens_total{key="alice",kind="completion",model="a"}') == 21
    assert metric(b, 'berth_key_requests_total{key="alice",model="a"}') == 6
    assert "alice-secret" not in requests.get(b.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text

    assert b.stop() == 0
    again = serve(berth, start_port, home)
    assert usage_of(again, "alice") == seen
    assert oct((home / "usage.sqlite3").stat().st_mode & 0o777) == "0o600"


def test_a_client_that_leaves_right_after_done_got_an_answer_and_its_tokens_count(berth, start_port, tmp_path):
    """The openai client closes a stream as soon as it reads [DONE]; a model server may end its response a
    moment later. The answer was whole: it is counted as answered, with the usage the server sent."""
    b = serve(berth, start_port, tmp_path / "home")
    alice = client(b, "alice-secret")
    stream = alice.chat.completions.create(model="a", messages=[{"role": "user", "content": "one two"}], stream=True,
                                           extra_body={"chunks": 3, "end_delay": 2})
    assert [chunk.usage.prompt_tokens for chunk in stream if chunk.usage] == [2]  # and the client closes
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def recorded() -> list[dict]:
        return requests.get(b.url + "/api/requests", headers=admin, timeout=5).json()["requests"]

    wait_until(lambda: recorded() != [], 10, "the request to be recorded")
    [entry] = recorded()
    assert (entry["status"], entry["prompt_tokens"], entry["completion_tokens"], entry["key"]) == (200, 2, 3, "alice")
    assert usage_of(b, "alice")["completion_tokens"] == 3


def test_keys_waiting_for_a_busy_model_take_turns(berth, start_port, tmp_path):
    """The model's server takes one request at a time (`parallel: 1`): while alice's first request holds it,
    four more of hers wait, then one of bob's. Bob's is served next, not after hers."""
    extra = "  - {name: bob, key: bob-secret}\n"
    b = berth(config(start_port, model_a="    parallel: 1").replace("\napiKeys:\n", "\napiKeys:\n" + extra),
              env={"BERTH_HOME": str(tmp_path / "home")})
    alice, bob = client(b, "alice-secret"), client(b, "bob-secret")
    ask(alice, "a")  # loaded
    hold = tmp_path / "go"
    numbers: dict[str, list[int]] = {"alice": [], "bob": []}

    def send(who: str, c: OpenAI, **extra) -> threading.Thread:
        def run() -> None:
            numbers[who].append(ask(c, "a", **extra).model_extra["number"])
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def running_a() -> dict:
        return requests.get(b.url + "/running", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5).json()[
            "running"][0]

    threads = [send("alice", alice, hold_file=str(hold))]
    wait_until(lambda: running_a()["in_flight"] == 1, 10, "alice's first request at the server")
    threads += [send("alice", alice) for _ in range(4)]
    wait_until(lambda: running_a()["queued"] == 4, 10, "alice's next four to wait in berth")
    threads.append(send("bob", bob))
    wait_until(lambda: running_a()["queued"] == 5, 10, "bob's request to wait behind them")
    hold.touch()
    for thread in threads:
        thread.join(30)
    first = min(numbers["alice"])
    assert numbers["bob"] == [first + 1]  # right after the request that held the server
    assert sorted(numbers["alice"]) == [first, first + 2, first + 3, first + 4, first + 5]


def test_berth_key_makes_a_key_and_its_hash_and_hashes_a_key_from_stdin(tmp_path):
    import hashlib
    import os
    import subprocess
    import sys

    def berth_key(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "berth.cli", "key", *args], input=stdin, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})

    made = berth_key("new", "--name", "alice")
    assert made.returncode == 0, made.stderr
    lines = dict(line.split(":", 1) for line in made.stdout.splitlines()[:2])
    key, key_hash = lines["key"].strip(), lines["keyHash"].strip()
    assert key.startswith("berth-") and len(key) > 40
    assert key_hash == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert f"  - name: alice\n    keyHash: {key_hash}" in made.stdout  # an entry to paste under apiKeys
    assert berth_key("hash", stdin=key + "\n").stdout.strip() == key_hash
    assert berth_key("hash", "test").stdout.strip() == (
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
    empty = berth_key("hash", stdin="\n")
    assert empty.returncode == 2 and "the key is empty" in empty.stderr
    assert berth_key("new").stdout.split()[1] != key  # a new key each time


def ollama_client(b, key: str) -> ollama.Client:
    return ollama.Client(host=b.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


HELLO = [{"role": "user", "content": "say hello"}]


def test_ollama_routes_keep_a_key_to_its_models_and_scopes(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    admin, alice = ollama_client(b, ADMIN), ollama_client(b, "alice-secret")
    assert alice.chat(model="alpha", messages=HELLO).message.content == "hello from a"
    assert [m.model for m in alice.list().models] == ["a"]
    assert sorted(m.model for m in admin.list().models) == ["a", "b"]
    assert [m.model for m in alice.ps().models] == ["a"]
    refusals = {
        "chat": lambda: alice.chat(model="b", messages=HELLO),
        "generate": lambda: alice.generate(model="b", prompt="hello", stream=True),
        "embed": lambda: alice.embed(model="b", input="hello"),
        "show": lambda: alice.show("b"),
        "load": lambda: alice.generate(model="b"),  # no prompt: Ollama's way to load a model
    }
    for what, refused in refusals.items():
        with pytest.raises(ollama.ResponseError) as caught:
            result = refused()
            if what == "generate":
                list(result)
        assert caught.value.status_code == 403, what
        assert "may not use model 'b'" in caught.value.error and "a*" in caught.value.error, what
    assert metric(b, 'berth_key_refusals_total{key="alice",reason="model"}') == len(refusals)

    for what, admin_only in {
        "pull": lambda: alice.pull("a"), "delete": lambda: alice.delete("a"),
        "unload": lambda: alice.generate(model="a", keep_alive=0),  # stops the model for every key
    }.items():
        with pytest.raises(ollama.ResponseError) as caught:
            admin_only()
        assert caught.value.status_code == 403 and "needs the scope 'admin'" in caught.value.error, what
    assert [m.model for m in alice.ps().models] == ["a"]  # still running
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client(b, "watcher-secret").chat(model="a", messages=HELLO)  # metrics only
    assert caught.value.status_code == 403 and "needs the scope 'inference'" in caught.value.error
    admin.chat(model="b", messages=HELLO)  # b runs in a's place
    assert [m.model for m in admin.ps().models] == ["b"] and alice.ps().models == []  # b is not alice's
    admin.generate(model="b", keep_alive=0)  # the admin key may unload
    wait_until(lambda: admin.ps().models == [], 10, "b to stop")


def test_ollama_requests_count_against_a_keys_limits_and_usage(berth, start_port, tmp_path):
    b = serve(berth, start_port, tmp_path / "home")
    alice = ollama_client(b, "alice-secret")
    prompt = completion = 0
    for words in ("one", "one two three"):
        whole = alice.chat(model="a", messages=[{"role": "user", "content": words}])
        prompt, completion = prompt + whole.prompt_eval_count, completion + whole.eval_count
        [last] = [part for part in alice.generate(model="a", prompt=words, stream=True) if part.done]
        prompt, completion = prompt + last.prompt_eval_count, completion + last.eval_count
    assert prompt > 0 and completion > 0
    seen = usage_of(b, "alice")
    assert (seen["requests"], seen["errors"], seen["prompt_tokens"], seen["completion_tokens"]) == (
        4, 0, prompt, completion)
    assert metric(b, 'berth_key_tokens_total{key="alice",kind="completion",model="a"}') == completion

    hasty = ollama_client(b, "hasty-secret")
    hasty.chat(model="a", messages=HELLO)
    hasty.generate(model="b", prompt="hello")
    with pytest.raises(ollama.ResponseError) as caught:
        hasty.chat(model="a", messages=HELLO)
    assert caught.value.status_code == 429 and "requestsPerMinute limit (2)" in caught.value.error
    refused = requests.post(b.url + "/api/chat", headers={"Authorization": "Bearer hasty-secret"}, timeout=5,
                            json={"model": "a", "messages": HELLO, "stream": False})
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert set(refused.json()) == {"error"}  # Ollama's shape
