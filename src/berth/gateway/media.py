"""Images (and audio, video) in a request's body: found wherever llama-server reads them, refused for a model
without a projector before anything loads, and fetched by berth when given as http(s) URLs (remote_media.py),
so the model server gets the bytes inline and never a URL.

Where llama-server 11434 reads media (tools/server/server-common.cpp, server-chat.cpp): OpenAI chat content
parts `image_url` ({"url"}), `input_audio` and `input_video`/`video_url` ({"data"} or {"url"}); the
Responses API's `input_image` (`image_url`, a string); Anthropic `image` blocks (`source`: base64 or url),
tool results included; embeddings inputs with such content; `/completion`'s `multimodal_data` (base64 only).
The body is walked whole, so every place these shapes can sit is covered, however deep.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from berth.core.errors import BadRequest, MediaNotSupported, MediaUrlRefused
from berth.gateway.context import GatewayContext
from berth.gateway.remote_media import RemoteMedia, shown

# a content part's `type` -> what it carries
_KINDS = {"image_url": "image", "input_image": "image", "image": "image", "input_audio": "audio",
          "input_video": "video", "video_url": "video"}
_NAMES = {"image": "images", "audio": "audio", "video": "video", "media": "multimodal data"}


@dataclass
class MediaPart:
    """One image, audio or video in a request: `holder[key]` is its URL or inline data."""

    kind: str  # image | audio | video | media (multimodal_data, whose kind is not said)
    holder: dict[str, Any]
    key: str
    anthropic: bool = False  # `holder` is an Anthropic image block's `source`

    @property
    def url(self) -> str | None:
        value = self.holder.get(self.key)
        return value if isinstance(value, str) else None

    @property
    def remote(self) -> bool:
        """A URL the model server would download (llama-server takes any value starting with `http`)."""
        return (self.url or "")[:4].lower() == "http"

    def inline(self, media_type: str, data: bytes) -> None:
        """Put the fetched bytes where the URL was, in the shape the part takes inline data."""
        encoded = base64.b64encode(data).decode("ascii")
        if self.anthropic:
            self.holder.clear()
            self.holder.update(type="base64", media_type=media_type, data=encoded)
        else:
            self.holder[self.key] = f"data:{media_type};base64,{encoded}"


def _part(node: dict[str, Any]) -> MediaPart | None:
    kind_of = node.get("type")
    kind = _KINDS.get(kind_of) if isinstance(kind_of, str) else None
    if kind is None:
        data = node.get("multimodal_data")
        return MediaPart("media", node, "multimodal_data") if isinstance(data, list) and data else None
    if kind_of == "image":  # Anthropic's image block
        source = node.get("source")
        if not isinstance(source, dict):
            return None
        return MediaPart(kind, source, "url", anthropic=True) if source.get("type") == "url" else \
            MediaPart(kind, source, "data")
    key = "image_url" if kind_of in ("image_url", "input_image") else str(kind_of)
    value = node.get(key)
    if isinstance(value, str):
        return MediaPart(kind, node, key)
    if isinstance(value, dict):  # llama-server reads `data` first, then `url`
        return MediaPart(kind, value, "url" if key == "image_url" or not isinstance(value.get("data"), str)
                         else "data")
    return None


def media_parts(payload: Any) -> list[MediaPart]:
    """Every media part of a JSON body, in document order (the walk keeps its own stack: a body nested
    as deeply as the parser allows does not exhaust Python's)."""
    found: list[MediaPart] = []
    stack: list[Any] = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            part = _part(node)
            if part is not None:
                found.append(part)
            stack.extend(reversed(list(node.values())))
    return found


async def take_media(context: GatewayContext, model_id: str, payload: Any, body_size: int) -> bool:
    """Refuse media for a model that cannot read them (before any load), and fetch the remote ones into the
    payload; whether the payload changed."""
    parts = media_parts(payload)
    if not parts:
        return False
    if context.pool.reads_images(model_id) is False:
        raise MediaNotSupported(model_id, [_NAMES[kind] for kind in dict.fromkeys(p.kind for p in parts)])
    remote = [part for part in parts if part.remote]
    if not remote:
        return False
    config = context.config
    if not config.remote_images.fetch:
        raise MediaUrlRefused(f"{shown(remote[0].url or '')}: remote media URLs are turned off (remoteImages.fetch: "
                              "false); send the file inline as a base64 data URL")
    async with RemoteMedia(config.remote_images, config.max_body_bytes - body_size, config.max_body_bytes) as fetcher:
        for part in remote:
            part.inline(*await fetcher.fetch(part.url or "", part.kind))
    return True


async def checked_body(context: GatewayContext, model_id: str, body: bytes) -> bytes:
    """A body on its way to a model server outside the inference routes (`/upstream`, `?model=`): its media
    taken as `take_media` does when it is JSON. A body that looks like JSON but does not parse is refused:
    the model server's parser might read it, and any URL in it, where berth's could not."""
    start = body.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if start not in (b"{", b"["):
        return body
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("request body starts like JSON but does not parse (or nests too deeply); send valid "
                         "JSON of ordinary depth") from None
    if await take_media(context, model_id, payload, len(body)):
        return json.dumps(payload).encode()
    return body
