"""A model spread over `berth agent`s with llama.cpp's RPC backend: real agents, rpc servers and
llama-server, a generated mixture-of-experts GGUF, the openai client."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import openai
import psutil
import pytest
import requests

from tests.e2e.conftest import rpc_server_binary
from tests.support.harness import children_of, closed_by_server, free_port, kill_quietly, pid_alive, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_models import write_llama  # noqa: E402

KEY = "gateway-key"  # the gateway's client key (apiKeys)
AGENT_KEY = "agent-key"  # the agents' own key (rpc.apiKey, `berth agent --api-key`)
PROMPT = "hello world"
_BUFFER = re.compile(r"\[(\S+)\] .*?RPC0\[([^\]]+)\]\s+(model|KV|compute) buffer size =\s+([\d.]+) MiB")


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory) -> str:
    """Four layers of eight experts; weights large enough that greedy output changes token to token."""
    return str(write_llama(tmp_path_factory.mktemp("rpc") / "moe.gguf", n_expert=8, n_expert_used=2, scale=0.5))


class Agent:
    """A real `berth agent` subprocess, optionally inside a network namespace."""

    def __init__(self, log: Path, host: str, port: int, *extra: str, netns: str | None = None,
                 key: str | None = AGENT_KEY, prefix: tuple[str, ...] = ()) -> None:
        self.host, self.port, self.extra, self.netns, self.log_path = host, port, extra, netns, log
        self.key, self.prefix = key, prefix
        self.address = f"{host}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        prefix = [*(["ip", "netns", "exec", self.netns] if self.netns else []), *self.prefix]
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k != "BERTH_AGENT_KEY"}
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "berth.cli", "agent", "--listen", self.address,
                                      *(["--api-key", self.key] if self.key else []), *self.extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                return requests.get(f"http://{self.address}/health", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_until(up, 20, f"agent {self.address}")
        return self

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def inventory(self) -> dict:
        return requests.get(f"http://{self.address}/v1/inventory", headers=self.headers, timeout=5).json()

    def rpc_pids(self) -> list[int]:
        return [lease["rpc_server_pid"] for lease in self.inventory()["leases"]]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        self._log.close()


@pytest.fixture
def agents(tmp_path):
    """Start agents: `agents(*extra_args, port=None, host="127.0.0.1", netns=None, key=AGENT_KEY, prefix=())`;
    all stopped after, and any rpc server one leaves behind killed (the test checks there is none)."""
    rpc_server_binary()
    started: list[Agent] = []

    def start(*extra: str, port: int | None = None, host: str = "127.0.0.1", netns: str | None = None,
              key: str | None = AGENT_KEY, prefix: tuple[str, ...] = ()) -> Agent:
        agent = Agent(tmp_path / f"agent-{len(started)}.log", host, port or free_port(), *extra, netns=netns,
                      key=key, prefix=prefix)
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        leftovers = children_of(agent.proc.pid) if agent.proc and agent.proc.poll() is None else []
        agent.stop()
        for pid in leftovers:
            kill_quietly(pid)


def config(model: str, a: Agent, b: Agent, extra_models: str = "") -> str:
    """local, and the same model split over agents a and b in each placement; `extra_models` are more
    entries under `models:` (written without indentation)."""
    cmd = f"llama-server -m {model} --port ${{PORT}} -c 512 -np 1 -lv 4"
    return textwrap.dedent(f"""\
        apiKeys: [{KEY}]
        models:
          local:
            cmd: {cmd}
          experts:
            cmd: {cmd}
            rpc: {{agents: ["{a.address}", "{b.address}"], placement: experts, apiKey: {AGENT_KEY}}}
          layers:
            cmd: {cmd}
            rpc: {{agents: ["{a.address}", "{b.address}"], placement: layers, apiKey: {AGENT_KEY}}}
          custom:
            cmd: {cmd} -ngl 0 -ot 'blk\\.(1|2)\\.ffn_.*_exps\\.=RPC0[{b.address}]'
            rpc: {{agents: ["{a.address}", "{b.address}"], placement: custom, apiKey: {AGENT_KEY}}}
        """) + textwrap.indent(textwrap.dedent(extra_models), "  ")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(server, model: str, tokens: int = 24) -> str:
    answer = client(server).completions.create(model=model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == tokens
    return answer.choices[0].text


def home(tmp_path) -> dict[str, str]:
    return {"BERTH_HOME": str(tmp_path / "home")}


def buffers(server, model: str) -> dict[str, dict[str, float]]:
    """llama.cpp's own buffer sizes (MiB) per rpc endpoint for `model`'s current run, from its -lv 4 log."""
    found: dict[str, dict[str, float]] = {}
    log = requests.get(server.url + "/logs", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    for source, endpoint, kind, mib in _BUFFER.findall(log):
        if source == model:
            found.setdefault(endpoint, {})[kind] = float(mib)
    return found


def rpc_endpoints(running: dict, leased: list[str]) -> dict[str, str]:
    """Agent address -> the endpoint in the model's `--rpc` (this machine's forwarder to it), for the agents
    the model leased from, in rpc.agents order."""
    argv = running["cmd"].split()
    return dict(zip(leased, argv[argv.index("--rpc") + 1].split(",")))


def test_a_model_split_over_two_agents_answers_as_the_local_one(berth, agents, moe_gguf, tmp_path):
    a, b = agents("--memory", "4GiB"), agents("--memory", "4GiB")  # even offers (free RAM moves between two starts)
    server = berth(config(moe_gguf, a, b), env=home(tmp_path))
    check = subprocess.run([sys.executable, "-m", "berth.cli", "check", "-c", str(server.config_path)],
                           capture_output=True, text=True, env={**os.environ, **home(tmp_path)})
    assert check.returncode == 0, check.stderr
    assert f"--rpc {a.address},{b.address}" in check.stdout
    assert rf"blk\.(0|1)\.ffn_(gate|up|down|gate_up)_exps\.=RPC0[{a.address}]" in check.stdout  # even offers
    assert "--gpu-layers 5 --tensor-split 3,2" in check.stdout
    local = greedy(server, "local")
    assert len(set(local)) > 4  # output that varies, so that equal answers mean something
    for model in ("experts", "layers", "custom"):
        assert greedy(server, model) == local, model
    # each agent lent one rpc server per split model, sized as the gateway planned it
    running = {r["model"]: r for r in requests.get(server.url + "/running", headers={"Authorization": f"Bearer {KEY}"},
                                                   timeout=5).json()["running"]}
    leases_of = {agent.address: {lease["model"]: lease for lease in agent.inventory()["leases"]} for agent in (a, b)}
    assert set(leases_of[b.address]) == {"experts", "layers", "custom"}
    assert set(leases_of[a.address]) == {"experts", "layers"}  # custom's -ot puts nothing on a: no lease there
    for agent in (a, b):
        leases = leases_of[agent.address]
        for model, lease in leases.items():
            assert lease["bytes_to_server"] > 0  # the weights went through the relay
            estimated = json.loads(subprocess.run(
                [sys.executable, "-m", "berth.cli", "fit", model, "-c", str(server.config_path), "--json"],
                capture_output=True, text=True, check=True, env={**os.environ, **home(tmp_path)}).stdout)
            planned = estimated["devices"].get(f"rpc:{agent.address}", {})
            assert lease["need_bytes"] == planned.get("total_bytes", 0), (model, agent.address)
            # what llama.cpp itself allocated there, reached through the forwarder --rpc names for this agent
            endpoint = rpc_endpoints(running[model], [x.address for x in (a, b) if model in leases_of[x.address]])
            real = buffers(server, model).get(endpoint[agent.address], {})
            mib = 1024 * 1024
            assert planned.get("weights_bytes", 0) / mib == pytest.approx(real.get("model", 0), rel=0.01, abs=0.02)
            assert planned.get("kv_bytes", 0) / mib == pytest.approx(real.get("KV", 0), rel=0.01, abs=0.02)
            if model == "experts":
                assert planned["compute_bytes"] / mib == pytest.approx(real["compute"], rel=0.10)
            # measured at -lv 4, the plan per agent is llama.cpp's own figure from now on
            measured = running[model]["memory"]["planned_bytes"].get(f"rpc:{agent.address}", 0) / mib
            assert measured == pytest.approx(sum(real.values()), abs=0.05)


def test_an_agent_killed_mid_stream_ends_the_request_naming_it_and_the_model_recovers(berth, agents, moe_gguf,
                                                                                     tmp_path):
    a, b = agents(), agents()
    server = berth(config(moe_gguf, a, b), env=home(tmp_path))
    expected = greedy(server, "experts")
    a_servers = a.rpc_pids()
    model_pid = next(r["pid"] for r in requests.get(server.url + "/running", timeout=5,
                                                    headers={"Authorization": f"Bearer {KEY}"}).json()["running"]
                     if r["model"] == "experts")
    stream = client(server).completions.create(model="experts", prompt=PROMPT, max_tokens=100000, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    events = 0
    with pytest.raises(openai.APIError) as cut:
        for _ in stream:
            events += 1
            if events == 5:
                a.proc.send_signal(signal.SIGKILL)
    assert events >= 5
    assert f"rpc agent {a.address} is unreachable" in str(cut.value)
    wait_until(lambda: not any(pid_alive(p) for p in [*a_servers, model_pid]), 15,
               "the dead agent's rpc servers and the model's llama-server to be gone")
    wait_until(lambda: not any(lease["model"] == "experts" for lease in b.inventory()["leases"]), 15,
               "the other agent's rpc server for the stopped model to be released")
    with pytest.raises(openai.APIStatusError) as refused:
        greedy(server, "experts")
    assert refused.value.status_code == 503 and f"rpc agent {a.address} is unreachable" in str(refused.value)
    a.stop()
    agents(port=a.port)  # the same agent, back
    assert greedy(server, "experts") == expected
    # a whole (not streamed) answer cut by an agent's death: 502 naming it
    def relayed_to_b() -> int:
        return sum(l["bytes_to_server"] for l in b.inventory()["leases"] if l["model"] == "experts")

    before = relayed_to_b()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(greedy, server, "experts", 100000)
        wait_until(lambda: relayed_to_b() > before, 10, "the answer to be under way on agent b")
        b.proc.send_signal(signal.SIGKILL)  # a few tokens into an answer that runs until the context is full
        with pytest.raises(openai.APIStatusError) as cut_whole:
            pending.result(60)
    assert cut_whole.value.status_code == 502 and f"rpc agent {b.address} is unreachable" in str(cut_whole.value)


def test_a_split_that_does_not_fit_an_agent_is_refused_before_anything_starts(berth, agents, moe_gguf, tmp_path):
    a, b = agents("--memory", "1MiB"), agents()
    server = berth(config(moe_gguf, a, b, extra_models=f"""\
        pinned:
          cmd: llama-server -m {moe_gguf} --port ${{PORT}} -c 512
          rpc: {{agents: ["{a.address}", "{b.address}"], layers: {{"{a.address}": 0-3}}, apiKey: {AGENT_KEY}}}
        """), env=home(tmp_path))
    with pytest.raises(openai.APIStatusError) as refused:
        greedy(server, "pinned")
    assert refused.value.status_code == 507
    assert f"rpc:{a.address}: needs" in str(refused.value)
    assert a.inventory()["leases"] == [] and b.inventory()["leases"] == []
    assert not any("llama-server" in _cmdline(p) for p in children_of(server.proc.pid))
    # spread by what the agents offer, the experts all go to the one with room
    assert greedy(server, "experts") == greedy(server, "local")
    assert a.inventory()["leases"] == []  # nothing planned there: nothing leased (no rpc server started)
    assert [lease["model"] for lease in b.inventory()["leases"]] == ["experts"]


def test_two_splits_that_do_not_fit_an_agent_together_take_turns(berth, agents, moe_gguf, tmp_path):
    """An agent's offer is a budget like the machine's own: an idle split model is evicted to make room."""
    a, b = agents("--memory", "48MiB"), agents()
    pinned = "\n".join(f"""\
        {name}:
          cmd: llama-server -m {moe_gguf} --port ${{PORT}} -c 512
          rpc: {{agents: ["{a.address}", "{b.address}"], layers: {{"{a.address}": 0-3}}, apiKey: {AGENT_KEY}}}""" for name in ("p1", "p2"))
    server = berth(config(moe_gguf, a, b, extra_models=pinned + "\n"), env=home(tmp_path))
    first = greedy(server, "p1")
    assert [lease["model"] for lease in a.inventory()["leases"]] == ["p1"]
    assert greedy(server, "p2") == first  # p1 was idle: stopped and its lease released, then p2 started
    assert [lease["model"] for lease in a.inventory()["leases"]] == ["p2"]
    assert "p1" not in {r["model"] for r in requests.get(server.url + "/running", timeout=5,
                                                         headers={"Authorization": f"Bearer {KEY}"}).json()["running"]}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_leases_of_a_gateway_that_died_run_out_and_their_rpc_servers_stop(berth, agents, moe_gguf, tmp_path):
    a, b = agents("--lease-timeout", "2"), agents("--lease-timeout", "2")
    server = berth(config(moe_gguf, a, b), env=home(tmp_path))
    greedy(server, "layers")
    servers = a.rpc_pids() + b.rpc_pids()
    assert len(servers) == 2 and all(pid_alive(p) for p in servers)
    server.stop(signal.SIGKILL)  # no goodbye to the agents
    wait_until(lambda: not any(pid_alive(p) for p in servers), 20, "the agents to stop the orphaned rpc servers")
    assert a.inventory()["leases"] == [] and b.inventory()["leases"] == []
    assert "not renewed for 2s" in a.log_path.read_text()


def test_an_agent_takes_its_rpc_servers_with_it_and_refuses_a_wrong_key(berth, agents, moe_gguf, tmp_path):
    a, b = agents(), agents()
    server = berth(config(moe_gguf, a, b, extra_models=f"""\
        wrong-key:
          cmd: llama-server -m {moe_gguf} --port ${{PORT}} -c 512
          rpc: {{agents: ["{a.address}"], placement: layers, apiKey: not-the-key}}
        """), env=home(tmp_path))
    with pytest.raises(openai.APIStatusError) as refused:
        greedy(server, "wrong-key")
    assert refused.value.status_code == 503 and f"rpc agent {a.address} refused the key" in str(refused.value)
    greedy(server, "layers")
    servers = a.rpc_pids()
    a.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in servers), 10, "the killed agent's rpc servers to die with it")


def test_agent_command_line_mistakes_exit_2_with_the_fix():
    rpc_server_binary()
    run = [sys.executable, "-m", "berth.cli", "agent"]
    no_key = subprocess.run([*run, "--listen", "0.0.0.0:7070"], capture_output=True, text=True, env={
        k: v for k, v in os.environ.items() if k != "BERTH_AGENT_KEY"})
    assert no_key.returncode == 2 and "--api-key" in no_key.stderr
    bad_size = subprocess.run([*run, "--listen", "127.0.0.1:7070", "--memory", "lots"], capture_output=True, text=True)
    assert bad_size.returncode == 2 and "--memory" in bad_size.stderr and "24GiB" in bad_size.stderr


# -- who may use an agent ---------------------------------------------------------------


def call(agent: Agent, method: str, path: str, body: object = None, source: str = "127.0.0.1",
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    """One HTTP request to `agent` from the address `source` (any 127.x address is this machine)."""
    conn = http.client.HTTPConnection(agent.host, agent.port, timeout=30, source_address=(source, 0))
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={**agent.headers, "Content-Type": "application/json",
                                                       **(headers or {})})
        response = conn.getresponse()
        text = response.read()
    finally:
        conn.close()
    return response.status, json.loads(text) if text.startswith(b"{") else {"text": text.decode(errors="replace")}


def test_only_the_lessee_renews_or_releases_a_lease(agents):
    """The key lets a gateway lease; renewing and ending a lease is for the address that took it."""
    a = agents()
    status, lease = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1 << 20})
    assert status == 201, lease
    for method, path in (("POST", f"/v1/leases/{lease['id']}/renew"), ("DELETE", f"/v1/leases/{lease['id']}")):
        status, refused = call(a, method, path, {} if method == "POST" else None, source="127.0.0.2")
        assert status == 403 and "belongs to 127.0.0.1" in refused["error"]["message"], (method, refused)
    assert [l["id"] for l in a.inventory()["leases"]] == [lease["id"]]
    assert call(a, "POST", f"/v1/leases/{lease['id']}/renew", {})[0] == 200
    assert call(a, "DELETE", f"/v1/leases/{lease['id']}")[0] == 200
    assert a.inventory()["leases"] == []


def test_lease_requests_are_checked_and_guarded_against_web_pages(agents):
    a = agents("--memory", "1GiB", key=None)  # a keyless agent, which listens on loopback only
    for need, words in ((-1, "above 0"), (0, "above 0"), (True, "whole number"), ("12", "whole number"),
                        (1.5, "whole number"), (None, "whole number")):
        status, answer = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": need})
        assert status == 400 and words in answer["error"]["message"], (need, answer)
    status, answer = call(a, "POST", "/v1/leases", raw=b'{"model": "m", "need_bytes": 1e400}')
    assert status == 400 and "whole number" in answer["error"]["message"], answer
    status, answer = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 2 << 30})
    assert status == 507 and "1.0 GiB" in answer["error"]["message"], answer
    # what a web page can send without asking: a text/plain POST; a name of its own for 127.0.0.1 (DNS rebinding)
    status, answer = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1}, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]["message"], answer
    status, answer = call(a, "GET", "/v1/inventory", headers={"Host": f"evil.example:{a.port}"})
    assert status == 403 and "evil.example" in answer["error"]["message"], answer
    assert a.inventory()["leases"] == [] and a.inventory()["leased_bytes"] == 0


def test_leases_are_capped_in_all_and_per_address(agents):
    a = agents("--max-leases", "2", "--max-leases-per-address", "1")
    assert call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1})[0] == 201
    status, answer = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1})
    assert status == 429 and "--max-leases-per-address 1" in answer["error"]["message"], answer
    assert call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1}, source="127.0.0.2")[0] == 201
    status, answer = call(a, "POST", "/v1/leases", {"model": "m", "need_bytes": 1}, source="127.0.0.3")
    assert status == 429 and "--max-leases 2" in answer["error"]["message"], answer
    assert sorted(lease["peer"] for lease in a.inventory()["leases"]) == ["127.0.0.1", "127.0.0.2"]


def test_a_credential_that_is_not_utf8_is_refused_not_a_crash(agents):
    a = agents()
    with socket.create_connection((a.host, a.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/inventory HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xc3\r\n"
                     b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b"Traceback" not in a.log_path.read_bytes()


def _listening_ports(pid: int) -> list[int]:
    return [c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


def _closed_at_once(address: tuple[str, int], first: bytes = b"") -> bool:
    """Whether a connection to `address` is closed by the other side without an answer (not held open, as by
    something behind it that waits for more)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(first)
        return closed_by_server(sock, 10)


def test_only_the_gateways_llama_server_reaches_a_leased_rpc_server(berth, agents, moe_gguf, tmp_path):
    a, b = agents(), agents()
    server = berth(config(moe_gguf, a, b), env=home(tmp_path))
    expected = greedy(server, "local")
    assert greedy(server, "experts") == expected
    lease = next(l for l in a.inventory()["leases"] if l["model"] == "experts")
    # on the agent's machine: the rpc server has a network namespace of its own, so no local user reaches it
    assert lease["isolation"] == "network namespace"
    assert os.readlink(f"/proc/{lease['rpc_server_pid']}/ns/net") != os.readlink("/proc/self/ns/net")
    for port in _listening_ports(lease["rpc_server_pid"]):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # at the relay, the lessee's own address is not enough: a connection must begin with the lease's secret
    relayed = lease["bytes_to_server"]
    assert _closed_at_once((a.host, lease["port"]), b"\0" * 64)
    wait_until(lambda: next(l for l in a.inventory()["leases"] if l["model"] == "experts")["refused_connections"] == 1,
               5, "the refusal to be counted")
    # on the gateway's machine: the forwarder llama-server's --rpc names takes only llama-server's own connections
    running = {r["model"]: r for r in requests.get(server.url + "/running", headers={"Authorization": f"Bearer {KEY}"},
                                                   timeout=5).json()["running"]}
    for endpoint in rpc_endpoints(running["experts"], [a.address, b.address]).values():
        host, _, port = endpoint.rpartition(":")
        assert _closed_at_once((host, int(port)))
    lease = next(l for l in a.inventory()["leases"] if l["model"] == "experts")
    assert lease["refused_connections"] == 1 and lease["bytes_to_server"] == relayed  # nothing reached the agent
    assert greedy(server, "experts") == expected  # the gateway's own connections are untouched


def test_an_agent_that_is_not_root_isolates_its_rpc_servers_too(berth, agents, moe_gguf, tmp_path):
    """Not root: the rpc server gets a user namespace of its own, and a network namespace inside it. The agent
    runs as uid 65534 without capabilities, in a user namespace this test makes (so that it still reads this
    machine's Python, which an ordinary user here may not)."""
    as_nobody = ("unshare", "--user", "--map-user=65534", "--map-group=65534")
    if shutil.which("unshare") is None or subprocess.run([*as_nobody, "true"], capture_output=True).returncode:
        pytest.skip("cannot make a user namespace here")
    nobody = agents(prefix=as_nobody)
    server = berth(config(moe_gguf, nobody, agents()), env=home(tmp_path))
    assert greedy(server, "experts") == greedy(server, "local")
    lease = next(l for l in nobody.inventory()["leases"] if l["model"] == "experts")
    assert lease["isolation"] == "network namespace", lease
    agent_ns, server_ns = f"/proc/{nobody.proc.pid}/ns", f"/proc/{lease['rpc_server_pid']}/ns"
    assert os.readlink(f"{agent_ns}/user") != os.readlink("/proc/self/ns/user")  # the agent is not root here
    for namespace in ("net", "user"):
        assert os.readlink(f"{server_ns}/{namespace}") != os.readlink(f"{agent_ns}/{namespace}"), namespace


# -- across a network namespace ----------------------------------------------------------


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: (namespace, our address, its address, a second
    address of ours). Skips where namespaces cannot be made (not root, no `ip`, no CAP_NET_ADMIN)."""
    name = f"berth-{uuid.uuid4().hex[:8]}"
    ours, peer = f"bh{name[-8:]}", f"ba{name[-8:]}"
    net = f"10.{(os.getpid() % 200) + 20}.{int(name[-2:], 16) % 250}"
    setup = [["ip", "netns", "add", name], ["ip", "link", "add", ours, "type", "veth", "peer", "name", peer],
             ["ip", "link", "set", peer, "netns", name], ["ip", "addr", "add", f"{net}.1/24", "dev", ours],
             ["ip", "addr", "add", f"{net}.3/24", "dev", ours], ["ip", "link", "set", ours, "up"],
             ["ip", "-n", name, "addr", "add", f"{net}.2/24", "dev", peer], ["ip", "-n", name, "link", "set", peer, "up"],
             ["ip", "-n", name, "link", "set", "lo", "up"]]
    try:
        for step in setup:
            made = subprocess.run(step, capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"cannot make a network namespace here ({' '.join(step)}: {made.stderr.strip()})")
        yield name, f"{net}.1", f"{net}.2", f"{net}.3"
    except FileNotFoundError:
        pytest.skip("no `ip` command to make a network namespace")
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_across_a_network_namespace_only_the_gateway_reaches_the_rpc_server(netns, berth, agents, moe_gguf,
                                                                            tmp_path):
    # `netns` first: fixtures end in reverse order, so the link goes only after berth and the agents
    name, ours, theirs, other = netns
    remote = agents(host=theirs, port=7070, netns=name)
    near = agents()
    server = berth(config(moe_gguf, remote, near), env=home(tmp_path))
    assert greedy(server, "experts") == greedy(server, "local")
    lease = next(l for l in remote.inventory()["leases"] if l["model"] == "experts")
    assert lease["peer"] == ours  # the gateway's address as the agent sees it
    intruder = socket.socket()
    intruder.bind((other, 0))  # this machine, another address: not the gateway the lease belongs to
    intruder.connect((theirs, lease["port"]))
    intruder.settimeout(5)
    assert intruder.recv(1) == b""  # closed at once, nothing relayed
    intruder.close()
    wait_until(lambda: next(l for l in remote.inventory()["leases"] if l["model"] == "experts")
               ["refused_connections"] == 1, 5, "the refusal to be counted")
    assert greedy(server, "experts") == greedy(server, "local")  # the gateway's own connection is untouched
