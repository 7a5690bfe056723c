"""Prometheus metrics: values after a real backup, restore and GC against a server process; auth on both paths;
one registry per app; the metric-source extension point."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import aiohttp
import prometheus_client
import pytest
import zstandard
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from chunkyard.config import load_config
from chunkyard.wire import Client, is_zero, make_frame
from repo_server.api import create_app
from repo_server.api.common import METRICS, REPO
from repo_server.api.metrics import RateWindow, register_metric_source
from repo_server.engine import init_repository
from tests.conftest import ServerProcess
from tests.helpers import MiB, backup, chunks_of, make_disk, restore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def scrape(url: str, token: str | None) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        await resp.read()
        return resp


async def run_job(client: Client, path: str, body: dict) -> dict:
    job = await client.json("POST", path, body)
    while job["state"] == "running":
        await asyncio.sleep(0.05)
        job = await client.job(job["id"])
    assert job["state"] == "done", job
    return job


async def test_metrics_after_backup_restore_and_gc(server: ServerProcess, admin: Client) -> None:
    began = time.monotonic()
    disk = make_disk("rcc1z1r", seed=7, tail=5000)  # random, compressible, a repeat, zeros, a short tail
    distinct = {bytes(c) for c in chunks_of(disk, MiB) if not is_zero(c)}
    first = await backup(admin, "vm1", {"d0": disk})
    session = await admin.session(first["session_id"])
    other = await backup(admin, "vm2", {"d0": make_disk("rr", seed=8)})
    await admin.delete_point(other["point_id"])  # its chunks are GC's to free

    # A duplicate upload: a chunk the repository holds already, sent again in a new session.
    again = (await admin.create_session(host="h", vm={"id": "vm3"}, disks=[{"disk_id": "d0", "size": MiB}]))
    dup = make_frame(disk[:MiB], zstandard.ZstdCompressor(level=1))
    answer = await admin.upload(again["session_id"], [dup])
    assert (answer["stored"], answer["duplicate"]) == (0, 1)
    await admin.abort(again["session_id"])
    ingest_s = time.monotonic() - began

    assert await restore(admin, first["point_id"], "d0") == disk
    vhdx = 0
    async for block in admin.stream_disk(first["point_id"], "d0", fmt="vhdx"):
        vhdx += len(block)
    gc = await run_job(admin, "/admin/gc", {"compact_below": 1.0})
    verify = await run_job(admin, "/admin/verify", {"mode": "all"})
    point = await admin.point(first["point_id"])
    stats = await admin.repository()

    m = parse(await (await admin._request("GET", "/metrics")).text())

    # Ingest: what the collector sent, split new / duplicate, and what the packs received.
    new_raw = sum(map(len, distinct)) + 2 * MiB  # vm1's distinct chunks, then vm2's two random ones
    assert value(m, "chunkyard_ingest_raw_bytes_total", outcome="new") == new_raw
    assert value(m, "chunkyard_ingest_chunks_total", outcome="new") == len(distinct) + 2
    assert value(m, "chunkyard_ingest_raw_bytes_total", outcome="duplicate") == MiB
    assert value(m, "chunkyard_ingest_chunks_total", outcome="duplicate") == 1
    stored = value(m, "chunkyard_ingest_stored_bytes_total")
    assert stored - session["stats"]["stored_bytes"] >= 2 * MiB  # vm2's random chunks do not shrink
    assert session["stats"]["stored_bytes"] < session["stats"]["new_bytes"]  # the compressible ones did
    rate = value(m, "chunkyard_ingest_rate_bytes_per_second")
    if ingest_s < 50:  # every upload is still inside the 60 s window
        assert rate * 60 == pytest.approx(new_raw + MiB)
    # Restore: the raw stream is the disk, the VHDX stream its file.
    assert value(m, "chunkyard_restore_bytes_total", format="raw") == len(disk)
    assert value(m, "chunkyard_restore_bytes_total", format="vhdx") == vhdx
    assert value(m, "chunkyard_http_body_bytes_total", direction="out") == len(disk) + vhdx

    # Scrape-time gauges: equal to /repository and the catalog.
    for name in ("logical_bytes", "unique_bytes", "stored_bytes", "chunk_count", "pack_count", "point_count",
                 "vm_count", "dedup_ratio", "compression_ratio"):
        assert value(m, f"chunkyard_{name}") == pytest.approx(stats[name]), name
    assert stats["dedup_ratio"] > 1  # the repeated chunk
    assert value(m, "chunkyard_vm_last_backup_timestamp_seconds", vm_id="vm1", vm_name="VM1") == point["created"]
    assert total(m, "chunkyard_vm_last_backup_timestamp_seconds") == point["created"]  # vm2 has no point left
    assert value(m, "chunkyard_repository_info", repository_id=stats["repository_id"], encryption="aes-256-gcm",
                 version=(await admin.health())["version"]) == 1

    # Maintenance: the jobs' own results and times.
    assert value(m, "chunkyard_maintenance_runs_total", kind="gc", state="done") == 1
    assert value(m, "chunkyard_maintenance_last_success_timestamp_seconds", kind="gc") == pytest.approx(gc["finished"])
    assert value(m, "chunkyard_maintenance_last_duration_seconds", kind="gc") == pytest.approx(
        gc["finished"] - gc["started"])
    assert value(m, "chunkyard_gc_last_freed_bytes") == value(m, "chunkyard_gc_freed_bytes_total") \
        == gc["result"]["bytes_freed"]
    assert value(m, "chunkyard_gc_last_swept_chunks") == gc["result"]["swept_chunks"] >= 2
    checked = verify["result"]["chunks_checked"]
    assert value(m, "chunkyard_verify_last_checked_chunks") == checked == stats["chunk_count"]
    assert value(m, "chunkyard_verify_last_bad_chunks") == value(m, "chunkyard_verify_bad_chunks_total") == 0

    # Requests: the latency histogram counts exactly the requests the status counter counts.
    uploads = total(m, "chunkyard_http_requests_total", route="/api/v1/sessions/{sid}/chunks")
    assert uploads >= 3
    assert value(m, "chunkyard_http_request_duration_seconds_count", route="/api/v1/sessions/{sid}/chunks",
                 method="POST") == uploads
    assert total(m, "chunkyard_http_request_duration_seconds_count") == total(m, "chunkyard_http_requests_total")
    assert value(m, "chunkyard_http_request_duration_seconds_bucket", route="/api/v1/sessions/{sid}/chunks",
                 method="POST", le="+Inf") == uploads
    assert value(m, "chunkyard_http_requests_total", route="/api/v1/points/{pid}/disks/{disk_id}/raw",
                 status="200") == 1

    # The process.
    assert value(m, "process_resident_memory_bytes") > 10 * MiB
    assert 0 < value(m, "chunkyard_up_seconds") < time.time() - value(m, "process_start_time_seconds") + 5


async def test_metrics_auth_on_both_paths(server: ServerProcess, admin: Client) -> None:
    reader = (await admin.create_token("reader", "prometheus"))["token"]
    collector = (await admin.create_token("collector", "hv01"))["token"]
    for path in ("/metrics", "/api/v1/metrics"):
        url = server.url + path
        anonymous = await scrape(url, None)
        assert anonymous.status == 401 and anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await scrape(url, "cy_not-a-token")).status == 401
        assert (await scrape(url, collector)).status == 403
        async with aiohttp.ClientSession() as http:
            basic = await http.get(url, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
            assert basic.status == 401
            garbage = await http.get(url, headers={"Authorization": "Bearer " + "\\x00%" * 1000})
            assert garbage.status == 401
            ok = await http.get(url, headers={"Authorization": f"Bearer {reader}"}, params={"junk": "\x00"})
            assert ok.status == 200 and ok.headers["Content-Type"].startswith("text/plain")
            names = {f.name for f in text_string_to_metric_families(await ok.text())}
        assert {"chunkyard_http_requests", "chunkyard_point_count", "process_resident_memory_bytes"} <= names
    m = parse(await (await admin._request("GET", "/metrics")).text())
    assert value(m, "chunkyard_http_requests_total", route="/metrics", status="401") == 4
    assert value(m, "chunkyard_http_requests_total", route="/metrics", status="403") == 1


@pytest.fixture
async def two_apps(tmp_path: Path):
    """Two servers in this process over their own repositories, each with an admin token."""
    clients = []
    for name in ("a", "b"):
        init_repository(tmp_path / name, encrypt=False)
        app = create_app(dataclasses.replace(load_config(), data=tmp_path / name))
        client = TestClient(TestServer(app))
        await client.start_server()
        token, _ = app[REPO].tokens.create("admin", "test")
        client.session.headers["Authorization"] = f"Bearer {token}"
        clients.append(client)
    yield clients
    for client in clients:
        await client.close()


async def test_each_app_has_its_own_registry(two_apps: list[TestClient]) -> None:
    a, b = two_apps
    for _ in range(3):
        assert (await a.get("/api/v1/repository")).status == 200
    fails = 0

    def broken() -> list:
        nonlocal fails
        fails += 1
        raise RuntimeError("a source that fails")

    def jobs() -> list:
        family = GaugeMetricFamily("chunkyard_test_job_runs", "A family from another part of the server.",
                                   labels=["outcome"])
        family.add_metric(["ok"], 7)
        return [family]

    register_metric_source(a.server.app, broken)  # logged and skipped; the scrape still answers
    register_metric_source(a.server.app, jobs)
    ma = parse(await (await a.get("/metrics")).text())
    mb = parse(await (await b.get("/metrics")).text())
    assert value(ma, "chunkyard_http_requests_total", route="/api/v1/repository", status="200") == 3
    assert value(ma, "chunkyard_http_request_duration_seconds_count", route="/api/v1/repository", method="GET") == 3
    assert ("chunkyard_http_requests_total", (("route", "/api/v1/repository"), ("status", "200"))) not in mb
    assert value(ma, "chunkyard_test_job_runs", outcome="ok") == 7 and fails == 1
    assert not any(name == "chunkyard_test_job_runs" for name, _ in mb)
    assert a.server.app[METRICS].registry is not b.server.app[METRICS].registry
    global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("chunkyard_") for n in global_names)


def test_rate_window_forgets_after_a_minute() -> None:
    window = RateWindow(60)
    window.add(600, now=1000.0)
    window.add(600, now=1000.5)
    window.add(1200, now=1030.0)
    assert window.rate(now=1030.0) == 40  # 2400 bytes / 60 s
    assert window.rate(now=1060.2) == 20  # the first second left the window
    assert window.rate(now=1090.0) == 0
