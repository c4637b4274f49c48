"""Images through berth to the real llama-server with a projector: Gemma 3 270M with a generated Gemma-3-style
`--mmproj` (random weights: the answers mean nothing, but the image is encoded into the prompt, which its
token count shows). Base64 data URLs and http URLs (berth fetches those), streamed and not, through the
openai client, Anthropic's /v1/messages and the ollama client; a model without a projector refuses images
before it starts."""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import sys
from pathlib import Path

import ollama
import openai
import pytest
import requests

from berth.core.gguf import read_model_header
from tests.e2e.conftest import llama_server_binary
from tests.support.image_server import ImageServer, image_bytes, write_images

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

        # Ollama's API: base64 images in messages[].images (/api/chat) and in `images` (/api/generate)
        c = ollama.Client(host=b.url, timeout=300)
        unseen = image_bytes("PNG", (80, 80), color=(10, 200, 60))  # nothing of it is in llama-server's cache
        chatted = c.chat(model="vision", options={"num_predict": 4},
                         messages=[{"role": "user", "content": QUESTION, "images": [unseen]}])
        assert chatted.done and chatted.prompt_eval_count >= image_tokens  # the image was encoded
        streamed = list(c.chat(model="vision", options={"num_predict": 4}, stream=True,
                               messages=[{"role": "user", "content": QUESTION, "images": [JPEG]}]))
        assert streamed[-1].done and streamed[-1].eval_count > 0
        generated = c.generate(model="vision", prompt=QUESTION, images=[image_bytes("JPEG", (72, 40))],
                               options={"num_predict": 4})
        assert generated.done and generated.prompt_eval_count >= image_tokens
        # the bytes reach llama-server's decoder: a WebP fails there, with its message
        with pytest.raises(ollama.ResponseError) as undecoded:
            c.chat(model="vision", messages=[{"role": "user", "content": QUESTION, "images": [image_bytes("WEBP")]}])
        assert undecoded.value.status_code == 400 and "Failed to load image" in undecoded.value.error


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
    c = ollama.Client(host=b.url, timeout=30)
    for send in (lambda: c.chat(model="text", messages=[{"role": "user", "content": QUESTION, "images": [PNG]}]),
                 lambda: c.generate(model="text", prompt=QUESTION, images=[PNG]),
                 lambda: c.generate(model="text", images=[PNG])):  # an image and no prompt is a request too
        with pytest.raises(ollama.ResponseError) as refused_ollama:
            send()
        assert refused_ollama.value.status_code == 400
        assert "model 'text' cannot read images: it has no multimodal projector" in refused_ollama.value.error
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


SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["score"], "additionalProperties": False}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "berth.cli", "bench", *args], capture_output=True, text=True,
                          timeout=600)


def test_bench_over_an_album_ranks_two_vision_models(berth, start_port, gemma_gguf, projector, tmp_path):
    """`berth bench --images --json-schema --score-field` over the projector model and a second entry of it with
    other flags. A random projector says nothing about the photos, but the schema (sent as response_format,
    which llama-server turns into a grammar) makes every answer JSON, so the figures can be checked against
    the answers they come from."""
    import csv

    import jsonschema

    binary = llama_server_binary()
    second = (f"  vision-np1:\n    cmd: {binary} -m {gemma_gguf} --mmproj {projector} -c 1024 -np 1 "
              f"--host 127.0.0.1 --port ${{PORT}} -t 2 --no-jinja --chat-template gemma\n")
    b = berth(vision_config(start_port, gemma_gguf, projector, extra_model=second))
    album = tmp_path / "album"
    photos = [p.name for p in write_images(album, 5)]  # PNG, JPEG, WebP in turn
    (album / "notes.txt").write_text("not a photo")
    schema = tmp_path / "score.schema.json"
    schema.write_text(json.dumps(SCORE_SCHEMA))
    out = tmp_path / "out"
    models = ["vision", "vision-np1"]
    run = bench("--url", b.url, "--model", models[0], "--model", models[1], "--images", str(album),
                "--json-schema", str(schema), "--score-field", "score", "--prompt", "Rate this photo from 0 to 9.",
                "--max-tokens", "48", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "not images, not sent: notes.txt" in run.stderr and "sent as PNG" in run.stderr
    found = json.loads((out / "results.json").read_text())
    sent = {i["name"]: i for i in found["settings"]["images"]}
    assert list(sent) == photos and sent["photo-02.webp"]["converted_from"] == "WEBP"

    table = found["per_image"]
    for model in models:  # every photo once per model, in the same order
        assert [row["image"] for row in table if row["model"] == model] == photos
    figures = {}
    for model in models:
        rows = [row for row in table if row["model"] == model]
        parsed = []
        for row in rows:
            try:
                jsonschema.validate(json.loads(row["answer"] or ""), SCORE_SCHEMA)
                parsed.append(json.loads(row["answer"])["score"])
            except (ValueError, jsonschema.ValidationError):
                pass
            try:
                answered = json.loads(row["answer"] or "")
            except ValueError:
                answered = None
            assert row["score"] == (answered.get("score") if isinstance(answered, dict) else None)
        latencies = sorted(row["latency_s"] for row in rows if row["latency_s"] is not None)
        figures[model] = (len(parsed) / len(rows), statistics.median(latencies), parsed)
    assert sum(len(f[2]) for f in figures.values()) > 0  # the grammar held: some answers parsed
    ranked = found["ranking"]
    assert [row["model"] for row in ranked] == sorted(models, key=lambda m: (-figures[m][0], figures[m][1]))
    for row in ranked:
        rate, p50, scores = figures[row["model"]]
        assert row["parse_rate"] == rate and row["parsed"] == len(scores) and row["requests"] == len(photos)
        assert row["e2e_p50_s"] == pytest.approx(p50)
        score = row["score"]
        assert score["scored"] == len(scores) and score["top"] == max(scores)
        assert score["ties_at_top"] == scores.count(max(scores))
        assert score["ties_at_top_share"] == scores.count(max(scores)) / len(scores)
        assert score["counts"] == {f"{v:g}": scores.count(v) for v in sorted(set(scores))}

    with open(out / "per_image.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(r["image"], r["model"], r["answer"], r["score"]) for r in csv_rows] == [
        (t["image"], t["model"], t["answer"], "" if t["score"] is None else f"{t['score']:g}") for t in table]
    assert all(float(r["latency_ms"]) > 0 for r in csv_rows)
    from PIL import Image

    with Image.open(out / "scores.png") as plot:
        assert plot.format == "PNG" and plot.height > plot.width / 2  # one panel per model
    summary = (out / "summary.md").read_text()
    assert "## Models ranked (parse rate, then p50 latency)" in summary
    ranked_lines = [line for line in summary.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [line.split("|")[2].strip() for line in ranked_lines] == [row["model"] for row in ranked]

    # swap: the models take turns on each photo, so both see the photos in the same order
    swapped = tmp_path / "swap"
    run = bench("--url", b.url, "--model", models[0], "--model", models[1], "--images", str(album), "--requests", "2",
                "--scenario", "swap", "--prompt", "What is this?", "--max-tokens", "4", "--out", str(swapped))
    assert run.returncode == 0, run.stderr
    table = json.loads((swapped / "results.json").read_text())["per_image"]
    order = sorted(table, key=lambda row: row["index"])
    assert [(row["model"], row["image"]) for row in order] == [
        (models[0], photos[0]), (models[1], photos[0]), (models[0], photos[1]), (models[1], photos[1])]

    # cold: the model is unloaded before each photo, so each answer includes a start with its projector
    cold = tmp_path / "cold"
    run = bench("--url", b.url, "--model", models[1], "--images", str(album), "--requests", "2", "--scenario", "cold",
                "--prompt", "What is this?", "--max-tokens", "4", "--out", str(cold))
    assert run.returncode == 0, run.stderr
    found = json.loads((cold / "results.json").read_text())
    assert [(row["model"], row["image"]) for row in sorted(found["per_image"], key=lambda row: row["index"])] == [
        (models[1], photos[0]), (models[1], photos[1])]
    assert found["summary"][0]["scenario"] == "cold" and found["summary"][0]["succeeded"] == 2
