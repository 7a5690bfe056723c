"""Service endpoints: health, repository stats, tokens, metrics, cloud tiers, the OpenAPI description."""

from __future__ import annotations

import time

from aiohttp import web

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
    stats = await run(request, request.app[REPO].stats)
    m = request.app[METRICS]
    lines = [
        "# HELP chunkyard_up_seconds Seconds since the server started.",
        "# TYPE chunkyard_up_seconds gauge",
        f"chunkyard_up_seconds {time.time() - m.started:.3f}",
    ]
    gauges = {
        "logical_bytes": "Bytes of data protected by all restore points (allocated chunks).",
        "unique_bytes": "Uncompressed bytes of unique stored chunks.",
        "stored_bytes": "Bytes the chunks take in packs.",
        "chunk_count": "Unique chunks stored.",
        "pack_count": "Pack files.",
        "point_count": "Restore points.",
        "vm_count": "VMs with at least one restore point.",
    }
    for name, help_text in gauges.items():
        lines += [f"# HELP chunkyard_{name} {help_text}", f"# TYPE chunkyard_{name} gauge",
                  f"chunkyard_{name} {stats[name]}"]
    lines += ["# HELP chunkyard_http_requests_total HTTP requests by route and status.",
              "# TYPE chunkyard_http_requests_total counter"]
    for (route, status), count in sorted(m.requests.items()):
        lines.append(f'chunkyard_http_requests_total{{route="{route}",status="{status}"}} {count}')
    lines += ["# HELP chunkyard_http_body_bytes_total Request and response body bytes of data endpoints.",
              "# TYPE chunkyard_http_body_bytes_total counter",
              f'chunkyard_http_body_bytes_total{{direction="in"}} {m.bytes_in}',
              f'chunkyard_http_body_bytes_total{{direction="out"}} {m.bytes_out}']
    lines += request.app[TIERS].metrics_lines()
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


@roles("admin", "reader")
async def tiers(request: web.Request) -> web.Response:
    return web.json_response({"tiers": request.app[TIERS].status()})


@roles("admin")
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
    r.add_post("/api/v1/tokens", create_token)
    r.add_get("/api/v1/tokens", list_tokens)
    r.add_delete("/api/v1/tokens/{token_id}", revoke_token)
    r.add_get("/api/v1/tiers", tiers)
    r.add_post("/api/v1/tiers/sync", sync_tiers)
