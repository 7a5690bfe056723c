"""Auditing administrative actions over HTTP, and reading the log back (GET /audit).

Two ways in, for handlers of any branch:
- `await audit(request, action, target, **details)` writes one record now (who = the request's token);
- `@audited(action, target_of)` on a handler writes one record per call: "ok" when it answers, "failed"
  with the error when it raises; the handler may add details with `note(request, **details)`.
Maintenance jobs run after their request answered: `audited_job` records how they ended.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from repo_server.engine import EngineError
from repo_server.engine.audit import AUDIT_FILE, MAX_LIMIT, AuditLog
from repo_server.engine.tokens import TokenInfo

from .common import REPO, TOKEN, ApiError, Handler, roles, run

AUDIT = web.AppKey("audit", AuditLog)
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
                                tenant=notes.pop("tenant", None), outcome="failed", **notes, **_error_of(e))
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
    app.router.add_get("/api/v1/audit", get_audit)
