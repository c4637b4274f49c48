"""Ollama's API on berth's models (a route family: `register`)."""

from berth.gateway.ollama.routes import register

__all__ = ["register"]
