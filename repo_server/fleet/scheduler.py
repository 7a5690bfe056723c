"""The fleet scheduler: backup jobs, pull collectors, runs and their work items.

All state lives on the event loop (no locks): handlers and the scheduler task mutate it between awaits,
and every change that matters after a crash is written (fleet/store.py) on a single I/O thread, in order.
A run holds one work item per VM selected from its collector's registered inventory; a collector's
long-poll takes the next queued item of its runs, honouring each job's max_per_host. A failed attempt
is retried after retry_delay_s while attempts remain; work whose collector went silent counts as a
failed attempt. Work that was running when the server stopped is "interrupted": the collector may still
finish it and post its result, so it becomes a failed attempt only when fleet_silent_seconds pass after the
restart with no word from the collector. An ok result with a committed point is never wasted while its run
is active: the first success of a VM wins, even from an attempt a retry already superseded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from repo_server.engine.errors import Conflict, Invalid, NotFound
from repo_server.engine.names import check_name

from . import calendar
from .jobs import check_job
from .store import FleetStore

log = logging.getLogger("chunkyard.fleet")
KEEP_RUNS = 100  # finished runs kept per job
ACTIVE = ("queued", "running")
LIVE = ("running", "interrupted")  # a VM whose current attempt may still report
COUNTERS = ("bytes_read", "bytes_changed", "bytes_new", "bytes_sent")
PHASE_MAX = 64
MAX_ERROR = 4000
MAX_CATCH_UP = 10_000  # schedule occurrences stepped through after downtime before jumping to now
Prune = Callable[[str, dict], Awaitable[dict]]  # (vm_id, policy) -> prune summary
Notify = Callable[[str, dict], Awaitable[None]]  # (event, details)
LastGood = Callable[[list[str]], Awaitable[dict[str, float | None]]]  # vm ids -> newest point time
PointOf = Callable[[str], Awaitable[dict | None]]  # point id -> its record, None when there is none


@functools.lru_cache(maxsize=1024)
def _schedule(text: str) -> calendar.Schedule:
    """Parsed once: the scheduler asks every tick."""
    return calendar.parse(text)


def _bad(message: str) -> Invalid:
    return Invalid(message, "bad_body")


def _count(body: dict, key: str, *, optional: bool = False, integer: bool = True) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value < 2**63:
        raise _bad(f"{key} must be a non-negative {'integer' if integer else 'number'}; got "
                   f"{json.dumps(value)[:40]}")
    return value


def check_inventory(body: object) -> tuple[str, str, list[dict]]:
    """A collector registration {name, version, hosts:[{host, vms:[{id, name}]}]}, validated."""
    shape = 'the body must be {"name", "version", "hosts": [{"host", "vms": [{"id", "name"}]}]}'
    if not isinstance(body, dict) or not isinstance(body.get("hosts"), list) or len(body["hosts"]) > 10_000:
        raise _bad(shape)
    name = check_name(body.get("name"), "collector name")
    version = body.get("version", "")
    if not isinstance(version, str) or len(version) > 100:
        raise _bad("version must be a string of at most 100 characters")
    hosts, vm_total = [], 0
    for h in body["hosts"]:
        if not isinstance(h, dict) or not isinstance(h.get("vms"), list):
            raise _bad(shape)
        host = check_name(h.get("host"), "host name")
        vms = []
        for vm in h["vms"]:
            if not isinstance(vm, dict):
                raise _bad(shape)
            vm_name = vm.get("name", vm.get("id"))
            if not isinstance(vm_name, str) or not 0 < len(vm_name) <= 256:
                raise _bad("a VM name must be a string of 1-256 characters")
            vms.append({"id": check_name(vm.get("id"), "VM id"), "name": vm_name})
        vm_total += len(vms)
        hosts.append({"host": host, "vms": vms})
    if vm_total > 100_000:
        raise _bad("at most 100000 VMs per collector")
    return name, version, hosts


def _vm_entry(host: str, vm: dict) -> dict:
    return {"vm": vm, "host": host, "state": "queued", "attempt": 0, "work_id": None, "progress": None,
            "point_id": None, "consistency": None, **dict.fromkeys(COUNTERS, 0), "duration_s": 0.0,
            "error": None, "retry_at": None, "started": None, "finished": None, "last_contact": None,
            "retention": None}


def totals(run: dict) -> dict:
    vms = run["vms"]
    states = Counter(v["state"] for v in vms)
    return {"vms": len(vms), **{s: states.get(s, 0) for s in ("queued", "running", "interrupted", "retrying",
                                                               "succeeded", "failed")},
            **{k: sum(v[k] for v in vms) for k in COUNTERS}, "duration_s": sum(v["duration_s"] for v in vms)}


def summary(run: dict) -> dict:
    """A run without its per-VM entries (the run lists)."""
    return {k: v for k, v in run.items() if k != "vms"} | {"totals": totals(run)}


def detail(run: dict) -> dict:
    return run | {"totals": totals(run)}


def visible(scope: str, tenant: str) -> bool:
    """May a token of tenant `scope` ("" = unscoped) see an object of `tenant`?"""
    return not scope or scope == tenant


class Fleet:
    def __init__(self, root: Path, *, poll_seconds: float = 30, silent_seconds: float = 300,
                 tick_seconds: float = 1.0, tiers: Iterable[str] = (), prune: Prune | None = None,
                 notify: Notify | None = None, last_good: LastGood | None = None, point_of: PointOf | None = None,
                 stale_hours: float = 0, offload: Callable[[str], None] | None = None):
        self.store = FleetStore(root)
        self.poll_seconds, self.silent_seconds, self.tick_seconds = poll_seconds, silent_seconds, tick_seconds
        self.tiers = list(tiers)
        self.prune, self.notify, self.last_good, self.point_of = prune, notify, last_good, point_of
        self.stale_seconds = stale_hours * 3600
        self.offload = offload  # start a sync cycle of the named tier now (the job's tier policy)
        self.jobs: dict[tuple[str, str], dict] = {}
        self.collectors: dict[tuple[str, str], dict] = {}
        self.runs: dict[str, dict] = {}
        self.stale: set[str] = set()  # "tenant/vm_id" already alerted in the current stale episode
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (tenant, job, state) since start
        self._polling: Counter[tuple[str, str]] = Counter()
        self._wake: dict[tuple[str, str], asyncio.Event] = {}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-io")  # one writer: in order
        self._tasks: set[asyncio.Task] = set()
        self._next_stale_check = 0.0
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self, now: float | None = None) -> None:
        """Load the state, mark the work the last process left running as interrupted (its collector gets
        fleet_silent_seconds to report it), and apply missed-run policies."""
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self._io, self.store.load, "jobs", [])
        collectors = await loop.run_in_executor(self._io, self.store.load, "collectors", [])
        state = await loop.run_in_executor(self._io, self.store.load, "state", {})
        runs = await loop.run_in_executor(self._io, self.store.load_runs)
        self.jobs = {(j["tenant"], j["name"]): j for j in jobs}
        self.collectors = {(c["tenant"], c["name"]): c for c in collectors}
        self.stale = set(state.get("stale", []))
        self.runs = {r["run_id"]: r for r in sorted(runs, key=lambda r: r["started"])}
        now = time.time() if now is None else now
        for run in self.active_runs():
            for vm in run["vms"]:
                if vm["state"] in LIVE:
                    vm |= {"state": "interrupted", "progress": None, "last_contact": now}
            await self._settle(run, now)
        for job in list(self.jobs.values()):
            occurrence = self._catch_up(job, now)
            if occurrence is not None:
                log.info("job %s/%s missed its schedule at %s while the server was down (missed=%s)",
                         job["tenant"], job["name"], datetime.fromtimestamp(occurrence, UTC), job["missed"])
                if job["missed"] == "run" and job["enabled"] and self._active_run_of(job) is None:
                    await self._create_run(job, "missed", now)
        await self._save_jobs()

    def release_pollers(self) -> None:
        """Answer every waiting long-poll now (with no work): the server is shutting down and must not
        wait for them."""
        self._closing = True
        for event in self._wake.values():
            event.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._io.shutdown)

    async def run_forever(self) -> None:
        """The scheduler task: due jobs, retries, silent collectors and stale VMs, every tick."""
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("fleet scheduler tick failed")
            await asyncio.sleep(self.tick_seconds)

    async def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        changed = False
        for job in list(self.jobs.values()):
            if not job["enabled"]:
                continue
            occurrence = self._catch_up(job, now)
            if occurrence is None:
                continue
            changed = True
            active = self._active_run_of(job)
            if active is not None:
                log.warning("job %s/%s is due but run %s is still active: skipped", job["tenant"], job["name"],
                            active["run_id"])
            else:
                await self._create_run(job, "schedule", now)
        if changed:
            await self._save_jobs()
        for run in self.active_runs():
            touched = False
            for vm in run["vms"]:
                if vm["state"] in LIVE and now - vm["last_contact"] > self.silent_seconds:
                    self._attempt_failed(run, vm, f"the collector went silent: no progress for "
                                                  f"{now - vm['last_contact']:.0f} s" if vm["state"] == "running"
                                         else f"interrupted: the server stopped while this VM was being backed up "
                                              f"and no result came within {self.silent_seconds:g} s of its restart",
                                         now)
                    touched = True
                elif vm["state"] == "retrying" and vm["retry_at"] <= now:
                    self._wake_collector(run)
            if touched:
                await self._settle(run, now)
        if self.stale_seconds and self.notify and now >= self._next_stale_check:
            self._next_stale_check = now + min(60.0, self.stale_seconds / 4)
            await self._check_stale(now)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _save_jobs(self) -> None:
        await self._write(self.store.save, "jobs", list(self.jobs.values()))

    async def _save_run(self, run: dict) -> None:
        await self._write(self.store.save_run, json.loads(json.dumps(run)))  # a snapshot, not the live dict

    # ------------------------------------------------------------------ schedules

    def next_run(self, job: dict) -> float | None:
        if not job["enabled"]:
            return None
        after = datetime.fromtimestamp(job["last_scheduled"], UTC)
        nxt = _schedule(job["schedule"]).next_after(after)
        return nxt.timestamp() if nxt else None

    def _catch_up(self, job: dict, now: float) -> float | None:
        """The newest schedule occurrence in (last_scheduled, now], recorded as handled; None if none."""
        schedule = _schedule(job["schedule"])
        latest = None
        at = datetime.fromtimestamp(job["last_scheduled"], UTC)
        for _ in range(MAX_CATCH_UP):
            nxt = schedule.next_after(at)
            if nxt is None or nxt.timestamp() > now:
                break
            at, latest = nxt, nxt.timestamp()
        else:
            latest = now
        if latest is not None:
            job["last_scheduled"] = latest
        return latest

    # ------------------------------------------------------------------ collectors

    async def register(self, tenant: str, body: object, now: float | None = None) -> dict:
        name, version, hosts = check_inventory(body)
        key = (tenant, name)
        record = self.collectors.get(key, {"name": name, "tenant": tenant, "registered": time.time()})
        record |= {"version": version, "hosts": hosts, "last_seen": time.time() if now is None else now}
        self.collectors[key] = record
        await self._write(self.store.save, "collectors", list(self.collectors.values()))
        return {"name": name, "poll_seconds": self.poll_seconds}

    def online(self, record: dict, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        key = (record["tenant"], record["name"])
        return self._polling[key] > 0 or now - record["last_seen"] <= 3 * self.poll_seconds

    def list_collectors(self, scope: str) -> list[dict]:
        return [c | {"online": self.online(c)} for c in self.collectors.values() if visible(scope, c["tenant"])]

    async def take_work(self, tenant: str, name: str, wait: float,
                        connected: Callable[[], bool] = lambda: True) -> dict | None:
        """The collector's next work item, waiting up to `wait` seconds for one (no thread is held).
        Stops waiting once `connected()` says the caller hung up, so no work goes to a closed connection."""
        key = (tenant, check_name(name, "collector name"))
        if key not in self.collectors:
            raise NotFound(f"collector {name!r} is not registered: POST /collectors first", "collector_not_found")
        deadline = time.monotonic() + wait
        event = self._wake.setdefault(key, asyncio.Event())
        self._polling[key] += 1
        try:
            while True:
                self.collectors[key]["last_seen"] = time.time()
                event.clear()
                if not connected():
                    return None
                item = await self._take(key)
                left = deadline - time.monotonic()
                if item is not None or left <= 0 or self._closing:
                    return item
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, self.tick_seconds))
        finally:
            self._polling[key] -= 1

    def _wake_collector(self, run: dict) -> None:
        event = self._wake.get((run["tenant"], run["collector"]))
        if event is not None:
            event.set()

    async def _take(self, key: tuple[str, str]) -> dict | None:
        now = time.time()
        for run in self.active_runs():
            if (run["tenant"], run["collector"]) != key:
                continue
            busy = Counter(v["host"] for v in run["vms"] if v["state"] in LIVE)
            for index, vm in enumerate(run["vms"]):
                ready = vm["state"] == "queued" or (vm["state"] == "retrying" and vm["retry_at"] <= now)
                if not ready or busy[vm["host"]] >= run["settings"]["max_per_host"]:
                    continue
                vm["attempt"] += 1
                # the previous attempt's error stays visible until this attempt reports
                vm |= {"state": "running", "work_id": f"{run['run_id']}.{index}.{vm['attempt']}", "progress": None,
                       "retry_at": None, "started": now, "last_contact": now}
                run["state"] = "running"
                await self._save_run(run)
                bandwidth = run["settings"]["bandwidth_mib_s"]
                return {"work_id": vm["work_id"], "run_id": run["run_id"], "job": run["job"], "host": vm["host"],
                        "vm": vm["vm"], "options": {
                            "bandwidth_bytes_per_s": None if bandwidth is None else int(bandwidth * (1 << 20)),
                            "full": run["options"]["full"]}}
        return None

    # ------------------------------------------------------------------ work progress and results

    def _work(self, scope: str, work_id: str) -> tuple[dict, dict]:
        """The run and VM entry of a work item that was handed out (NotFound otherwise)."""
        run_id, _, rest = work_id.rpartition(".")
        run_id, _, index = run_id.rpartition(".")
        run = self.runs.get(run_id)
        if run is None or not visible(scope, run["tenant"]) or not index.isdigit() or not rest.isdigit() \
                or int(index) >= len(run["vms"]):
            raise NotFound(f"no work item {work_id[:80]!r}", "work_not_found")
        vm = run["vms"][int(index)]
        if f"{run_id}.{int(index)}.{int(rest)}" != work_id or not 0 < int(rest) <= vm["attempt"]:
            raise NotFound(f"no work item {work_id[:80]!r}", "work_not_found")  # never handed out
        return run, vm

    @staticmethod
    def _current(vm: dict, work_id: str) -> bool:
        """Is work_id the VM's attempt in flight (not superseded, not finished)?"""
        return vm["work_id"] == work_id and vm["state"] in LIVE

    @staticmethod
    def _late(run: dict, vm: dict) -> bool:
        """May a success of a superseded attempt still count? While the run is active and the VM has none."""
        return run["state"] in ACTIVE and vm["state"] != "succeeded"

    async def progress(self, scope: str, work_id: str, body: object) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("phase"), str) or len(body["phase"]) > PHASE_MAX:
            raise _bad('the body must be {"phase": "...", "done_bytes", "total_bytes", "rate_bytes_per_s"}')
        progress = {"phase": body["phase"], "done_bytes": _count(body, "done_bytes"),
                    "total_bytes": _count(body, "total_bytes", optional=True),
                    "rate_bytes_per_s": _count(body, "rate_bytes_per_s", integer=False)}
        run, vm = self._work(scope, work_id)
        if not self._current(vm, work_id):
            return {"cancel": True}
        vm["progress"], vm["last_contact"] = progress, time.time()
        if vm["state"] == "interrupted":  # the collector kept working through the restart: live again
            log.info("work %s: the collector is still on it after the server restart", work_id)
            vm["state"] = "running"
            await self._save_run(run)
        return {"cancel": False}

    async def result(self, scope: str, work_id: str, body: object) -> None:
        """Record a work item's outcome. A repeated result changes nothing, nor does a superseded attempt's
        failure; a superseded attempt's success counts while the VM has none (the retry is then cancelled
        through its progress answer)."""
        shape = ('the body must be {"ok": bool, "point_id", "consistency", "bytes_read", "bytes_changed", '
                 '"bytes_new", "bytes_sent", "duration_s", "error"}')
        if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
            raise _bad(shape)
        fields = {k: _count(body, k) if k in body else 0 for k in COUNTERS}
        fields["duration_s"] = _count(body, "duration_s", integer=False) if "duration_s" in body else 0.0
        for key, limit in (("point_id", 128), ("consistency", 64), ("error", MAX_ERROR)):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or (len(value) > limit and key != "error")):
                raise _bad(f"{key} must be a string or null")
            fields[key] = value[:MAX_ERROR] if isinstance(value, str) else None
        if body["ok"] and not fields["point_id"]:
            raise _bad("a successful result names the restore point it created (point_id)")
        run, vm = self._work(scope, work_id)

        def counts() -> bool:
            return self._current(vm, work_id) or (body["ok"] and self._late(run, vm))

        if counts() and body["ok"] and self.point_of is not None:
            point = await self.point_of(fields["point_id"])
            late = not self._current(vm, work_id)
            if point is None or point["vm"]["id"] != vm["vm"]["id"] or (late and point["created"] < run["started"]):
                raise Invalid(f"point_id {fields['point_id'][:80]!r} is not a restore point of VM {vm['vm']['id']!r}"
                              f"{' made during this run' if late else ''}: report ok only after the session's "
                              "commit", "bad_point")
            fields["consistency"] = fields["consistency"] or point.get("consistency")
        if not counts():  # (re-checked: a duplicate may have won while the point was looked up)
            return
        now = time.time()
        if not self._current(vm, work_id):
            log.info("work %s: a late success of a superseded attempt ends VM %s's backup (attempt %d, %s, is "
                     "dropped)", work_id, vm["vm"]["id"], vm["attempt"], vm["state"])
        vm |= fields
        vm["last_contact"] = now
        if body["ok"]:
            vm |= {"state": "succeeded", "finished": now, "error": None, "work_id": work_id, "retry_at": None}
            if run["settings"]["retention"] and self.prune is not None:
                try:
                    pruned = await self.prune(vm["vm"]["id"], run["settings"]["retention"])
                    vm["retention"] = {"kept": pruned["kept"], "removed": pruned["removed"]}
                except Exception as e:  # the backup itself succeeded: report, do not fail it
                    log.exception("retention after %s failed", work_id)
                    vm["retention"] = {"error": f"{type(e).__name__}: {e}"[:MAX_ERROR]}
            if run["tier"] and self.offload is not None:  # off site now, not at the tier's next cycle
                self.offload(run["tier"])
                vm["offload"] = {"tier": run["tier"], "requested": now}
            self.stale.discard(f"{run['tenant']}/{vm['vm']['id']}")
        else:
            self._attempt_failed(run, vm, fields["error"] or "the collector reported a failure", now)
        await self._settle(run, now)

    def _attempt_failed(self, run: dict, vm: dict, error: str, now: float) -> None:
        settings = run["settings"]
        vm["error"] = error
        if vm["attempt"] <= settings["retries"]:
            vm |= {"state": "retrying", "retry_at": now + settings["retry_delay_s"]}
        else:
            vm |= {"state": "failed", "finished": now, "retry_at": None}

    async def _settle(self, run: dict, now: float) -> None:
        """Persist a run after a change, finishing it once every VM has succeeded or failed."""
        states = {v["state"] for v in run["vms"]}
        if run["state"] in ACTIVE and states <= {"succeeded", "failed"}:
            run["state"] = ("failed" if "succeeded" not in states else
                            "partial" if "failed" in states else "succeeded")
            run["finished"] = now
            self.outcomes[(run["tenant"], run["job"], run["state"])] += 1
            if self.notify is not None:
                event = "success" if run["state"] == "succeeded" else "failure"
                self._spawn(self.notify(event, {"run": detail(run)}))
        await self._save_run(run)
        if run["finished"] is not None:
            await self._forget_old_runs(run["tenant"], run["job"])

    async def _forget_old_runs(self, tenant: str, job: str) -> None:
        finished = [r for r in self.runs.values() if (r["tenant"], r["job"]) == (tenant, job) and r["finished"]]
        for old in finished[:-KEEP_RUNS]:
            del self.runs[old["run_id"]]
            await self._write(self.store.delete_run, old["run_id"])

    # ------------------------------------------------------------------ jobs and runs

    def _job(self, scope: str, name: str, tenant: str | None = None) -> dict:
        matches = [j for (t, n), j in self.jobs.items() if n == name and visible(scope, t)
                   and (tenant is None or t == tenant)]
        if not matches:
            raise NotFound(f"no backup job {name[:80]!r}", "job_not_found")
        if len(matches) > 1:
            raise Conflict(f"several tenants have a job {name!r}: pass ?tenant=NAME", "ambiguous_job")
        return matches[0]

    def job_view(self, job: dict) -> dict:
        last = next((r for r in reversed(self.runs.values())
                     if (r["tenant"], r["job"]) == (job["tenant"], job["name"])), None)
        return job | {"next_run": self.next_run(job), "last_run": None if last is None else {
            "run_id": last["run_id"], "state": last["state"], "finished": last["finished"]}}

    def list_jobs(self, scope: str) -> list[dict]:
        return [self.job_view(j) for j in self.jobs.values() if visible(scope, j["tenant"])]

    def get_job(self, scope: str, name: str, tenant: str | None = None) -> dict:
        return self.job_view(self._job(scope, name, tenant))

    async def create_job(self, scope: str, body: object) -> dict:
        job = check_job(body, tenant=scope, tiers=self.tiers)
        if (job["tenant"], job["name"]) in self.jobs:
            raise Conflict(f"a backup job {job['name']!r} exists; PUT /backup-jobs/{job['name']} replaces it",
                           "job_exists")
        now = time.time()
        job |= {"created": now, "updated": now, "last_scheduled": now}
        self.jobs[(job["tenant"], job["name"])] = job
        await self._save_jobs()
        return self.job_view(job)

    async def replace_job(self, scope: str, name: str, body: object, tenant: str | None = None) -> dict:
        old = self._job(scope, name, tenant)
        if isinstance(body, dict):
            body = {"name": name, "tenant": old["tenant"]} | body
            if body["name"] != name or body["tenant"] != old["tenant"]:
                raise Invalid("PUT replaces a job in place: its name and tenant cannot change", "bad_job")
        job = check_job(body, tenant=scope or old["tenant"], tiers=self.tiers)
        now = time.time()
        schedule_changed = job["schedule"] != old["schedule"] or job["enabled"] != old["enabled"]
        job |= {"created": old["created"], "updated": now,
                "last_scheduled": now if schedule_changed else old["last_scheduled"]}
        self.jobs[(job["tenant"], name)] = job
        await self._save_jobs()
        return self.job_view(job)

    async def delete_job(self, scope: str, name: str, tenant: str | None = None) -> None:
        job = self._job(scope, name, tenant)
        del self.jobs[(job["tenant"], name)]
        await self._save_jobs()
        run = self._active_run_of(job)
        if run is not None:
            now = time.time()
            for vm in run["vms"]:
                if vm["state"] not in ("succeeded", "failed"):
                    vm |= {"state": "failed", "finished": now, "error": "cancelled: the job was deleted"}
            await self._settle(run, now)

    async def run_now(self, scope: str, name: str, body: object, tenant: str | None = None) -> dict:
        job = self._job(scope, name, tenant)
        if not isinstance(body, dict) or set(body) - {"full"} or not isinstance(body.get("full", False), bool):
            raise _bad('the body may hold {"full": true|false} (a full read instead of changed blocks)')
        active = self._active_run_of(job)
        if active is not None:
            raise Conflict(f"job {name!r} is already running as run {active['run_id']}", "job_running")
        return await self._create_run(job, "manual", time.time(), full=body.get("full", False))

    def active_runs(self) -> list[dict]:
        return [r for r in self.runs.values() if r["state"] in ACTIVE]

    def _active_run_of(self, job: dict) -> dict | None:
        return next((r for r in self.active_runs() if (r["tenant"], r["job"]) == (job["tenant"], job["name"])),
                    None)

    def _select(self, job: dict) -> list[dict]:
        collector = self.collectors.get((job["tenant"], job["collector"]))
        if collector is None:
            return []
        host_pattern, vm_pattern = job["host_pattern"].lower(), job["vm_pattern"].lower()
        return [_vm_entry(h["host"], vm) for h in collector["hosts"] if fnmatchcase(h["host"].lower(), host_pattern)
                for vm in h["vms"] if fnmatchcase(vm["name"].lower(), vm_pattern)
                or fnmatchcase(vm["id"].lower(), vm_pattern)]

    async def _create_run(self, job: dict, trigger: str, now: float, *, full: bool = False) -> dict:
        run_id = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        vms = self._select(job)
        run = {"run_id": run_id, "job": job["name"], "tenant": job["tenant"], "collector": job["collector"],
               "trigger": trigger, "state": "queued", "started": now, "finished": None, "error": None,
               "tier": job["tier"], "options": {"full": full},
               "settings": {k: job[k] for k in ("max_per_host", "retries", "retry_delay_s", "bandwidth_mib_s",
                                                "retention")},
               "vms": vms}
        if not vms:
            known = (job["tenant"], job["collector"]) in self.collectors
            run["error"] = (f"no VM of collector {job['collector']!r} matches host_pattern {job['host_pattern']!r} "
                            f"and vm_pattern {job['vm_pattern']!r}" if known else
                            f"collector {job['collector']!r} has not registered (POST /collectors)")
        self.runs[run_id] = run
        log.info("run %s of job %s/%s (%s): %d VMs", run_id, job["tenant"], job["name"], trigger, len(vms))
        await self._settle(run, now)
        self._wake_collector(run)
        return run

    def runs_of(self, scope: str, name: str, limit: int, tenant: str | None = None) -> list[dict]:
        job_tenant = self._job(scope, name, tenant)["tenant"]
        runs = [r for r in self.runs.values() if r["job"] == name and r["tenant"] == job_tenant]
        return [summary(r) for r in reversed(runs[-limit:])]

    def get_run(self, scope: str, run_id: str) -> dict:
        run = self.runs.get(run_id)
        if run is None or not visible(scope, run["tenant"]):
            raise NotFound(f"no run {run_id[:80]!r} (the newest {KEEP_RUNS} runs per job are kept)", "run_not_found")
        return detail(run)

    # ------------------------------------------------------------------ metrics

    def metric_families(self) -> Iterable[Metric]:
        """Prometheus families for /metrics: run outcomes since start, VMs of active runs by state,
        collectors online. Safe to call from another thread (it copies before iterating)."""
        outcomes = CounterMetricFamily("chunkyard_fleet_runs", "Finished backup job runs by outcome (since start).",
                                       labels=["tenant", "job", "state"])
        for (tenant, job, state), n in sorted(self.outcomes.copy().items()):
            outcomes.add_metric([tenant, job, state], n)
        vms = GaugeMetricFamily("chunkyard_fleet_vms", "VMs of active backup job runs by state.", labels=["state"])
        states = Counter(v["state"] for r in list(self.runs.values()) if r["state"] in ACTIVE for v in list(r["vms"]))
        for state in ("queued", "running", "interrupted", "retrying"):
            vms.add_metric([state], states.get(state, 0))
        online = GaugeMetricFamily("chunkyard_fleet_collectors_online", "Pull collectors seen recently.",
                                   labels=["tenant"])
        by_tenant = Counter(c["tenant"] for c in list(self.collectors.values()) if self.online(c))
        for tenant in sorted({c["tenant"] for c in list(self.collectors.values())}):
            online.add_metric([tenant], by_tenant.get(tenant, 0))
        return [outcomes, vms, online]

    # ------------------------------------------------------------------ stale VMs

    async def _check_stale(self, now: float) -> None:
        """Alert once per VM when a job's VM has had no restore point for stale_hours; a new point ends it."""
        assert self.last_good is not None and self.notify is not None
        wanted: dict[str, tuple[dict, dict]] = {}
        for job in self.jobs.values():
            if job["enabled"]:
                for entry in self._select(job):
                    wanted.setdefault(f"{job['tenant']}/{entry['vm']['id']}", (job, entry))
        newest = await self.last_good([key.split("/", 1)[1] for key in wanted])
        alerts = []
        for key, (job, entry) in wanted.items():
            good = newest.get(entry["vm"]["id"])
            since = good if good is not None else job["created"]
            if now - since <= self.stale_seconds:
                self.stale.discard(key)
            elif key not in self.stale:
                self.stale.add(key)
                alerts.append({"tenant": job["tenant"], "job": job["name"], "vm": entry["vm"], "host": entry["host"],
                               "last_good": good, "hours": round((now - since) / 3600, 2)})
        await self._write(self.store.save, "state", {"stale": sorted(self.stale)})
        if alerts:
            self._spawn(self.notify("stale", {"vms": alerts, "stale_hours": self.stale_seconds / 3600}))
