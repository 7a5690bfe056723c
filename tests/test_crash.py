"""Crash consistency: SIGKILL the real server mid-upload and at every step of a commit, restart it,
and check that every committed point restores bit-exact and open sessions resume or are cleanly gone."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
import zstandard

from chunkyard.wire import ApiError, bitmap_get, is_zero, make_frame
from tests.conftest import ServerProcess
from tests.helpers import MiB, backup, chunks_of, make_disk, restore


async def collector_token(server: ServerProcess) -> str:
    async with server.client() as admin:
        return (await admin.create_token("collector", "crash test"))["token"]


async def test_sigkill_during_uploads_then_resume(server: ServerProcess) -> None:
    """Kill while several uploads are in flight: committed points survive, the session resumes."""
    token = await collector_token(server)
    base_disk = make_disk("rrrzrr", seed=1)
    async with server.client(token) as c:
        committed = await backup(c, "vm1", {"d0": base_disk})
        big = make_disk("r" * 48, seed=2)
        partial = await backup(c, "vm1", {"d0": big}, commit=False)  # opens a session, uploads, maps
        sid = partial["session_id"]
        # A second stream of uploads into the same session while we kill the server.
        more = make_disk("r" * 64, seed=3)
        cctx = zstandard.ZstdCompressor(level=1)
        frames = [make_frame(p, cctx) for p in chunks_of(more, MiB)]

        async def pump(part: list) -> None:
            for _ in range(500):  # keeps uploading (duplicates after the first round) until the kill
                for i in range(0, len(part), 4):
                    await c.upload(sid, part[i : i + 4])

        tasks = [asyncio.create_task(pump(frames[k::3])) for k in range(3)]
        await asyncio.sleep(0.3)
        server.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, aiohttp.ClientError | ApiError | OSError) for r in results), results

    server.start()
    async with server.client() as admin:
        assert await restore(admin, committed["point_id"], "d0") == base_disk
    async with server.client(token) as c:
        session = await c.json("GET", f"/sessions/{sid}")
        assert session["state"] == "open"  # the uncommitted session survived the crash and resumes
        resumed = await backup_into(c, sid, "d0", big)
        assert resumed["uploaded"] == 0  # everything acknowledged before the kill was durable
        point = await c.commit(sid)
    async with server.client() as admin:
        assert await restore(admin, point["point_id"], "d0") == big


async def backup_into(c, sid: str, disk_id: str, image: bytes) -> dict:
    """Re-run the upload half of a backup inside an existing session (what a resumed collector does)."""
    cctx = zstandard.ZstdCompressor(level=1)
    frames = [make_frame(p, cctx) for p in chunks_of(image, MiB) if not is_zero(p)]
    bitmap = await c.missing(sid, [f.digest for f in frames])
    todo = [f for n, f in enumerate(frames) if bitmap_get(bitmap, n)]
    if todo:
        await c.upload(sid, todo)
    await c.map(sid, disk_id, [(i, make_frame(p).digest) for i, p in enumerate(chunks_of(image, MiB))])
    return {"uploaded": len(todo)}


@pytest.mark.parametrize("crash_at, committed", [
    ("after_pack_sync", False),   # chunks durable in the pack, index not yet written
    ("after_pages", False),       # manifest pages stored, no point file yet
    ("after_point_file", True),   # point file durable, index not yet written
    ("after_commit", True),       # everything written, answer not yet sent
])
async def test_sigkill_at_each_commit_step(server: ServerProcess, crash_at: str, committed: bool) -> None:
    """A crash between two durable steps of a commit leaves either no point or a complete one."""
    token = await collector_token(server)
    first = make_disk("rrzr", seed=10)
    second = make_disk("rrrr", seed=11)
    async with server.client(token) as c:
        base = await backup(c, "vm1", {"d0": first})
    server.restart(env={"CHUNKYARD_CRASH_AT": crash_at})
    async with server.client(token) as c:
        with pytest.raises((aiohttp.ClientError, ApiError)):
            await backup(c, "vm1", {"d0": second}, only={"d0": {1, 3}})
    server.proc.wait(10)
    assert server.proc.returncode == 137
    server.start()
    async with server.client() as admin:
        points = await admin.points("vm1")
        assert await restore(admin, base["point_id"], "d0") == first
        expected = bytearray(first)
        expected[MiB : 2 * MiB] = second[MiB : 2 * MiB]
        expected[3 * MiB :] = second[3 * MiB :]
        if committed:
            assert len(points) == 2
            assert await restore(admin, points[1]["point_id"], "d0") == bytes(expected)
            stats = await admin.repository()
            assert stats["point_count"] == 2
        else:
            assert [p["point_id"] for p in points] == [base["point_id"]]
    if not committed:  # the interrupted backup simply runs again
        async with server.client(token) as c:
            again = await backup(c, "vm1", {"d0": second}, only={"d0": {1, 3}})
        async with server.client() as admin:
            assert await restore(admin, again["point_id"], "d0") == bytes(expected)


async def test_torn_pack_tail_is_cut_on_restart(server: ServerProcess) -> None:
    """Garbage after the last record (a write torn by a crash) is cut; every record before it is kept."""
    token = await collector_token(server)
    disk = make_disk("rrcr", seed=20)
    async with server.client(token) as c:
        point = await backup(c, "vm1", {"d0": disk})
    server.kill()
    packs = sorted((server.data / "packs").glob("*/*.pack"))
    size = packs[-1].stat().st_size
    with open(packs[-1], "ab") as f:
        f.write(b"CYCK" + os.urandom(3000))  # a record header whose payload never made it
    server.start()
    assert packs[-1].stat().st_size == size
    async with server.client() as admin:
        assert await restore(admin, point["point_id"], "d0") == disk
    async with server.client(token) as c:
        again = await backup(c, "vm2", {"d0": disk})
        assert again["uploaded"] == 0


@pytest.mark.parametrize("job", ["verify", "prune", "gc"])
async def test_sigkill_during_maintenance_jobs(server: ServerProcess, job: str) -> None:
    """SIGKILL at a random moment of a verify, prune or GC job: after a restart every point still
    listed restores bit-exact, and the same job then completes."""
    import random

    rng = random.Random(job)
    images = {}
    async with server.client() as admin:
        for n in range(6):
            img = make_disk("rrz" + "c" * (n % 3), seed=300 + n)
            point = await backup(admin, f"vm{n % 2}", {"d0": img})
            images[point["point_id"]] = img
        await admin.delete_point(next(iter(images)))
        bodies = {"verify": ("/admin/verify", {"mode": "all"}),
                  "prune": ("/admin/prune", {"dry_run": False, "policy": {"keep_last": 1}}),
                  "gc": ("/admin/gc", {"compact_below": 1.0})}
        path, body = bodies[job]
        await admin.json("POST", path, body)
        await asyncio.sleep(rng.random() * 0.05)
    server.kill()
    server.start()
    async with server.client() as admin:
        listed = [p["point_id"] for vm in ("vm0", "vm1") for p in await admin.points(vm)]
        for pid in listed:
            assert await restore(admin, pid, "d0") == images[pid]
        result = await admin.json("POST", path, body)
        while result["state"] == "running":
            await asyncio.sleep(0.05)
            result = await admin.json("GET", f"/jobs/{result['id']}")
        assert result["state"] == "done", result
        for vm in ("vm0", "vm1"):
            for p in await admin.points(vm):
                assert await restore(admin, p["point_id"], "d0") == images[p["point_id"]]
