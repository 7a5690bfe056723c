"""Move mode (capacity tier), on a repository served in-process and a bucket on moto or Azurite.

Points are aged through the worker's injectable clock, never by sleeping. Every restore goes through the
HTTP server (raw and VHDX) with the moved packs gone from local disk.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest

from chunkyard.vdisk import open_vhdx
from chunkyard.wire import ApiError
from repo_server.engine.chunk_store import MOVED
from repo_server.engine.gc import GarbageCollector
from repo_server.engine.pack import pack_path
from repo_server.engine.restore import DiskImage
from repo_server.engine.verify import Verifier
from tests.helpers import backup, make_disk, restore
from tests.tiering.conftest import CHUNK, Emulators, Live
from tiering.layout import pack_key
from tiering.move import DAY
from tiering.remote import RecordCache
from tiering.stores.faulty import Fault, FaultyStore
from tiering.sync import TierWorker

SECTOR = 512


async def cycle(worker: TierWorker, now: float | None = None) -> None:
    """A cycle with its move pass (forced, as `POST /tiers/sync` does), at `now` on the worker's clock."""
    if now is not None:
        worker.clock = lambda: now
    worker.wake()
    assert await asyncio.to_thread(worker.run_cycle), worker.status.error


def local_pack_files(live: Live) -> dict[int, int]:
    return {int(p.stem, 16): p.stat().st_size for p in (live.data / "packs").glob("*/*.pack")}


def packs_in_index(live: Live, state: str) -> set[int]:
    return {int.from_bytes(k, "little") for k, v in live.repo.index.scan("packs") if json.loads(v)["state"] == state}


def packs_of(live: Live, point_id: str) -> set[int]:
    """The packs a point needs (its manifest pages and their chunks), worked out through the restore path."""
    repo = live.repo
    point = repo.points.get(point_id)
    found = set()
    for disk in point["disks"]:
        image = DiskImage(repo, point, disk["disk_id"])
        try:
            found |= {loc.pack_id for loc in image.locations(0, image.chunks) if loc is not None}
            found |= {loc.pack_id for loc in repo.index.locate_many(image.root) if loc is not None}
        finally:
            image.close()
    return found


async def restores_bit_exact(live: Live, expected: dict[str, bytes], tmp_path: Path) -> None:
    """Every point's disk d0, raw and as VHDX, through the HTTP server."""
    for point_id, image in expected.items():
        assert await restore(live.client, point_id, "d0") == image
        whole = b"".join([p async for p in live.client.stream_disk(point_id, "d0", fmt="vhdx")])
        with open_vhdx(io.BytesIO(whole)) as vhdx:
            assert vhdx.read(0, vhdx.virtual_size) == image + bytes(-len(image) % SECTOR)


async def created(live: Live, point_id: str) -> float:
    return (await live.client.point(point_id))["created"]


async def test_old_packs_move_and_every_point_restores_from_the_cloud(live: Live, emulators: Emulators, kind: str,
                                                                      tmp_path: Path) -> None:
    store = FaultyStore(emulators.store(kind), [])  # no faults: it counts the calls
    first = make_disk("rrrrrrcz", CHUNK, seed=1)
    second = first[:CHUNK] + make_disk("rr", CHUNK, seed=2) + first[3 * CHUNK :]  # churn
    third = second[: 5 * CHUNK] + make_disk("r", CHUNK, seed=3) + second[6 * CHUNK :]
    other = make_disk("rrrr", CHUNK, seed=4)
    p1 = (await backup(live.client, "vm1", {"d0": first}))["point_id"]
    p2 = (await backup(live.client, "vm1", {"d0": second}))["point_id"]
    p3 = (await backup(live.client, "vm2", {"d0": other}))["point_id"]
    worker = live.worker(store, kind, mode="move", move_after_days=30)
    await cycle(worker)  # all young: copied, nothing moved
    assert (worker.status.moved_packs, worker.status.move_after_days) == (0, 30)
    p4 = (await backup(live.client, "vm1", {"d0": third}))["point_id"]
    expected = {p1: first, p2: second, p3: other, p4: third}
    maps = {p: await live.client.disk_map(p, "d0") for p in expected}
    disk_before = sum(local_pack_files(live).values())

    # p1-p3 are older than 30 days, p4 is not: what p4 needs stays, every other pack moves.
    await cycle(worker, (await created(live, p3) + await created(live, p4)) / 2 + 30 * DAY)
    moved = packs_in_index(live, MOVED)
    assert moved == (packs_of(live, p1) | packs_of(live, p2) | packs_of(live, p3)) - packs_of(live, p4)
    assert moved and not moved & local_pack_files(live).keys()
    assert worker.status.moved_packs == worker.status.moved_since_start == len(moved)
    assert worker.status.move_error is None
    assert {pack_key(p) for p in moved} <= {i.key for i in store.inner.list("packs/")}
    await restores_bit_exact(live, expected, tmp_path)
    assert worker.status_dict()["cloud_reads"] > 0

    await cycle(worker, time.time() + 1000 * DAY)  # now every point is old: every pack moves
    assert local_pack_files(live) == {} and packs_in_index(live, "sealed") == set()
    left = sum(p.stat().st_size for p in (live.data / "packs").rglob("*") if p.is_file())  # the stubs
    assert left < disk_before / 50
    status = worker.status_dict()
    assert status["local_bytes"] == 0 and status["moved_bytes"] == status["cloud_bytes"] >= disk_before
    reads = status["cloud_reads"]
    await restores_bit_exact(live, expected, tmp_path)
    assert {p: await live.client.disk_map(p, "d0") for p in expected} == maps
    status = worker.status_dict()
    assert status["cloud_reads"] > reads and status["cache_hits"] > 0
    reads = status["cloud_reads"]
    await restores_bit_exact(live, expected, tmp_path)  # the second time from the local cache
    assert worker.status_dict()["cloud_reads"] == reads

    stats = await asyncio.to_thread(Verifier(live.repo, mode="all").run)  # reads each moved pack from the cloud
    assert stats.packs_from_cloud == len(packs_in_index(live, MOVED)) and not stats.damaged_chunks
    assert stats.chunks_checked == live.repo.chunks.chunk_count

    vm2_only = packs_of(live, p3) - packs_of(live, p1) - packs_of(live, p2) - packs_of(live, p4)
    assert vm2_only
    await live.client.delete_point(p3)
    gc = await asyncio.to_thread(GarbageCollector(live.repo, compact_below=0.99).run)
    assert gc.packs_compacted == 0 and local_pack_files(live) == {}  # moved packs are never rewritten locally
    assert not vm2_only & packs_in_index(live, MOVED)  # dead moved packs leave the index...
    await cycle(worker)
    assert not {pack_key(p) for p in vm2_only} & {i.key for i in store.inner.list("packs/")}  # ...and the cloud
    del expected[p3]
    await restores_bit_exact(live, expected, tmp_path)


async def test_reads_are_retried_through_transient_faults(live: Live, emulators: Emulators, kind: str,
                                                          tmp_path: Path) -> None:
    image = make_disk("rrrrcrr", CHUNK, seed=5)
    point = (await backup(live.client, "vm1", {"d0": image}))["point_id"]
    worker = live.worker(emulators.store(kind), kind, mode="move", move_after_days=1, cache_mib=0)
    await cycle(worker, time.time() + 2 * DAY)
    assert worker.status.moved_packs > 0 and local_pack_files(live) == {}
    faulty = FaultyStore(worker.remote.store, [Fault("error", op="get", probability=0.3),
                                               Fault("timeout", op="get", probability=0.2, delay=0.01),
                                               Fault("slow", op="get", probability=0.2, delay=0.02)], seed=3)
    worker.remote.store = faulty
    for _ in range(2):  # no cache: every read goes to the cloud
        await restores_bit_exact(live, {point: image}, tmp_path)
    assert faulty.fired[0] > 0 and faulty.fired[1] > 0 and faulty.fired[2] > 0
    assert worker.remote.retries >= faulty.fired[0] + faulty.fired[1]


async def test_an_unreachable_cloud_is_a_503_never_wrong_bytes(live: Live, emulators: Emulators) -> None:
    image = make_disk("rrrr", CHUNK, seed=6)
    point = (await backup(live.client, "vm1", {"d0": image}))["point_id"]
    worker = live.worker(emulators.store("s3"), mode="move", move_after_days=1, cache_mib=0)
    await cycle(worker, time.time() + 2 * DAY)
    inner = worker.remote.store
    worker.remote.store = FaultyStore(inner, [Fault("error")])  # nothing answers
    for fmt in ("raw", "vhdx"):
        with pytest.raises(ApiError) as refused:
            await anext(live.client.stream_disk(point, "d0", fmt=fmt))
        assert refused.value.status == 503 and refused.value.code == "tier_unavailable"
        assert "cloud tier 't'" in str(refused.value) and "reachable" in str(refused.value)
    worker.remote.store = FaultyStore(inner, [Fault("error", op="get")])  # answers HEAD, then fails mid-stream
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await restore(live.client, point, "d0")  # the connection is cut short: never a wrong byte
    live.repo.chunks.remote = None  # the tier's table removed from the configuration
    with pytest.raises(ApiError) as refused:
        await anext(live.client.stream_disk(point, "d0"))
    assert refused.value.status == 503 and "add its [[tier]] table back" in str(refused.value)
    worker.remote.store = inner  # back: restores work again
    live.repo.chunks.remote = worker.remote
    assert await restore(live.client, point, "d0") == image


async def test_the_read_cache_stays_within_its_bound(live: Live, emulators: Emulators, tmp_path: Path) -> None:
    image = make_disk("rrrrrrrr", CHUNK, seed=7)  # 2 MiB of records against a 1 MiB cache
    point = (await backup(live.client, "vm1", {"d0": image}))["point_id"]
    worker = live.worker(emulators.store("s3"), mode="move", move_after_days=1, cache_mib=1)
    await cycle(worker, time.time() + 2 * DAY)
    cache_dir = live.data / "tier-cache" / "t"
    for _ in range(2):
        assert await restore(live.client, point, "d0") == image
        status = worker.status_dict()
        assert 0 < status["cache_bytes"] <= 1 << 20
        assert sum(p.stat().st_size for p in cache_dir.iterdir()) == status["cache_bytes"]
    assert status["cloud_reads"] > len(image) // CHUNK  # evicted records were fetched again


def test_record_cache_is_an_lru_and_adopts_its_directory(tmp_path: Path) -> None:
    cache = RecordCache(tmp_path / "c", 300)
    for name in ("a", "b", "c"):
        cache.put(name, name.encode() * 100)
    assert cache.get("a") == b"a" * 100  # a is now the most recent
    cache.put("d", b"d" * 100)  # b, the least recently used, goes
    assert cache.get("b") is None and cache.size == 300
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a", "c", "d"]
    cache.put("huge", b"x" * 301)  # larger than the whole cache: not kept
    assert cache.get("huge") is None
    (tmp_path / "c" / ".x.123").write_bytes(b"cut short")
    smaller = RecordCache(tmp_path / "c", 200)  # a restart with a smaller bound trims the oldest
    assert smaller.size == 200 and sorted(p.name for p in (tmp_path / "c").iterdir()) == ["a", "d"]
    assert smaller.get("d") == b"d" * 100 and (smaller.hits, smaller.misses) == (1, 0)


async def test_a_copy_tier_keeps_packs_local_until_it_holds_them(live: Live, emulators: Emulators) -> None:
    """With a copy tier beside the move tier, a pack moves only once both hold it."""
    image = make_disk("rrrr", CHUNK, seed=8)
    await backup(live.client, "vm1", {"d0": image})
    mover = live.worker(emulators.store("s3"), mode="move", move_after_days=1)
    mover.peers = ["copy"]
    await cycle(mover, time.time() + 2 * DAY)
    assert mover.status.moved_packs == 0 and local_pack_files(live)
    copier = TierWorker(live.repo, mover.tier.__class__(name="copy", kind="azure", bucket="-"),
                        emulators.store("azure"), backoff=mover.backoff)
    assert await asyncio.to_thread(copier.run_cycle)
    await cycle(mover)
    assert mover.status.moved_packs > 0 and local_pack_files(live) == {}
    assert all(pack_path(live.repo.chunks.root, p).exists() is False for p in packs_in_index(live, MOVED))


@pytest.mark.parametrize("body", [b"garbage\xff", b"[]", b'"yes"', b'{"allow_mass_delete": 1}',
                                  b'{"allow_mass_delete": "true"}', b'{"allow_mass_delete": true, "force": true}',
                                  b'{"allow_mass_delete": null}', b"{" * 100_000, b'{"x": "' + b"y" * 900_000 + b'"}'])
async def test_a_bad_sync_request_is_refused(live: Live, body: bytes) -> None:
    resp = await live.client._session.post(f"{live.client.base}/tiers/sync", data=body)
    async with resp:
        assert resp.status in (400, 422), await resp.text()
        assert (await resp.json())["error"] in ("bad_json", "bad_field")


async def test_sync_requests(live: Live) -> None:
    too_big = await live.client._session.post(f"{live.client.base}/tiers/sync", data=b" " * (2 << 20))
    async with too_big:
        assert too_big.status == 413
    for good in (None, {}, {"allow_mass_delete": False}, {"allow_mass_delete": True}):
        assert (await live.client.json("POST", "/tiers/sync", good))["tiers"] == []


async def test_a_dead_moved_pack_under_object_lock_stays_in_the_bucket(live: Live, emulators: Emulators) -> None:
    """GC drops a dead moved pack from the index, but its cloud copy stays, counted as a locked deletion:
    the deleted point's copy is still locked and may need it (and S3 Object Lock, which moto enforces on
    the version, would refuse the pack's delete too). That a lock cannot be shortened rests on AWS."""
    store = emulators.store("s3", locked=True)
    kept = (await backup(live.client, "vm1", {"d0": make_disk("rrrr", CHUNK, seed=9)}))["point_id"]
    gone = (await backup(live.client, "vm2", {"d0": make_disk("rrrr", CHUNK, seed=10)}))["point_id"]
    worker = live.worker(store, mode="move", move_after_days=1, immutable_days=1)
    await cycle(worker, time.time() + 2 * DAY)
    dead = packs_of(live, gone) - packs_of(live, kept)
    assert dead and dead <= packs_in_index(live, MOVED)
    await live.client.delete_point(gone)
    await asyncio.to_thread(GarbageCollector(live.repo).run)
    assert not dead & packs_in_index(live, MOVED)
    await cycle(worker)
    assert {pack_key(p) for p in dead} <= {i.key for i in store.list("packs/")}
    assert worker.status.locked_deletes >= len(dead)
    assert await restore(live.client, kept, "d0") == make_disk("rrrr", CHUNK, seed=9)


async def test_a_pack_whose_cloud_copy_does_not_verify_stays_local(live: Live, emulators: Emulators,
                                                                    kind: str) -> None:
    image = make_disk("rrrrrrrr", CHUNK, seed=11)
    point = (await backup(live.client, "vm1", {"d0": image}))["point_id"]
    store = emulators.store(kind)
    worker = live.worker(store, kind, mode="move", move_after_days=1)
    await cycle(worker)  # copied; nothing old yet
    local = local_pack_files(live)
    damaged, cut = sorted(local)[:2]
    data = pack_path(live.repo.chunks.root, damaged).read_bytes()
    store.put(pack_key(damaged), data[:-10] + bytes(10), if_absent=False)  # same size, different trailer
    store.put(pack_key(cut), pack_path(live.repo.chunks.root, cut).read_bytes()[:-1], if_absent=False)
    await cycle(worker, time.time() + 2 * DAY)
    assert {damaged, cut} <= local_pack_files(live).keys()  # never deleted locally
    assert not {damaged, cut} & packs_in_index(live, MOVED)
    assert packs_in_index(live, MOVED) == local.keys() - {damaged, cut}
    assert "differs from the local pack" in worker.status.move_error or "instead of" in worker.status.move_error
    assert await restore(live.client, point, "d0") == image
    await cycle(worker)  # the bad copies were deleted and forgotten: uploaded again, verified, moved
    assert local_pack_files(live) == {} and worker.status.move_error is None
    assert await restore(live.client, point, "d0") == image
