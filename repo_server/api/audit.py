"""Auditing administrative actions over HTTP, and reading the log back (GET /audit).

Two ways in, for handlers of any branch:
- `await audit(request, action, target, **details)` writes one record now (who = the request's token);
- `@audited(action, target_of)` on a handler writes one record per call: "ok" when it answers, "refused"
  when it rejects its input (400, 413, 422: nothing was done), "failed" with the error when it raises
  otherwise; the handler may add details with `note(request, **details)`.
Maintenance jobs run after their request answered: `audited_job` records how they ended.
Refused authentication on administrative routes is recorded too (`refused_auth`, called by the auth
middleware), throttled per source so that a flood of bad tokens cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from repo_server.engine import EngineError, Invalid
from repo_server.engine.audit import AUDIT_FILE, MAX_LIMIT, AuditLog, RefusalThrottle
from repo_server.engine.tokens import TokenInfo

from .common import CONFIG, POOL, REPO, TOKEN, ApiError, Handler, roles, run

AUDIT = web.AppKey("audit", AuditLog)
REFUSALS = web.AppKey("audit_refusals", RefusalThrottle)
NOTES = web.RequestKey("audit_notes", dict)
RECORDED = web.RequestKey("audit_recorded", threading.Event)  # set once the request's record is written


def who(token: TokenInfo | None) -> dict:
    if token is None:
        return {"token_id": None, "name": "anonymous", "tenant": ""}
    return {"token_id": token.id, "name": token.name, "tenant": token.tenant}


async def audit(request: web.Request, action: str, target: str | None, *, tenant: str | None = None,
                outcome: str = "ok", **details: Any) -> dict:
    """Append one record (fsynced) for an action of the request's token; `tenant` defaults to the
    token's own (pass the object's tenant when an operator token acts on a tenant's object)."""
    token = request.get(TOKEN)
    tenant = tenant if tenant is not None else (token.tenant if token else "")
    return await run(request, functools.partial(request.app[AUDIT].append, who(token), action, target,
                                                tenant=tenant, outcome=outcome, **details))


def note(request: web.Request, **details: Any) -> None:
    """Add details (or `target`/`tenant`) to the record an @audited handler writes."""
    request.setdefault(NOTES, {}).update(details)


def _error_of(e: BaseException) -> dict:
    if isinstance(e, EngineError):
        return {"error": e.code, "message": e.message}
    if isinstance(e, web.HTTPException):
        try:
            body = json.loads(e.text or "{}")
        except ValueError:
            body = {}
        return {"error": body.get("error", e.reason), "message": body.get("message", ""), "status": e.status}
    return {"error": type(e).__name__}


def _outcome_of(e: BaseException) -> str:
    """"refused" for bad input (the action never started), "failed" for everything else."""
    refused = isinstance(e, Invalid) or (isinstance(e, web.HTTPException) and e.status in (400, 413, 422))
    return "refused" if refused else "failed"


def audited(action: str, target_of: Callable[[web.Request], str | None] = lambda r: None
            ) -> Callable[[Handler], Handler]:
    """Record every call of the handler: outcome "ok" (or the handler's noted outcome) or "failed"."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def audited_handler(request: web.Request) -> web.StreamResponse:
            request[RECORDED] = threading.Event()
            try:
                try:
                    response = await handler(request)
                except Exception as e:
                    notes = request.get(NOTES, {})
                    await audit(request, action, notes.pop("target", target_of(request)),
                                tenant=notes.pop("tenant", None), outcome=_outcome_of(e), **notes, **_error_of(e))
                    raise
                notes = request.get(NOTES, {})
                await audit(request, action, notes.pop("target", target_of(request)),
                            tenant=notes.pop("tenant", None), outcome=notes.pop("outcome", "ok"), **notes)
            finally:
                request[RECORDED].set()
            return response

        audited_handler.audit_action = action  # type: ignore[attr-defined]
        return audited_handler

    return wrap


def audited_job(request: web.Request, action: str, target: str | None, work: Callable[[Any], Any]
                ) -> Callable[[Any], Any]:
    """Wrap a maintenance job's work so that its end is on record too, after the record of the request
    that started it (an @audited handler's, which a quick job could otherwise overtake)."""
    log, token = request.app[AUDIT], request.get(TOKEN)
    recorded = request.get(RECORDED) or threading.Event()
    if RECORDED not in request:
        recorded.set()

    def run_and_record(job: Any) -> Any:
        try:
            result = work(job)
        except Exception as e:
            recorded.wait(30)
            log.append(who(token), action, target, tenant=token.tenant if token else "", outcome="failed",
                       job=job.id, **_error_of(e))
            raise
        recorded.wait(30)
        log.append(who(token), action, target, tenant=token.tenant if token else "", outcome="done", job=job.id)
        return result

    return run_and_record


def administrative(handler: Handler) -> bool:
    """Admin-only routes and audited actions: a refused token there is worth a record."""
    return tuple(getattr(handler, "allowed_roles", None) or ()) == ("admin",) or \
        getattr(handler, "audit_action", None) is not None


def _write_refusal(log: AuditLog, summary: dict) -> None:
    details = dict(summary)
    caller, target = details.pop("who"), details.pop("target")
    log.append(caller, "auth.refused", target, tenant=caller["tenant"], outcome="refused", **details)


async def refused_auth(request: web.Request, error: str, token: TokenInfo | None) -> None:
    """Record a 401 on an administrative route: who (an expired token's id, name and tenant; else
    anonymous; never what was sent), the route, the reason and the source address, with `count`
    refusals per record (one record per source, reason and token per window)."""
    source = request.remote or "unknown"
    details = {"who": who(token), "target": f"{request.method} {request.path}"[:300], "error": error,
               "source": source}
    summary = request.app[REFUSALS].add((source, error, token.id if token else None), details, time.time())
    if summary is not None:
        await run(request, _write_refusal, request.app[AUDIT], summary)


async def flush_refusals(app: web.Application) -> AsyncIterator[None]:
    """Write the counted refusals' summaries as their windows pass, and the rest at shutdown."""
    throttle, loop = app[REFUSALS], asyncio.get_running_loop()

    async def write(summaries: list[dict]) -> None:
        for summary in summaries:
            await loop.run_in_executor(app[POOL], _write_refusal, app[AUDIT], summary)

    async def every_window() -> None:
        while True:
            await asyncio.sleep(min(5.0, throttle.window / 2))
            await write(throttle.due(time.time()))

    task = asyncio.create_task(every_window())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await write(throttle.due(time.time() + throttle.window))


@roles("admin")
async def get_audit(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, "bad_limit", f"limit must be an integer from 1 to {MAX_LIMIT}; got {raw!r:.40}")
    records = await run(request, request.app[AUDIT].tail, int(raw), request[TOKEN].tenant)
    return web.json_response({"records": records})


def add_routes(app: web.Application) -> None:
    async def open_log(app: web.Application) -> None:  # runs after the repository is opened
        app[AUDIT] = AuditLog(app[REPO].data / AUDIT_FILE)

    app.on_startup.append(open_log)
    app[REFUSALS] = RefusalThrottle(app[CONFIG].audit_refusal_window_seconds)
    app.cleanup_ctx.append(flush_refusals)  # after the repository's lifecycle: cleaned up before the pool stops
    app.router.add_get("/api/v1/audit", get_audit)
