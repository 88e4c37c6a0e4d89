"""Serve a GGUF variant to coding agents: the pinned llama-server behind OpenAI- and Anthropic-compatible
endpoints, with a thin layer of our own only where llama-server falls short (see :mod:`.proxy`)."""

from .clients import CLIENTS, client_config
from .models import resolve_model
from .server import ServeOptions, serve

__all__ = ["CLIENTS", "ServeOptions", "client_config", "resolve_model", "serve"]
