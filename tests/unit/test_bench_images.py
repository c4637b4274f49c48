"""`berth bench --images DIR`: which files are sent, in what order and shape, and the exit code 2 with a message
naming the problem and its fix for every way the directory, the schema or the score field can be wrong (all
found before the target is asked anything)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from berth.bench.images import BadImages, load_images
from berth.bench.runner import BenchSettings, planned_requests, request_body
from berth.cli.bench import bench
from tests.support.image_server import write_images


def sent_bytes(data_url: str) -> bytes:
    return base64.b64decode(data_url.split(",", 1)[1])


def test_images_are_read_in_name_order_jpeg_and_png_as_they_are_webp_as_png(tmp_path):
    paths = write_images(tmp_path, 4)  # PNG, JPEG, WebP, PNG
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "sub").mkdir()
    images, skipped = load_images(tmp_path)
    assert [i.name for i in images] == [p.name for p in paths] and skipped == ["notes.txt"]
    assert [i.media_type for i in images] == ["image/png", "image/jpeg", "image/png", "image/png"]
    assert sent_bytes(images[0].data_url) == paths[0].read_bytes()
    assert sent_bytes(images[1].data_url) == paths[1].read_bytes()
    webp = images[2]
    assert webp.converted_from == "WEBP" and images[0].converted_from is None
    with Image.open(io.BytesIO(sent_bytes(webp.data_url))) as sent, Image.open(paths[2]) as original:
        assert sent.format == "PNG" and sent.convert("RGB").tobytes() == original.convert("RGB").tobytes()


def test_a_bad_album_names_the_problem_and_the_fix(tmp_path):
    with pytest.raises(BadImages, match="is not a directory; give the directory that holds the images"):
        load_images(tmp_path / "nowhere")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(BadImages, match=r"has no \.jpg, \.jpeg, \.png, \.webp files; put the images to send there"):
        load_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(BadImages, match="broken.png is not a readable image .*; replace it, or move it out"):
        load_images(tmp_path)


def test_every_model_gets_the_images_in_the_same_order_and_each_request_carries_one(tmp_path):
    write_images(tmp_path, 3)
    images, _ = load_images(tmp_path)
    settings = BenchSettings("http://x", ["a", "b"], 3, [1], ["Rate it."], 8, False, "warm", None, None, 10.0,
                             "--prompt", images=images)
    assert [p.image.name for p in planned_requests(settings)] == [i.name for i in images]
    swap = BenchSettings("http://x", ["a", "b"], 2, [1], ["Rate it."], 8, False, "swap", None, None, 10.0,
                         "--prompt", images=images)
    assert [p.image.name for p in planned_requests(swap)] == [images[0].name] * 2 + [images[1].name] * 2
    body = request_body(settings, "a", planned_requests(settings)[1])
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Rate it."}, {"type": "image_url", "image_url": {"url": images[1].data_url}}]}]


def test_bad_image_and_score_options_exit_2_before_the_target_is_asked(tmp_path):
    not_images = tmp_path / "not-images"
    not_images.mkdir()
    (not_images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    album = tmp_path / "album"
    write_images(album, 1)
    scored = tmp_path / "scored.json"
    scored.write_text(json.dumps({"type": "object", "properties": {"score": {"type": "integer"},
                                                                   "why": {"type": "string"}}}))
    listless = tmp_path / "listless.json"
    listless.write_text(json.dumps({"type": "object"}))
    # the URL is never asked: every case fails before the first request (a reachable one would answer "not served")
    common = ["--url", "http://127.0.0.1:1", "--model", "a", "--out", str(tmp_path / "out")]
    cases = [
        (["--images", str(tmp_path / "nowhere")], "give the directory that holds the images to send"),
        (["--images", str(not_images)], "broken.jpg is not a readable image"),
        (["--images", str(album), "--json-schema", str(scored), "--score-field", "rating"],
         "--score-field rating is not a property of --json-schema"),
        (["--images", str(album), "--json-schema", str(scored), "--score-field", "rating"], "its properties: score, why"),
        (["--json-schema", str(listless), "--score-field", "score"], "its properties: none"),
        (["--json-schema", str(scored), "--score-field", "why"],
         "--score-field why is of type 'string' in --json-schema"),
        (["--images", str(album), "--json-schema", str(tmp_path / "missing.json")], "cannot read --json-schema"),
    ]
    for args, message in cases:
        run = CliRunner().invoke(bench, [*common, *args])
        assert run.exit_code == 2, (args, run.output)
        assert message in " ".join(run.stderr.split()), (args, run.stderr)
    assert not (tmp_path / "out").exists()  # nothing was written
