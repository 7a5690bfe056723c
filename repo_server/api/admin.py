"""Service endpoints: health, repository stats, tokens, metrics, cloud tiers, the OpenAPI description."""

from __future__ import annotations

import json
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from chunkyard import __version__
from tiering.sync import TierSync

from .audit import audited, note
from .common import METRICS, REPO, ApiError, operator_only, public, read_json, roles, run, scope, token_of
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
    return web.json_response(await run(request, request.app[REPO].stats, scope(request)))


TOKEN_FIELDS = ("role", "name", "tenant", "expires_in", "expires")
MAX_LIFETIME = 10 * 365 * 86400


def _expiry(body: dict) -> float | None:
    """The unix time a new token expires at, from "expires_in" (seconds from now) or "expires"."""
    if "expires_in" in body and "expires" in body:
        raise ApiError(422, "bad_field", 'give either "expires_in" (seconds) or "expires" (unix time), not both')
    value = body.get("expires_in")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= MAX_LIFETIME:
            raise ApiError(422, "bad_field", f"expires_in must be a number of seconds from 1 to {MAX_LIFETIME} "
                           f"(10 years); got {json.dumps(value)[:40]}")
        return time.time() + value
    value = body.get("expires")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ApiError(422, "bad_field", f"expires must be a unix time in seconds; got {json.dumps(value)[:40]}")
    return value


@roles("admin")
@audited("token.create")
async def create_token(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("role"), str) or set(body) - set(TOKEN_FIELDS):
        raise ApiError(422, "bad_field", 'the body must be {"role": "admin|collector|reader", "name": "...", '
                       '"tenant": "..." (optional), "expires_in": seconds or "expires": unix time (optional)}')
    mine = scope(request)
    tenant = body.get("tenant", mine)
    if mine and tenant != mine:
        raise ApiError(403, "forbidden", f"a token of tenant {mine!r} may create tokens only for that tenant")
    token, info = await run(request, request.app[REPO].tokens.create, body["role"], body.get("name", ""),
                            tenant, _expiry(body))
    note(request, target=info.id, tenant=info.tenant, role=info.role, name=info.name, expires=info.expires)
    return web.json_response(info.public() | {"token": token}, status=201)


@roles("admin", "reader", "collector")
async def whoami(request: web.Request) -> web.Response:
    """The caller's own token (never its secret), so a client can adapt to its role and tenant."""
    info = token_of(request)
    return web.json_response({"id": info.id, "name": info.name, "role": info.role, "tenant": info.tenant,
                              "expires": info.expires})


@roles("admin")
async def list_tokens(request: web.Request) -> web.Response:
    tokens = await run(request, request.app[REPO].tokens.list, scope(request))
    return web.json_response({"tokens": [t.public() | {"expired": t.expired()} for t in tokens]})


@roles("admin")
@audited("token.revoke", lambda request: request.match_info["token_id"])
async def revoke_token(request: web.Request) -> web.Response:
    info = await run(request, request.app[REPO].tokens.revoke, request.match_info["token_id"], scope(request))
    note(request, tenant=info.tenant, role=info.role, name=info.name)
    return web.Response(status=204)


@roles("admin", "reader")
@operator_only
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; also served at the root path /metrics, where scrapers look by default."""
    body = await run(request, request.app[METRICS].exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@roles("admin", "reader")
@operator_only
async def tiers(request: web.Request) -> web.Response:
    return web.json_response({"tiers": request.app[TIERS].status()})


@roles("admin")
@operator_only
@audited("tier.sync")
async def sync_tiers(request: web.Request) -> web.Response:
    """Start a sync cycle now; a tier is caught up with this request once its synced_at ≥ requested.
    {"allow_mass_delete": true} lets that cycle's deletions past the mass-deletion guard."""
    body = await read_json(request, optional=True)
    if not isinstance(body, dict) or set(body) - {"allow_mass_delete"} \
            or not isinstance(body.get("allow_mass_delete", False), bool):
        raise ApiError(422, "bad_field", 'the body may hold {"allow_mass_delete": true|false} (default false)')
    requested = time.time()
    request.app[TIERS].wake(allow_mass_delete=body.get("allow_mass_delete", False))
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
    r.add_get("/api/v1/whoami", whoami)
    r.add_delete("/api/v1/tokens/{token_id}", revoke_token)
    r.add_get("/api/v1/tiers", tiers)
    r.add_post("/api/v1/tiers/sync", sync_tiers)
