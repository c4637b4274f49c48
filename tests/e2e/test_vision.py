"""Images through berth to the real llama-server with a projector: Gemma 3 270M with a generated Gemma-3-style
`--mmproj` (random weights: the answers mean nothing, but the image is encoded into the prompt, which its
token count shows). Base64 data URLs and http URLs (berth fetches those), streamed and not, through the
openai client and Anthropic's /v1/messages; a model without a projector refuses images before it starts."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from berth.core.gguf import read_model_header
from tests.e2e.conftest import llama_server_binary
from tests.support.image_server import ImageServer, image_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_models import write_gemma3_projector  # noqa: E402

PNG = image_bytes("PNG", (96, 64))
JPEG = image_bytes("JPEG", (64, 96), color=(20, 120, 220))
QUESTION = "Describe the picture."


@pytest.fixture(scope="session")
def projector(gemma_gguf, tmp_path_factory) -> str:
    """A Gemma-3-style projector as wide as the model's embeddings (small encoder: 224 px, 2 layers)."""
    width = int(read_model_header(gemma_gguf).arch_value("embedding_length"))
    return str(write_gemma3_projector(tmp_path_factory.mktemp("mmproj") / "mmproj-gemma3.gguf", text_embd=width))


def vision_config(start_port: int, gemma_gguf: str, projector: str, extra_model: str = "") -> str:
    binary = llama_server_binary()
    common = f"--host 127.0.0.1 --port ${{PORT}} -t 2 --no-jinja --chat-template gemma"
    return f"""
startPort: {start_port}
healthCheckTimeout: 60
remoteImages: {{allowPrivateAddresses: true}}   # the images are served on 127.0.0.1 here
models:
  vision:
    cmd: {binary} -m {gemma_gguf} --mmproj {projector} -c 2048 {common}
  text:
    cmd: {binary} -m {gemma_gguf} -c 1024 {common}
{extra_model}"""


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def with_image(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_base64_and_url_images_answered_through_berth_streamed_and_not(berth, start_port, gemma_gguf, projector):
    images = ImageServer({"photo.png": ("image/png", PNG), "photo.jpg": ("image/jpeg", JPEG)})
    with images.running():
        b = berth(vision_config(start_port, gemma_gguf, projector))
        client = openai.OpenAI(base_url=b.url + "/v1", api_key="none", max_retries=0)
        text_only = client.chat.completions.create(
            model="vision", max_tokens=4, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}])
        inline = client.chat.completions.create(model="vision", messages=with_image(data_url("image/png", PNG)),
                                                max_tokens=8)
        assert inline.choices[0].finish_reason in ("stop", "length") and inline.model == "vision"
        # the image became prompt tokens: the projector's tokens and the markers around them
        image_tokens = inline.usage.prompt_tokens - text_only.usage.prompt_tokens
        assert image_tokens >= 16

        fetched = client.chat.completions.create(model="vision", messages=with_image(images.url("photo.png")),
                                                 max_tokens=8)
        assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens  # the same image, fetched by berth
        stream = client.chat.completions.create(model="vision", messages=with_image(images.url("photo.jpg")),
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == inline.usage.prompt_tokens
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
        streamed_inline = client.chat.completions.create(
            model="vision", messages=with_image(data_url("image/jpeg", JPEG)), max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        assert list(streamed_inline)[-1].usage.prompt_tokens == inline.usage.prompt_tokens
        assert images.requests == ["/photo.png", "/photo.jpg"]
        assert set(images.user_agents) == {"berth"}  # berth fetched them (llama-server's agent is llama-cpp/...)

        # Anthropic's Messages API: a base64 block and a url block
        for source in ({"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
                       {"type": "url", "url": images.url("photo.png")}):
            answer = requests.post(b.url + "/v1/messages", timeout=120, json={
                "model": "vision", "max_tokens": 8, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": QUESTION}, {"type": "image", "source": source}]}]})
            assert answer.status_code == 200, answer.text
            assert answer.json()["type"] == "message" and answer.json()["content"][0]["type"] == "text"

        # WebP: llama.cpp 11434 decodes JPEG, PNG, BMP, GIF (stb_image), not WebP; its 400 comes back as sent
        webp = requests.post(b.url + "/v1/chat/completions", timeout=120, json={
            "model": "vision", "max_tokens": 4, "messages": with_image(data_url("image/webp", image_bytes("WEBP")))})
        assert webp.status_code == 400 and "Failed to load image" in webp.json()["error"]["message"]


def test_images_for_a_model_without_a_projector_are_refused_before_it_starts(berth, start_port, gemma_gguf,
                                                                            projector):
    b = berth(vision_config(start_port, gemma_gguf, projector))
    client = openai.OpenAI(base_url=b.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="text", messages=with_image(data_url("image/png", PNG)), max_tokens=4)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["code"] == "model_not_multimodal"
    assert error["type"] == "invalid_request_error"
    assert "model 'text' cannot read images: it has no multimodal projector" in error["message"]
    anthropic = requests.post(b.url + "/v1/messages", timeout=30, json={"model": "text", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}}]}]})
    assert anthropic.status_code == 400 and anthropic.json()["error"]["code"] == "model_not_multimodal"
    assert b.running() == {}  # nothing was started for them

    # the listings: vision where the cmd has --mmproj, in llama-swap's capabilities shape, and in `berth ps`
    listed = {m["id"]: m for m in requests.get(b.url + "/v1/models", timeout=10).json()["data"]}
    assert listed["vision"]["capabilities"] == {"vision": True}
    assert listed["vision"]["architecture"]["input_modalities"] == ["text", "image"]
    assert "capabilities" not in listed["text"] and "architecture" not in listed["text"]
    for model in ("vision", "text"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    shown = subprocess.run([sys.executable, "-m", "berth.cli", "ps", "--url", b.url], capture_output=True, text=True,
                           timeout=60)
    header, *rows = shown.stdout.splitlines()
    column = header.split().index("VISION")
    assert {row.split()[0]: row.split()[column] for row in rows} == {"vision": "yes", "text": "-"}
    assert {m: entry["vision"] for m, entry in b.running().items()} == {"vision": True, "text": False}
