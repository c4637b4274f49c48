"""berth's config: a llama-swap style YAML file read into typed, immutable records.

This module is the package's face: other packages import from `berth.config` only (an import-linter
contract in pyproject.toml holds them to it), so the modules behind it can change freely.
"""

from berth.config.loader import load_config, parse_config
from berth.config.records import (
    DEFAULT_CONCURRENCY_LIMIT, DEFAULT_GROUP, PORT_MACRO, ApiKey, BerthConfig, Capabilities, GroupSpec, KeyLimits,
    MatrixSpec, MemorySettings, ModelSpec, PeerSpec, ProfileSpec, RemoteImages, RpcSpec, SelectorSpec,
    UpstreamTimeouts,
)
from berth.config.schema import KEY_SCOPES

__all__ = [
    "DEFAULT_CONCURRENCY_LIMIT", "DEFAULT_GROUP", "KEY_SCOPES", "PORT_MACRO", "ApiKey", "BerthConfig", "Capabilities",
    "GroupSpec", "KeyLimits", "MatrixSpec", "MemorySettings", "ModelSpec", "PeerSpec", "ProfileSpec", "RemoteImages",
    "RpcSpec", "SelectorSpec", "UpstreamTimeouts", "load_config", "parse_config",
]
