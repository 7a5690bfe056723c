"""End to end over HTTP against a real server process: full, incremental, global dedup, restore."""

from __future__ import annotations

from chunkyard.wire import Client
from tests.helpers import MiB, backup, make_disk, restore


async def test_full_incremental_and_global_dedup(collector: Client, admin: Client) -> None:
    disk = make_disk("rrz1c1zrr", tail=12345)  # random, zero, repeated and compressible chunks, short tail
    full = await backup(collector, "vm-a", {"d0": disk})
    assert full["uploaded"] == 7  # r r 1 c r r + tail: the repeated "1" goes once, zeros never
    assert await restore(admin, full["point_id"], "d0") == disk

    changed = bytearray(disk)
    changed[2 * MiB : 2 * MiB + 10] = b"x" * 10  # a zero chunk becomes data
    changed[7 * MiB + 5] ^= 0xFF
    changed = bytes(changed)
    inc = await backup(collector, "vm-a", {"d0": changed}, only={"d0": {2, 7}})
    assert inc["uploaded"] == 2
    assert inc["stats"]["changed_bytes"] == 2 * MiB
    assert await restore(admin, inc["point_id"], "d0") == changed
    assert await restore(admin, full["point_id"], "d0") == disk  # the older point is untouched

    clone = await backup(collector, "vm-b", {"d0": changed}, host="host2")
    assert clone["uploaded"] == 0  # global dedup: another VM's identical disk uploads nothing
    assert await restore(admin, clone["point_id"], "d0") == changed

    stats = await admin.repository()
    assert stats["point_count"] == 3 and stats["vm_count"] == 2
    assert stats["dedup_ratio"] > 2
    points = await admin.points("vm-a")
    assert [p["point_id"] for p in points] == [full["point_id"], inc["point_id"]]
    assert points[1]["base_point"] == full["point_id"]
