"""The pull collector: register with the server, long-poll for work, back up, report; survive restarts.

A collector needs only outbound HTTP(S) to the server (the fleet contract, /work/shared briefs): it
registers its name, version and inventory (the hosts and VMs its source sees), asks for work with a long
poll, runs each work item with the ordinary pipeline, streams progress, and posts the result.

What keeps it going (state in --state-dir):
- connection errors and 408/429/502/503/504 answers back off exponentially with jitter, capped (default 30 s);
- `work.json` holds the work item in flight: a collector killed or stopped mid-backup picks it up again
  when it starts, if the server still knows the item (the first progress report says so);
- `sessions/` is the pipeline's state directory, so a re-run resumes the interrupted backup session
  and sends nothing twice; a backup cut off by a server restart is re-run the same way;
- `outbox/` holds results until the server took them: written before the POST, removed after it, and
  re-posted (the result endpoint is idempotent) after a drop or a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from chunkyard import __version__
from chunkyard.progress import Progress
from chunkyard.units import format_size
from chunkyard.wire import ApiError, Client

from .pipeline import Options, Result, run_backup
from .sources import Source, SourceError, VmInfo

log = logging.getLogger("chunkyard.collector")

TRANSIENT_STATUS = (408, 429, 502, 503, 504)  # a proxy, a busy or a starting server: try again later


def transient(exc: BaseException) -> bool:
    """True for failures that go away by themselves (server down or restarting, network drop)."""
    if isinstance(exc, ApiError):
        return exc.status in TRANSIENT_STATUS
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError,
                            ConnectionError))


def default_name() -> str:
    return socket.gethostname()


def inventory(vms: list[VmInfo]) -> list[dict]:
    """The source's VMs grouped by host, as the registration wants them."""
    hosts: dict[str, list[dict]] = {}
    for vm in vms:
        hosts.setdefault(vm.host, []).append({"id": vm.id, "name": vm.name})
    return [{"host": host, "vms": vms} for host, vms in sorted(hosts.items())]


class Backoff:
    """Exponential backoff with 'equal jitter': the n-th delay is uniform in [d/2, d], d = min(cap, base·2^n).
    Jitter keeps a fleet of collectors from reconnecting in lockstep after a server restart."""

    def __init__(self, base: float = 1.0, cap: float = 30.0, rng: Callable[[], float] = random.random):
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling / 2 + self.rng() * ceiling / 2

    def reset(self) -> None:
        self.attempt = 0


class TokenBucket:
    """A bandwidth limit: `rate` bytes per second on average, bursts up to `burst` bytes.

    A request larger than what the bucket holds is let through after waiting off its deficit (the bucket
    goes into debt), so an upload body of any size passes and the average rate still holds. `granted` and
    `waited` are the accounting: over any run, granted <= burst + rate × (time since creation)."""

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep):
        if rate <= 0:
            raise ValueError(f"a bandwidth limit must be positive; got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # one second's worth
        self.clock, self.sleep = clock, sleep
        self.tokens = self.burst
        self.stamp = self.created = clock()
        self.granted = 0
        self.waited = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self, n: int) -> None:
        async with self._lock:  # one waiter at a time: concurrent uploads queue in order
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            if self.tokens < 0:
                delay = -self.tokens / self.rate
                self.waited += delay
                await self.sleep(delay)
            self.granted += n


class JsonFile:
    """One small JSON document, written atomically and durably (tmp, fsync, rename)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Any:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is unreadable; ignoring it", self.path)
            return None

    def save(self, doc: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Outbox:
    """Results the server has not acknowledged yet, one file per work item, oldest first."""

    def __init__(self, directory: Path):
        self.dir = directory

    def put(self, work_id: str, result: dict) -> None:
        JsonFile(self.dir / f"{_safe(work_id)}.json").save({"work_id": work_id, "result": result,
                                                             "queued": time.time()})

    def pending(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        docs = [JsonFile(p).load() for p in self.dir.glob("*.json")]
        return sorted((d for d in docs if isinstance(d, dict) and "work_id" in d), key=lambda d: d["queued"])

    def remove(self, work_id: str) -> None:
        JsonFile(self.dir / f"{_safe(work_id)}.json").remove()


def _safe(work_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in work_id)[:120]


class WorkProgress(Progress):
    """The pipeline's progress, kept for the server instead of drawn: a service logs one line per item."""

    def __init__(self) -> None:
        super().__init__(None, "work", io.StringIO())
        self.phase = "checkpoint"

    def _draw(self, text: str, end: str = "\n") -> None:
        """Draw nothing: a service has no terminal; the agent posts this progress to the server instead."""

    def report(self) -> dict:
        return {"phase": self.phase, "done_bytes": self.done, "total_bytes": self.total or 0,
                "rate_bytes_per_s": round(self._rate or 0.0)}


def work_problem(work: object) -> str | None:
    """What is wrong with a work item (from the server, or the state file of one in flight); None if runnable."""
    if not isinstance(work, dict) or not isinstance(work.get("work_id"), str) or not work["work_id"]:
        return "no work_id"
    vm = work.get("vm")
    if not isinstance(vm, dict) or not isinstance(vm.get("id"), str) or not vm["id"]:
        return "no vm.id"
    options = work.get("options") or {}
    if not isinstance(options, dict):
        return "options is not an object"
    limit = options.get("bandwidth_bytes_per_s")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < 1e15):
        return "options.bandwidth_bytes_per_s is not a positive number or null"
    if not isinstance(options.get("full", False), bool):
        return "options.full is not true or false"
    return None


class WorkGone(Exception):
    """The server no longer knows the work item (answered 404 to its progress)."""


class Cancelled(Exception):
    """The server asked to cancel the work item."""


def result_body(work: dict, result: Result | None, consistency: str | None, seconds: float,
                error: str | None, read_bytes: int = 0) -> dict:
    """The result the server records for the VM: what the backup achieved or why it failed."""
    if result is None:
        return {"ok": False, "point_id": None, "consistency": None, "bytes_read": read_bytes, "bytes_changed": 0,
                "bytes_new": 0, "bytes_sent": 0, "duration_s": round(seconds, 3), "error": error}
    stats = result.server_stats
    return {"ok": True, "point_id": result.point_id, "consistency": consistency, "bytes_read": result.read_bytes,
            "bytes_changed": stats.get("changed_bytes", 0), "bytes_new": stats.get("new_bytes", 0),
            "bytes_sent": result.sent_bytes, "duration_s": round(seconds, 3), "error": None}


class Agent:
    """One pull collector. `run()` works until cancelled; cancellation (SIGTERM) leaves the work item in
    flight and its backup session resumable for the next start."""

    def __init__(self, client: Client, source: Source, name: str, state_dir: Path, *,
                 backoff: Backoff | None = None, progress_every: float = 2.0, inventory_every: float = 300.0,
                 limiter_factory: Callable[[float], TokenBucket] = TokenBucket):
        self.client, self.source, self.name = client, source, name
        self.state_dir = Path(state_dir)
        self.current = JsonFile(self.state_dir / "work.json")
        self.outbox = Outbox(self.state_dir / "outbox")
        self.sessions = self.state_dir / "sessions"
        self.backoff = backoff or Backoff()
        self.progress_every, self.inventory_every = progress_every, inventory_every
        self.limiter_factory = limiter_factory
        self.poll_seconds = 30.0
        self.hosts: list[dict] | None = None
        self.registered_at = -1e18
        self.completed = 0  # work items finished (either way), for logs and tests

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Register, deliver kept results, finish interrupted work, then poll for work and run it, forever."""
        await self._retrying(lambda: self.register(refresh=True))
        log.info("collector %s registered with %s (version %s): %s", self.name, self.client.base, __version__,
                 ", ".join(f"{h['host']} ({len(h['vms'])} VMs)" for h in self.hosts or []) or "no VMs")
        while True:
            await self._retrying(self.deliver)
            work = self._interrupted_work()
            if work is None:
                if time.monotonic() - self.registered_at > self.inventory_every:
                    await self._retrying(lambda: self.register(refresh=True))
                work = await self._retrying(self.poll)
                if work is None or not await self._acceptable(work):
                    continue
                self.current.save(work)
            await self.execute(work)

    async def _acceptable(self, work: object) -> bool:
        """A malformed work item is refused with a failed result (when it can be named), never run."""
        problem = work_problem(work)
        if problem is None:
            return True
        log.error("the server sent a malformed work item (%s): %.200s", problem, json.dumps(work))
        if isinstance(work, dict) and isinstance(work.get("work_id"), str) and work["work_id"]:
            self.outbox.put(work["work_id"], result_body(work, None, None, 0.0, f"malformed work item: {problem}"))
            await self._retrying(self.deliver)
        return False

    def _interrupted_work(self) -> dict | None:
        work = self.current.load()
        if work is None:
            return None
        if (problem := work_problem(work)) is not None:
            log.warning("%s holds no usable work item (%s); ignoring it", self.current.path, problem)
            self.current.remove()
            return None
        if any(d["work_id"] == work.get("work_id") for d in self.outbox.pending()):
            self.current.remove()  # it finished; only its result was left to deliver
            return None
        log.info("work %s: resuming after an interruption", work.get("work_id"))
        return work

    async def _retrying(self, call: Callable[[], Any]) -> Any:
        """Await call() until it gets through, backing off on transient failures."""
        while True:
            try:
                value = await call()
            except Exception as e:
                if not transient(e):
                    raise
                delay = self.backoff.next()
                log.warning("server unreachable (%s); retrying in %.1f s", _describe(e), delay)
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            return value

    # ------------------------------------------------------------------ calls

    async def register(self, *, refresh: bool = False) -> None:
        """Register (idempotent); refresh=True re-reads the inventory from the source."""
        if refresh or self.hosts is None:
            try:
                self.hosts = inventory(await asyncio.to_thread(self.source.vms))
            except SourceError as e:
                if self.hosts is None:
                    raise
                log.warning("could not refresh the inventory (%s); keeping the last one", e)
        answer = await self.client.register_collector(self.name, __version__, self.hosts)
        self.poll_seconds = float(answer.get("poll_seconds") or self.poll_seconds)
        self.registered_at = time.monotonic()

    async def poll(self) -> dict | None:
        try:
            return await self.client.poll_work(self.name, max(1, min(60, int(self.poll_seconds))))
        except ApiError as e:
            if e.code != "collector_not_found":
                raise
            await self.register(refresh=True)  # the server forgot us (a restored data directory): introduce again
            return None

    async def deliver(self) -> None:
        """Post every kept result; one the server refuses outright (4xx) is dropped with a log line."""
        for doc in self.outbox.pending():
            try:
                await self.client.work_result(doc["work_id"], doc["result"])
            except ApiError as e:
                if transient(e) or e.status >= 500 or e.status in (401, 403):  # kept: the token is the problem
                    raise
                log.warning("work %s: the server refused its result (%s); dropping it", doc["work_id"], e)
            self.outbox.remove(doc["work_id"])

    # ------------------------------------------------------------------ one work item

    async def execute(self, work: dict) -> dict:
        """Run a work item to a result (re-running it, resumed, after transient failures), queue and post it."""
        work_id, vm = work["work_id"], work["vm"]
        options = work.get("options") or {}
        log.info("work %s: start %s (%s) on %s, job %s run %s%s%s", work_id, vm.get("name"), vm.get("id"),
                 work.get("host"), work.get("job"), work.get("run_id"), ", full read" if options.get("full") else "",
                 f", limit {format_size(options['bandwidth_bytes_per_s'])}/s"
                 if options.get("bandwidth_bytes_per_s") else "")
        started = time.monotonic()
        resumed = False
        while True:
            progress = WorkProgress()
            try:
                result, consistency = await self._attempt(work, progress)
                body = result_body(work, result, consistency, time.monotonic() - started, None)
                resumed = result.resumed_session
                break
            except WorkGone:
                log.warning("work %s: the server no longer knows it; dropped", work_id)
                self.current.remove()
                return {}
            except Cancelled:
                body = result_body(work, None, None, time.monotonic() - started, "cancelled by the server",
                                   progress.done)
                break
            except Exception as e:
                if not transient(e):
                    log.debug("work %s failed", work_id, exc_info=True)
                    body = result_body(work, None, None, time.monotonic() - started, _describe(e), progress.done)
                    break
                delay = self.backoff.next()
                log.warning("work %s: interrupted (%s); resuming in %.1f s", work_id, _describe(e), delay)
                await asyncio.sleep(delay)
            finally:
                progress.close()
        self.outbox.put(work_id, body)
        self.current.remove()
        self.completed += 1
        self._log_finish(work, body, resumed)
        await self._retrying(self.deliver)
        return body

    async def _attempt(self, work: dict, progress: WorkProgress) -> tuple[Result, str]:
        """One try at the backup, with a reporter beside it that posts progress and obeys cancel."""
        options = work.get("options") or {}
        limit = options.get("bandwidth_bytes_per_s")
        pipeline = Options(full=bool(options.get("full")), state_dir=self.sessions,
                           limiter=self.limiter_factory(limit) if limit else None)
        await self._report(work["work_id"], progress)  # the item is still wanted (and it is live again)
        backup_task = asyncio.create_task(self._backup(work["vm"], pipeline, progress))
        reporter = asyncio.create_task(self._reporter(work["work_id"], progress, backup_task))
        try:
            return await backup_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being stopped
            exc = reporter.exception() if reporter.done() else None
            raise exc if isinstance(exc, WorkGone) else Cancelled() from None
        finally:
            reporter.cancel()
            backup_task.cancel()
            await asyncio.gather(reporter, backup_task, return_exceptions=True)

    async def _backup(self, vm: dict, options: Options, progress: WorkProgress) -> tuple[Result, str]:
        taking = asyncio.ensure_future(asyncio.to_thread(self.source.begin, vm["id"]))
        try:
            backup = await asyncio.shield(taking)
        except asyncio.CancelledError:  # the thread still takes the checkpoint: release it, do not leave it
            with contextlib.suppress(Exception):
                await asyncio.to_thread((await taking).end, False)
            raise
        try:
            progress.phase = "read"
            result = await run_backup(self.client, backup, options=options, progress=progress)
            return result, backup.consistency
        finally:
            await asyncio.to_thread(backup.end, False)  # rolls the checkpoint back unless committed

    async def _report(self, work_id: str, progress: WorkProgress) -> None:
        try:
            answer = await self.client.work_progress(work_id, progress.report())
        except ApiError as e:
            if e.status == 404:
                raise WorkGone() from None
            raise
        if answer.get("cancel"):
            raise Cancelled()

    async def _reporter(self, work_id: str, progress: WorkProgress, backup: asyncio.Task) -> None:
        """Every progress_every seconds: progress to the server; cancel the backup if it says so. Also keeps
        the collector marked online through a long backup. A failed report is not a failed backup."""
        heartbeat = time.monotonic()
        while True:
            await asyncio.sleep(self.progress_every)
            try:
                await self._report(work_id, progress)
                if time.monotonic() - heartbeat > self.poll_seconds:
                    heartbeat = time.monotonic()
                    await self.register()
            except (Cancelled, WorkGone):
                backup.cancel()
                raise
            except Exception as e:
                log.debug("work %s: progress report failed: %s", work_id, _describe(e))

    def _log_finish(self, work: dict, body: dict, resumed: bool) -> None:
        vm = work["vm"].get("name")
        if body["ok"]:
            log.info("work %s: done %s: point %s, %s, read %s, changed %s, new %s, sent %s in %.1f s%s",
                     work["work_id"], vm, body["point_id"], body["consistency"], format_size(body["bytes_read"]),
                     format_size(body["bytes_changed"]), format_size(body["bytes_new"]),
                     format_size(body["bytes_sent"]), body["duration_s"],
                     " (resumed an interrupted session)" if resumed else "")
        else:
            log.error("work %s: FAILED %s after %.1f s (read %s): %s", work["work_id"], vm, body["duration_s"],
                      format_size(body["bytes_read"]), body["error"])


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
