"""Ollama's model names in berth's terms.

Ollama writes `name:tag`, `:latest` when no tag is given, and takes Hugging Face GGUFs as
`hf.co/owner/repo:QUANT`. berth's models are the config's ids, aliases, selectors, profile pins and peers'
`peer/model`; its store takes `owner/repo:QUANT`. A name that is neither (`llama3.2`, `library/qwen3:8b`)
is a name in Ollama's own registry, which berth does not pull from.
"""

from __future__ import annotations

import re

from berth.config import BerthConfig
from berth.core.errors import BadRequest
from berth.core.refs import ModelRef, parse_ref
from berth.engine.launch import HF_DEFAULT_QUANT, store_reference

HF_HOSTS = ("hf.co/", "huggingface.co/")
_QUANT = re.compile(r"(?i)^(ud-)?(i?q\d\w*|f16|f32|bf16|mxfp4\w*)$")  # the tags of GGUF quantizations
LATEST = ":latest"


class RegistryOnlyName(BadRequest):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name!r} is a name in Ollama's registry, which berth does not pull from; berth pulls GGUF files from "
            "Hugging Face (HF_ENDPOINT): name one as hf.co/<owner>/<repo>:<QUANT>, e.g. "
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")


def _known(config: BerthConfig, name: str) -> bool:
    return (config.resolve(name) is not None or config.resolve_peer(name) is not None or name in config.selectors
            or any(name == pinned for profile in config.profiles.values() for pinned, _ in profile.pins))


def hub_reference(name: str) -> ModelRef:
    """A Hugging Face GGUF named the way Ollama takes one: `hf.co/owner/repo[:QUANT]` (no tag, or `latest`:
    Q4_K_M, as Ollama and llama-server choose), or `owner/repo:QUANT` with a quant for a tag. Anything else
    (`llama3.2`, `library/qwen3:8b`, `user/model:latest`) is RegistryOnlyName."""
    text = name.strip()
    via_hub = False
    for host in HF_HOSTS:
        if text.lower().startswith(host):
            text, via_hub = text[len(host):], True
            break
    repo, _, tag = text.partition(":")
    if repo.count("/") != 1 or not via_hub and (repo.lower().startswith("library/") or not _QUANT.match(tag)):
        raise RegistryOnlyName(name)
    quant = tag if tag and tag.lower() != "latest" else HF_DEFAULT_QUANT
    try:
        return parse_ref(f"{repo}:{quant}")
    except BadRequest:
        raise RegistryOnlyName(name) from None


def store_models(config: BerthConfig, store_name: str) -> list[str]:
    """The ids of the config's models that run the store's model `store_name`."""
    found = []
    for spec in config.models.values():
        try:
            wanted = store_reference(spec)
        except BadRequest:
            continue
        if wanted is not None and wanted[0].default_name == store_name:
            found.append(spec.id)
    return found


def local_name(config: BerthConfig, name: str) -> str:
    """The name berth routes for an Ollama model name: as written, without `:latest`, or the config's model
    that runs the Hugging Face GGUF it names. Unknown names stay as written (and answer 404 later)."""
    if _known(config, name):
        return name
    if name.endswith(LATEST) and _known(config, name.removesuffix(LATEST)):
        return name.removesuffix(LATEST)
    try:
        models = store_models(config, hub_reference(name).default_name)
    except BadRequest:
        return name
    return models[0] if models else name
