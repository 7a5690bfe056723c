"""Fleet routes (docs/architecture.md "Fleet operations"): pull collectors, backup jobs, runs.

Thin: every decision is in repo_server/fleet. A token's tenant scopes everything it sees."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from repo_server.engine import Invalid, NotFound
from repo_server.fleet.notify import Notifier
from repo_server.fleet.scheduler import Fleet

from .admin import TIERS
from .audit import audited, note
from .common import CONFIG, POOL, REPO, ApiError, read_json, roles, scope
from .metrics import register_metric_source
from .retention import POLICIES

FLEET = web.AppKey("fleet", Fleet)
MAX_WAIT = 60.0


def _tenant_param(request: web.Request) -> str | None:
    """An unscoped token may pick the tenant of an ambiguous job name with ?tenant=."""
    return request.query.get("tenant")


def _number_param(request: web.Request, key: str, default: float, lo: float, hi: float, *, integer: bool) -> float:
    text = request.query.get(key)
    if text is None:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ApiError(422, "bad_query", f"{key} must be a {'whole ' if integer else ''}number from {lo:g} to {hi:g}")
    return value


@roles("admin", "collector")
async def register_collector(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await request.app[FLEET].register(scope(request), body))


@roles("admin", "reader")
async def list_collectors(request: web.Request) -> web.Response:
    return web.json_response({"collectors": request.app[FLEET].list_collectors(scope(request))})


@roles("admin", "collector")
async def take_work(request: web.Request) -> web.Response:
    wait = _number_param(request, "wait", 30.0, 0.0, MAX_WAIT, integer=False)
    item = await request.app[FLEET].take_work(
        scope(request), request.match_info["name"], wait,
        lambda: request.transport is not None and not request.transport.is_closing())
    return web.Response(status=204) if item is None else web.json_response(item)


@roles("admin", "collector")
async def post_progress(request: web.Request) -> web.Response:
    body = await read_json(request)
    return web.json_response(await request.app[FLEET].progress(scope(request), request.match_info["work_id"], body))


@roles("admin", "collector")
async def post_result(request: web.Request) -> web.Response:
    body = await read_json(request)
    await request.app[FLEET].result(scope(request), request.match_info["work_id"], body)
    return web.Response(status=204)


@roles("admin")
@audited("job.create", lambda request: request.match_info.get("name"))
async def create_job(request: web.Request) -> web.Response:
    body = await read_json(request)
    job = await request.app[FLEET].create_job(scope(request), body)
    note(request, target=job["name"], tenant=job["tenant"])
    return web.json_response(job, status=201)


@roles("admin", "reader")
async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": request.app[FLEET].list_jobs(scope(request))})


@roles("admin", "reader")
async def get_job(request: web.Request) -> web.Response:
    job = request.app[FLEET].get_job(scope(request), request.match_info["name"], _tenant_param(request))
    return web.json_response(job)


@roles("admin")
@audited("job.replace", lambda request: request.match_info.get("name"))
async def replace_job(request: web.Request) -> web.Response:
    body = await read_json(request)
    job = await request.app[FLEET].replace_job(scope(request), request.match_info["name"], body,
                                               _tenant_param(request))
    return web.json_response(job)


@roles("admin")
@audited("job.delete", lambda request: request.match_info.get("name"))
async def delete_job(request: web.Request) -> web.Response:
    await request.app[FLEET].delete_job(scope(request), request.match_info["name"], _tenant_param(request))
    return web.Response(status=204)


@roles("admin")
@audited("job.run", lambda request: request.match_info.get("name"))
async def run_job(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    run = await request.app[FLEET].run_now(scope(request), request.match_info["name"], body, _tenant_param(request))
    return web.json_response({"run_id": run["run_id"]}, status=202,
                             headers={"Location": f"/api/v1/runs/{run['run_id']}"})


@roles("admin", "reader")
async def job_runs(request: web.Request) -> web.Response:
    limit = int(_number_param(request, "limit", 20, 1, 1000, integer=True))
    runs = request.app[FLEET].runs_of(scope(request), request.match_info["name"], limit, _tenant_param(request))
    return web.json_response({"runs": runs})


@roles("admin", "reader")
async def get_run(request: web.Request) -> web.Response:
    return web.json_response(request.app[FLEET].get_run(scope(request), request.match_info["run_id"]))


async def fleet_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Runs after the repository is opened (app.py appends it after the main lifecycle)."""
    config, repo = app[CONFIG], app[REPO]
    loop = asyncio.get_running_loop()

    async def prune(vm_id: str, policy: dict) -> dict:
        from repo_server.engine.retention import prune as prune_vm

        return await loop.run_in_executor(app[POOL], lambda: prune_vm(
            repo, app[POLICIES], lambda *_: None, vm=vm_id, policy=policy, dry_run=False))

    async def last_good(vm_ids: list[str]) -> dict[str, float | None]:
        def newest() -> dict[str, float | None]:
            return {v: (repo.points.vm(v) or {}).get("latest_time") for v in vm_ids}

        return await loop.run_in_executor(app[POOL], newest)

    async def point_of(point_id: str) -> dict | None:
        def get() -> dict | None:
            try:
                return repo.points.get(point_id)
            except (NotFound, Invalid):
                return None

        return await loop.run_in_executor(app[POOL], get)

    notifier = Notifier(config.notify)
    fleet = Fleet(repo.data / "fleet", poll_seconds=config.fleet_poll_seconds,
                  silent_seconds=config.fleet_silent_seconds, tick_seconds=config.fleet_tick_seconds,
                  tiers=[t.name for t in app[TIERS].tiers], prune=prune, notify=notifier.send,
                  last_good=last_good, point_of=point_of,
                  stale_hours=config.notify.stale_hours if "stale" in config.notify.on else 0,
                  offload=app[TIERS].wake_tier)
    await fleet.start()
    app[FLEET] = fleet
    task = asyncio.create_task(fleet.run_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await fleet.close()
    await notifier.close()


async def release_pollers(app: web.Application) -> None:
    if FLEET in app:
        app[FLEET].release_pollers()


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(fleet_lifecycle)
    register_metric_source(app, lambda: app[FLEET].metric_families() if FLEET in app else ())
    app.on_shutdown.append(release_pollers)  # before aiohttp waits for running handlers
    r = app.router
    r.add_post("/api/v1/collectors", register_collector)
    r.add_get("/api/v1/collectors", list_collectors)
    r.add_get("/api/v1/collectors/{name}/work", take_work)
    r.add_post("/api/v1/work/{work_id}/progress", post_progress)
    r.add_post("/api/v1/work/{work_id}/result", post_result)
    r.add_post("/api/v1/backup-jobs", create_job)
    r.add_get("/api/v1/backup-jobs", list_jobs)
    r.add_get("/api/v1/backup-jobs/{name}", get_job)
    r.add_put("/api/v1/backup-jobs/{name}", replace_job)
    r.add_delete("/api/v1/backup-jobs/{name}", delete_job)
    r.add_post("/api/v1/backup-jobs/{name}/run", run_job)
    r.add_get("/api/v1/backup-jobs/{name}/runs", job_runs)
    r.add_get("/api/v1/runs/{run_id}", get_run)
