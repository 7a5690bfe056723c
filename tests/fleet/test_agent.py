"""The pull collector (collectors/agent.py) against a real server process: registration, the work loop,
progress, results kept across a server restart, backoff while the server is down, resume of an
interrupted session, and the bandwidth limiter's accounting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chunkyard import __version__
from chunkyard.wire import ApiError, Client
from collectors.agent import Agent, Backoff, Outbox, TokenBucket, inventory, transient, work_problem
from collectors.sources import VmInfo
from collectors.sources.lab import LabSource, init_lab
from tests.conftest import ROOT, ServerProcess, free_port, require_tool
from tests.fleet.fleet_server import fleet_server
from tests.helpers import MiB, restore


class FakeClock:
    """Time that passes only when the limiter sleeps: accounting without wall-clock asserts."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# ------------------------------------------------------------------------------------------ pure parts

def test_backoff_grows_with_jitter_to_the_cap_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(7).random)
    delays = [backoff.next() for _ in range(10)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0 and delays[-1] >= 15.0
    assert len({round(d, 6) for d in delays[6:]}) == 4  # capped, yet still jittered (no lockstep)
    backoff.reset()
    assert backoff.next() <= 1.0


async def test_token_bucket_accounting() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    await bucket.acquire(500)  # the burst passes at once
    assert clock.slept == []
    await bucket.acquire(2000)  # a body larger than the bucket waits off its deficit
    assert clock.slept == [pytest.approx(2.0)]
    clock.now += 10  # idle time refills only up to the burst
    await bucket.acquire(600)
    assert clock.slept[-1] == pytest.approx(0.1)
    assert bucket.granted == 3100
    # Never ahead of the limit: granted <= burst + rate × elapsed.
    assert bucket.granted <= bucket.burst + bucket.rate * (clock.now - 100.0) + 1e-6
    assert bucket.waited == pytest.approx(2.1)


async def test_token_bucket_serialises_concurrent_uploads() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    await asyncio.gather(*(bucket.acquire(100) for _ in range(5)))
    assert bucket.granted == 500
    assert clock.now - 100.0 == pytest.approx(4.0)  # first 100 from the burst, then 1 s per 100 bytes


def test_token_bucket_refuses_a_useless_rate() -> None:
    for rate in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            TokenBucket(rate)


def test_inventory_groups_vms_by_host() -> None:
    vms = [VmInfo("1", "web", "hv2"), VmInfo("2", "sql", "hv1"), VmInfo("3", "dc", "hv2")]
    assert inventory(vms) == [{"host": "hv1", "vms": [{"id": "2", "name": "sql"}]},
                              {"host": "hv2", "vms": [{"id": "1", "name": "web"}, {"id": "3", "name": "dc"}]}]
    assert inventory([]) == []


def test_transient_errors() -> None:
    assert transient(aiohttp.ServerDisconnectedError())
    assert transient(ConnectionRefusedError())
    assert transient(TimeoutError())
    assert transient(ApiError(503, "unavailable", "starting"))
    assert transient(ApiError(429, "busy", "slow down"))
    assert not transient(ApiError(401, "unauthorized", "bad token"))
    assert not transient(ApiError(422, "bad", "bad body"))
    assert not transient(ValueError("bug"))


def test_outbox_keeps_results_in_order_and_survives_garbage(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    assert box.pending() == []
    box.put("w/1", {"ok": True})
    box.put("w2", {"ok": False})
    (tmp_path / "outbox" / "junk.json").write_bytes(b"\xff\x00 not json")
    (tmp_path / "outbox" / "list.json").write_text("[1, 2]")
    assert [d["work_id"] for d in box.pending()] == ["w/1", "w2"]
    assert box.pending()[0]["result"] == {"ok": True}
    box.remove("w/1")
    assert [d["work_id"] for d in box.pending()] == ["w2"]
    assert Outbox(tmp_path / "outbox").pending()[0]["result"] == {"ok": False}  # a new process sees it


def test_malformed_work_items_are_named() -> None:
    good = {"work_id": "r.0.1", "run_id": "r", "job": "j", "host": "h", "vm": {"id": "v", "name": "n"},
            "options": {"bandwidth_bytes_per_s": None, "full": False}}
    assert work_problem(good) is None
    assert work_problem(good | {"options": None}) is None
    assert work_problem(good | {"options": {"bandwidth_bytes_per_s": 1048576, "full": True}}) is None
    bad = [None, [], "work", {}, good | {"work_id": 7}, good | {"work_id": ""}, good | {"vm": "v"},
           good | {"vm": {"name": "n"}}, good | {"vm": {"id": ["v"]}}, good | {"options": [1]},
           good | {"options": {"bandwidth_bytes_per_s": 0}}, good | {"options": {"bandwidth_bytes_per_s": -5}},
           good | {"options": {"bandwidth_bytes_per_s": True}}, good | {"options": {"bandwidth_bytes_per_s": "9"}},
           good | {"options": {"bandwidth_bytes_per_s": 1e300}}, good | {"options": {"full": "yes"}}]
    for work in bad:
        assert work_problem(work), work


# ------------------------------------------------------------------------------------------ against the server

@pytest.fixture
def lab(tmp_path: Path) -> Path:
    require_tool("qemu-img")
    require_tool("qemu-io")
    init_lab(tmp_path / "lab", vms=2, disk_size=32 * MiB, seed=31)
    return tmp_path / "lab"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    server, tokens = fleet_server(tmp_path, tokens=(("collector", "c1", ""),))
    server.start()
    yield server, tokens
    server.stop()


async def until(predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = 60) -> Any:
    """Poll until predicate() is truthy; fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def finished(admin: Client, run_id: str, seen: list[dict] | None = None) -> dict:
    async def done() -> dict | None:
        run = await admin.backup_run(run_id)
        if seen is not None:
            seen.extend(v["progress"] for v in run["vms"] if v["progress"] and v["state"] == "running")
        return run if run["state"] in ("succeeded", "partial", "failed") else None

    return await until(done, f"run {run_id} to finish")


async def idle(agent: Agent) -> bool:
    """The server has the agent's results and it holds no work (the last POST's answer has come back)."""
    return not agent.outbox.pending() and agent.current.load() is None


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task]:
    """The agent's loop as a task; cancelled (as SIGTERM does) on the way out."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.client.close()


def raw_of(vhdx: Path, out: Path) -> bytes:
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(out)], check=True)
    return out.read_bytes()


async def test_registers_runs_work_reports_progress_and_limits_bandwidth(tmp_path: Path, lab: Path, fleet) -> None:
    server, tokens = fleet
    limiters: list[TokenBucket] = []

    def limiter(rate: float) -> TokenBucket:
        limiters.append(TokenBucket(rate))
        return limiters[-1]

    agent = Agent(Client(server.url, tokens["c1"]), LabSource(lab), "c1", tmp_path / "state", progress_every=0.1,
                  limiter_factory=limiter)
    async with server.client() as admin, running(agent):
        collectors = await until(admin.collectors, "the collector to register")
        assert [(c["name"], c["version"], c["online"]) for c in collectors] == [("c1", __version__, True)]
        assert collectors[0]["hosts"] == inventory(LabSource(lab).vms())
        await admin.create_backup_job({"name": "lab", "collector": "c1", "schedule": "yearly", "missed": "skip",
                                       "bandwidth_mib_s": 8})
        seen: list[dict] = []
        run = await finished(admin, await admin.run_backup_job("lab"), seen)
        await until(lambda: idle(agent), "the collector to settle its outbox")

    assert run["state"] == "succeeded", run
    assert {v["vm"]["name"] for v in run["vms"]} == {"vm01", "vm02"}
    for vm in run["vms"]:
        assert vm["consistency"] == "application" and vm["point_id"] and vm["error"] is None
        assert 0 < vm["bytes_new"] <= vm["bytes_read"] <= 32 * MiB and vm["bytes_sent"] > 0 and vm["duration_s"] > 0
    assert any(p["phase"] == "read" and p["done_bytes"] > 0 and p["total_bytes"] > 0 for p in seen), seen
    assert agent.completed == 2 and not agent.outbox.pending() and agent.current.load() is None
    # The limit held by the limiters' own accounting: every upload body went through them, at 8 MiB/s.
    assert [b.rate for b in limiters] == [8 * MiB, 8 * MiB]
    for bucket, vm in zip(limiters, run["vms"], strict=True):
        # granted = upload bodies on the wire (frames: payload + 41-byte headers); bytes_sent = what the server
        # stored (payload + 28 bytes of seal per record): equal within those per-chunk overheads
        assert bucket.granted > 0 and abs(bucket.granted - vm["bytes_sent"]) <= bucket.granted * 0.01
        assert bucket.granted <= bucket.burst + bucket.rate * (bucket.clock() - bucket.created)
        assert bucket.waited >= (bucket.granted - bucket.burst) / bucket.rate - 1e-6
    vm01 = next(v for v in run["vms"] if v["vm"]["name"] == "vm01")
    async with server.client() as admin:
        point = await admin.point(vm01["point_id"])
        assert await restore(admin, vm01["point_id"], point["disks"][0]["disk_id"]) == \
            raw_of(lab / "vm01" / "sys.vhdx", tmp_path / "vm01.raw")


class Link:
    """A TCP relay between the collector and the server that the test can cut and restore: a real network
    drop (connections reset, then connection refused) on a live server."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.listener: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.listener = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)

    async def down(self) -> None:
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
            self.listener = None
        for writer in list(self.pipes):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self.pipes -= {writer, up_writer}


class DropsBeforeResult(Client):
    """A real client whose first result post meets a dead network: the link is cut at exactly that moment
    (the backup's commit has been answered, its result not yet delivered)."""

    def __init__(self, link: Link, token: str):
        super().__init__(f"http://127.0.0.1:{link.port}", token)
        self.link = link
        self.cut = False

    async def work_result(self, work_id: str, result: dict) -> None:
        if not self.cut:
            self.cut = True
            await self.link.down()
        await super().work_result(work_id, result)


async def test_result_kept_through_a_network_drop_and_a_collector_restart(tmp_path: Path, lab: Path,
                                                                          fleet) -> None:
    server, tokens = fleet
    link = Link(server.port)
    await link.up()
    state = tmp_path / "state"
    async with server.client() as admin:
        await admin.create_backup_job({"name": "one", "collector": "c1", "vm_pattern": "vm01", "schedule": "yearly",
                                       "missed": "skip"})
        first = Agent(DropsBeforeResult(link, tokens["c1"]), LabSource(lab), "c1", state,
                      backoff=Backoff(base=0.05, cap=0.2))
        async with running(first):
            await until(admin.collectors, "the collector to register")
            run_id = await admin.run_backup_job("one")

            async def kept() -> bool:
                return bool(first.outbox.pending()) and first.backoff.attempt >= 3  # and retrying meanwhile
            await until(kept, "the undeliverable result to be kept")
        # The collector stopped too; its result waits on disk, in a file a new process reads.
        [doc] = Outbox(state / "outbox").pending()
        assert doc["result"]["ok"] and doc["result"]["point_id"] and doc["result"]["consistency"] == "application"
        assert (await admin.backup_run(run_id))["vms"][0]["state"] == "running"

        await link.up()
        second = Agent(Client(f"http://127.0.0.1:{link.port}", tokens["c1"]), LabSource(lab), "c1", state)
        async with running(second):
            run = await finished(admin, run_id)
            await until(lambda: idle(second), "the collector to settle its outbox")
    await link.down()
    assert run["state"] == "succeeded"
    [vm] = run["vms"]
    assert vm["point_id"] == doc["result"]["point_id"] and vm["attempt"] == 1  # delivered, not re-run
    assert vm["bytes_read"] == doc["result"]["bytes_read"] > 0
    assert not Outbox(state / "outbox").pending() and second.completed == 0


async def test_server_killed_mid_backup_then_the_session_resumes(tmp_path: Path, fleet) -> None:
    """The server is killed while a backup uploads and started again: the collector backs off, resumes its
    open session (nothing uploaded twice), and the run still ends with a point equal to the disk, delivered
    by the same work item (interrupted, not failed: no retry)."""
    server, tokens = fleet
    require_tool("qemu-img")
    lab = tmp_path / "big-lab"
    init_lab(lab, vms=1, disk_size=64 * MiB, seed=32)  # about 25 MiB to send: two upload bodies
    agent = Agent(Client(server.url, tokens["c1"]), LabSource(lab), "c1", tmp_path / "state",
                  backoff=Backoff(base=0.05, cap=0.3), progress_every=0.05)
    async with running(agent):
        async with server.client() as admin:
            await until(admin.collectors, "the collector to register")
            await admin.create_backup_job({"name": "one", "collector": "c1", "vm_pattern": "vm01",
                                           "schedule": "yearly", "missed": "skip", "bandwidth_mib_s": 8,
                                           "retry_delay_s": 0})
            run_id = await admin.run_backup_job("one")
            await until(lambda: _stored_chunks(admin, 3), "the first uploads to land")
        await asyncio.to_thread(server.kill)
        sessions = list((tmp_path / "state" / "sessions").glob("*.session.json"))
        assert len(sessions) == 1  # the open session is remembered for the resume
        await asyncio.sleep(0.5)  # the collector meets the dead server and backs off
        await asyncio.to_thread(server.start)
        async with server.client() as admin:
            run = await finished(admin, run_id)
            assert run["state"] == "succeeded", run
            [vm] = run["vms"]
            assert vm["attempt"] == 1 and vm["work_id"].endswith(".1")  # carried on through the restart
            point = await admin.point(vm["point_id"])
            assert point["stats"]["duplicate_chunks"] == 0  # resumed: no chunk crossed the wire twice
            assert await restore(admin, vm["point_id"], point["disks"][0]["disk_id"]) == \
                raw_of(lab / "vm01" / "sys.vhdx", tmp_path / "vm01.raw")
    assert not list((tmp_path / "state" / "sessions").glob("*.session.json"))


async def _stored_chunks(admin: Client, n: int) -> bool:
    return (await admin.repository())["chunk_count"] >= n


async def test_backs_off_while_the_server_is_down_then_comes_back(tmp_path: Path, lab: Path, fleet,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    server, tokens = fleet
    server.stop()
    caplog.set_level("WARNING", logger="chunkyard.collector")
    agent = Agent(Client(server.url, tokens["c1"]), LabSource(lab), "c1", tmp_path / "state",
                  backoff=Backoff(base=0.05, cap=0.3, rng=random.Random(5).random))

    async def retried() -> bool:
        return agent.backoff.attempt >= 6
    async with running(agent):
        await until(retried, "six attempts against the stopped server")
        unreachable = [r.getMessage() for r in caplog.records if "server unreachable" in r.getMessage()]
        assert len(unreachable) >= 6 and all("retrying in" in m for m in unreachable)
        await asyncio.to_thread(server.start)
        async with server.client() as admin:
            collectors = await until(admin.collectors, "the collector to register once the server is back")
            assert collectors[0]["name"] == "c1" and collectors[0]["online"]
            await admin.create_backup_job({"name": "one", "collector": "c1", "vm_pattern": "vm02",
                                           "schedule": "yearly", "missed": "skip"})
            run = await finished(admin, await admin.run_backup_job("one"))
            tracked = await finished(admin, await admin.run_backup_job("one"))
            full = await finished(admin, await admin.run_backup_job("one", full=True))
    assert run["state"] == tracked["state"] == full["state"] == "succeeded"
    assert agent.backoff.attempt == 0  # a success resets the backoff
    # options.full: change tracking ignored, everything allocated read again (and deduplicated).
    assert tracked["vms"][0]["bytes_read"] == 0
    assert full["vms"][0]["bytes_read"] == run["vms"][0]["bytes_read"] > 0 and full["vms"][0]["bytes_new"] == 0


async def test_job_deleted_mid_backup_cancels_it(tmp_path: Path, lab: Path, fleet) -> None:
    server, tokens = fleet
    agent = Agent(Client(server.url, tokens["c1"]), LabSource(lab), "c1", tmp_path / "state", progress_every=0.05)
    async with server.client() as admin, running(agent):
        await until(admin.collectors, "the collector to register")
        await admin.create_backup_job({"name": "slow", "collector": "c1", "vm_pattern": "vm01", "schedule": "yearly",
                                       "missed": "skip", "bandwidth_mib_s": 0.5})
        run_id = await admin.run_backup_job("slow")

        async def reading() -> bool:
            vm = (await admin.backup_run(run_id))["vms"][0]
            return bool(vm["progress"] and vm["progress"]["done_bytes"] > 0)
        await until(reading, "the backup to start reading")
        await admin.delete_backup_job("slow")

        async def stopped() -> bool:
            return agent.completed == 1 and await idle(agent)
        await until(stopped, "the collector to stop the cancelled backup")
        run = await admin.backup_run(run_id)
    assert run["state"] == "failed" and run["vms"][0]["error"] == "cancelled: the job was deleted"
    assert not agent.outbox.pending() and agent.current.load() is None
    assert not (lab / "vm01" / "checkpoint.json").exists()  # the checkpoint was rolled back


async def test_sigterm_mid_backup_then_the_next_start_resumes_it(tmp_path: Path, fleet) -> None:
    """A real `chunkyard collector run` process stopped by SIGTERM mid-backup exits cleanly, keeps the work item
    and its session; started again, it resumes both, and no chunk crosses the wire twice."""
    server, tokens = fleet
    require_tool("qemu-img")
    lab = tmp_path / "big-lab"
    init_lab(lab, vms=1, disk_size=64 * MiB, seed=33)
    state, log = tmp_path / "state", tmp_path / "collector.log"
    cmd = [sys.executable, "-m", "chunkyard.cli", "collector", "run", "--server", server.url, "--token",
           tokens["c1"], "--source", f"lab:{lab}", "--name", "c1", "--state-dir", str(state)]

    def start() -> subprocess.Popen:
        with open(log, "a") as out:
            return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    env=os.environ | {"PYTHONUNBUFFERED": "1"})

    proc = start()
    try:
        async with server.client() as admin:
            await until(admin.collectors, "the collector to register")
            await admin.create_backup_job({"name": "one", "collector": "c1", "schedule": "yearly", "missed": "skip",
                                           "bandwidth_mib_s": 8})
            run_id = await admin.run_backup_job("one")
            await until(lambda: _stored_chunks(admin, 3), "the first uploads to land")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0
            assert re.search(r"stopped after 0 work items; work \S+ resumes at the next start", log.read_text())
            assert (state / "work.json").exists() and list((state / "sessions").glob("*.session.json"))
            assert not (lab / "vm01" / "checkpoint.json").exists()  # the checkpoint was rolled back
            assert (await admin.backup_run(run_id))["vms"][0]["state"] == "running"

            proc = start()
            run = await finished(admin, run_id)
            assert run["state"] == "succeeded", run
            [vm] = run["vms"]
            assert vm["attempt"] == 1  # the same work item, finished by the restarted process
            point = await admin.point(vm["point_id"])
            assert point["stats"]["duplicate_chunks"] == 0
            assert await restore(admin, vm["point_id"], point["disks"][0]["disk_id"]) == \
                raw_of(lab / "vm01" / "sys.vhdx", tmp_path / "vm01.raw")
            text = log.read_text()
            assert "resuming after an interruption" in text and "(resumed an interrupted session)" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


async def test_garbage_state_files_and_a_vanished_vm(tmp_path: Path, lab: Path, fleet) -> None:
    """Unusable state files are ignored (not fatal); a VM that left the host since registration fails its
    work item with the source's message, and the collector goes on to the next one."""
    server, tokens = fleet
    state = tmp_path / "state"
    (state / "outbox").mkdir(parents=True)
    (state / "work.json").write_text('{"work_id": 5, "vm": []}')
    (state / "outbox" / "x.json").write_bytes(b"\x00\xff garbage")
    agent = Agent(Client(server.url, tokens["c1"]), LabSource(lab), "c1", state)
    async with server.client() as admin, running(agent):
        await until(admin.collectors, "the collector to register")
        assert agent.current.load() is None
        shutil.rmtree(lab / "vm02")  # gone from the host, still in the registered inventory
        await admin.create_backup_job({"name": "all", "collector": "c1", "schedule": "yearly", "missed": "skip",
                                       "retries": 0})
        run = await finished(admin, await admin.run_backup_job("all"))
        await until(lambda: idle(agent), "the collector to settle its outbox")
    assert run["state"] == "partial"
    states = {v["vm"]["name"]: (v["state"], v["error"]) for v in run["vms"]}
    assert states["vm01"] == ("succeeded", None)
    assert states["vm02"][0] == "failed" and "no VM" in states["vm02"][1] and "its VMs: vm01" in states["vm02"][1]
    assert agent.completed == 2
