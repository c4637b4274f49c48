"""berth's models as Ollama describes them: /api/tags entries, /api/ps entries, /api/show bodies.

What a model is comes from its GGUF header (family, parameter count, quantization, metadata) and the flags
its cmd gives llama-server; what a running model reports on `/props` (its chat template, its sampling
defaults, its slot context, whether it sees images) replaces the flags' view while it runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from berth.core.errors import BerthError
from berth.core.gguf import GGUFHeader, GGUFInvalid, read_model_header
from berth.engine.llama_args import LlamaServerArgs
from berth.gateway.ledger import RequestRecord
from berth.gateway.ollama.answers import WholeBody, iso
from berth.runtime.snapshot import ModelSnapshot

FOREVER = timedelta(seconds=(2**63 - 1) / 1e9)  # Go's largest duration: Ollama's expiry of keep_alive -1
# llama-server's sampling settings (as /props names them, and its flags) under Ollama's parameter names
_PARAMETERS = (  # (Ollama's name, /props params name, LlamaServerArgs dest)
    ("temperature", "temperature", "temp"), ("top_k", "top_k", "top_k"), ("top_p", "top_p", "top_p"),
    ("min_p", "min_p", "min_p"), ("typical_p", "typical_p", None), ("repeat_last_n", "repeat_last_n", None),
    ("repeat_penalty", "repeat_penalty", "repeat_penalty"),
    ("presence_penalty", "presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty", "frequency_penalty"), ("mirostat", "mirostat", None),
    ("mirostat_tau", "mirostat_tau", None), ("mirostat_eta", "mirostat_eta", None), ("seed", "seed", "seed"),
    ("num_predict", "n_predict", "n_predict"), ("num_keep", "n_keep", None),
)
_THINKING_MARKS = ("enable_thinking", "reasoning_content", "<think>")


def human_number(count: int) -> str:
    """A parameter count as Ollama writes it: 8B, 7.2B, 134.52M, 500K."""
    for unit, size, decimals in (("B", 10**9, 1), ("M", 10**6, 2)):
        if count >= size:
            number = count / size
            return f"{number:.0f}{unit}" if number == int(number) else f"{number:.{decimals}f}{unit}"
    return f"{count / 1000:.0f}K" if count >= 1000 else str(count)


@dataclass(frozen=True)
class ModelFile:
    """A model's GGUF (and projector) and the flags llama-server runs it with."""

    path: Path
    header: GGUFHeader
    projector: GGUFHeader | None
    args: LlamaServerArgs
    digest: str  # the sha256 berth verified the file against when it pulled it; "" for other files

    @classmethod
    def read(cls, args: LlamaServerArgs | None, digest_of: Callable[[Path], str | None]) -> ModelFile | None:
        """None when the launch is not llama.cpp's, or its files cannot be read."""
        if args is None or not args.get("model"):
            return None
        try:
            header = read_model_header(args.get("model"))
            projector = read_model_header(args.get("mmproj")) if args.get("mmproj") else None
        except (OSError, GGUFInvalid):
            return None
        path = Path(args.get("model"))
        return cls(path, header, projector, args, digest_of(path) or "")

    @property
    def size(self) -> int:
        return self.header.file_size + (self.projector.file_size if self.projector else 0)

    @property
    def modified_at(self) -> str:
        return iso(datetime.fromtimestamp(self.path.stat().st_mtime, UTC))

    @property
    def context(self) -> int:
        """Each slot's context: -c (or the model's trained context) over the parallel slots, unless they
        share one unified cache."""
        total = self.args.get("ctx_size") or int(self.header.arch_value("context_length") or 0)
        parallel, unified = self.args.sequences()
        return total if unified else total // parallel

    def details(self) -> dict[str, Any]:
        family = self.header.architecture or ""
        return {"parent_model": "", "format": "gguf", "family": family,
                "families": [family] + (["clip"] if self.projector else []),
                "parameter_size": human_number(self.header.parameter_count),
                "quantization_level": self.header.file_type or ""}


NO_DETAILS = {"parent_model": "", "format": "", "family": "", "families": [], "parameter_size": "",
              "quantization_level": ""}


def listing(name: str, file: ModelFile | None, started_at: int) -> dict[str, Any]:
    """One /api/tags entry."""
    modified = file.modified_at if file else iso(datetime.fromtimestamp(started_at, UTC))
    return {"name": name, "model": name, "modified_at": modified, "size": file.size if file else 0,
            "digest": file.digest if file else "", "details": file.details() if file else dict(NO_DETAILS)}


def running(name: str, file: ModelFile | None, snapshot: ModelSnapshot) -> dict[str, Any]:
    """One /api/ps entry: memory as measured (else as planned), the GPUs' share of it, when the idle TTL
    runs out."""
    memory = snapshot.measured or (snapshot.plan.planned if snapshot.plan else None) or {}
    left = snapshot.ttl_remaining_s
    expires = datetime.now(UTC) + (FOREVER if left is None else timedelta(seconds=left))
    return {"name": name, "model": name, "size": sum(memory.values()),
            "digest": file.digest if file else "", "details": file.details() if file else dict(NO_DETAILS),
            "expires_at": iso(expires),
            "size_vram": sum(b for d, b in memory.items() if d.startswith("gpu")),
            "context_length": file.context if file else 0}


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _capabilities(file: ModelFile, template: str, vision: bool, tools: bool) -> list[str]:
    if file.args.get("embeddings"):
        return ["embedding"]
    found = ["completion"]
    if tools and file.args.get("jinja", True):  # without jinja llama-server refuses `tools`
        found.append("tools")
    if vision:
        found.append("vision")
    if any(mark in template for mark in _THINKING_MARKS):
        found.append("thinking")
    return found


def show(file: ModelFile, props: dict[str, Any] | None) -> dict[str, Any]:
    """An /api/show body. With `props` (a running llama-server's /props), its template, sampling defaults,
    slot context and vision; without, what the GGUF and the cmd's flags say."""
    header = file.header
    if props is not None:
        settings = props.get("default_generation_settings") or {}
        params = settings.get("params") or {}
        values = {ollama: params.get(name) for ollama, name, _ in _PARAMETERS}
        values["num_ctx"] = settings.get("n_ctx", file.context)
        template = props.get("chat_template") or ""
        vision = bool((props.get("modalities") or {}).get("vision"))
        caps = props.get("chat_template_caps") or {}
        tools = bool(caps.get("supports_tool_calls") or caps.get("supports_tools"))
    else:
        values = {ollama: file.args.get(dest) for ollama, _, dest in _PARAMETERS if dest}
        values["num_ctx"] = file.context
        template = file.args.get("chat_template") or header.metadata.get("tokenizer.chat_template") or ""
        vision = file.projector is not None
        tools = "tools" in template  # a template that renders the tools it is given
    parameters = "\n".join(f"{name:<20} {_number(value)}" for name, value in values.items() if value is not None)
    info = {**header.metadata, "general.parameter_count": header.parameter_count}
    result: dict[str, Any] = {
        "license": header.metadata.get("general.license") or "", "modelfile": "", "parameters": parameters,
        "template": template, "details": file.details(), "model_info": info,
        "capabilities": _capabilities(file, template, vision, tools), "modified_at": file.modified_at}
    if file.projector is not None:
        result["projector_info"] = dict(file.projector.metadata)
    return result


def no_file_show(started_at: int) -> dict[str, Any]:
    """/api/show for a model berth cannot read a GGUF of (another engine's cmd)."""
    return {"license": "", "modelfile": "", "parameters": "", "template": "", "details": dict(NO_DETAILS),
            "model_info": {}, "capabilities": ["completion"],
            "modified_at": iso(datetime.fromtimestamp(started_at, UTC))}


class PropsAnswer:
    """/api/show from a running llama-server's /props (the proxy's Reframe); a server that has no /props gets
    what the files and flags say."""

    content_type = "application/json"

    def __init__(self, file: ModelFile) -> None:
        self.file = file
        self._body = WholeBody()

    def refused(self, status: int, message: str) -> web.Response:
        return web.json_response(show(self.file, None))

    def feed(self, chunk: bytes) -> bytes:
        return self._body.feed(chunk)

    def close(self, record: RequestRecord) -> bytes:
        try:
            props: dict[str, Any] | None = self._body.parsed()
        except ValueError:
            props = None
        return json.dumps(show(self.file, props)).encode()

    def failed(self, error: BerthError) -> bytes:
        return json.dumps({"error": error.message}).encode()
