"""The one place that turns a model spec into the argv that is actually executed."""

from __future__ import annotations

from berth.config import ModelSpec


def build_launch_argv(spec: ModelSpec) -> list[str]:
    return list(spec.argv)
