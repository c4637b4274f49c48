"""The images of `berth bench --images DIR`: read once, in name order, each sent inline (a base64 data URL) with
the prompt, one per request.

JPEG and PNG go as they are. WebP goes as PNG: llama.cpp (build 11434) decodes images with stb_image, which
reads no WebP, so a WebP would measure an error rather than the model; the conversion is lossless. (So does
any other format Pillow reads behind one of these suffixes.)
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SENT_AS = {"JPEG": "image/jpeg", "PNG": "image/png"}


class BadImages(Exception):
    """--images names no directory of images, or a file there is no image Pillow can read."""


@dataclass(frozen=True)
class BenchImage:
    name: str  # the file's name in the directory
    media_type: str  # what is sent: image/jpeg or image/png
    data_url: str  # the image as sent, encoded once
    converted_from: str | None = None  # the format it was in when sent as PNG (WEBP)


def _image(name: str, media_type: str, data: bytes, converted_from: str | None = None) -> BenchImage:
    return BenchImage(name, media_type, f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}",
                      converted_from)


def load_images(directory: Path) -> tuple[list[BenchImage], list[str]]:
    """The directory's images in name order, and the names of the other files there (not sent)."""
    if not directory.is_dir():
        raise BadImages(f"--images {directory} is not a directory; give the directory that holds the images to send")
    files = sorted(p for p in directory.iterdir() if p.is_file())
    found = [_read(p) for p in files if p.suffix.lower() in SUFFIXES]
    if not found:
        raise BadImages(f"--images {directory} has no {', '.join(SUFFIXES)} files; put the images to send there, "
                        "or name the directory that holds them")
    return found, [p.name for p in files if p.suffix.lower() not in SUFFIXES]


def _read(path: Path) -> BenchImage:
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency; only bench --images needs it

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind = image.format or ""
            if kind in _SENT_AS:
                return _image(path.name, _SENT_AS[kind], data)
            converted = io.BytesIO()
            image.save(converted, "PNG")
    except (UnidentifiedImageError, OSError) as exc:
        raise BadImages(f"--images: {path.name} is not a readable image ({exc}); replace it, or move it out of "
                        "the directory") from None
    return _image(path.name, "image/png", converted.getvalue(), converted_from=kind or "unknown")
