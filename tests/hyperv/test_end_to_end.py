"""The Hyper-V source end to end: fake host (WinRM transport boundary) + real Samba + real server.

No Windows host can run here: the host is faked at pywinrm's transport boundary (fakehost.py) with
answers modelled on documented and recorded outputs, while the disk data path is real: qemu-img
VHDX files served by smbd and read through smbprotocol, backed up by the real pipeline into a real
`chunkyard serve` process, and restored bit-exact.
"""

from __future__ import annotations

import hashlib
import io

import pytest

from chunkyard.progress import Progress
from chunkyard.wire import Client
from collectors.pipeline import Options, Result, run_backup
from collectors.sources.hyperv import HyperVBackup
from collectors.sources.hyperv.source import NOT_ASKED
from tests.helpers import Interrupt, KillAt, restore

from .conftest import Lab, MiB


def quiet() -> Progress:
    return Progress(None, "test", io.StringIO())


async def backup(lab: Lab, client: Client, progress: Progress | None = None, **options) -> tuple[Result, HyperVBackup]:
    with lab.source().begin("web01") as b:
        result = await run_backup(client, b, options=Options(**options), progress=progress or quiet())
    return result, b


def digest(data: bytes) -> str:
    """Compare disk images by digest: a failing assert on two 64 MiB values would take pytest ages to diff."""
    return hashlib.sha256(data).hexdigest()


async def restored(admin: Client, result: Result, lab: Lab) -> dict[str, str]:
    return {d.local_path.name: digest(await restore(admin, result.point_id, d.virtual_disk_id.lower()))
            for d in lab.vm.disks}


def current(lab: Lab) -> dict[str, str]:
    return {d.local_path.name: digest(lab.raw(d.local_path.name)) for d in lab.vm.disks}


def disk_id(lab: Lab, name: str) -> str:
    return lab.disk(name).virtual_disk_id.lower()


async def test_full_then_rct_incremental_restore_bit_exact(lab: Lab, collector: Client, admin: Client) -> None:
    first, b1 = await backup(lab, collector)
    assert [d.plan for d in first.disks] == ["full", "full"]
    assert b1.consistency == "application" and not b1.consistency_notes
    assert b1.fallback_reason == dict.fromkeys([disk_id(lab, "sys.vhdx"), disk_id(lab, "data.vhdx")], NOT_ASKED)
    assert first.read_bytes == 6 * MiB + 5 * MiB  # only allocated blocks are read
    assert (lab.transport.opened, lab.transport.closed) == (1, 1)  # one WinRM shell for the whole backup
    before = current(lab)
    assert await restored(admin, first, lab) == before
    point = await admin.point(first.point_id)
    assert point["consistency"] == "application"
    snapshot = b1.checkpoint.instance_id.split(":")[1]
    assert sorted(point["blobs"]) == [f"{snapshot}.vmcx", f"{snapshot}.vmgs"]
    vmcx = await admin.blob(first.point_id, f"{snapshot}.vmcx")
    assert vmcx == f".vmcx of web01 at {b1.checkpoint.instance_id}".encode() * 100
    assert not lab.fake.snapshots, "the checkpoint was converted: nothing may be left behind"
    assert len(lab.fake.points) == 1
    assert b1.checkpoint.name.startswith("chunkyard-col1-")

    lab.write("sys.vhdx", 5 * MiB + 4096, 8192, 0x66)  # one chunk, inside a block that was never written
    lab.write("sys.vhdx", 41 * MiB, 3 * MiB, 0x77)  # crosses the 40 MiB window of the change query
    second, b2 = await backup(lab, collector)
    plans = {d.disk_id: d for d in second.disks}
    sys_result, data_result = plans[disk_id(lab, "sys.vhdx")], plans[disk_id(lab, "data.vhdx")]
    assert sys_result.plan == data_result.plan == "tracked"
    assert b2.fallback_reason == dict.fromkeys(b2.fallback_reason)  # RCT answered for every disk
    assert sys_result.read_bytes == 4 * MiB and data_result.read_bytes == 0
    assert len(lab.fake.ops("changes")) == 2 + 1  # sys: 64 MiB in 40 MiB windows; data: one call
    assert second.uploaded_chunks == 2  # the three 0x77 chunks are identical: one upload
    after = current(lab)
    assert await restored(admin, second, lab) == after
    assert await restored(admin, first, lab) == before  # the first point is untouched
    assert len(lab.fake.points) == 1 and b2.pruned and b2.pruned[0] not in lab.fake.points  # only the new one


async def test_rct_invalid_falls_back_to_full_read_and_uploads_only_changes(lab: Lab, collector: Client,
                                                                            admin: Client) -> None:
    await backup(lab, collector)
    lab.write("sys.vhdx", 10 * MiB, MiB, 0x99)
    lab.disk("sys.vhdx").rct_valid = False  # e.g. the VM was moved and RCT reset
    result, b = await backup(lab, collector)
    plans = {d.disk_id: d for d in result.disks}
    sys_id = disk_id(lab, "sys.vhdx")
    assert plans[sys_id].plan == "compare" and plans[disk_id(lab, "data.vhdx")].plan == "tracked"
    assert "change query failed" in b.fallback_reason[sys_id] and "32773" in b.fallback_reason[sys_id]
    assert plans[sys_id].read_bytes == 6 * MiB  # everything allocated was read ...
    assert result.uploaded_chunks == 1  # ... but only the changed chunk was sent
    assert await restored(admin, result, lab) == current(lab)




async def test_failure_mid_backup_destroys_checkpoint_and_next_run_is_incremental(
        lab: Lab, collector: Client, admin: Client) -> None:
    await backup(lab, collector)
    lab.write("sys.vhdx", 20 * MiB, MiB, 0xAB)
    with pytest.raises(Interrupt):
        await backup(lab, collector, progress=KillAt(MiB // 2))
    created = lab.fake.ops("create_checkpoint")
    destroyed = lab.fake.ops("destroy_checkpoint")
    assert len(created) == 2 and len(destroyed) == 1, "the failed run's checkpoint must be destroyed"
    assert not lab.fake.snapshots and len(lab.fake.points) == 1  # the committed point's reference point stays
    assert lab.transport.shells == set(), "the WinRM shell is closed after a failure too"

    third, b3 = await backup(lab, collector)
    assert [d.plan for d in third.disks] == ["tracked", "tracked"]
    assert third.read_bytes == MiB
    assert await restored(admin, third, lab) == current(lab)
    assert b3.pruned  # the first run's reference point went after this commit


async def test_conversion_failure_destroys_checkpoint(lab: Lab, collector: Client) -> None:
    lab.fake.refuse["convert_checkpoint"] = "The operation cannot be performed while the object is in use."
    with pytest.raises(Exception, match=r"ConvertToReferencePoint failed"):
        await backup(lab, collector)
    assert len(lab.fake.ops("destroy_checkpoint")) == 1
    assert not lab.fake.snapshots and not lab.fake.points
