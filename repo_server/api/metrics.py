"""Prometheus metrics of one server app (GET /metrics and /api/v1/metrics).

Every app owns a `CollectorRegistry` (never prometheus_client's global one: tests start several apps in one
process). Two kinds of metrics live in it:
- instruments the handlers update as things happen: request counts and latencies, ingest and restore
  bytes, maintenance job outcomes;
- *sources*, functions called at scrape time that return metric families computed from current state:
  repository sizes and ratios, each VM's last backup, tier lag. Other parts of the server add their own
  with `register_metric_source(app, fn)`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from chunkyard import __version__
from repo_server.engine import Repository

log = logging.getLogger("chunkyard.metrics")

MetricSource = Callable[[], Iterable[Metric]]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Seconds; long buckets because a restore download is one request that lasts as long as the stream.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
RATE_WINDOW = 60  # seconds of the dashboard's "ingest bytes per second"


class RateWindow:
    """Bytes per second over the last `seconds`, kept in one-second buckets (a rate for readers without
    Prometheus, who cannot apply rate() to the counter)."""

    def __init__(self, seconds: int = RATE_WINDOW):
        self.seconds = seconds
        self._buckets: deque[list[int]] = deque()  # [second, bytes], oldest first
        self._lock = threading.Lock()

    def add(self, n: int, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += n
            else:
                self._buckets.append([second, n])
            self._trim(second)

    def rate(self, now: float | None = None) -> float:
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            self._trim(second)
            return sum(n for _, n in self._buckets) / self.seconds

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.seconds:
            self._buckets.popleft()


class _Sources(Collector):
    """Runs the registered sources at scrape time; one failing source costs its families, not the scrape."""

    def __init__(self, sources: list[MetricSource]):
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in list(self.sources):
            try:
                families = list(source())
            except Exception:
                log.exception("metric source %s failed", getattr(source, "__qualname__", source))
                continue
            yield from families

    def describe(self) -> Iterable[Metric]:
        return []  # families are only known at scrape time; no name-clash check at registration


class Metrics:
    """One app's registry and instruments."""

    def __init__(self) -> None:
        self.started = time.time()
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("chunkyard_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=reg)
        self.latency = Histogram("chunkyard_http_request_duration_seconds",
                                 "Time from a request's arrival to its last response byte, by route template.",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.body_bytes = Counter("chunkyard_http_body_bytes", "Request and response body bytes of data endpoints.",
                                  ["direction"], registry=reg)
        self.ingest_chunks = Counter("chunkyard_ingest_chunks", "Uploaded chunks: new (stored) or duplicate "
                                     "(already held, or twice in one upload).", ["outcome"], registry=reg)
        self.ingest_raw = Counter("chunkyard_ingest_raw_bytes", "Uncompressed bytes of uploaded chunks, new or "
                                  "duplicate.", ["outcome"], registry=reg)
        self.ingest_stored = Counter("chunkyard_ingest_stored_bytes", "Bytes written to packs for new uploaded "
                                     "chunks (compressed, and sealed when encrypted).", registry=reg)
        self.restore_bytes = Counter("chunkyard_restore_bytes", "Disk image bytes sent by restore downloads.",
                                     ["format"], registry=reg)
        self.runs = Counter("chunkyard_maintenance_runs", "Finished maintenance jobs by kind and state.",
                            ["kind", "state"], registry=reg)
        self.last_run = Gauge("chunkyard_maintenance_last_run_timestamp_seconds",
                              "Unix time the last job of this kind finished (done or failed).", ["kind"], registry=reg)
        self.last_success = Gauge("chunkyard_maintenance_last_success_timestamp_seconds",
                                  "Unix time the last successful job of this kind finished.", ["kind"], registry=reg)
        self.last_duration = Gauge("chunkyard_maintenance_last_duration_seconds",
                                   "Duration of the last job of this kind.", ["kind"], registry=reg)
        self.gc_freed = Counter("chunkyard_gc_freed_bytes", "Pack bytes freed by garbage collection.", registry=reg)
        self.gc_last_freed = Gauge("chunkyard_gc_last_freed_bytes", "Pack bytes the last GC freed.", registry=reg)
        self.gc_last_swept = Gauge("chunkyard_gc_last_swept_chunks", "Chunks the last GC dropped.", registry=reg)
        self.verify_checked = Counter("chunkyard_verify_checked_chunks", "Chunks read back and checked by verify.",
                                      registry=reg)
        self.verify_bad = Counter("chunkyard_verify_bad_chunks", "Damaged chunks found (and quarantined) by verify.",
                                  registry=reg)
        self.verify_last_checked = Gauge("chunkyard_verify_last_checked_chunks", "Chunks the last verify checked.",
                                         registry=reg)
        self.verify_last_bad = Gauge("chunkyard_verify_last_bad_chunks", "Damaged chunks the last verify found.",
                                     registry=reg)
        self.pruned = Counter("chunkyard_prune_removed_points", "Restore points deleted by prune (not dry runs).",
                              registry=reg)
        for direction in ("in", "out"):
            self.body_bytes.labels(direction)
        for outcome in ("new", "duplicate"):
            self.ingest_chunks.labels(outcome)
            self.ingest_raw.labels(outcome)
        for fmt in ("raw", "vhdx"):
            self.restore_bytes.labels(fmt)
        self.ingest_window = RateWindow()
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, process_start_time_seconds, CPU, fds
        self.sources: list[MetricSource] = [self._own_gauges]
        reg.register(_Sources(self.sources))

    # ------------------------------------------------------------------ events

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route, method if method in METHODS else "other").observe(seconds)

    def received(self, n: int) -> None:
        self.body_bytes.labels("in").inc(n)

    def restored(self, n: int, fmt: str) -> None:
        self.body_bytes.labels("out").inc(n)
        self.restore_bytes.labels(fmt).inc(n)

    def ingested(self, new_chunks: int, duplicate_chunks: int, new_raw: int, duplicate_raw: int,
                 stored: int) -> None:
        self.ingest_chunks.labels("new").inc(new_chunks)
        self.ingest_chunks.labels("duplicate").inc(duplicate_chunks)
        self.ingest_raw.labels("new").inc(new_raw)
        self.ingest_raw.labels("duplicate").inc(duplicate_raw)
        self.ingest_stored.inc(stored)
        self.ingest_window.add(new_raw + duplicate_raw)

    def job_finished(self, kind: str, state: str, started: float, finished: float, result: Any) -> None:
        """A maintenance job's outcome (called on the maintenance thread when it ends)."""
        self.runs.labels(kind, state).inc()
        self.last_run.labels(kind).set(finished)
        self.last_duration.labels(kind).set(finished - started)
        if state != "done" or not isinstance(result, dict):
            return
        self.last_success.labels(kind).set(finished)
        if kind == "gc":
            self.gc_freed.inc(result.get("bytes_freed", 0))
            self.gc_last_freed.set(result.get("bytes_freed", 0))
            self.gc_last_swept.set(result.get("swept_chunks", 0))
        elif kind == "verify":
            bad = len(result.get("damaged_chunks", []))
            self.verify_checked.inc(result.get("chunks_checked", 0))
            self.verify_bad.inc(bad)
            self.verify_last_checked.set(result.get("chunks_checked", 0))
            self.verify_last_bad.set(bad)
        elif kind == "prune" and not result.get("dry_run", True):
            self.pruned.inc(result.get("removed", 0))

    # ------------------------------------------------------------------ scrape

    def _own_gauges(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("chunkyard_up_seconds", "Seconds since the server started.",
                                value=time.time() - self.started)
        yield GaugeMetricFamily("chunkyard_ingest_rate_bytes_per_second",
                                f"Uncompressed bytes uploaded per second over the last {RATE_WINDOW} s (for "
                                "dashboards; with Prometheus use rate(chunkyard_ingest_raw_bytes_total)).",
                                value=self.ingest_window.rate())

    def exposition(self) -> bytes:
        """The text format; blocking (sources read the index), so handlers run it on the pool."""
        return generate_latest(self.registry)


def repository_families(repo: Repository) -> Iterable[Metric]:
    """Sizes and ratios from repo.stats() (in-memory counters plus one scan of the per-VM summaries) and
    each VM's last backup: cheap enough for every scrape."""
    stats = repo.stats()
    yield InfoMetricFamily("chunkyard_repository", "The repository and the server build.",
                           value={"repository_id": stats["repository_id"], "encryption": stats["encryption"],
                                  "version": __version__})
    sizes = {
        "logical_bytes": "Bytes of data protected by all restore points (allocated chunks).",
        "unique_bytes": "Uncompressed bytes of unique stored chunks.",
        "stored_bytes": "Bytes the chunks take in packs.",
        "chunk_count": "Unique chunks stored.",
        "pack_count": "Pack files.",
        "point_count": "Restore points.",
        "vm_count": "VMs with at least one restore point.",
        "dedup_ratio": "logical_bytes / unique_bytes (absent while nothing is stored).",
        "compression_ratio": "unique_bytes / stored_bytes (absent while nothing is stored).",
    }
    for name, help_text in sizes.items():
        if stats[name] is not None:
            yield GaugeMetricFamily(f"chunkyard_{name}", help_text, value=stats[name])
    last = GaugeMetricFamily("chunkyard_vm_last_backup_timestamp_seconds",
                             "Unix time of the VM's newest restore point (its last successful backup).",
                             labels=["vm_id", "vm_name"])
    for vm in repo.points.vms():
        last.add_metric([vm["id"], vm.get("name", "")], vm["latest_time"])
    yield last


METRICS = web.AppKey("metrics", Metrics)


def register_metric_source(app: web.Application, fn: MetricSource) -> None:
    """Add families to the app's /metrics: `fn()` runs at every scrape, on a worker thread, and returns
    prometheus_client.core metric families (GaugeMetricFamily, CounterMetricFamily, ...). It must be quick
    and must not use the names of other sources; an exception is logged and drops only its own families."""
    app[METRICS].sources.append(fn)
