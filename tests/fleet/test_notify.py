"""Notifications over real channels: an aiosmtpd SMTP server and an aiohttp webhook receiver in the test
process, a real server process sending to both; plus retention applied after a job's successful backup."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk

from .fleet_server import INVENTORY, Api, fleet_server, job, real_points, result
from .notify_channels import LOOPBACK_AUTH_WARNING, SMTP_PASSWORD, Inbox, notify_channels, notify_config

pytestmark = pytest.mark.filterwarnings(LOOPBACK_AUTH_WARNING)


@pytest.fixture
async def inbox() -> AsyncIterator[tuple[Inbox, int, int]]:
    async with notify_channels() as channels:
        yield channels


def notify_server(tmp_path: Path, smtp_port: int, hook_port: int, on: str, stale_hours: float = 26,
                  password: str = "") -> ServerProcess:
    """A server notifying the test's SMTP server and webhook; without `password` in the file, the SMTP
    password comes from $CHUNKYARD_SMTP_PASSWORD."""
    server, _ = fleet_server(tmp_path, extra=notify_config(smtp_port, hook_port, on, stale_hours, password))
    server.start(env={} if password else {"CHUNKYARD_SMTP_PASSWORD": SMTP_PASSWORD})
    return server


async def test_failure_and_success_reports(tmp_path: Path, inbox: tuple[Inbox, int, int]) -> None:
    box, smtp_port, hook_port = inbox
    server = notify_server(tmp_path, smtp_port, hook_port, '["failure", "success"]')
    api = Api(server.url, server.admin_token)
    try:
        points = await real_points(server, ["vm-a", "vm-b"])
        await api.ok("POST", "/collectors", INVENTORY)
        await api.ok("POST", "/backup-jobs", job(vm_pattern="web-[ab]", max_per_host=2), status=201)
        box.fail_next_hook = 1  # the first delivery fails: the notifier retries
        await api.ok("POST", "/backup-jobs/nightly/run", status=202)
        items = {i["vm"]["name"]: i for i in [await api.ok("GET", "/collectors/col1/work?wait=5") for _ in range(2)]}
        await api.ok("POST", f"/work/{items['web-a']['work_id']}/result",
                     result(False, error="VSS writer 'SqlServerWriter' timed out"), status=204)
        await api.ok("POST", f"/work/{items['web-b']['work_id']}/result", result(point_id=points["vm-b"]),
                     status=204)
        await box.wait(1, 1)
        mail = box.mails[0]
        assert mail["Subject"] == "Chunkyard: backup job nightly partial: 1 of 2 VMs failed"
        assert mail["To"] == "ops@example.test, oncall@example.test"
        assert mail["From"] == "chunkyard@example.test"
        text = mail.get_content().replace("\r\n", "\n")
        assert "- web-a (vm-a) on hv1: failed after 1 attempt(s): VSS writer 'SqlServerWriter' timed out" in text
        assert f"- web-b (vm-b) on hv1: succeeded, point {points['vm-b']}, crash consistency" in text
        hook = box.hooks[0]
        assert box.fail_next_hook == 0  # the refused first delivery was retried
        assert box.logins == ["chunkyard"]  # with the password from the environment
        assert hook["event"] == "failure" and hook["subject"] == mail["Subject"] and hook["text"] == text
        assert hook["run"]["job"] == "nightly" and hook["run"]["state"] == "partial"
        failed = [v for v in hook["run"]["vms"] if v["state"] == "failed"]
        assert [(v["vm"]["name"], v["error"]) for v in failed] == [("web-a", "VSS writer 'SqlServerWriter' timed out")]

        await api.ok("POST", "/backup-jobs/nightly/run", status=202)
        for _ in range(2):
            item = await api.ok("GET", "/collectors/col1/work?wait=5")
            good = result(point_id=points[item["vm"]["id"]], bytes_new=3 << 20)
            await api.ok("POST", f"/work/{item['work_id']}/result", good, status=204)
        await box.wait(2, 2)
        assert box.mails[1]["Subject"] == "Chunkyard: backup job nightly succeeded (2 VMs, 6.0 MiB new)"
        assert box.hooks[1]["event"] == "success" and box.hooks[1]["run"]["totals"]["succeeded"] == 2
        assert "web-a" in box.mails[1].get_content() and "web-b" in box.mails[1].get_content()
    finally:
        await api.close()
        server.stop()


async def test_stale_alert_once_per_episode(tmp_path: Path, inbox: tuple[Inbox, int, int]) -> None:
    box, smtp_port, hook_port = inbox
    server = notify_server(tmp_path, smtp_port, hook_port, '["stale"]', stale_hours=0.0005,
                           password="s3cret")  # 1.8 s
    api = Api(server.url, server.admin_token)
    try:
        await api.ok("POST", "/collectors", INVENTORY)
        await api.ok("POST", "/backup-jobs", job(vm_pattern="web-[ab]"), status=201)
        await box.wait(1, 1)  # neither VM has a point: both go stale 1.8 s after the job was created
        assert sorted(v["vm"]["name"] for v in box.hooks[0]["vms"]) == ["web-a", "web-b"]
        assert box.hooks[0]["event"] == "stale"
        assert box.mails[0]["Subject"] == "Chunkyard: 2 VM(s) without a good backup for 0.0005 hours"
        assert "web-a (vm-a) on hv1, job nightly" in box.mails[0].get_content()
        await asyncio.sleep(2)  # several more checks: still stale, but already alerted
        assert len(box.hooks) == 1 and len(box.mails) == 1
        await asyncio.get_running_loop().run_in_executor(None, server.restart)
        await asyncio.sleep(1.5)  # the alerted set survived the restart: no second alert
        assert len(box.hooks) == 1 and len(box.mails) == 1
        async with server.client() as client:  # a real restore point for vm-a ends its episode
            await backup(client, "vm-a", {"d0": make_disk("r")})
        await box.wait(2, 2, timeout=10)  # ... and 1.8 s later a new one starts, for vm-a only
        assert [v["vm"]["id"] for v in box.hooks[1]["vms"]] == ["vm-a"]
        assert box.hooks[1]["vms"][0]["last_good"] is not None
        assert len(box.hooks) == 2
    finally:
        await api.close()
        server.stop()


async def test_retention_applies_after_a_good_backup(tmp_path: Path) -> None:
    server, _ = fleet_server(tmp_path)
    server.start()
    api = Api(server.url, server.admin_token)
    try:
        async with server.client() as client:
            points = [(await backup(client, "vm-a", {"d0": make_disk("r", seed=n)}))["point_id"] for n in range(3)]
        await api.ok("POST", "/collectors", INVENTORY)
        await api.ok("POST", "/backup-jobs", job(vm_pattern="web-a", retention={"keep_last": 1}), status=201)
        run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
        item = await api.ok("GET", "/collectors/col1/work?wait=5")
        await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=points[-1]), status=204)
        run = await api.ok("GET", f"/runs/{run_id}")
        assert run["state"] == "succeeded" and run["vms"][0]["retention"] == {"kept": 1, "removed": 2}
        left = await api.ok("GET", "/vms/vm-a/points")
        assert [p["point_id"] for p in left["points"]] == [points[-1]]
        assert json.dumps(run).count(points[0]) == 0
    finally:
        await api.close()
        server.stop()
