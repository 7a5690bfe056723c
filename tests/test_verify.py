"""Verify against the real server: bit rot is found in exactly the affected points, quarantined, and
healed by the next backup; the "new" and "sample" modes check each shared chunk once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chunkyard.wire import Client, digest
from repo_server.engine import Repository
from repo_server.engine.index import Location
from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk, restore


async def run_job(client: Client, path: str, **body) -> dict:
    job = await client.json("POST", path, body or None)
    while job["state"] == "running":
        await asyncio.sleep(0.05)
        job = await client.json("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    return job["result"]


def flip_byte_of_chunk(data: Path, chunk_digest: bytes) -> None:
    """Bit rot inside one chunk's stored payload, found through the index (server stopped)."""
    repo = Repository(data)
    try:
        chunk_id = repo.chunk_ids([chunk_digest])[0]
        loc = Location.decode(chunk_id, repo.index.get("chunks", chunk_id))
    finally:
        repo.close()
    path = next((data / "packs").glob(f"*/{loc.pack_id:016x}.pack"))
    with open(path, "r+b") as f:
        f.seek(loc.record.offset + 49 + loc.record.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


async def test_bit_rot_found_quarantined_and_healed(server: ServerProcess) -> None:
    shared = make_disk("1", seed=5)  # one chunk shared by vm-a and vm-b
    a = make_disk("r", seed=1) + shared + make_disk("r", seed=2)
    b = shared + make_disk("rr", seed=3)
    c = make_disk("rrr", seed=4)
    async with server.client() as admin:
        points = {vm: await backup(admin, vm, {"d0": img}) for vm, img in (("vm-a", a), ("vm-b", b),
                                                                            ("vm-c", c))}
        clean = await run_job(admin, "/admin/verify")
        assert clean["damaged_chunks"] == [] and clean["points_checked"] == 3
        assert clean["chunks_checked"] == 3 + 3 + 2 + 3  # each data chunk once (shared once), plus 3 pages
    server.stop()
    flip_byte_of_chunk(server.data, digest(shared))
    server.start()
    async with server.client() as admin:
        result = await run_job(admin, "/admin/verify", mode="all")
        assert len(result["damaged_chunks"]) == 1  # the shared chunk (named by its id at rest)
        assert sorted(result["points_damaged"]) == sorted([points["vm-a"]["point_id"], points["vm-b"]["point_id"]])
        status = (await admin.point(points["vm-a"]["point_id"]))["verify"]
        assert status["ok"] is False and status["damaged_chunks"] == 1
        assert (await admin.point(points["vm-c"]["point_id"]))["verify"]["ok"] is True
        # Quarantined: the next backup of any VM holding the chunk sends it again, and heals both points.
        healed = await backup(admin, "vm-b", {"d0": b})
        assert healed["uploaded"] == 1
        assert await restore(admin, points["vm-a"]["point_id"], "d0") == a
        again = await run_job(admin, "/admin/verify", mode="all")
        assert again["damaged_chunks"] == [] and again["points_damaged"] == []


async def test_new_and_sample_modes(server: ServerProcess) -> None:
    async with server.client() as admin:
        first = await backup(admin, "vm1", {"d0": make_disk("rr", seed=1)})
        await run_job(admin, "/admin/verify", mode="all")
        second = await backup(admin, "vm2", {"d0": make_disk("rr", seed=1) + make_disk("r", seed=9)})
        new = await run_job(admin, "/admin/verify", mode="new")
        assert new["points_checked"] == 1 and new["chunks_checked"] == 3 + 1  # 3 data chunks, 1 page
        assert (await admin.point(second["point_id"]))["verify"]["mode"] == "new"
        sample = await run_job(admin, "/admin/verify", mode="sample", percent=100)
        assert sample["points_checked"] == 2 and sample["chunks_checked"] == 3 + 2  # shared chunks once
        assert (await admin.point(first["point_id"]))["verify"]["ok"] is True
        with pytest.raises(Exception, match="422"):
            await admin.json("POST", "/admin/verify", {"mode": "everything"})


async def test_cli_gc_verify_and_repair_check(server: ServerProcess) -> None:
    """The maintenance commands end to end: gc and verify follow their jobs; repair --check on the
    stopped repository reports damage without changing anything, and exits 1 while it is there."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], capture_output=True, text=True,
                              cwd=ROOT)

    disk = make_disk("rrr", seed=12)
    async with server.client() as admin:
        await backup(admin, "vm1", {"d0": disk})
        gone = await backup(admin, "vm2", {"d0": make_disk("rr", seed=13)})
        await admin.delete_point(gone["point_id"])
    base = ["--server", server.url, "--token", server.admin_token]
    gc = cli("gc", *base, "--json")
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["swept_chunks"] == 3
    verify = cli("verify", *base)
    assert verify.returncode == 0 and "Everything verified." in verify.stdout
    server.stop()
    healthy = cli("repair", "--check", "--data", str(server.data))
    assert healthy.returncode == 0 and "Healthy." in healthy.stdout
    flip_byte_of_chunk(server.data, digest(disk[1 << 20 : 2 << 20]))
    damaged = cli("repair", "--check", "--data", str(server.data), "--json")
    assert damaged.returncode == 1
    report = json.loads(damaged.stdout)
    assert len(report["damaged_chunks"]) == 1 and len(report["damaged_points"]) == 1
    assert cli("repair", "--check", "--data", str(server.data)).returncode == 1  # read-only: still there
    server.start()
