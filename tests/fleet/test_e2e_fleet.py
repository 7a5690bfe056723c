"""Issue 9's "done when": a real server, three real `chunkyard collector run` processes on lab hosts in two
tenants, jobs on a 5-second schedule run twice with churn in between (the second incremental), run history
per VM, success and failure notifications by webhook and SMTP (real receivers), the Prometheus metrics
against the history and the catalog, tenant isolation (each collector given only its tenant's work, readers,
and the `missing` side channel), the dashboard in chromium for a tenant reader and for the operator (a job
started there, followed live, its point downloaded bit-exact), the job and collector commands, and a point
restored bit-exact with `chunkyard restore`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from chunkyard.job_cli import set_enabled
from chunkyard.wire import DIGEST_LEN, ZERO, ApiError, Client, bitmap_get
from collectors.sources.lab import LabSource, churn, init_lab
from tests.conftest import ROOT, ServerProcess, require_module, require_tool
from tests.dashboard_page import DashboardPage, chromium
from tests.helpers import MiB

from .fleet_server import fleet_server
from .notify_channels import LOOPBACK_AUTH_WARNING, SMTP_PASSWORD, Inbox, notify_channels, notify_config
from .test_agent import finished, raw_of, until

pytestmark = pytest.mark.filterwarnings(LOOPBACK_AUTH_WARNING)

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


async def scrape(url: str, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http, \
            http.get(url + "/metrics") as response:
        return response.status, await response.text()


async def delivered(box: Inbox, event: str, run_id: str) -> tuple[dict, str, str] | None:
    """The webhook payload, mail subject and mail text of `event` for a run, once both channels have it."""
    hook = next((h for h in box.hooks if h["event"] == event and h["run"]["run_id"] == run_id), None)
    mail = next((m for m in box.mails if f", run {run_id} (" in Inbox.text(m)), None)
    return None if hook is None or mail is None else (hook, mail["Subject"], Inbox.text(mail))


async def check_success_notifications(box: Inbox, runs: list[dict]) -> None:
    """Each successful run was summarised by webhook and by mail, naming the job and every VM's point."""
    for run in runs:
        hook, subject, text = await until(lambda run=run: delivered(box, "success", run["run_id"]),
                                          f"the success notifications of run {run['run_id']}", timeout=20)
        assert subject.startswith(f"Chunkyard: backup job {run['job']} succeeded ({len(run['vms'])} VMs, "), subject
        assert hook["subject"] == subject and hook["text"] == text
        assert hook["run"]["job"] == run["job"] and hook["run"]["state"] == "succeeded"
        assert text.startswith(f"Job {run['job']} (tenant {run['tenant']}), run {run['run_id']} (schedule)"), text
        for vm in run["vms"]:
            assert (f"- {vm['vm']['name']} ({vm['vm']['id']}) on {vm['host']}: succeeded, point {vm['point_id']}, "
                    "application consistency") in text, text
        assert sorted(v["vm"]["id"] for v in hook["run"]["vms"]) == sorted(v["vm"]["id"] for v in run["vms"])


async def provoke_failure(admin: Client, box: Inbox, lab: Path, job: str) -> dict:
    """A manual run of `job` while its (only) VM's disk file is gone: the run fails, and the failure
    notification names the VM and the collector's error by both channels."""
    (lab_vm,) = LabSource(lab).vms()
    disk = lab / lab_vm.name / "sys.vhdx"
    disk.rename(disk.with_name("sys.vhdx.away"))
    try:
        run = await finished(admin, await admin.run_backup_job(job))
    finally:
        disk.with_name("sys.vhdx.away").rename(disk)
    assert run["state"] == "failed" and run["trigger"] == "manual", run
    (vm,) = run["vms"]
    assert vm["state"] == "failed" and vm["point_id"] is None and vm["vm"]["id"] == lab_vm.id
    assert "cannot open the lab disk" in vm["error"] and str(disk) in vm["error"], vm["error"]
    hook, subject, text = await until(lambda: delivered(box, "failure", run["run_id"]),
                                      "the failure notifications", timeout=20)
    assert subject == f"Chunkyard: backup job {job} failed: 1 of 1 VMs failed"
    assert f"- {lab_vm.name} ({lab_vm.id}) on {vm['host']}: failed after 1 attempt(s): {vm['error']}" in text, text
    assert [(v["vm"]["name"], v["state"], v["error"]) for v in hook["run"]["vms"]] == \
        [(lab_vm.name, "failed", vm["error"])]
    assert hook["text"] == text and hook["run"]["state"] == "failed"
    return run


async def check_missing_side_channel(url: str, tokens: dict[str, str], acme_point: dict, beta_point: dict) -> None:
    """Chunks only acme holds: `missing` tells a beta collector to upload them all (it learns nothing), tells
    another acme collector they are present, and beta cannot map them without uploading."""
    def digests(table: bytes) -> list[bytes]:
        return [table[i:i + DIGEST_LEN] for i in range(0, len(table), DIGEST_LEN)]

    async with Client(url, tokens["acme-reader"]) as acme_reader, Client(url, tokens["beta-reader"]) as beta_reader:
        disk = acme_point["disks"][0]["disk_id"]
        acme_table = await acme_reader.disk_map(acme_point["point_id"], disk)
        beta_table = await beta_reader.disk_map(beta_point["point_id"], beta_point["disks"][0]["disk_id"])
        try:
            await beta_reader.disk_map(acme_point["point_id"], disk)
            raise AssertionError("a beta reader read an acme point's map")
        except ApiError as e:
            assert e.status == 404
    beta_holds = set(digests(beta_table))
    acme_only = list(dict.fromkeys(d for d in digests(acme_table) if d != ZERO and d not in beta_holds))
    assert len(acme_only) >= 8, "the acme point should hold chunks that beta does not"

    async with Client(url, tokens["beta-hv1"]) as beta, Client(url, tokens["acme-hv2"]) as acme:
        opened = {}
        try:
            for who, client in (("beta", beta), ("acme", acme)):
                opened[who] = (client, (await client.create_session(
                    host=f"{who}-probe", vm={"id": f"vm-{who}-probe", "name": f"{who}-probe"},
                    disks=[{"disk_id": "d0", "size": DISK}], base=None))["session_id"])
            beta_bits = await beta.missing(opened["beta"][1], acme_only)
            assert all(bitmap_get(beta_bits, i) for i in range(len(acme_only)))  # beta must upload every one
            assert not any(await acme.missing(opened["acme"][1], acme_only))  # acme's own: present
            try:
                await beta.map(opened["beta"][1], "d0", [(0, acme_only[0])])
                raise AssertionError("beta mapped a chunk it never uploaded")
            except ApiError as e:
                assert (e.status, e.code) == (422, "unknown_chunk"), e
        finally:
            for client, sid in opened.values():
                await client.abort(sid)


async def check_metrics(server: ServerProcess, admin: Client, tokens: dict[str, str]) -> None:
    """/metrics against the run history, the catalog and /repository; operators only."""
    parser = require_module("prometheus_client.parser")
    status, text = await scrape(server.url, server.admin_token)
    assert status == 200, text
    samples: dict[str, list] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    history: dict[tuple[str, str, str], int] = {}
    for job in await admin.backup_jobs():
        for run in await admin.backup_job_runs(job["name"], limit=100):
            assert run["finished"], run
            key = (run["tenant"], run["job"], run["state"])
            history[key] = history.get(key, 0) + 1
    outcomes = {(s.labels["tenant"], s.labels["job"], s.labels["state"]): s.value
                for s in samples["chunkyard_fleet_runs_total"]}
    assert outcomes == history
    assert {state for _, _, state in history} == {"succeeded", "failed"}
    online = {s.labels["tenant"]: s.value for s in samples["chunkyard_fleet_collectors_online"]}
    assert online == {"acme": 2, "beta": 1}

    last = {s.labels["vm_id"]: s.value for s in samples["chunkyard_vm_last_backup_timestamp_seconds"]}
    vms = await admin.vms()
    assert len(vms) == 4 and set(last) == {vm["id"] for vm in vms}
    for vm in vms:
        assert last[vm["id"]] == max(p["created"] for p in await admin.points(vm["id"])), vm["id"]

    ingest = {s.labels["outcome"]: s.value for s in samples["chunkyard_ingest_raw_bytes_total"]}
    assert ingest["new"] > 0 and samples["chunkyard_ingest_stored_bytes_total"][0].value > 0
    (dedup,) = samples["chunkyard_dedup_ratio"]
    assert dedup.value == pytest.approx((await admin.repository())["dedup_ratio"], rel=1e-9)

    for name in ("acme-reader", "beta-hv1"):  # tenant tokens: the metrics span every tenant
        status, text = await scrape(server.url, tokens[name])
        assert status == 403, (name, status, text)


def dashboard(url: str, tokens: dict[str, str], admin_token: str, acme: dict, vm_id: str, dest: Path) -> tuple:
    """In chromium: acme's reader sees acme's VMs and jobs only; the operator runs a job there, follows it to
    the end and downloads the new point of VM `vm_id`. Returns (run id, point id, downloaded file)."""
    with chromium() as browser:
        ui = DashboardPage(browser, url).open().login(tokens["acme-reader"])
        fleet = {r["id"]: r for r in ui.vm_rows()}
        assert set(fleet) == set(acme["vms"]), fleet  # acme's three VMs, none of beta's
        for acme_vm, latest in acme["vms"].items():
            assert fleet[acme_vm]["Last backup"] != "never"
            shown = datetime.fromisoformat(ui.vm_last_backup(acme_vm)).timestamp()
            assert shown == pytest.approx(latest, abs=0.001)
        ui.jobs_text()
        assert {r["id"] for r in ui.job_rows()} == set(acme["runs"])
        for job, run_ids in acme["runs"].items():
            ui.open_job(job)
            runs = {r["id"]: r for r in ui.job_run_rows()}
            assert set(runs) == set(run_ids)
            assert all(runs[run_id]["State"] == state for run_id, state in run_ids.items())
        ui.logout()

        ui.login(admin_token)
        assert len(ui.vm_rows()) == 4  # the operator sees every tenant
        run_id = ui.start_job("acme-hv1-all")
        assert ui.wait_run_finished() == "succeeded"
        assert {(v["VM"], v["State"]) for v in ui.run_vm_rows()} == \
            {(name, "succeeded") for name in acme["hv1_names"]}
        ui.vm_rows()
        ui.open_vm(vm_id=vm_id)
        point = ui.point_rows()[0]  # newest first: the run's point
        disk_id = ui.page.locator(f"#points tbody tr[data-point-id='{point['id']}']").get_attribute("data-disk-id")
        downloaded = ui.download_point(point["id"], disk_id, "raw", dest)
        assert ui.script_errors == []
        return run_id, point["id"], downloaded


async def test_three_collectors_two_tenants_scheduled_twice(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")
    async with notify_channels() as (box, smtp_port, hook_port):
        await scenario(tmp_path, box, notify_config(smtp_port, hook_port, '["failure", "success", "stale"]',
                                                     password=SMTP_PASSWORD))


async def scenario(tmp_path: Path, box: Inbox, notify: str) -> None:
    made = [("collector", name, tenant) for name, (tenant, _) in COLLECTORS.items()]
    server, tokens = fleet_server(tmp_path, extra=notify, tokens=(
        *made, ("reader", "acme-reader", "acme"), ("reader", "beta-reader", "beta")))
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
            for name in COLLECTORS:  # schedules off: every run from here on is started by hand
                await set_enabled(admin, f"{name}-all", False)
            await until(quiet, "the runs in flight to end")

            # Notifications: every scheduled run summarised by webhook and mail; a run whose VM's disk is gone
            # reported as a failure naming the VM and the error.
            await check_success_notifications(box, [*first.values(), *second.values()])
            await provoke_failure(admin, box, labs["acme-hv2"], "acme-hv2-all")

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

            # Tenants: `missing` reveals nothing of acme's chunks to beta.
            await check_missing_side_channel(server.url, tokens, await admin.point(second["acme-hv1"]["vms"][0]
                                                                                   ["point_id"]),
                                             await admin.point(second["beta-hv1"]["vms"][0]["point_id"]))

            # The dashboard: acme's reader sees acme only; the operator runs a job and downloads its point.
            acme_ids = vm_ids["acme-hv1"] | vm_ids["acme-hv2"]
            acme = {"vms": {vm["id"]: vm["latest_time"] for vm in await admin.vms() if vm["id"] in acme_ids},
                    "runs": {job: {r["run_id"]: r["state"] for r in await admin.backup_job_runs(job, limit=100)}
                             for job in ("acme-hv1-all", "acme-hv2-all")},
                    "hv1_names": {vm.name for vm in LabSource(labs["acme-hv1"]).vms()}}
            assert len(acme["vms"]) == 3
            lab_vm = LabSource(labs["acme-hv1"]).vms()[0]
            run_id, point_id, downloaded = await asyncio.to_thread(
                dashboard, server.url, tokens, server.admin_token, acme, lab_vm.id, tmp_path)
            run = await admin.backup_run(run_id)
            assert (run["job"], run["trigger"], run["state"]) == ("acme-hv1-all", "manual", "succeeded")
            assert point_id == next(v["point_id"] for v in run["vms"] if v["vm"]["id"] == lab_vm.id)
            disk = labs["acme-hv1"] / lab_vm.name / "sys.vhdx"
            assert downloaded.read_bytes() == raw_of(disk, tmp_path / "expected.raw")

            # Metrics, now that every run has finished; no VM went without a backup long enough to alert.
            await check_metrics(server, admin, tokens)
            assert not [h for h in box.hooks if h["event"] == "stale"]

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
            for name in COLLECTORS:
                cli(server.url, server.admin_token, "job", "delete", f"{name}-all")
            assert [j["name"] for j in await admin.backup_jobs()] == ["beta-once"]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.stop()
