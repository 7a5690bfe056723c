"""The HTTP API (aiohttp): thin handlers over repo_server.engine."""

from .app import create_app

__all__ = ["create_app"]
