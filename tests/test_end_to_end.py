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


async def test_disk_resize_between_points(collector: Client, admin: Client) -> None:
    """A disk that grows (old short tail becomes a full chunk) and then shrinks (new short tail), with
    only RCT-style changed ranges sent: every point restores bit-exact."""
    small = make_disk("rr", tail=300_000, seed=5)
    p1 = await backup(collector, "vm-r", {"d0": small})
    grown = small + bytes(3 * MiB + 4096 - 300_000)  # the grown area reads as zeros, as on Hyper-V
    p2 = await backup(collector, "vm-r", {"d0": grown}, only={"d0": set()})
    shrunk = grown[: MiB + 777]
    p3 = await backup(collector, "vm-r", {"d0": shrunk}, only={"d0": set()})
    regrown = bytearray(shrunk + bytes(6 * MiB))
    regrown[5 * MiB : 5 * MiB + 3] = b"new"
    p4 = await backup(collector, "vm-r", {"d0": bytes(regrown)}, only={"d0": {5}})
    for point, image in ((p1, small), (p2, grown), (p3, shrunk), (p4, bytes(regrown))):
        assert await restore(admin, point["point_id"], "d0") == image
    info = await admin.point(p4["point_id"])
    assert info["disks"][0]["size"] == len(regrown)


async def test_two_disks_sparse_map_and_abort(collector: Client, admin: Client) -> None:
    """Two disks in one point, a sparse disk, the digest map, and an aborted session leaving nothing."""
    sparse = bytearray(40 * MiB + 5)
    for i in (1, 17, 39, 40):
        sparse[i * MiB : i * MiB + 5] = b"data!"
    disks = {"sys": make_disk("rrc", seed=7), "data": bytes(sparse)}
    session = await collector.create_session(host="h", vm={"id": "vm-m"}, disks=[
        {"disk_id": d, "size": len(img)} for d, img in disks.items()])
    await collector.abort(session["session_id"])
    assert await admin.vms() == []
    session = await backup(collector, "vm-m", disks, commit=False)
    vmcx = make_disk("c", seed=8)[:300_000] + bytes(MiB) + b"end"  # a config file with a zero run
    await collector.put_blob(session["session_id"], "vm-m.vmcx", vmcx)
    point = await collector.commit(session["session_id"])
    assert await admin.blob(point["point_id"], "vm-m.vmcx") == vmcx
    for disk_id, image in disks.items():
        assert await restore(admin, point["point_id"], disk_id) == image
    digests = await admin.disk_map(point["point_id"], "data")
    assert len(digests) == 32 * 41
    assert digests[:32] == bytes(32) and digests[32:64] != bytes(32)
    assert await admin.disk_map(point["point_id"], "data", 16, 41) == digests[16 * 32 :]  # a window, by Range
    assert (await admin.point(point["point_id"]))["disks"][1]["allocated_chunks"] == 4


async def test_vhdx_download_is_valid_and_ranges_match(collector: Client, admin: Client, tmp_path) -> None:
    """The streamed VHDX passes qemu-img check, converts back to the exact raw image, reads the same
    with our reader, and any byte range equals the same slice of the whole file."""
    import subprocess

    from chunkyard.vdisk import open_vhdx
    from tests.conftest import require_module, require_tool

    qemu_img = require_tool("qemu-img")
    disk = make_disk("rzr1zzc1", tail=70_001, seed=31)  # not a whole sector
    point = await backup(collector, "vm-v", {"d0": disk})
    whole = b"".join([p async for p in admin.stream_disk(point["point_id"], "d0", fmt="vhdx")])
    path = tmp_path / "d0.vhdx"
    path.write_bytes(whole)
    subprocess.run([qemu_img, "check", "-f", "vhdx", str(path)], check=True, capture_output=True)
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(path), str(tmp_path / "d0.raw")],
                   check=True)
    padded = disk + bytes(-len(disk) % 512)  # VHDX sizes are whole sectors
    assert (tmp_path / "d0.raw").read_bytes() == padded
    with open_vhdx(path) as vhdx:
        assert vhdx.read(0, vhdx.virtual_size) == padded
    pyvhdi = require_module("pyvhdi")
    f = pyvhdi.file()
    f.open(str(path))
    try:
        assert f.read_buffer_at_offset(f.media_size, 0) == padded
    finally:
        f.close()
    for start, stop in ((0, 1), (1 << 20, 3 << 20), (len(whole) - 5000, len(whole)), (12345, 4 << 20)):
        part = b"".join([p async for p in admin.stream_disk(point["point_id"], "d0", fmt="vhdx", start=start,
                                                             stop=stop)])
        assert part == whole[start:stop]


async def test_collector_builds_only_on_its_own_points(server, collector: Client, admin: Client) -> None:
    """A base copies a manifest whose map its session's owner may read: a second collector's "latest" is
    its own latest point (none here: a full), and naming another collector's point is refused."""
    from chunkyard.wire import ApiError

    disk = make_disk("rr", seed=41)
    first = await backup(collector, "vm-s", {"d0": disk})
    other_token = (await admin.create_token("collector", "other host"))["token"]
    async with server.client(other_token) as other:
        session = await other.create_session(host="h2", vm={"id": "vm-s"}, disks=[{"disk_id": "d0",
                                                                                  "size": len(disk)}])
        assert session["base_point"] is None
        try:
            await other.create_session(host="h2", vm={"id": "vm-s"}, base=first["point_id"],
                                       disks=[{"disk_id": "d0", "size": len(disk)}])
            raise AssertionError("another collector's point was accepted as a base")
        except ApiError as e:
            assert e.status == 403
    admin_session = await admin.create_session(host="h", vm={"id": "vm-s"}, disks=[{"disk_id": "d0",
                                                                                    "size": len(disk)}])
    assert admin_session["base_point"] == first["point_id"]
