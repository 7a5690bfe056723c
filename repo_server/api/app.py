"""The application factory, its lifecycle (repository, thread pool, housekeeping) and middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from chunkyard.config import ServerConfig
from repo_server.engine import Conflict, Corrupt, EngineError, Forbidden, Invalid, NotFound, Repository, Unavailable
from tiering.config import parse_tiers
from tiering.sync import TierSync

from . import admin, catalog, dashboard, fleet, jobs, retention, sessions
from .admin import TIERS
from .audit import add_routes as add_audit_routes
from .audit import administrative, audit, refused_auth
from .common import CONFIG, METRICS, POOL, REPO, STREAMING, TOKEN, ApiError
from .metrics import Metrics, register_metric_source, repository_families
from .signed import SIGNER, UrlSigner, load_secret

log = logging.getLogger("chunkyard.server")
STATUS = {NotFound: 404, Invalid: 422, Forbidden: 403, Conflict: 409, Corrupt: 500, Unavailable: 503}


def _disk_full(e: BaseException) -> bool:
    """ENOSPC from our own writes, or RocksDB reporting the same through its message."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def _json_error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


@web.middleware
async def errors_and_auth(request: web.Request, handler) -> web.StreamResponse:
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    began = time.perf_counter()
    entered = False  # whether the handler ran (an @audited handler records its own failures)
    expired = None  # the token of a 401 token_expired (its id, name and tenant go on record)
    try:
        allowed = getattr(handler, "allowed_roles", None)
        if allowed is not None:
            auth = request.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            if not auth and "sig" in request.query and getattr(handler, "signable", False):
                info = request.app[SIGNER].check(request, request.app[REPO].tokens)  # a signed download link
            else:
                info = request.app[REPO].tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
            if info is None:
                raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                               headers={"WWW-Authenticate": 'Bearer realm="chunkyard"'})
            if info.expired():  # only the token's holder can learn this: it had to send the secret
                expired = info
                raise ApiError(401, "token_expired", f"this token ({info.id}) expired at "
                               f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(info.expires))}; "
                               "ask an admin for a new one", headers={"WWW-Authenticate": 'Bearer realm="chunkyard", '
                                                                       'error="invalid_token"'})
            request[TOKEN] = info
            if info.role not in allowed:
                raise ApiError(403, "forbidden", f"a {info.role} token may not do this; needs {' or '.join(allowed)}")
            if info.tenant and getattr(handler, "operator_only", False):
                raise ApiError(403, "operator_only", f"this concerns the whole repository: a token scoped to "
                               f"tenant {info.tenant!r} may not do it; use an unscoped (operator) token")
        entered = True
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        if status == 403 and not entered and getattr(handler, "audit_action", None):
            await audit(request, handler.audit_action, request.path, outcome="denied",
                        **json.loads(e.text or "{}"))
        if status == 401 and not entered and administrative(handler):
            await refused_auth(request, json.loads(e.text or "{}").get("error", "unauthorized"), expired)
        raise
    except EngineError as e:
        status = next((s for cls, s in STATUS.items() if isinstance(e, cls)), 500)
        if status == 500:
            log.error("%s %s: %s", request.method, request.path, e)
        return _json_error(status, e.code, e.message)
    except web.HTTPException as e:  # aiohttp's own (404 route, 405 method, 413 ...): answer in our JSON shape
        status = e.status
        if e.content_type == "application/json":
            raise
        keep = {k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _json_error(e.status, e.reason.lower().replace(" ", "_"), e.reason, headers=keep)
    except (ConnectionResetError, asyncio.CancelledError):
        status = 499
        raise
    except Exception as e:
        if _disk_full(e):
            status = 507
            log.error("%s %s: the repository's disk is full: %s", request.method, request.path, e)
            if not request.get(STREAMING):
                return _json_error(507, "disk_full", "the repository's disk is full: free space or grow the "
                                   "volume, then retry; everything already committed is intact")
            raise
        log.exception("%s %s failed", request.method, request.path)
        if request.get(STREAMING):  # headers already sent: aiohttp closes the connection
            raise
        return _json_error(500, "internal", "the server failed on this request; its log has the details")
    finally:
        request.app[METRICS].request_done(route, request.method, status, time.perf_counter() - began)


def create_app(config: ServerConfig, repo: Repository | None = None, passphrase: str | None = None
               ) -> web.Application:
    """Build the server. Without `repo` the app opens (and closes) the repository at config.data."""
    app = web.Application(middlewares=[errors_and_auth], client_max_size=1 << 20)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[TIERS] = TierSync(parse_tiers(config.tiers))  # a bad [[tier]] table fails here, before serving
    register_metric_source(app, lambda: repository_families(app[REPO]))
    register_metric_source(app, app[TIERS].metric_families)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="chunkyard")
        app[POOL] = pool
        opened = repo or await asyncio.get_running_loop().run_in_executor(pool, lambda: Repository(
            config.data, pack_size=config.pack_size_mib << 20, cache_bytes=config.index_cache_mib << 20,
            passphrase=passphrase))
        app[REPO] = opened
        app[SIGNER] = UrlSigner(load_secret(opened.data))
        app[TIERS].start(opened)  # uploader threads, never the event loop
        housekeeping = asyncio.create_task(_housekeeping(app))
        yield
        housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await housekeeping
        await asyncio.get_running_loop().run_in_executor(None, app[TIERS].stop)  # before the repository closes
        pool.shutdown(wait=True)
        if repo is None:
            opened.close()

    app.cleanup_ctx.append(lifecycle)
    admin.add_routes(app)
    sessions.add_routes(app)
    catalog.add_routes(app)
    jobs.add_routes(app)
    retention.add_routes(app)
    dashboard.add_routes(app)
    add_audit_routes(app)
    fleet.add_routes(app)  # after the repository's lifecycle: its own needs the repository open
    return app


async def _housekeeping(app: web.Application) -> None:
    """Expire idle backup sessions and forget old closed ones."""
    config = app[CONFIG]
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.housekeeping_seconds)
        try:
            n = await loop.run_in_executor(app[POOL], app[REPO].sessions.expire,
                                           config.session_idle_hours * 3600,
                                           config.keep_closed_sessions_days * 86400)
            if n:
                log.info("housekeeping: expired or forgot %d sessions", n)
        except Exception:
            log.exception("housekeeping failed")
