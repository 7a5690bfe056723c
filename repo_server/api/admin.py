"""Service endpoints: health, repository stats, tokens, metrics, cloud tiers, the OpenAPI description."""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from chunkyard import __version__
from tiering.sync import TierSync

from .common import METRICS, REPO, ApiError, public, read_json, roles, run
from .openapi import openapi_document

TIERS = web.AppKey("tiers", TierSync)  # the cloud tiers' uploaders, started with the app (app.py)


@public
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


@public
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


@roles("admin", "reader", "collector")
async def repository(request: web.Request) -> web.Response:
    return web.json_response(await run(request, request.app[REPO].stats))


@roles("admin")
async def create_token(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("role"), str):
        raise ApiError(422, "bad_field", 'the body must be {"role": "admin|collector|reader", "name": "..."}')
    token, info = await run(request, request.app[REPO].tokens.create, body["role"], body.get("name", ""))
    return web.json_response(info.public() | {"token": token}, status=201)


@roles("admin")
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await run(request, request.app[REPO].tokens.list)
    return web.json_response({"tokens": [t.public() for t in tokens]})


@roles("admin")
async def revoke_token(request: web.Request) -> web.Response:
    await run(request, request.app[REPO].tokens.revoke, request.match_info["token_id"])
    return web.Response(status=204)


@roles("admin", "reader")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; also served at the root path /metrics, where scrapers look by default."""
    body = await run(request, request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@roles("admin", "reader")
async def tiers(request: web.Request) -> web.Response:
    return web.json_response({"tiers": request.app[TIERS].status()})


@roles("admin")
async def sync_tiers(request: web.Request) -> web.Response:
    """Start a sync cycle now; a tier is caught up with this request once its synced_at ≥ requested."""
    requested = time.time()
    request.app[TIERS].wake()
    return web.json_response({"requested": requested, "tiers": request.app[TIERS].status()}, status=202)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/health", health)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/api/v1/repository", repository)
    r.add_get("/api/v1/metrics", metrics)
    r.add_get("/metrics", metrics)
    r.add_post("/api/v1/tokens", create_token)
    r.add_get("/api/v1/tokens", list_tokens)
    r.add_delete("/api/v1/tokens/{token_id}", revoke_token)
    r.add_get("/api/v1/tiers", tiers)
    r.add_post("/api/v1/tiers/sync", sync_tiers)
