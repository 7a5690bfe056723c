"""The web dashboard end to end in Debian's headless chromium: a real server, a VM backed up by the real
CLI, then login (a bad token refused), the fleet overview, a point's raw and VHDX downloads checked
bit-exact against the disk, the repository panel, the jobs and collectors panels, the token's role and
tenant (a reader gets no "Run now"), logout and a revoked token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, ServerProcess, require_tool
from tests.dashboard_page import DashboardPage, chromium
from tests.helpers import MiB, make_disk


def call(server: ServerProcess, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    request = urllib.request.Request(
        f"{server.url}/api/v1{path}", method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token or server.admin_token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def backup_file(server: ServerProcess, disk: Path, vm: str) -> dict:
    """`chunkyard backup --source file:DISK` as an operator runs it, with a collector token."""
    token = call(server, "POST", "/tokens", {"role": "collector", "name": "dashboard test"})["token"]
    out = subprocess.run([sys.executable, "-m", "chunkyard.cli", "backup", "--source", f"file:{disk}", "--vm", vm,
                          "--server", server.url, "--token", token, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_dashboard_login_fleet_download_repository(tmp_path: Path, server: ServerProcess) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(make_disk("rrzcr1zr1", MiB, seed=7, tail=12345))  # odd size, zero and repeated chunks
    result = backup_file(server, disk, "web01")
    point_id, disk_id = result["point_id"], result["disks"][0]["disk_id"]
    reader = call(server, "POST", "/tokens", {"role": "reader", "name": "dashboard"})

    with chromium() as browser:
        ui = DashboardPage(browser, server.url).open()
        assert ui.page.url == f"{server.url}/ui/"  # / redirects to the dashboard
        ui.try_login("cy_not-a-real-token")
        assert "refused" in ui.login_error()
        assert not ui.logged_in()
        collector = call(server, "POST", "/tokens", {"role": "collector"})["token"]
        ui.try_login(collector)
        assert "admin or reader" in ui.login_error()
        assert not ui.logged_in()

        ui.login(reader["token"])
        assert reader["token"] not in ui.page.url
        assert ui.page.evaluate("sessionStorage.getItem('chunkyard.token')") == reader["token"]
        rows = ui.vm_rows()
        assert len(rows) == 1
        vm = rows[0]
        assert vm["id"] == "web01" and vm["VM"] == "web01"
        assert vm["Last backup"] in ("now", "1 second ago") or vm["Last backup"].endswith("seconds ago")
        assert vm["Consistency"] == "crash"  # what the file source records
        assert vm["Disk size"] == "9.01 MiB" and vm["Points"] == "1"
        assert vm["Dedup"].endswith("×")

        ui.open_vm("web01")
        assert ui.page.locator("#vm-name").inner_text() == "web01"
        points = ui.point_rows()
        assert [p["id"] for p in points] == [point_id]
        assert points[0]["Consistency"] == "crash" and points[0]["Size"] == "9.01 MiB"

        raw = ui.download_point(point_id, disk_id, "raw", tmp_path)
        assert raw.name == f"web01-disk-{point_id}.raw"
        assert raw.read_bytes() == disk.read_bytes()  # bit-exact
        assert "Download started" in ui.status()
        vhdx = ui.download_point(point_id, disk_id, "vhdx", tmp_path)
        assert vhdx.name == f"web01-disk-{point_id}.vhdx"
        converted = tmp_path / "from-vhdx.raw"
        subprocess.run([require_tool("qemu-img"), "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(converted)],
                       check=True)
        padded = disk.read_bytes()
        assert converted.read_bytes() == padded + bytes(-len(padded) % 512)  # VHDX sizes are whole sectors

        facts = ui.repository_facts()
        assert facts["Encryption"].startswith("aes-256-gcm")
        assert facts["Restore points"] == "1" and facts["VMs"] == "1"
        assert facts["Chunk size"] == "1.00 MiB" and facts["Dedup ratio"].endswith("×")
        assert "No cloud tiers configured" in ui.tiers_text()
        assert ui.banner() is None  # encrypted: no warning

        assert "No jobs configured" in ui.jobs_text()
        assert "No collectors registered" in ui.collectors_text()
        assert ui.identity() == "reader · all tenants"
        call(server, "POST", "/backup-jobs", {"name": "nightly", "collector": "hv", "schedule": "yearly"})
        assert not ui.can_run_now("nightly")  # a reader sees the job but no admin-only action

        ui.logout()
        assert not ui.page.locator("#whoami").is_visible()
        ui.login(server.admin_token)
        assert ui.identity() == "admin · all tenants"
        assert ui.can_run_now("nightly")
        ui.logout()
        assert ui.page.evaluate("sessionStorage.getItem('chunkyard.token')") is None
        ui.page.reload()
        ui.page.locator("#login").wait_for(state="visible")

        ui.login(reader["token"])
        ui.vm_rows()
        call(server, "DELETE", f"/tokens/{reader['id']}")
        ui.page.click("#nav a[data-section=repository]")  # the next call is refused: back to the login
        assert "log in again" in ui.login_error()
        assert ui.page.evaluate("sessionStorage.getItem('chunkyard.token')") is None
        assert ui.script_errors == []


def test_dashboard_warns_when_not_encrypted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "chunkyard.cli", "init", "--data", str(data), "--no-encrypt"],
                   check=True, capture_output=True, cwd=ROOT, env=os.environ)
    server = ServerProcess(data)
    server.start()
    try:
        with chromium() as browser:
            ui = DashboardPage(browser, server.url).open().login(server.admin_token)
            assert "No VM has a restore point yet" in ui.page.locator("#vms-empty").inner_text()
            ui.page.locator("#banner").wait_for(state="visible")
            assert "not encrypted" in ui.banner()
            assert ui.repository_facts()["Encryption"] == "not encrypted"
            assert ui.script_errors == []
    finally:
        server.stop()
