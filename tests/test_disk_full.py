"""Disk full: the server's data directory on a small tmpfs. Uploads that do not fit get a clear 507,
nothing committed is lost, reads keep working, and a GC compaction that runs out of space fails
cleanly without touching the packs it was moving."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chunkyard.wire import ApiError
from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk, restore


@pytest.fixture
def small_volume(tmp_path: Path):
    mount = tmp_path / "vol"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        message = f"cannot mount a small tmpfs (needs root): {done.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_during_upload_keeps_committed_points(small_volume: Path) -> None:
    srv = ServerProcess(small_volume / "data")
    srv.start()
    try:
        first = make_disk("rrrr", seed=1)
        async with srv.client() as admin:
            point = await backup(admin, "vm1", {"d0": first})
            with pytest.raises(ApiError) as full:
                await backup(admin, "vm2", {"d0": make_disk("r" * 48, seed=2)})
            assert full.value.status == 507 and "disk is full" in full.value.message
            assert await restore(admin, point["point_id"], "d0") == first  # reads still work
            assert (await admin.repository())["point_count"] == 1
        srv.stop()
        # After a restart (space still short) the committed point is intact and restores bit-exact.
        srv.start()
        async with srv.client() as admin:
            assert await restore(admin, point["point_id"], "d0") == first
            assert [p["point_id"] for p in await admin.points("vm1")] == [point["point_id"]]
    finally:
        srv.stop()


async def test_disk_full_during_compaction_loses_nothing(small_volume: Path, tmp_path: Path) -> None:
    import asyncio

    config = tmp_path / "server.toml"
    config.write_text("[server]\npack_size_mib = 4\n")
    srv = ServerProcess(small_volume / "data", config=config)
    srv.start()
    try:
        old = make_disk("rrrrrrrr", seed=3)
        new = bytearray(old)
        new[1 << 20] ^= 1
        new[5 << 20] ^= 1
        new = bytes(new)
        async with srv.client() as admin:
            p1 = await backup(admin, "vm1", {"d0": old})
            p2 = await backup(admin, "vm1", {"d0": new}, only={"d0": {1, 5}})
            await admin.delete_point(p1["point_id"])  # two packs become 3/4 live
            stat = os.statvfs(small_volume)
            filler = small_volume / "filler"
            filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - (1 << 20)))

            async def gc() -> dict:
                job = await admin.json("POST", "/admin/gc", {"compact_below": 1.0})
                while job["state"] == "running":
                    await asyncio.sleep(0.05)
                    job = await admin.json("GET", f"/jobs/{job['id']}")
                return job

            failed = await gc()
            assert failed["state"] == "failed" and "space" in failed["error"].lower()
            assert await restore(admin, p2["point_id"], "d0") == new
            filler.unlink()
            done = await gc()
            assert done["state"] == "done", done
            assert await restore(admin, p2["point_id"], "d0") == new
    finally:
        srv.stop()
