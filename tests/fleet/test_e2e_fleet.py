"""Issue 9's "done when", as far as pull collectors and jobs go: a real server, three real `chunkyard collector
run` processes on lab hosts in two tenants, jobs on a 5-second schedule run twice with churn in between
(the second incremental), run history per VM, each tenant's collector given only its tenant's work, the
job and collector commands, and a point restored bit-exact with `chunkyard restore`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from chunkyard.job_cli import set_enabled
from chunkyard.wire import ApiError, Client
from collectors.sources.lab import LabSource, churn, init_lab
from tests.conftest import ROOT, require_tool
from tests.helpers import MiB

from .fleet_server import fleet_server
from .test_agent import raw_of, until

DISK = 32 * MiB
COLLECTORS = {  # name -> (tenant, VMs in its lab)
    "acme-hv1": ("acme", 2),
    "acme-hv2": ("acme", 1),
    "beta-hv1": ("beta", 1),
}


def cli(server_url: str, token: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "chunkyard.cli", *args, "--server", server_url, "--token", token],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert not check or out.returncode == 0, out.stderr
    return out


def make_lab(path: Path, host: str, vms: int, seed: int) -> Path:
    init_lab(path, vms=vms, disk_size=DISK, seed=seed)
    doc = json.loads((path / "lab.json").read_text())
    (path / "lab.json").write_text(json.dumps(doc | {"host": host}))  # one Hyper-V host per lab
    return path


async def test_three_collectors_two_tenants_scheduled_twice(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")
    made = [("collector", name, tenant) for name, (tenant, _) in COLLECTORS.items()]
    server, tokens = fleet_server(tmp_path, tokens=(*made, ("reader", "acme-reader", "acme")))
    labs = {name: make_lab(tmp_path / f"lab-{name}", name, vms, seed)
            for seed, (name, (_, vms)) in enumerate(COLLECTORS.items(), 40)}
    vm_ids = {name: {vm.id for vm in LabSource(lab).vms()} for name, lab in labs.items()}
    server.start()
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in COLLECTORS}
    try:
        for name in COLLECTORS:
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "chunkyard.cli", "collector", "run", "--server", server.url, "--token",
                     tokens[name], "--source", f"lab:{labs[name]}", "--name", name,
                     "--state-dir", str(tmp_path / f"state-{name}"), "--max-backoff", "2"],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        async with server.client() as admin:
            async def all_online() -> bool:
                return sorted(c["name"] for c in await admin.collectors() if c["online"]) == sorted(COLLECTORS)
            await until(all_online, "three collectors online", timeout=30)
            listing = cli(server.url, server.admin_token, "collector", "list").stdout
            assert all(re.search(rf"{name}\s+{tenant}\s+\S+\s+online", listing)
                       for name, (tenant, _) in COLLECTORS.items()), listing

            # One job per collector, every 5 seconds; one made with the CLI, the others over the API.
            cli(server.url, server.admin_token, "job", "create", "acme-hv1-all", "--collector", "acme-hv1",
                "--schedule", "*:*:0/5", "--keep-last", "5", "--tenant", "acme", "--missed", "skip", "--retries", "0")
            for name, (tenant, _) in COLLECTORS.items():
                if name != "acme-hv1":
                    await admin.create_backup_job({"name": f"{name}-all", "collector": name, "tenant": tenant,
                                                   "schedule": "*:*:0/5", "missed": "skip", "retries": 0})

            async def runs_after(since: float) -> dict | None:
                """Each job's first run created after `since`, once it has finished (None until then)."""
                runs = {}
                for name in COLLECTORS:
                    later = [r for r in await admin.backup_job_runs(f"{name}-all") if r["started"] > since]
                    if not later or not later[-1]["finished"]:
                        return None
                    runs[name] = await admin.backup_run(later[-1]["run_id"])
                return runs
            first = await until(lambda: runs_after(0), "every job's first scheduled run", timeout=30)

            # Schedules off while the guests change their disks, then on again: the scheduler runs each job again.
            for name in COLLECTORS:
                await set_enabled(admin, f"{name}-all", False)

            async def quiet() -> bool:
                return all(j["last_run"]["finished"] for j in await admin.backup_jobs())
            await until(quiet, "the runs in flight to end")
            for seed, lab in enumerate(labs.values(), 60):
                for vm in LabSource(lab).vms():
                    churn(lab, vm.name, percent=1, seed=seed)
            enabled = time.time()
            for name in COLLECTORS:
                await set_enabled(admin, f"{name}-all", True)
            second = await until(lambda: runs_after(enabled), "every job's run after the churn", timeout=30)
            for name in COLLECTORS:  # stop the schedules
                cli(server.url, server.admin_token, "job", "delete", f"{name}-all")

            # A manual run followed with the progress display; the history and the job as the CLI shows them.
            cli(server.url, server.admin_token, "job", "create", "beta-once", "--collector", "beta-hv1",
                "--schedule", "yearly", "--tenant", "beta", "--bandwidth", "4")
            waited = cli(server.url, server.admin_token, "job", "run", "beta-once", "--wait")
            assert re.search(r"run \S+ of job beta-once \(manual\): succeeded, 1/1 VMs", waited.stdout), waited.stdout
            assert "1/1 VMs done" in waited.stderr  # the progress display's final line
            history = json.loads(cli(server.url, server.admin_token, "job", "history", "beta-once", "--json").stdout)
            assert [r["state"] for r in history] == ["succeeded"]
            shown = cli(server.url, server.admin_token, "job", "show", "beta-once").stdout
            assert "4.0 MiB/s" in shown and "beta" in shown

            # History per VM: both runs scheduled and successful, application-consistent; the second incremental.
            for name, (tenant, _) in COLLECTORS.items():
                for run in (first[name], second[name]):
                    assert run["state"] == "succeeded" and run["trigger"] == "schedule" and run["tenant"] == tenant
                    assert {v["vm"]["id"] for v in run["vms"]} == vm_ids[name]
                    assert all(v["consistency"] == "application" and v["point_id"] for v in run["vms"])
                    assert all(v["host"] == name for v in run["vms"])
                for before, after in zip(first[name]["vms"], second[name]["vms"], strict=True):
                    assert before["bytes_read"] > DISK / 3  # the first backup read everything allocated
                    # only what the churn touched, in whole chunks
                    assert 0 < after["bytes_read"] < min(DISK / 4, before["bytes_read"] / 2)
                    assert after["bytes_changed"] > 0
                    assert after["bytes_sent"] < before["bytes_sent"]

            # Tenants: each collector was given only its own VMs (its log names each work item it ran), and a
            # tenant's reader sees only its tenant's collectors and jobs.
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                assert proc.wait(20) == 0
                text = logs[name].read_text()
                started = set(re.findall(r"work \S+: start \S+ \(([^)]+)\)", text))
                assert started == vm_ids[name], text
                assert "stopped after" in text
            async with Client(server.url, tokens["acme-reader"]) as reader:
                assert sorted(c["name"] for c in await reader.collectors()) == ["acme-hv1", "acme-hv2"]
                try:
                    await reader.backup_run(second["beta-hv1"]["run_id"])
                    raise AssertionError("a tenant read another tenant's run")
                except ApiError as e:
                    assert e.status == 404

            # Restore a point of the second run bit-exact with the restore command.
            vm = second["acme-hv1"]["vms"][0]
            point = await admin.point(vm["point_id"])
            out = tmp_path / "restored.raw"
            cli(server.url, server.admin_token, "restore", vm["point_id"], "--disk", point["disks"][0]["disk_id"],
                "--format", "raw", "-o", str(out))
            lab_vm = next(v for v in LabSource(labs["acme-hv1"]).vms() if v.id == vm["vm"]["id"])
            assert out.read_bytes() == raw_of(labs["acme-hv1"] / lab_vm.name / "sys.vhdx", tmp_path / "now.raw")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.stop()
