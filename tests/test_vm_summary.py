"""GET /vms carries what the dashboard's fleet overview shows per VM: the newest point's time, consistency,
size and data, and the sums over all the VM's points (logical bytes, bytes its backups added) with the
dedup ratio they give. Kept up to date through backups and deletions, and rebuilt for an older index."""

from __future__ import annotations

import json

from chunkyard.wire import Client
from repo_server.engine import Repository
from tests.conftest import ServerProcess
from tests.helpers import MiB, backup, make_disk


async def vms(client: Client) -> dict[str, dict]:
    return {v["id"]: v for v in await client.vms()}


async def test_vm_summaries_follow_backups_and_deletes(server: ServerProcess, admin: Client) -> None:
    first = make_disk("rrrz", MiB, seed=1)
    p1 = (await backup(admin, "vm1", {"d0": first}))["point_id"]
    second = first[: 2 * MiB] + make_disk("r", MiB, seed=2) + bytes(MiB)  # one chunk changed
    p2 = (await backup(admin, "vm1", {"d0": second}))["point_id"]
    await backup(admin, "vm2", {"d0": first, "d1": make_disk("c", MiB, seed=3)}, host="host2")

    got = await vms(admin)
    v1, v2 = got["vm1"], got["vm2"]
    assert v1["points"] == 2 and v1["latest_point"] == p2 and v1["latest_consistency"] == "crash"
    assert v1["latest_size"] == 4 * MiB and v1["latest_logical_bytes"] == 3 * MiB
    assert v1["logical_bytes"] == 6 * MiB and v1["new_bytes"] == 4 * MiB  # 3 chunks, then 1 changed
    assert v1["dedup_ratio"] == 1.5
    assert v2["host"] == "host2" and v2["latest_size"] == 5 * MiB and v2["logical_bytes"] == 4 * MiB
    assert v2["new_bytes"] == MiB and v2["dedup_ratio"] == 4.0  # only its compressible chunk was new
    assert 0 < v2["stored_bytes"] < MiB  # zstd shrank it

    await admin.delete_point(p2)
    v1 = (await vms(admin))["vm1"]
    assert v1["points"] == 1 and v1["latest_point"] == p1
    assert v1["logical_bytes"] == 3 * MiB and v1["new_bytes"] == 3 * MiB and v1["dedup_ratio"] == 1.0
    await admin.delete_point(p1)
    assert "vm1" not in await vms(admin)

    # An index written before these fields existed is brought up to date when the server starts.
    before = await vms(admin)
    server.stop()
    repo = Repository(server.data)
    try:
        summary = repo.points.vm("vm2")
        old = {k: summary[k] for k in ("id", "points", "name", "host", "latest_point", "latest_time")}
        batch = repo.index.batch()
        batch.put("points", b"m:vm2", json.dumps(old).encode())
        repo.index.write(batch, sync=True)
    finally:
        repo.close()
    server.start()
    assert await vms(admin) == before
