"""Images through berth with fake model servers that echo what reached them: berth fetches http(s) image URLs
itself (public addresses only unless the config allows others, within size and time limits) and sends the
bytes inline, so a model server never gets a URL; its body limit names itself. Every image is made here."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from tests.support.harness import fake_cmd
from tests.support.image_server import ImageServer, image_bytes

PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")


@pytest.fixture
def images():
    server = ImageServer({"red.png": ("image/png", PNG), "red.jpg": ("image/jpeg", JPEG),
                          "untyped": ("application/octet-stream", PNG), "page.html": ("text/html", b"<html>"),
                          "big.png": ("image/png", image_bytes("PNG", (100, 100), noise=True))})
    with server.running():
        yield server


def config(start_port: int, remote: str = "", extra: str = "") -> str:
    return (f"startPort: {start_port}\n{extra}\n" + (f"remoteImages: {{{remote}}}\n" if remote else "") +
            f"models:\n  m: {{cmd: \"{fake_cmd('m')}\"}}\n")


def chat_body(*urls: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]}


def sent_to_model(response: requests.Response) -> dict:
    """The body the fake model server received (it echoes what it does not serve)."""
    assert response.status_code == 200, response.text
    return json.loads(response.json()["body"])


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_image_urls_reach_the_model_inline_as_berth_fetched_them(berth, start_port, images):
    b = berth(config(start_port, "allowPrivateAddresses: true"))
    # OpenAI content parts (echoed from the Responses path: the model server reads the same parts anywhere)
    chat = sent_to_model(requests.post(b.url + "/v1/responses", json=chat_body(
        images.url("red.png"), images.url("redirect/red.jpg"), images.url("untyped"), data_url("image/png", PNG)),
        timeout=30))
    parts = chat["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert [p["image_url"]["url"] for p in parts[1:]] == [
        data_url("image/png", PNG), data_url("image/jpeg", JPEG), data_url("image/octet-stream", PNG),
        data_url("image/png", PNG)]  # the one sent inline is left as it was
    # the Responses API's input_image, and an Anthropic url block (which becomes a base64 block)
    responses = sent_to_model(requests.post(b.url + "/v1/responses", json={"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": images.url("red.png")}]}]}, timeout=30))
    assert responses["input"][0]["content"][0]["image_url"] == data_url("image/png", PNG)
    anthropic = sent_to_model(requests.post(b.url + "/v1/messages", json={"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": images.url("red.jpg")}}]}]},
        timeout=30))
    assert anthropic["messages"][0]["content"][0]["source"] == {
        "type": "base64", "media_type": "image/jpeg", "data": base64.b64encode(JPEG).decode()}
    # /upstream is passed through raw, but not with a URL for the model server to fetch
    upstream = sent_to_model(requests.post(b.url + "/upstream/m/v1/anything", json=chat_body(images.url("red.png")),
                                           timeout=30))
    assert upstream["messages"][0]["content"][1]["image_url"]["url"] == data_url("image/png", PNG)
    assert images.requests == ["/red.png", "/redirect/red.jpg", "/red.jpg", "/untyped", "/red.png", "/red.jpg",
                               "/red.png"]
    assert set(images.user_agents) == {"berth"}


def test_private_and_loopback_addresses_are_refused_by_default_and_nothing_starts(berth, start_port, images):
    b = berth(config(start_port))
    for url in (images.url("red.png"), images.url("red.png", host="localhost"), images.url("red.png", host="[::1]"),
                "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"):
        refused = requests.post(b.url + "/v1/chat/completions", json=chat_body(url), timeout=30)
        assert refused.status_code == 400, (url, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "media_url_not_allowed" and error["type"] == "invalid_request_error"
        assert "not a public address" in error["message"] and "remoteImages.allowPrivateAddresses" in error["message"]
    # the same through /upstream and ?model= routes, and with an Anthropic block
    for path in ("/upstream/m/v1/chat/completions", "/v1/anything?model=m"):
        refused = requests.post(b.url + path, json=chat_body(images.url("red.png")), timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "media_url_not_allowed"
    anthropic = requests.post(b.url + "/v1/messages", timeout=30, json={"model": "m", "messages": [{"role": "user",
        "content": [{"type": "image", "source": {"type": "url", "url": images.url("red.png")}}]}]})
    assert anthropic.status_code == 400 and anthropic.json()["error"]["code"] == "media_url_not_allowed"
    assert images.requests == []  # berth connected to none of them
    assert b.running() == {}  # and started no model for them


def test_remote_image_limits_and_failures_are_clear_400s_before_any_start(berth, start_port, images):
    b = berth(config(start_port, "allowPrivateAddresses: true, maxBytes: 5000, timeout: 1"))

    def refused(url: str) -> dict:
        answer = requests.post(b.url + "/v1/chat/completions", json=chat_body(url), timeout=30)
        assert answer.status_code == 400, (url, answer.text)
        return answer.json()["error"]

    big = refused(images.url("big.png"))
    assert big["code"] == "invalid_image_url" and "over remoteImages.maxBytes (4.9 KiB)" in big["message"]
    slow = refused(images.url("slow"))
    assert "did not arrive within remoteImages.timeout (1 s)" in slow["message"]
    assert "text/html, not an image" in refused(images.url("page.html"))["message"]
    assert "answered HTTP 404" in refused(images.url("nothing.png"))["message"]
    assert "redirected more than 5 times" in refused(images.url("loop"))["message"]
    assert "came compressed (gzip)" in refused(images.url("gzip.png"))["message"]
    scheme = refused("httpx://example.com/a.png")
    assert scheme["code"] == "media_url_not_allowed" and "only http and https" in scheme["message"]
    assert b.running() == {}


def test_image_urls_are_refused_when_fetching_is_off(berth, start_port, images):
    b = berth(config(start_port, "fetch: false"))
    refused = requests.post(b.url + "/v1/chat/completions", json=chat_body(images.url("red.png")), timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "media_url_not_allowed"
    assert "remoteImages.fetch: false" in refused.json()["error"]["message"]
    inline = requests.post(b.url + "/v1/responses", json=chat_body(data_url("image/png", PNG)), timeout=30)
    assert sent_to_model(inline)["messages"][0]["content"][1]["image_url"]["url"] == data_url("image/png", PNG)
    assert images.requests == []


def test_the_body_limit_counts_inline_images_and_fetched_ones(berth, start_port, images):
    b = berth(config(start_port, "allowPrivateAddresses: true", extra="maxBodyBytes: 40000"))
    fits = requests.post(b.url + "/v1/responses", json=chat_body(data_url("image/png", PNG)), timeout=30)
    assert fits.status_code == 200
    too_big = requests.post(b.url + "/v1/chat/completions", timeout=30,
                            json=chat_body(data_url("image/png", image_bytes("PNG", (200, 200), noise=True))))
    assert too_big.status_code == 413
    error = too_big.json()["error"]
    assert error["code"] == "request_too_large" and "maxBodyBytes (39.1 KiB, 40000 bytes)" in error["message"]
    assert "4/3 of their file size" in error["message"]
    # fetched images are inlined, so the body they make counts against the same limit
    over = requests.post(b.url + "/v1/chat/completions", json=chat_body(images.url("big.png")), timeout=30)
    assert over.status_code == 413 and "inlined, it would make the request larger than maxBodyBytes" in \
        over.json()["error"]["message"]
