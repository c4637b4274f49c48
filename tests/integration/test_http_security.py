"""berth's HTTP surface against what a hostile web page or client sends (issue 22): other sites' requests and
CORS, content types and methods, credentials that are not ASCII, a listen address open to the network without
keys, credentials and peers, and what scrapers of the keyless metrics socket can make model servers do. Real
berth processes, fake model servers, plain HTTP on 127.0.0.1 with the headers a browser sends."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from berth.runtime.gauges import REFRESH_INTERVAL
from tests.support.harness import children_of, fake_cmd, free_port, kill_quietly, wait_until

EVIL = "https://evil.example"  # a page the operator never heard of
CHAT_APP = "https://chat.example"  # a browser app the operator lets in with allowedOrigins
CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def one_model(start_port: int, *flags: str, extra: str = "") -> str:
    return f"startPort: {start_port}\n{extra}\nmodels:\n  a: {{cmd: \"{fake_cmd('a', *flags)}\"}}\n"


def error_code(response: requests.Response) -> str:
    return response.json()["error"]["code"]


def test_pages_of_other_origins_are_refused_and_model_servers_cors_never_reaches_a_browser(berth, start_port):
    b = berth(one_model(start_port, "--echo-cors", extra=f"allowedOrigins: [{CHAT_APP}]"))
    evil = {"Origin": EVIL}
    # what a page's fetch() sends without asking the browser first: a text/plain POST, a GET
    for method, path, headers in (("POST", "/v1/chat/completions", {"Content-Type": "text/plain"}),
                                  ("POST", "/v1/chat/completions", {"Content-Type": "application/json"}),
                                  ("GET", "/upstream/a/props", {}), ("POST", "/models/load", {})):
        refused = requests.request(method, b.url + path, data=json.dumps(CHAT), headers={**evil, **headers},
                                   timeout=10)
        assert refused.status_code == 403 and error_code(refused) == "origin_not_allowed", (path, refused.text)
        assert "allowedOrigins" in refused.json()["error"]["message"]
        assert "Access-Control-Allow-Origin" not in refused.headers
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    refused = requests.options(b.url + "/v1/chat/completions", headers={**evil, **preflight}, timeout=10)
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
    assert b.running() == {}  # nothing was loaded for those pages

    # the listed origin: berth answers its preflight and allows it, without credentials
    app = {"Origin": CHAT_APP}
    allowed = requests.options(b.url + "/v1/chat/completions", headers={**app, **preflight}, timeout=10)
    assert allowed.status_code == 204 and allowed.headers["Access-Control-Allow-Origin"] == CHAT_APP
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in allowed.headers["Access-Control-Allow-Headers"].split(",")}
    assert "Origin" in allowed.headers["Vary"] and "Access-Control-Allow-Credentials" not in allowed.headers
    answered = requests.post(b.url + "/v1/chat/completions", json=CHAT, headers=app, timeout=30)
    assert answered.status_code == 200 and answered.json()["server"] == "a"
    # the model server allowed `*` with credentials; the browser sees berth's answer alone
    assert answered.headers["Access-Control-Allow-Origin"] == CHAT_APP
    assert "Access-Control-Allow-Credentials" not in answered.headers
    echoed = requests.get(b.url + "/upstream/a/echo", headers=app, timeout=10)
    assert echoed.headers["Access-Control-Allow-Origin"] == CHAT_APP
    assert "Access-Control-Allow-Credentials" not in echoed.headers
    assert "origin" not in {h.lower() for h in echoed.json()["headers"]}  # the model server never sees it

    # the dashboard's own calls come from berth's own origin
    own = requests.post(b.url + "/ui/api/chat/completions", json=CHAT, headers={"Origin": b.url}, timeout=30)
    assert own.status_code == 200 and "Access-Control-Allow-Origin" not in own.headers


def test_by_default_no_other_origin_is_allowed_and_following_a_link_still_works(berth, start_port):
    b = berth(one_model(start_port))
    refused = requests.get(b.url + "/v1/models", headers={"Origin": CHAT_APP}, timeout=10)
    assert refused.status_code == 403 and error_code(refused) == "origin_not_allowed"
    # an <img> or <script> on another site sends no Origin, but a browser marks where it came from
    for site in ("cross-site", "same-site"):  # same-site: another port of localhost
        marked = requests.get(b.url + "/upstream/a/props", headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors",
                                                                    "Sec-Fetch-Dest": "image"}, timeout=10)
        assert marked.status_code == 403 and error_code(marked) == "origin_not_allowed"
    assert b.running() == {}
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert requests.get(b.url + "/v1/models", headers=link, timeout=10).status_code == 200
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert requests.get(b.url + "/v1/models", headers=typed, timeout=10).status_code == 200


def test_from_a_browser_changing_routes_take_json_and_every_route_its_own_method(berth, start_port):
    b = berth(one_model(start_port, extra=f"allowedOrigins: [{CHAT_APP}]"))
    # bodies a form or a fetch() can send without asking the browser first, from pages that pass the Origin
    # check: berth's own (under a name a page of another site got to resolve to it) and a listed origin's
    pages = ({"Origin": b.url, "Sec-Fetch-Site": "same-origin"}, {"Origin": CHAT_APP, "Sec-Fetch-Site": "cross-site"})
    for page in pages:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**page, **({"Content-Type": content_type} if content_type else {})}
            for path, body in (("/v1/chat/completions", CHAT), ("/models/load", {"model": "a"}),
                               ("/ui/api/models/load", {"model": "a"}), ("/upstream/a/v1/chat/completions", CHAT)):
                refused = requests.post(b.url + path, data=json.dumps(body), headers=headers, timeout=10)
                assert refused.status_code == 415 and error_code(refused) == "unsupported_media_type", (
                    path, page, refused.text)
                assert "Content-Type: application/json" in refused.json()["error"]["message"]
            refused = requests.post(b.url + "/api/generate", data=json.dumps({"model": "a", "prompt": "hi"}),
                                    headers=headers, timeout=10)
            assert refused.status_code == 415 and "application/json" in refused.json()["error"], refused.text
    # a page cannot hide that a browser sent it: a Sec-Fetch-* header alone is a browser's too
    marked = requests.post(b.url + "/models/load", data=json.dumps({"model": "a"}), timeout=10,
                           headers={"Content-Type": "text/plain", "Sec-Fetch-Mode": "no-cors"})
    assert marked.status_code == 415
    assert b.running() == {}
    assert requests.post(b.url + "/models/load", json={"model": "a"}, headers=pages[0], timeout=30).status_code == 200
    for method in ("GET", "HEAD", "PUT", "DELETE"):  # GET /unload: an <img> tag
        refused = requests.request(method, b.url + "/unload", timeout=10)
        assert refused.status_code == 405 and refused.headers["Allow"] == "POST", method
    form = requests.post(b.url + "/unload", data="", timeout=10,
                         headers={**pages[0], "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert requests.get(b.url + "/models/load?model=a", timeout=10).status_code == 405
    assert "a" in b.running()
    assert requests.post(b.url + "/unload", headers=pages[0], timeout=30).text == "OK"  # no body, no type
    assert b.running() == {}
    heard = requests.post(b.url + "/v1/audio/transcriptions", data={"model": "a"}, timeout=30, headers=pages[0],
                          files={"file": ("hi.wav", b"RIFF0000WAVE")})  # uploads stay multipart
    assert heard.status_code == 200 and heard.json()["text"] == "a heard 12 bytes"


def test_programs_send_json_as_curl_d_does_as_llama_server_llama_swap_and_ollama_take_it(berth, start_port):
    """`curl URL -d '{...}'` (what llama.cpp's, llama-swap's and Ollama's docs show) labels the body a form; no
    browser sent it, so berth reads it as JSON as they do."""
    b = berth(one_model(start_port))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    chat = requests.post(b.url + "/v1/chat/completions", data=json.dumps(CHAT), headers=form, timeout=30)
    assert chat.status_code == 200 and chat.json()["server"] == "a", chat.text
    generated = requests.post(b.url + "/api/generate", data=json.dumps({"model": "a", "prompt": "hi", "stream": False}),
                              headers=form, timeout=30)
    assert generated.status_code == 200 and generated.json()["done"] is True, generated.text
    assert generated.json()["response"]
    for path in ("/models/load", "/models/unload", "/models/load"):
        answered = requests.post(b.url + path, data=json.dumps({"model": "a"}), headers=form, timeout=30)
        assert answered.status_code == 200 and answered.json()["success"] is True, (path, answered.text)
    assert "a" in b.running()
    assert requests.post(b.url + "/unload", data="", headers=form, timeout=30).text == "OK"  # curl -d '' /unload
    assert b.running() == {}


def test_ollamas_routes_get_the_same_origin_cors_and_method_rules(berth, start_port):
    b = berth(one_model(start_port, "--echo-cors", extra=f"allowedOrigins: [{CHAT_APP}]"))
    generate = json.dumps({"model": "a", "prompt": "hi", "stream": False})
    for method, path, headers in (("POST", "/api/generate", {"Content-Type": "text/plain"}),
                                  ("POST", "/api/chat", {"Content-Type": "application/json"}),
                                  ("GET", "/api/tags", {}), ("DELETE", "/api/delete", {})):
        refused = requests.request(method, b.url + path, data=generate, headers={"Origin": EVIL, **headers}, timeout=10)
        # refused in Ollama's error shape, as every error of its routes
        assert refused.status_code == 403 and "allowedOrigins" in refused.json()["error"], (path, refused.text)
        assert "Access-Control-Allow-Origin" not in refused.headers
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    refused = requests.options(b.url + "/api/chat", headers={"Origin": EVIL, **preflight}, timeout=10)
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused.headers
    assert b.running() == {}

    app = {"Origin": CHAT_APP}
    allowed = requests.options(b.url + "/api/chat", headers={**app, **preflight}, timeout=10)
    assert allowed.status_code == 204 and allowed.headers["Access-Control-Allow-Origin"] == CHAT_APP
    answered = requests.post(b.url + "/api/generate", data=generate, timeout=30,
                             headers={**app, "Content-Type": "application/json"})
    assert answered.status_code == 200 and answered.json()["done"] is True, answered.text
    # the model server allowed any origin with credentials; the browser sees berth's answer alone
    assert answered.headers["Access-Control-Allow-Origin"] == CHAT_APP
    assert "Access-Control-Allow-Credentials" not in answered.headers
    tags = requests.get(b.url + "/api/tags", headers=app, timeout=10)
    assert tags.status_code == 200 and tags.headers["Access-Control-Allow-Origin"] == CHAT_APP

    # another method than the route's: a 405 naming the route's, in Ollama's shape
    for method, path, allow in (("GET", "/api/chat", "POST"), ("GET", "/api/generate", "POST"),
                                ("GET", "/api/pull", "POST"), ("POST", "/api/delete", "DELETE"),
                                ("POST", "/api/tags", "GET")):
        refused = requests.request(method, b.url + path, timeout=10)
        assert refused.status_code == 405 and allow in refused.headers["Allow"], (method, path, refused.text)
        assert isinstance(refused.json()["error"], str), refused.text


def _status_with_raw_header(url: str, name: str, value: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", "/v1/models")
        connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_credential_that_is_not_ascii_is_a_401(berth, start_port):
    b = berth(one_model(start_port, extra="apiKeys: [sekrit]"))
    for name, value in (("Authorization", "Bearer ключ".encode()), ("Authorization", b"Bearer \xff\xfe"),
                        ("X-Api-Key", "ключ".encode()), ("Authorization", b"Basic " + base64.b64encode("u:ключ".encode())),
                        ("Authorization", b"Basic " + base64.b64encode(b"u:\xff")), ("Authorization", b"Basic \xff")):
        status, body = _status_with_raw_header(b.url, name, value)
        assert status == 401 and body["error"]["type"] == "authentication_error", (name, value, body)
    assert _status_with_raw_header(b.url, "Authorization", b"Bearer sekrit")[0] == 200


def test_a_peer_never_gets_the_clients_credentials(berth, start_port, fake_openai_peer):
    b = berth(one_model(start_port, extra=f"peers:\n  hosted: {{proxy: \"{fake_openai_peer}\", models: [vendor/big]}}"))
    echoed = requests.post(b.url + "/v1/embeddings", json={"model": "hosted/vendor/big", "input": "x"}, timeout=30,
                           headers={"Authorization": "Bearer client-secret", "X-Api-Key": "client-secret",
                                    "Cookie": "session=client-secret"})
    assert echoed.status_code == 200
    assert "client-secret" not in json.dumps(echoed.json()["headers"])


@contextmanager
def serving_open(tmp_path: Path, config: str) -> Iterator[tuple[str, int, Path]]:
    """berth on every address (0.0.0.0), its stderr apart from stdout: (its loopback URL, port, stderr file)."""
    (tmp_path / "config.yaml").write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stderr = tmp_path / "stderr.log"
    with open(tmp_path / "stdout.log", "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "berth.cli", "serve", "-c", str(tmp_path / "config.yaml"),
                                 "--listen", f"0.0.0.0:{port}"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env={**os.environ, "BERTH_HOME": str(tmp_path / "home")})
        try:
            wait_until(lambda: _healthy(url, proc), 30, "berth to listen")
            yield url, port, stderr
        finally:
            leftovers = children_of(proc.pid)
            proc.terminate()
            proc.wait(30)
            for pid in leftovers:
                kill_quietly(pid)


def _healthy(url: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"berth exited with {proc.returncode}")
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_keyless_berth_open_to_the_network_warns_everywhere_and_checks_host_names(tmp_path, start_port):
    with serving_open(tmp_path, one_model(start_port)) as (url, port, stderr):
        warned = stderr.read_text()
        assert f"0.0.0.0:{port}" in warned and "apiKeys" in warned and "anyone" in warned
        log = requests.get(url + "/logs", timeout=10).text
        assert f"0.0.0.0:{port}" in log and "apiKeys" in log
        page = requests.get(url + "/ui/", timeout=10).text
        assert 'id="exposure"' in page and "apiKeys" in page
        # DNS rebinding: a name of the attacker's that resolves to this machine
        rebound = requests.get(url + "/v1/models", headers={"Host": f"evil.example:{port}"}, timeout=10)
        assert rebound.status_code == 403 and error_code(rebound) == "host_not_allowed"
        for host in (f"192.0.2.7:{port}", f"[2001:db8::7]:{port}", f"localhost:{port}"):  # addresses rebind nothing
            assert requests.get(url + "/v1/models", headers={"Host": host}, timeout=10).status_code == 200, host


def test_with_keys_an_open_listen_address_neither_warns_nor_checks_host_names(tmp_path, start_port):
    with serving_open(tmp_path, one_model(start_port, extra="apiKeys: [sekrit]")) as (url, port, stderr):
        assert "apiKeys" not in stderr.read_text()
        key = {"Authorization": "Bearer sekrit"}
        assert 'id="exposure"' not in requests.get(url + "/ui/", headers=key, timeout=10).text
        named = requests.get(url + "/v1/models", headers={**key, "Host": f"berth.example:{port}"}, timeout=10)
        assert named.status_code == 200


def test_scrapers_of_the_keyless_metrics_socket_cannot_make_model_servers_work(berth, start_port, tmp_path):
    log = tmp_path / "requests.log"
    metrics_port = free_port()
    b = berth(one_model(start_port, "--request-log", str(log)), "--metrics-listen", f"127.0.0.1:{metrics_port}")
    assert requests.post(b.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
    side = f"http://127.0.0.1:{metrics_port}"
    began = time.monotonic()
    scrapes = 0
    while time.monotonic() - began < 3 * REFRESH_INTERVAL:
        assert requests.get(side + "/metrics", timeout=10).status_code == 200
        scrapes += 1
    elapsed = time.monotonic() - began
    slots = sum(1 for line in log.read_text().splitlines() if line.startswith("GET /slots"))
    assert scrapes > 5 * slots  # many more scrapes than requests to the model server
    # one when the model became ready, then at most one per interval
    assert slots <= 1 + elapsed / REFRESH_INTERVAL + 1
