"""Copy mode, one uploader cycle at a time, on a repository served in-process and a bucket on an emulator.

The property every test ends on: the bucket, as it stands, is a consistent repository (every point it
holds resolves to chunks in packs it holds, all of which verify).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from repo_server.engine import Repository
from repo_server.engine.gc import GarbageCollector
from repo_server.engine.keyring import paper_key
from repo_server.engine.pack import pack_path
from repo_server.engine.verify import check_repository
from tests.helpers import backup, make_disk
from tests.tiering.conftest import CHUNK, Emulators, Live
from tiering.attach import attach, usable
from tiering.layout import local_path, pack_id_of, pack_key
from tiering.stores.base import Store
from tiering.stores.faulty import Fault, FaultyStore
from tiering.sync import TierSync, TierWorker


def bucket_repository(store: Store, live: Live, target: Path) -> tuple[dict, set[str]]:
    """Open the bucket as a repository (the key copied from the source, which never uploads it) and
    check it: check_repository's report, and the point ids it holds. What a cut upload left (a half
    pack or point) is dropped first, as attach does: no point may need it."""
    source = live.data
    for info in store.list():
        path = local_path(target, info.key)
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(info.key))
        if not usable(info.key, path, live.repo.keyring):
            path.unlink()
    if not (target / "repo.toml").exists():  # its first upload was cut: nothing else can be there yet
        assert not [i.key for i in store.list() if i.key != "repo.toml"]
        return {"healthy": True}, set()
    shutil.copy(source / "repo.key", target / "repo.key")
    repo = Repository(target)
    try:
        return check_repository(repo), {k[2:].decode() for k, _ in repo.index.scan("points", b"p:")}
    finally:
        repo.close()
        shutil.rmtree(target)


def lag_age(tiers: TierSync) -> float:
    """chunkyard_tier_oldest_pending_age_seconds of the only tier, as /metrics would show it."""
    (family,) = [f for f in tiers.metric_families() if f.name == "chunkyard_tier_oldest_pending_age_seconds"]
    (sample,) = family.samples
    return sample.value


async def cycle(worker: TierWorker) -> bool:
    return await asyncio.to_thread(worker.run_cycle)


def sealed_packs(live: Live) -> set[str]:
    return {pack_key(int.from_bytes(k, "little")) for k, v in live.repo.index.scan("packs")
            if json.loads(v)["state"] == "sealed"}


async def test_copy_uploads_everything_once(live: Live, emulators: Emulators, kind: str, tmp_path: Path) -> None:
    store = FaultyStore(emulators.store(kind), [])  # no faults: it counts the calls
    p1 = await backup(live.client, "vm1", {"d0": make_disk("rrrrcz", CHUNK, seed=1)})
    p2 = await backup(live.client, "vm2", {"d0": make_disk("rr1r1", CHUNK, seed=2)})
    await live.client.protect(p2["point_id"], note="audit")
    await live.client.set_retention({"keep_last": 3})
    worker = live.worker(store, kind)
    assert await cycle(worker), worker.status.error

    assert live.repo.chunks.open_pack_id() is None  # sealed for the points that needed it
    keys = {i.key for i in store.inner.list()}
    points = {f"points/vm1/{p1['point_id']}.json", f"points/vm2/{p2['point_id']}.json"}
    assert keys == sealed_packs(live) | points | {f"points/vm2/{p2['point_id']}.protect", "retention.json",
                                                  "repo.toml"}  # never repo.key, tokens or the index
    status = worker.status
    assert (status.state, status.pending_packs, status.pending_bytes, status.pending_points) == ("idle", 0, 0, 0)
    assert status.synced_at is not None and status.uploaded_objects == len(keys) - 1

    puts = store.calls["put"]
    assert await cycle(worker) and store.calls["put"] == puts  # nothing twice
    restarted = live.worker(store, kind)  # tier state from the index: nothing again
    assert await cycle(restarted) and store.calls["put"] == puts
    batch = live.repo.index.batch()  # the state lost with an index rebuild: adopted from a listing
    batch.delete_prefix("meta", b"tier/t/")
    live.repo.index.write(batch)
    adopted = live.worker(store, kind)
    assert await cycle(adopted) and store.calls["put"] == puts + 2  # only the small mutable files

    await live.client.protect(p2["point_id"], False)
    assert await cycle(adopted)
    assert store.inner.head(f"points/vm2/{p2['point_id']}.protect") is None
    report, found = bucket_repository(store.inner, live, tmp_path / "bucket")
    assert report["healthy"] and found == {p1["point_id"], p2["point_id"]}


async def test_points_wait_for_their_packs(live: Live, emulators: Emulators) -> None:
    store = FaultyStore(emulators.store("s3"), [Fault("error", op="put", key="packs/")])
    began = time.time()
    first = await backup(live.client, "vm1", {"d0": make_disk("rrrr", CHUNK)})
    worker = live.worker(store)
    assert not await cycle(worker)
    assert worker.status.state == "error" and "injected error" in worker.status.error
    assert worker.status.pending_points == 1 and worker.status.pending_packs > 0
    # The lag's age: since the first pack filled during the backup, at the latest since the point's commit
    # (its id holds that time).
    assert began - 0.01 <= worker.status.oldest_pending <= int(first["point_id"][:12], 16) / 1000
    tiers = TierSync([], stores=[])
    tiers.workers = [worker]
    before = time.time()
    age = lag_age(tiers)
    assert 0 < before - worker.status.oldest_pending <= age <= time.time() - worker.status.oldest_pending
    assert not [i for i in store.inner.list() if i.key.startswith("points/")]

    await backup(live.client, "vm2", {"d0": make_disk("rr", CHUNK, seed=9)})
    assert not await cycle(worker)
    assert live.repo.chunks.open_pack_id() is not None  # a tier that is down does not seal a pack per cycle
    store.faults.clear()
    assert not await cycle(worker)  # the first good cycle uploads the sealed packs only...
    assert worker.status.error is None and worker.status.last_error
    assert not [i for i in store.inner.list() if i.key.startswith("points/")]
    assert await cycle(worker)  # ...the next one seals and uploads the points
    assert len([i for i in store.inner.list() if i.key.startswith("points/")]) == 2
    assert worker.status.oldest_pending is None and lag_age(tiers) == 0


async def test_gc_deletions_reach_the_cloud(live: Live, emulators: Emulators, kind: str, tmp_path: Path) -> None:
    store = emulators.store(kind)
    gone = await backup(live.client, "vm1", {"d0": make_disk("rrrrrr", CHUNK, seed=3)})
    kept = await backup(live.client, "vm2", {"d0": make_disk("rrrrr", CHUNK, seed=4)})
    worker = live.worker(store, kind)
    assert await cycle(worker)
    before = {i.key for i in store.list("packs/")}
    await live.client.delete_point(gone["point_id"])
    stats = await asyncio.to_thread(GarbageCollector(live.repo).run)
    assert stats.packs_deleted + stats.packs_compacted > 0
    assert await cycle(worker), worker.status.error
    after = {i.key for i in store.list("packs/")}
    assert after == sealed_packs(live) and before - after  # the cloud mirrors what GC left
    assert store.head(f"points/vm1/{gone['point_id']}.json") is None
    assert worker.status.deleted_objects == len(before - after) + 1 and worker.status.locked_deletes == 0
    report, found = bucket_repository(store, live, tmp_path / "bucket")
    assert report["healthy"] and found == {kept["point_id"]}


async def test_locked_copies_stay_and_locks_are_extended(live: Live, emulators: Emulators, tmp_path: Path) -> None:
    """S3 Object Lock on moto: a deleted point's locked copy stays, and so do the packs it needs."""
    store = emulators.store("s3", locked=True)
    gone = await backup(live.client, "vm1", {"d0": make_disk("rrrrrr", CHUNK, seed=5)})
    kept = await backup(live.client, "vm2", {"d0": make_disk("rrrrr", CHUNK, seed=6)})
    worker = live.worker(store, immutable_days=1, lock_generation_days=2)
    assert await cycle(worker)
    now = datetime.now(UTC)
    point_lock = store.head(f"points/vm1/{gone['point_id']}.json").retain_until
    pack_lock = store.head(min(sealed_packs(live))).retain_until
    assert abs(point_lock - now - timedelta(days=1)) < timedelta(minutes=1)
    assert abs(pack_lock - now - timedelta(days=3)) < timedelta(minutes=1)  # one generation beyond

    before = {i.key for i in store.list("packs/")}
    await live.client.delete_point(gone["point_id"])
    await asyncio.to_thread(GarbageCollector(live.repo).run)
    assert await cycle(worker)
    assert store.head(f"points/vm1/{gone['point_id']}.json") is not None
    assert before <= {i.key for i in store.list("packs/")}  # the locked point may need every one of them
    assert worker.status.locked_deletes > 0
    report, found = bucket_repository(store, live, tmp_path / "bucket")
    assert report["healthy"] and found == {gone["point_id"], kept["point_id"]}

    batch = live.repo.index.batch()  # pretend a generation went by: every local pack is due again
    for key, value in live.repo.index.scan("meta", b"tier/t/packs/"):
        batch.put("meta", key, json.dumps(json.loads(value) | {"until": now.timestamp()}).encode())
    live.repo.index.write(batch)
    worker = live.worker(store, immutable_days=1, lock_generation_days=2)
    assert await cycle(worker) and worker.status.retention_extended == len(sealed_packs(live))


async def test_interrupted_uploads_never_break_the_bucket(live: Live, emulators: Emulators, kind: str,
                                                          tmp_path: Path) -> None:
    """Cut uploads (half objects), timeouts after the store acted, and refused calls, at random (seeded).
    After every cycle the bucket is a consistent repository; once the faults stop, the next cycle completes."""
    inner = emulators.store(kind)
    store = FaultyStore(inner, [Fault("cut", op="put", probability=0.3), Fault("timeout", op="put", probability=0.2),
                                Fault("error", probability=0.1)], seed=11)
    worker = live.worker(store, kind, concurrency=1)  # one upload at a time: the seed replays exactly
    expected = set()
    images = {"vm1": make_disk("rrrrc", CHUNK, seed=7), "vm2": make_disk("rrr1r", CHUNK, seed=8)}
    for n in range(10):
        if n < 4:
            vm = f"vm{n % 2 + 1}"
            point = await backup(live.client, vm, {"d0": images[vm][: (n + 2) * CHUNK]})
            expected.add(point["point_id"])
        await cycle(worker)
        report, found = bucket_repository(inner, live, tmp_path / "bucket")
        assert report["healthy"], report
    store.faults.clear()  # the weather clears: the copy completes (a cycle after a failed one only uploads packs)
    assert await cycle(worker) or await cycle(worker), worker.status.error
    report, found = bucket_repository(inner, live, tmp_path / "bucket")
    assert report["healthy"] and found == expected

    assert store.fired[0] > 0 and store.fired[1] > 0  # cuts and timeouts really happened
    assert all(i.size == pack_path(live.repo.chunks.root, pack_id_of(i.key)).stat().st_size
               for i in inner.list("packs/"))  # every half object was replaced

    inner.put("packs/00000000000000ff.pack", b"CYPACK\x00\x01 cut short")  # as a non-atomic store might keep
    attached = attach(inner, tmp_path / "attached", paper_key=paper_key(live.repo.keyring.master))
    assert attached["skipped"] == ["packs/00000000000000ff.pack"] and attached["points"] == len(expected)


async def test_a_bucket_prefix_holds_one_repository(live: Live, emulators: Emulators) -> None:
    store = emulators.store("s3")
    store.put("repo.toml", b'repository_id = "someone-else"\n')
    worker = live.worker(store)
    assert not await cycle(worker)
    assert "holds repository someone-else" in worker.status.error
    assert [i.key for i in store.list()] == ["repo.toml"]
