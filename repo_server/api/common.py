"""Shared pieces of the handlers: app keys, role checks, bounded body reads, engine offloading."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from chunkyard.config import ServerConfig
from repo_server.engine import Repository
from repo_server.engine.tokens import TokenInfo

from .metrics import METRICS

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


CONFIG = web.AppKey("config", ServerConfig)
REPO = web.AppKey("repo", Repository)
POOL = web.AppKey("pool", ThreadPoolExecutor)
TOKEN = web.RequestKey("token", TokenInfo)  # the caller's token
STREAMING = web.RequestKey("streaming", bool)  # set once a streamed response has sent its headers


class ApiError(web.HTTPException):
    """An error answered as JSON {"error": code, "message": text}."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": code, "message": message}),
            content_type="application/json",
            headers=headers,
        )


def roles(*allowed: str) -> Callable[[Handler], Handler]:
    """Declare which token roles may call a handler; the auth middleware enforces it."""

    def mark(handler: Handler) -> Handler:
        handler.allowed_roles = allowed  # type: ignore[attr-defined]
        return handler

    return mark


def operator_only(handler: Handler) -> Handler:
    """Whole-repository actions (GC, verify, tier sync, global figures): a tenant-scoped token gets 403."""
    handler.operator_only = True  # type: ignore[attr-defined]
    return handler


def public(handler: Handler) -> Handler:
    handler.allowed_roles = None  # type: ignore[attr-defined]
    return handler


def token_of(request: web.Request) -> TokenInfo:
    return request[TOKEN]


def scope(request: web.Request) -> str:
    """The caller's tenant: "" for an operator token (sees everything)."""
    return request[TOKEN].tenant


async def run(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking engine work in the server's thread pool."""
    return await asyncio.get_running_loop().run_in_executor(request.app[POOL], fn, *args)


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read a streamed body, enforcing our own limit (client_max_size does not cover streams)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"the body is {request.content_length} bytes; the limit is {limit}")
    parts: list[bytes] = []
    total = 0
    async for part in request.content.iter_any():
        total += len(part)
        if total > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
        parts.append(part)
    request.app[METRICS].received(total)
    return b"".join(parts)


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    body = await read_body(request, 1 << 20)
    if not body.strip() and optional:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {e}") from None
