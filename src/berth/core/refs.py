"""Model references as users write them: `owner/repo:QUANT`, `owner/repo/path/file.gguf`, `hf://...`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from berth.core.errors import BadRequest

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/(?!\.+$)[\w.-]+$")  # a name of dots alone would be a path step
SPLIT_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


class BadModelRef(BadRequest):
    pass


@dataclass(frozen=True)
class ModelRef:
    repo: str  # owner/name
    quant: str | None = None  # a quant tag such as Q4_K_M
    filename: str | None = None  # a path inside the repo
    revision: str | None = None

    @property
    def default_name(self) -> str:
        """The store name: stable, lower-case, free of upstream file-name churn."""
        if self.filename:
            base = SPLIT_SUFFIX.sub("", self.filename.rsplit("/", 1)[-1])
            base = re.sub(r"\.gguf$", "", base, flags=re.IGNORECASE)
            return base.lower()
        repo_name = re.sub(r"[-_.]gguf$", "", self.repo.split("/", 1)[1], flags=re.IGNORECASE)
        return f"{repo_name}-{self.quant}".lower() if self.quant else repo_name.lower()

    def __str__(self) -> str:
        if self.filename:
            return f"{self.repo}/{self.filename}"
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(text: str, revision: str | None = None) -> ModelRef:
    """Read a model reference; BadModelRef names the accepted forms."""
    raw = text.strip()
    body = raw[len("hf://"):] if raw.startswith("hf://") else raw
    forms = "owner/repo:QUANT, owner/repo/path/file.gguf or hf://owner/repo..."
    if ":" in body:
        repo, _, quant = body.partition(":")
        if _REPO.match(repo) and re.fullmatch(r"[\w.-]+", quant):
            return ModelRef(repo, quant=quant, revision=revision)
    else:
        parts = body.split("/")
        if any(part in ("", ".", "..") or "\\" in part for part in parts[2:]):
            raise BadModelRef(f"{raw!r} names a file with an empty, '.' or '..' part or a backslash; write the "
                              "file's path inside the repo as the hub lists it")
        if len(parts) >= 3 and parts[-1].lower().endswith(".gguf") and _REPO.match("/".join(parts[:2])):
            return ModelRef("/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision)
        if len(parts) == 2 and _REPO.match(body):
            return ModelRef(body, revision=revision)
    raise BadModelRef(f"{raw!r} is not a model reference; write {forms}")
