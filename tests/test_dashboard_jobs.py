"""The dashboard's jobs side in chromium, against the fleet API (docs: fleet-api contract): a real pull
collector (`chunkyard collector run` on a lab) shows online, a job started with "Run now" is followed live
until it finishes, its VMs then appear in the fleet overview and a point downloads bit-exact.

Needs the fleet API (repo_server/api/fleet.py and the pull collector); on a branch without it the module
is skipped with that reason, and it runs once the fleet branch is merged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, ServerProcess, require_tool
from tests.dashboard_page import DashboardPage, chromium
from tests.helpers import MiB


def call(server: ServerProcess, method: str, path: str, body: dict | None = None) -> object:
    request = urllib.request.Request(
        f"{server.url}/api/v1{path}", method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def test_dashboard_runs_a_job_live_and_downloads_its_point(tmp_path: Path, server: ServerProcess) -> None:
    from collectors.sources.lab import init_lab

    lab = tmp_path / "lab"
    init_lab(lab, vms=2, disk_size=32 * MiB, seed=5)
    token = call(server, "POST", "/tokens", {"role": "collector", "name": "hv01"})["token"]  # type: ignore[index]
    agent = subprocess.Popen(
        [sys.executable, "-m", "chunkyard.cli", "collector", "run", "--source", f"lab:{lab}", "--name", "hv01",
         "--server", server.url, "--token", token, "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(tmp_path / "collector.log").open("wb"))
    try:
        deadline = time.monotonic() + 60
        while not any(c["name"] == "hv01" and c["online"]
                      for c in call(server, "GET", "/collectors")["collectors"]):  # type: ignore[index]
            assert time.monotonic() < deadline, (tmp_path / "collector.log").read_text()[-2000:]
            time.sleep(0.2)
        call(server, "POST", "/backup-jobs", {"name": "nightly", "collector": "hv01", "schedule": "mon..fri 22:00"})

        with chromium() as browser:
            ui = DashboardPage(browser, server.url).open().login(server.admin_token)
            assert "hv01" in ui.collectors_text()
            collector = {r["id"]: r for r in ui.collector_rows()}["hv01"]
            assert collector["Status"] == "online" and "2 VMs" in collector["Hosts"]
            ui.jobs_text()
            job = {r["id"]: r for r in ui.job_rows()}["nightly"]
            assert job["Last run"] == "never" and job["Schedule"] == "mon..fri 22:00"

            ui.start_job("nightly")
            assert ui.wait_run_finished() == "succeeded"
            vms = ui.run_vm_rows()
            assert sorted(v["VM"] for v in vms) == ["vm01", "vm02"]
            assert all(v["State"] == "succeeded" and v["Consistency"] == "application" for v in vms)

            fleet = {r["VM"]: r for r in ui.vm_rows()}
            assert set(fleet) == {"vm01", "vm02"} and fleet["vm01"]["Consistency"] == "application"
            ui.open_vm("vm01")
            (point,) = ui.point_rows()
            disk_id = ui.page.locator("#points tbody tr").first.get_attribute("data-disk-id")
            raw = ui.download_point(point["id"], disk_id, "raw", tmp_path)
            expected = tmp_path / "expected.raw"
            subprocess.run([require_tool("qemu-img"), "convert", "-f", "vhdx", "-O", "raw",
                            str(lab / "vm01" / "sys.vhdx"), str(expected)], check=True)
            assert raw.read_bytes() == expected.read_bytes()
            assert ui.script_errors == []
    finally:
        agent.terminate()
        agent.wait(20)
