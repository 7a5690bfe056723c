"""Maintenance jobs (GC, verify, prune): run on their own thread, observed at GET /jobs/{id}."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from repo_server.engine import EngineError

from .audit import audited, audited_job, note
from .common import METRICS, REPO, ApiError, operator_only, read_json, roles, scope

log = logging.getLogger("chunkyard.jobs")
KEEP = 100  # finished jobs remembered


class Job:
    def __init__(self, job_id: str, kind: str, params: dict, tenant: str = ""):
        self.id, self.kind, self.params, self.tenant = job_id, kind, params, tenant
        self.state = "running"
        self.phase, self.done, self.total = "starting", 0, None
        self.started, self.finished = time.time(), None
        self.result: Any = None
        self.error: str | None = None

    def progress(self, phase: str, done: int, total: int | None) -> None:
        self.phase, self.done, self.total = phase, done, total

    def public(self) -> dict:
        result = dataclasses.asdict(self.result) if dataclasses.is_dataclass(self.result) else self.result
        return {"id": self.id, "kind": self.kind, "params": self.params, "tenant": self.tenant, "state": self.state,
                "phase": self.phase, "done": self.done, "total": self.total, "started": self.started,
                "finished": self.finished, "result": result, "error": self.error}


class JobManager:
    """One maintenance thread: jobs queue behind each other instead of fighting for the disk."""

    def __init__(self, on_finish: Callable[[Job, str], None] | None = None) -> None:
        self._on_finish = on_finish  # metrics: told of every job's outcome
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maintenance")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, params: dict, work: Callable[[Job], Any], tenant: str = "") -> Job:
        job = Job(f"{kind}-{int(time.time())}-{next(self._ids)}", kind, params, tenant)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP and next(iter(self._jobs.values())).state != "running":
                self._jobs.popitem(last=False)

        def run() -> None:
            state = "failed"
            try:
                job.result = work(job)
                state = "done"
            except EngineError as e:
                job.error = e.message
            except Exception as e:  # a job must report, never vanish
                log.exception("job %s failed", job.id)
                job.error = f"{type(e).__name__}: {e}"
            finally:
                job.finished = time.time()
                if self._on_finish is not None:
                    self._on_finish(job, state)
                job.state = state  # last: whoever sees the job ended sees its result and its metrics

        asyncio.get_running_loop().run_in_executor(self._pool, run)
        return job

    def get(self, job_id: str, tenant: str = "") -> Job:
        """A job; a tenant sees only its own (another tenant's answers like an unknown id)."""
        job = self._jobs.get(job_id)
        if job is None or (tenant and job.tenant != tenant):
            raise ApiError(404, "job_not_found", f"no job {job_id!r:.80} (jobs are kept until {KEEP} newer ones)")
        return job

    def list(self, tenant: str = "") -> list[Job]:
        return [j for j in self._jobs.values() if not tenant or j.tenant == tenant]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


JOBS = web.AppKey("jobs", JobManager)


@roles("admin")
@operator_only
@audited("gc")
async def start_gc(request: web.Request) -> web.Response:
    from repo_server.engine.gc import GarbageCollector

    body = await read_json(request, optional=True)
    compact_below = body.get("compact_below", 0.5) if isinstance(body, dict) else None
    if not isinstance(compact_below, int | float) or isinstance(compact_below, bool) or not 0 <= compact_below <= 1:
        raise ApiError(422, "bad_field", 'the body may hold {"compact_below": 0..1} (default 0.5)')
    repo = request.app[REPO]
    job = request.app[JOBS].start("gc", {"compact_below": compact_below}, audited_job(
        request, "gc", None, lambda job: GarbageCollector(repo, job.progress, compact_below=compact_below).run()))
    note(request, job=job.id, compact_below=compact_below, outcome="started")
    return web.json_response(job.public(), status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})


@roles("admin")
@operator_only
@audited("verify")
async def start_verify(request: web.Request) -> web.Response:
    from repo_server.engine.verify import MODES, Verifier

    body = await read_json(request, optional=True)
    if not isinstance(body, dict):
        raise ApiError(422, "bad_body", "the body must be a JSON object")
    mode, percent = body.get("mode", "all"), body.get("percent", 10)
    if mode not in MODES or not isinstance(percent, int | float) or isinstance(percent, bool) \
            or not 0 < percent <= 100:
        raise ApiError(422, "bad_field", f'the body may hold {{"mode": {"|".join(MODES)}, "percent": 0..100}}')
    repo = request.app[REPO]
    job = request.app[JOBS].start("verify", {"mode": mode, "percent": percent}, audited_job(
        request, "verify", None, lambda job: Verifier(repo, job.progress, mode=mode, percent=percent).run()))
    note(request, job=job.id, mode=mode, percent=percent, outcome="started")
    return web.json_response(job.public(), status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})


@roles("admin", "reader")
async def get_job(request: web.Request) -> web.Response:
    return web.json_response(request.app[JOBS].get(request.match_info["job_id"], scope(request)).public())


@roles("admin", "reader")
async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": [j.public() for j in request.app[JOBS].list(scope(request))]})


def add_routes(app: web.Application) -> None:
    app[JOBS] = JobManager(lambda job, state: app[METRICS].job_finished(
        job.kind, state, job.started, job.finished, job.public()["result"]))

    async def stop_jobs(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, app[JOBS].shutdown)

    app.on_shutdown.append(stop_jobs)
    r = app.router
    r.add_post("/api/v1/admin/gc", start_gc)
    r.add_post("/api/v1/admin/verify", start_verify)
    r.add_get("/api/v1/jobs", list_jobs)
    r.add_get("/api/v1/jobs/{job_id}", get_job)
