"""A backup job's tier policy: after each good backup the job's tier starts a cycle at once, so the point is
off site long before the tier's own interval (an hour here) would have taken it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.conftest import ServerProcess
from tests.fleet.fleet_server import FAST, INVENTORY, Api, job, real_points, result
from tests.tiering.conftest import Emulators
from tests.tiering.test_attach import write_config


async def test_a_jobs_tier_takes_its_points_off_site_right_after_the_backup(tmp_path: Path,
                                                                          emulators: Emulators) -> None:
    bucket, env = emulators.new_bucket("s3"), emulators.env("s3")
    config = tmp_path / "server.toml"
    write_config(config, emulators.tier_table("s3", bucket, name="dr", interval_seconds=3600))
    config.write_text(config.read_text().replace("[server]\n", FAST.format(silent=30).lstrip(), 1))
    server = ServerProcess(tmp_path / "data", config=config)
    server.start(env)
    api = Api(server.url, server.admin_token)
    try:
        async def tier() -> dict:
            return (await api.ok("GET", "/tiers"))["tiers"][0]

        deadline = time.monotonic() + 20
        while (await tier())["synced_at"] is None and time.monotonic() < deadline:  # the start-up cycle
            await asyncio.sleep(0.1)
        points = await real_points(server, ["vm-a"])  # committed now: the tier's next cycle is an hour away
        await api.ok("POST", "/collectors", INVENTORY)
        status, answer = await api.call("POST", "/backup-jobs", job(vm_pattern="web-a", tier="nowhere"))
        assert status == 422 and "configured: dr" in answer["message"]
        await api.ok("POST", "/backup-jobs", job(vm_pattern="web-a", tier="dr"), status=201)
        run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
        work = await api.ok("GET", "/collectors/col1/work?wait=5")
        reported = time.time()
        await api.ok("POST", f"/work/{work['work_id']}/result", result(point_id=points["vm-a"]), status=204)

        run = await api.ok("GET", f"/runs/{run_id}")
        assert run["state"] == "succeeded" and run["vms"][0]["offload"]["tier"] == "dr"
        deadline = time.monotonic() + 30
        while True:
            status = await tier()
            if (status["synced_at"] or 0) >= reported and status["pending_points"] == 0:
                break
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.2)
        keys = [o["Key"] for o in emulators.s3_client().list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(points["vm-a"] in key for key in keys), keys
    finally:
        await api.close()
        server.stop()
