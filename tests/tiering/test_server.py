"""Move mode and the mass-deletion guard in a real server process, driven through the HTTP API and the CLI:
a crash at each step of a move leaves a consistent repository, and a lost points/ directory does not
empty the bucket unless the admin confirms."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chunkyard.wire import Client
from repo_server.engine.chunk_store import MOVED
from repo_server.engine.index import Index
from repo_server.engine.pack import pack_path
from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk, restore
from tests.tiering.conftest import CHUNK, Emulators
from tests.tiering.test_attach import cli, write_config


def index_packs(data: Path) -> dict[int, dict]:
    """The packs column family, read without opening the repository (which would run recovery)."""
    index = Index(data / "index")
    try:
        return {int.from_bytes(k, "little"): json.loads(v) for k, v in index.scan("packs")}
    finally:
        index.close()


def pack_files(data: Path) -> set[int]:
    return {int(p.stem, 16) for p in (data / "packs").glob("*/*.pack")}


async def run_gc(client: Client) -> None:
    job = await client.json("POST", "/admin/gc", {"compact_below": 0.5})
    while job["state"] == "running":
        await asyncio.sleep(0.1)
        job = await client.job(job["id"])
    assert job["state"] == "done", job


def sync(server: ServerProcess, env: dict[str, str], *extra: str):
    return cli("tier", "sync", *extra, "--server", server.url, "--token", server.admin_token, env=env)


@pytest.mark.parametrize("crash", ["tier_move_verified", "tier_move_marked"])
async def test_a_crash_during_a_move_leaves_a_consistent_repository(tmp_path: Path, emulators: Emulators,
                                                                    crash: str) -> None:
    bucket, env = emulators.new_bucket("s3"), emulators.env("s3")
    config = tmp_path / "server.toml"
    config.write_text("[server]\npack_size_mib = 1\n")  # backups first, with no tier that could move them
    site = tmp_path / "site"
    server = ServerProcess(site, chunk_size="256KiB", config=config)
    server.start(env)
    images = {"vm1": make_disk("rrrrrcr", CHUNK, seed=41), "vm2": make_disk("rrrr1", CHUNK, seed=42)}
    try:
        async with server.client() as client:
            points = {vm: (await backup(client, vm, {"d0": image}))["point_id"] for vm, image in images.items()}
    finally:
        server.stop()

    write_config(config, emulators.tier_table("s3", bucket, mode="move", move_after_days=0, interval_seconds=3600))
    server.start(env | {"CHUNKYARD_CRASH_AT": crash}, wait=False)  # the first cycle copies, then moves
    assert server.proc.wait(60) == 137
    packs = index_packs(site)
    moved = {p for p, state in packs.items() if state["state"] == MOVED}
    if crash == "tier_move_verified":  # the cloud copy checked, nothing recorded yet: a local pack as before
        assert not moved and pack_files(site) == set(packs)
    else:  # recorded as moved, its file not yet deleted: recovery finishes the move
        assert len(moved) == 1 and pack_files(site) == set(packs)
    store = emulators.store("s3", bucket=bucket)
    assert {f"packs/{p:016x}.pack" for p in packs} <= {i.key for i in store.list("packs/")}

    server.start(env)
    try:
        synced = sync(server, env, "--json")
        assert synced.returncode == 0, synced.stderr
        (tier,) = json.loads(synced.stdout)
        assert tier["moved_packs"] == len(packs) and tier["local_bytes"] == 0 and tier["move_error"] is None
        assert pack_files(site) == set()
        assert not any(pack_path(site / "packs", p).exists() for p in packs)
        status = cli("tier", "status", "--server", server.url, "--token", server.admin_token, env=env)
        assert f"moved after 0 days: {len(packs)} packs" in status.stdout and "local 0 B" in status.stdout
        async with server.client() as client:
            metrics = await (await client._request("GET", "/metrics")).text()
            samples = {(s.name, s.labels.get("tier")): s.value
                       for family in text_string_to_metric_families(metrics) for s in family.samples}
            assert samples[("chunkyard_tier_local_bytes", "s3")] == 0
            assert samples[("chunkyard_tier_moved_bytes", "s3")] == tier["moved_bytes"]
            for vm, image in images.items():
                assert await restore(client, points[vm], "d0") == image
    finally:
        server.stop()

    # The index stays a cache: moved packs leave stubs (tier, size, records) that a rebuild reads.
    rebuilt = cli("repair", "--rebuild-index", "--data", str(site), env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert {p for p, state in index_packs(site).items() if state["state"] == MOVED} == set(packs)
    checked = cli("repair", "--check", "--data", str(site), env=env)  # offline: the cloud packs are not read
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(packs)} packs live in a cloud tier" in checked.stdout and "Healthy." in checked.stdout
    server.start(env)
    try:
        async with server.client() as client:
            for vm, image in images.items():
                assert await restore(client, points[vm], "d0") == image
    finally:
        server.stop()


async def test_a_lost_points_directory_does_not_empty_the_bucket(tmp_path: Path, emulators: Emulators) -> None:
    bucket, env = emulators.new_bucket("s3"), emulators.env("s3")
    config = tmp_path / "server.toml"
    write_config(config, emulators.tier_table("s3", bucket, interval_seconds=3600, mass_delete_min=2))
    site = tmp_path / "site"
    server = ServerProcess(site, chunk_size="256KiB", config=config)
    store = emulators.store("s3", bucket=bucket)
    server.start(env)
    try:
        async with server.client() as client:
            points = [(await backup(client, f"vm{n}", {"d0": make_disk("rrrr", CHUNK, seed=50 + n)}))["point_id"]
                      for n in range(5)]
            assert sync(server, env).returncode == 0
            await client.delete_point(points[4])  # a normal prune: mirrored
            await run_gc(client)
            synced = sync(server, env)
            assert synced.returncode == 0, synced.stderr
        cloud = {i.key for i in store.list()}
        assert f"points/vm4/{points[4]}.json" not in cloud
        assert len([k for k in cloud if k.startswith("points/")]) == 4
        assert {k for k in cloud if k.startswith("packs/")} == {f"packs/{p:016x}.pack" for p in pack_files(site)}
    finally:
        server.stop()

    shutil.rmtree(site / "points")  # the disaster: startup recovery drops every point, GC then every pack
    server.start(env)
    try:
        async with server.client() as client:
            assert await client.vms() == []
            await run_gc(client)
        assert pack_files(site) == set()
        paused = sync(server, env)
        assert paused.returncode == 2 and "cloud deletions paused" in paused.stderr
        assert "4 of the 4 points" in paused.stderr and "--allow-mass-delete" in paused.stderr
        assert {i.key for i in store.list()} == cloud  # untouched
        status = cli("tier", "status", "--server", server.url, "--token", server.admin_token, env=env)
        assert "deletions paused" in status.stdout
        assert "cloud deletions paused" in (site.parent / "site-server.log").read_text()

        confirmed = sync(server, env, "--allow-mass-delete", "--json")  # the admin meant it
        assert confirmed.returncode == 0, confirmed.stderr
        assert json.loads(confirmed.stdout)[0]["deletions_paused"] is None
        assert [i.key for i in store.list()] == ["repo.toml"]
    finally:
        server.stop()
