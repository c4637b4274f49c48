"""Images in request bodies: where berth finds them (every shape llama-server 11434 reads), how fetched bytes
replace a URL, which addresses count as public, and what says a model takes images."""

from __future__ import annotations

import base64
import json

import pytest

from berth.config import Capabilities
from berth.gateway.media import media_parts
from berth.gateway.remote_media import is_public


def _found(payload) -> list[tuple[str, str | None]]:
    return [(part.kind, part.url) for part in media_parts(payload)]


def test_every_shape_llama_server_reads_media_from_is_found_in_document_order():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "plain text is no media"},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "http://a.example/1.png", "detail": "low"}},
                {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},  # a bare string
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "input_audio", "input_audio": {"url": "https://a.example/a.wav"}},
                {"type": "input_video", "input_video": {"url": "http://a.example/v.mp4"}},
                {"type": "video_url", "video_url": {"url": "http://a.example/w.mp4"}},
            ]},
            {"role": "user", "content": [  # Anthropic's blocks, one inside a tool result
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "image", "source": {"type": "url", "url": "https://a.example/2.jpg"}}]},
            ]},
        ],
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://a.example/3.webp"}]}],
        "prompt": {"prompt_string": "<__media__>", "multimodal_data": ["AAAA"]},
        "tools": [{"type": "function", "function": {"parameters": {"type": "object", "properties": {
            "image_url": {"type": "string"}, "image": {"type": "image"}}}}}],  # schemas, not media
    }
    assert _found(body) == [
        ("image", "http://a.example/1.png"), ("image", "data:image/png;base64,AAAA"), ("audio", "UklGRg=="),
        ("audio", "https://a.example/a.wav"), ("video", "http://a.example/v.mp4"), ("video", "http://a.example/w.mp4"),
        ("image", "AAAA"), ("image", "https://a.example/2.jpg"), ("image", "http://a.example/3.webp"),
        ("media", None),
    ]
    assert [p.remote for p in media_parts(body)] == [True, False, False, True, True, True, False, True, True, False]
    assert _found({"messages": [{"role": "user", "content": "hi"}], "image": "x", "type": "image_url"}) == []


def test_a_remote_url_is_anything_llama_server_would_download():
    def remote(url: str) -> bool:
        (part,) = media_parts({"type": "image_url", "image_url": {"url": url}})
        return part.remote

    assert remote("http://x/a.png") and remote("HTTPS://x/a.png") and remote("httpfoo")
    assert not remote("data:image/png;base64,AAAA") and not remote("file:///etc/passwd") and not remote("AAAA")


def test_fetched_bytes_replace_the_url_in_the_shape_each_part_takes_inline():
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://a.example/1.png"}},
        {"type": "image", "source": {"type": "url", "url": "http://a.example/2.png"}},
        {"type": "input_image", "image_url": "http://a.example/3.png"},
    ]}]}
    for part in media_parts(body):
        part.inline("image/png", b"\x89PNG")
    encoded = base64.b64encode(b"\x89PNG").decode()
    chat, anthropic, responses = body["messages"][0]["content"]
    assert chat["image_url"] == {"url": f"data:image/png;base64,{encoded}"}
    assert anthropic["source"] == {"type": "base64", "media_type": "image/png", "data": encoded}
    assert responses["image_url"] == f"data:image/png;base64,{encoded}"
    assert not any(part.remote for part in media_parts(json.loads(json.dumps(body))))


def test_a_body_nested_deeper_than_pythons_recursion_limit_is_walked():
    deep: object = {"type": "image_url", "image_url": {"url": "http://a.example/deep.png"}}
    for _ in range(5000):
        deep = {"next": [deep]}
    assert _found(deep) == [("image", "http://a.example/deep.png")]


@pytest.mark.parametrize("address, public", [
    ("93.184.215.14", True), ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fd00::1", False),
    ("224.0.0.1", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::ffff:127.0.0.1", False), ("::ffff:93.184.215.14", True),  # IPv4-mapped: judged as the IPv4 address
    ("64:ff9b::a01:203", False), ("64:ff9b::5db8:d70e", True),  # NAT64 of 10.1.2.3 and of a public one
    ("2002:a01:203::1", False),  # 6to4 of 10.1.2.3
])
def test_public_addresses(address, public):
    assert is_public(address) is public


def test_what_says_a_model_takes_images():
    plain, declared = Capabilities(), Capabilities(inputs=("text", "image"))
    text_only = Capabilities(inputs=("text",))
    assert plain.reads_images(True) is True and plain.reads_images(False) is False and plain.reads_images(None) is None
    assert declared.reads_images(False) is True and declared.reads_images(None) is True  # the declaration wins
    assert text_only.reads_images(None) is False and text_only.reads_images(True) is True
    assert plain.with_image_input() == Capabilities(inputs=("text", "image"), outputs=("text",))
    audio = Capabilities(inputs=("audio",), outputs=("text",), tools=True)
    assert audio.with_image_input() == Capabilities(inputs=("audio", "image"), outputs=("text",), tools=True)
    assert declared.with_image_input() is declared
