"""Garbage collection against the real server: sweep and compaction, the pin race, GC concurrent with
backups, and SIGKILL at every GC step."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest

from chunkyard.wire import ApiError, Client, bitmap_get, make_frame
from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk, restore

CS = 256 * 1024


@pytest.fixture
def srv(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text("[server]\npack_size_mib = 1\n")  # small packs: compaction has work to do
    server = ServerProcess(tmp_path / "data", chunk_size="256KiB", config=config)
    server.start()
    yield server
    server.stop()


async def run_gc(client: Client, **body) -> dict:
    job = await client.json("POST", "/admin/gc", body or None)
    while job["state"] == "running":
        await asyncio.sleep(0.05)
        job = await client.json("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    return job["result"]


async def test_gc_sweeps_deleted_points_and_compacts(srv: ServerProcess) -> None:
    async with srv.client() as admin:
        keep = make_disk("rrrrcc", chunk_size=CS, seed=1)
        drop = make_disk("rrrrrrrr", chunk_size=CS, seed=2)
        shared = keep[: 2 * CS] + drop[2 * CS :]
        p_keep = await backup(admin, "vm-keep", {"d0": keep})
        p_drop = await backup(admin, "vm-drop", {"d0": drop})
        p_shared = await backup(admin, "vm-shared", {"d0": shared})
        before = await admin.repository()
        await admin.delete_point(p_drop["point_id"])
        result = await run_gc(admin, compact_below=0.75)
        assert result["swept_chunks"] == 2 + 1  # drop's chunks 0 and 1, and its manifest page
        after = await admin.repository()
        assert after["chunk_count"] == before["chunk_count"] - 3
        assert after["stored_bytes"] < before["stored_bytes"]
        assert result["packs_deleted"] + result["packs_compacted"] >= 1 and result["bytes_freed"] > 0
        assert await restore(admin, p_keep["point_id"], "d0") == keep
        assert await restore(admin, p_shared["point_id"], "d0") == shared
        again = await run_gc(admin)
        assert again["swept_chunks"] == 0
        # Swept chunks are asked for again by the next backup: nothing is silently missing.
        p_back = await backup(admin, "vm-drop", {"d0": drop})
        assert p_back["uploaded"] == 2
        assert await restore(admin, p_back["point_id"], "d0") == drop


async def test_present_answer_survives_gc_until_mapped(srv: ServerProcess) -> None:
    """missing says present -> the only point holding the chunk is deleted -> GC -> map still works."""
    async with srv.client() as admin:
        disk = make_disk("rr", chunk_size=CS, seed=3)
        p1 = await backup(admin, "vm1", {"d0": disk})
        session = await admin.create_session(host="h", vm={"id": "vm2"}, disks=[{"disk_id": "d0",
                                                                                  "size": len(disk)}])
        frames = [make_frame(disk[i : i + CS]) for i in range(0, len(disk), CS)]
        bitmap = await admin.missing(session["session_id"], [f.digest for f in frames])
        assert not any(bitmap_get(bitmap, i) for i in range(2))  # present: not to be uploaded
        await admin.delete_point(p1["point_id"])
        result = await run_gc(admin)
        assert result["swept_chunks"] == 1  # only p1's manifest page; the pinned data stays
        await admin.map(session["session_id"], "d0", [(i, f.digest) for i, f in enumerate(frames)])
        point = await admin.commit(session["session_id"])
        assert await restore(admin, point["point_id"], "d0") == disk


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_gc_concurrent_with_backups(srv: ServerProcess, seed: int) -> None:
    """Backups that reuse chunks of points being deleted, with GCs at random moments (three timings):
    every committed point restores bit-exact afterwards."""
    rng = random.Random(seed)
    async with srv.client() as admin:
        base = [make_disk("rrrr", chunk_size=CS, seed=100 + i) for i in range(3)]
        images: dict[str, bytes] = {}
        committed: list[tuple[str, str]] = []

        async def backups() -> None:
            for n in range(12):
                vm = f"vm{n % 3}"
                img = bytearray(base[n % 3])
                img[rng.randrange(4) * CS] ^= 0xFF
                img = bytes(img)
                point = await backup(admin, vm, {"d0": img})
                images[point["point_id"]] = img
                committed.append((vm, point["point_id"]))
                if len(committed) > 3 and rng.random() < 0.5:
                    _, old = committed.pop(rng.randrange(len(committed) - 1))
                    await admin.delete_point(old)
                await asyncio.sleep(rng.random() / 50)

        async def collections() -> None:
            for _ in range(6):
                await asyncio.sleep(rng.random() / 10)
                await run_gc(admin, compact_below=0.9)

        await asyncio.gather(backups(), collections())
        await run_gc(admin)
        for _, pid in committed:
            assert await restore(admin, pid, "d0") == images[pid]


@pytest.mark.parametrize("crash_at", ["gc_after_mark", "gc_after_sweep", "after_relocate_copy",
                                      "after_relocate_index"])
async def test_sigkill_during_gc(srv: ServerProcess, crash_at: str) -> None:
    async with srv.client() as admin:
        disks = {f"vm{i}": make_disk("rrrrrr", chunk_size=CS, seed=200 + i) for i in range(3)}
        points = {vm: await backup(admin, vm, {"d0": img}) for vm, img in disks.items()}
        await admin.delete_point(points.pop("vm1")["point_id"])
    srv.restart(env={"CHUNKYARD_CRASH_AT": crash_at})
    async with srv.client() as admin:
        with pytest.raises((aiohttp.ClientError, ApiError, AssertionError)):
            await run_gc(admin, compact_below=1.0)
    srv.proc.wait(10)
    srv.start()
    async with srv.client() as admin:
        for vm, point in points.items():
            assert await restore(admin, point["point_id"], "d0") == disks[vm]
        await run_gc(admin, compact_below=1.0)
        for vm, point in points.items():
            assert await restore(admin, point["point_id"], "d0") == disks[vm]
        stats = await admin.repository()
        assert stats["chunk_count"] == 2 * 6 + 2  # the two kept disks and their pages


def test_gc_sweep_and_compaction_beside_concurrent_puts(tmp_path: Path) -> None:
    """Engine level, many garbage chunks and a writer putting chunks all through the GC: the GC must
    finish (a lock-order inversion between the sweep and the flush once hung the server), and every
    chunk put during it must survive (compaction once deleted packs sealed after the sweep's scan)."""
    import os
    import threading

    from chunkyard.wire import digest
    from repo_server.engine import Repository, init_repository
    from repo_server.engine.chunk_store import NewChunk
    from repo_server.engine.gc import GarbageCollector

    init_repository(tmp_path / "r")
    repo = Repository(tmp_path / "r", pack_size=64 * 1024)
    try:
        def chunks(n: int, size: int) -> list[NewChunk]:
            raws = [os.urandom(size) for _ in range(n)]
            ids = repo.chunk_ids([digest(r) for r in raws])
            return [NewChunk(i, 0, len(r), r) for i, r in zip(ids, raws, strict=True)]

        for _ in range(20):
            repo.chunks.put(chunks(500, 64))  # garbage: nothing references it
        written: list[bytes] = []
        stop = threading.Event()

        def writer() -> None:
            gc_started = False  # chunks put before the GC began are unreferenced garbage it may take
            while not stop.is_set():
                gc_started = gc_started or repo.barrier.active
                batch = chunks(20, 4096)
                repo.chunks.put(batch)
                if gc_started:
                    written.extend(c.digest for c in batch)

        thread = threading.Thread(target=writer)
        thread.start()
        collector = threading.Thread(target=lambda: GarbageCollector(repo, compact_below=1.0).run())
        collector.start()
        collector.join(60)
        stop.set()
        thread.join(30)
        assert not collector.is_alive(), "GC hung beside concurrent puts"
        assert written
        with repo.chunks.reader() as reader:
            for d in written:
                reader.read_digest(d)  # raises if the chunk or its pack is gone
    finally:
        repo.close()
