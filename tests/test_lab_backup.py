"""Issue 4's end-to-end loop on the real server: a lab fleet from one template -> full backups ->
churn -> RCT-style incrementals -> every point restores bit-exact (checked against qemu-img's reading
of the disk at that moment); a tracking reset falls back to a full read that uploads only what changed."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from chunkyard.progress import Progress
from chunkyard.wire import Client
from collectors.pipeline import Options, run_backup
from collectors.sources.lab import LabSource, churn, init_lab, reset_tracking
from tests.conftest import require_tool
from tests.helpers import MiB, restore


def raw_of(vhdx: Path, out: Path) -> bytes:
    """The disk as qemu-img reads it: the independent oracle for what a restore must return."""
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(out)],
                   check=True)
    return out.read_bytes()


async def backup_vm(client: Client, lab: Path, vm: str, **options) -> object:
    with LabSource(lab).begin(vm) as b:
        return await run_backup(client, b, options=Options(**options), progress=Progress(None, vm, io.StringIO()))


async def test_lab_fleet_full_incremental_reset(tmp_path: Path, collector: Client, admin: Client) -> None:
    lab = tmp_path / "lab"
    vms = init_lab(lab, vms=3, disk_size=48 * MiB, template_share=0.6, seed=11)
    names = [vm.name for vm in vms]
    disk = lambda vm: lab / vm / "sys.vhdx"  # noqa: E731

    fulls = {vm: await backup_vm(collector, lab, vm) for vm in names}
    assert all(r.disks[0].plan == "full" for r in fulls.values())
    sent_first = fulls[names[0]].uploaded_chunks
    # The template portion is stored once: later VMs upload clearly less than the first.
    assert all(fulls[vm].uploaded_chunks < 0.75 * sent_first for vm in names[1:])
    snapshots = {vm: raw_of(disk(vm), tmp_path / f"{vm}-1.raw") for vm in names}
    did = {vm: fulls[vm].disks[0].disk_id for vm in names}  # VirtualDiskId-like GUIDs, as on Hyper-V
    for vm in names:
        assert await restore(admin, fulls[vm].point_id, did[vm]) == snapshots[vm]

    changed = churn(lab, names[0], percent=3, seed=5)
    inc = await backup_vm(collector, lab, names[0])
    assert inc.disks[0].plan == "tracked"
    # Bytes read ≈ changed bytes widened to whole chunks, far below the disk's allocated size.
    assert inc.read_bytes <= changed["bytes"] + 2 * MiB * len(changed["ranges"][did[names[0]]])
    assert inc.read_bytes < 0.5 * fulls[names[0]].read_bytes
    now = raw_of(disk(names[0]), tmp_path / "vm0-2.raw")
    assert await restore(admin, inc.point_id, did[names[0]]) == now
    assert await restore(admin, fulls[names[0]].point_id, did[names[0]]) == snapshots[names[0]]

    churn(lab, names[0], percent=2, seed=6)
    reset_tracking(lab, names[0])
    fallback = await backup_vm(collector, lab, names[0])
    assert fallback.disks[0].plan == "compare"
    assert fallback.read_bytes >= 0.9 * fulls[names[0]].read_bytes  # everything allocated was read...
    assert fallback.uploaded_chunks <= inc.uploaded_chunks + 4  # ...but only what changed was sent
    later = raw_of(disk(names[0]), tmp_path / "vm0-3.raw")
    assert await restore(admin, fallback.point_id, did[names[0]]) == later

    unchanged = await backup_vm(collector, lab, names[1])
    assert unchanged.disks[0].plan == "tracked" and unchanged.read_bytes == 0 and unchanged.uploaded_chunks == 0
    assert await restore(admin, unchanged.point_id, did[names[1]]) == snapshots[names[1]]
    configs = (await admin.point(unchanged.point_id))["blobs"]
    assert configs  # the VM's configuration files travel with every point


async def test_killed_collector_rerun_sends_nothing_twice(tmp_path: Path, server, admin: Client) -> None:
    """SIGKILL a real `chunkyard backup` process mid-run; the re-run resumes its session, takes over the
    stale checkpoint, and uploads only what the server does not have yet."""
    import asyncio
    import json
    import os
    import signal
    import sys

    from tests.conftest import ROOT

    lab = tmp_path / "lab"
    init_lab(lab, vms=1, disk_size=384 * MiB, seed=21)
    token = (await admin.create_token("collector", "hv-lab"))["token"]
    cmd = [sys.executable, "-m", "chunkyard.cli", "backup", "--source", f"lab:{lab}", "--vm", "vm01",
           "--server", server.url, "--token", token, "--state", str(tmp_path / "state"), "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for _ in range(400):
        await asyncio.sleep(0.02)
        if (await admin.repository())["chunk_count"] >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    await asyncio.sleep(0.3)
    stored_before = (await admin.repository())["chunk_count"]
    assert stored_before >= 40 and (lab / "vm01" / "checkpoint.json").exists()

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["resumed_session"]
    stats = await admin.repository()
    assert result["server_stats"]["duplicate_chunks"] == 0  # no chunk crossed the wire twice
    assert 0 < result["uploaded_chunks"] <= stats["chunk_count"] - stored_before
    assert not (lab / "vm01" / "checkpoint.json").exists()
    disk_id = result["disks"][0]["disk_id"]
    assert await restore(admin, result["point_id"], disk_id) == raw_of(lab / "vm01" / "sys.vhdx",
                                                                        tmp_path / "now.raw")
