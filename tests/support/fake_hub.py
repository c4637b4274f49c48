"""A local stand-in for the Hugging Face Hub, for `huggingface_hub` clients under test.

Speaks: model info with file metadata (`/api/models/{repo}[/revision/{rev}]`),
`resolve` (HEAD and GET) answering with a redirect to a blob URL and the
`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size` headers, and byte ranges on
the blob. Faults can be injected per file: drop the connection after N bytes,
or serve corrupted bytes once. A lying hub (`lies = True`) also answers any
other path ending in a listed file's name with that file, as a hub that
lists `../x.gguf` would (clients collapse the `..` in the URL). Runs in a
thread of the test process.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.support.threaded_server import ThreadedServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    path: Path  # bytes on disk
    sha256: str
    size: int


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.bytes_sent: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()
        self.drop_after: dict[str, int] = {}  # file -> bytes; the next GET is cut there (once)
        self.corrupt_once: set[str] = set()
        self.seconds_per_block = 0.0  # > 0 makes downloads slow (64 KiB blocks)
        self.lies = False  # serve a listed file at any path that ends in its name
        self.url = ""
        self._server = ThreadedServer()

    def add(self, repo: str, filename: str, source: Path) -> HubFile:
        digest = hashlib.sha256()
        with open(source, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        entry = HubFile(Path(source), digest.hexdigest(), Path(source).stat().st_size)
        self.repos.setdefault(repo, {})[filename] = entry
        return entry

    # -- handlers ---------------------------------------------------------------------

    async def _info(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        if repo not in self.repos:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        siblings = [{"rfilename": name, "size": f.size, "blobId": f.sha256[:40],
                     "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}}
                    for name, f in self.repos[repo].items()]
        return web.json_response({"_id": "x", "id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                  "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    async def _resolve(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        entry = self.repos.get(repo, {}).get(request.match_info["path"])
        if entry is None and self.lies:
            return await self._anywhere(request)
        if entry is None:
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound"})
        blob = f"{self.url}/blobs/{repo}/{request.match_info['path']}"
        return web.Response(status=302, headers={
            "Location": blob, "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{entry.sha256}"',
            "X-Linked-Size": str(entry.size), "ETag": f'"{entry.sha256[:40]}"'})

    async def _anywhere(self, request: web.Request) -> web.StreamResponse:
        tail = request.path.rsplit("/", 1)[-1]
        for repo, files in self.repos.items():
            for name in files:
                if self.lies and name.replace("\\", "/").rsplit("/", 1)[-1] == tail:
                    return await self._send(request, repo, name)
        return web.json_response({"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._send(request, repo, request.match_info["path"])

    async def _send(self, request: web.Request, repo: str, name: str) -> web.StreamResponse:
        entry = self.repos[repo][name]
        start = 0
        if request.http_range.start is not None:
            start = request.http_range.start
        # The blob sits on the hub's own host, so clients follow the redirect; it repeats the hub headers.
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{entry.sha256}"', "Content-Length": str(entry.size - start),
                   "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{entry.size - 1}/{entry.size}"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.gets[name] += 1
        cut = self.drop_after.pop(name, None)
        corrupt = name in self.corrupt_once
        self.corrupt_once.discard(name)
        sent = 0
        with open(entry.path, "rb") as fh:
            fh.seek(start)
            while block := fh.read(1 << 16):
                if corrupt and sent == 0 and len(block) > 10:
                    block = block[:10] + bytes([block[10] ^ 0xFF]) + block[11:]
                if cut is not None and sent + len(block) > cut:
                    block = block[:cut - sent]
                    await response.write(block)
                    self.bytes_sent[name] += len(block)
                    request.transport.close()  # the connection drops mid-file
                    return response
                await response.write(block)
                if self.seconds_per_block:
                    await asyncio.sleep(self.seconds_per_block)
                sent += len(block)
                self.bytes_sent[name] += len(block)
        await response.write_eof()
        return response

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> "FakeHub":
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self._info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self._info)
        app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        app.router.add_route("*", "/blobs/{owner}/{name}/{path:.+}", self._blob)
        app.router.add_route("*", "/{tail:.+}", self._anywhere)
        self._server.serve(app)
        self.url = self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()
