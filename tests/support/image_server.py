"""Images made in the test (Pillow), and a small HTTP server on 127.0.0.1 that serves them, in a thread of the
test process: what a client's image URL points at, with the ways such a server can misbehave."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30),
                noise: bool = False) -> bytes:
    """An image file in `fmt` (PNG, JPEG, WEBP); with `noise`, random pixels (so it does not compress)."""
    from PIL import Image

    if noise:
        import os
        image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, color)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_images(directory: Path, count: int) -> list[Path]:
    """`count` small images of different colours, cycling through PNG, JPEG and WebP."""
    directory.mkdir(parents=True, exist_ok=True)
    formats = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))
    paths = []
    for i in range(count):
        fmt, ext = formats[i % len(formats)]
        path = directory / f"photo-{i:02d}.{ext}"
        path.write_bytes(image_bytes(fmt, color=(40 * i % 256, 255 - 30 * i % 256, 90)))
        paths.append(path)
    return paths


class ImageServer:
    """Serves `files` (path -> (content type, bytes)) and these paths: /redirect/<path> (302 to /<path>),
    /loop (redirects to itself), /slow (answers only when the server stops), /gzip.png (a PNG sent with
    Content-Encoding: gzip); anything else is a 404. `requests` lists the paths asked for."""

    def __init__(self, files: dict[str, tuple[str, bytes]]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.user_agents: list[str] = []
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                server.user_agents.append(self.headers.get("User-Agent", ""))
                if self.path.startswith("/redirect/"):
                    self._answer(302, "text/plain", b"", {"Location": "/" + self.path[len("/redirect/"):]})
                elif self.path == "/loop":
                    self._answer(302, "text/plain", b"", {"Location": "/loop"})
                elif self.path == "/slow":
                    server._release.wait()
                    self._answer(200, "image/png", b"")
                elif self.path == "/gzip.png":
                    self._answer(200, "image/png", b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"})
                elif self.path.lstrip("/") in server.files:
                    self._answer(200, *server.files[self.path.lstrip("/")])
                else:
                    self._answer(404, "text/plain", b"not here")

            def _answer(self, status: int, content_type: str, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path}"

    @contextmanager
    def running(self) -> Iterator[ImageServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._release.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
