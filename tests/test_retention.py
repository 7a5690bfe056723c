"""Retention: the GFS plan on synthetic times, then policies, protection and prune on the real server
(including a restart and an index rebuild). Points made through the API all share one hour, so the
calendar buckets are tested as units and the API tests use keep_last and protection."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chunkyard.wire import ApiError, Client
from repo_server.engine import Corrupt, Invalid
from repo_server.engine.retention import DEFAULT, NEWEST, Policies, check_policy, plan
from tests.conftest import ROOT, ServerProcess
from tests.helpers import backup, make_disk, restore

# ------------------------------------------------------------------------------------------ the plan


def reasons(whens: Iterable[str], policy: dict | None, protected: Iterable[str] = ()) -> dict[str, list[str]]:
    """Plan points made at the given UTC times; answer the kept ones' reasons by time."""
    points = []
    for when in whens:
        ts = datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp()
        points.append({"point_id": f"{int(ts * 1000):012x}00000000", "created": ts, "protected": when in protected,
                       "when": when})
    kept, removed = plan(points, policy)
    by_id = {p["point_id"]: p["when"] for p in points}
    assert sorted(by_id[p["point_id"]] for p in kept + removed) == sorted(by_id.values())
    assert [p["created"] for p in kept] == sorted((p["created"] for p in kept), reverse=True)
    return {by_id[p["point_id"]]: p["reasons"] for p in kept}


DAYS = ["2026-11-20T09:00", "2026-11-22T09:00", "2026-11-22T21:00", "2026-11-23T08:00", "2026-11-24T01:00",
        "2026-11-24T13:00"]


@pytest.mark.parametrize("policy", [None, {}])
def test_no_policy_keeps_everything(policy: dict | None) -> None:
    assert reasons(DAYS, policy) == {w: ["no retention policy"] for w in DAYS}


def test_keep_last() -> None:
    assert reasons(DAYS, {"keep_last": 3}) == {"2026-11-24T13:00": ["last 1"], "2026-11-24T01:00": ["last 2"],
                                               "2026-11-23T08:00": ["last 3"]}


def test_hourly_keeps_the_newest_of_each_hour_and_skips_empty_hours() -> None:
    whens = ["2026-11-24T10:05", "2026-11-24T10:45", "2026-11-24T11:10", "2026-11-24T11:50", "2026-11-24T13:30"]
    assert reasons(whens, {"keep_hourly": 3}) == {"2026-11-24T13:30": ["hourly 2026-11-24 13:00"],
                                                  "2026-11-24T11:50": ["hourly 2026-11-24 11:00"],
                                                  "2026-11-24T10:45": ["hourly 2026-11-24 10:00"]}


def test_daily_counts_only_days_that_have_points() -> None:
    """The 21st has no point, so the fourth daily is the 20th's."""
    assert reasons(DAYS, {"keep_daily": 4}) == {"2026-11-24T13:00": ["daily 2026-11-24"],
                                               "2026-11-23T08:00": ["daily 2026-11-23"],
                                               "2026-11-22T21:00": ["daily 2026-11-22"],
                                               "2026-11-20T09:00": ["daily 2026-11-20"]}


def test_weekly_uses_iso_weeks_across_the_new_year() -> None:
    """2026 has 53 ISO weeks: Monday 2026-12-28 to Sunday 2027-01-03 is one week, 2026-W53."""
    whens = ["2026-12-20T12:00", "2026-12-21T12:00", "2026-12-27T12:00", "2026-12-28T12:00", "2027-01-03T12:00",
             "2027-01-04T12:00"]
    assert reasons(whens, {"keep_weekly": 3}) == {"2027-01-04T12:00": ["weekly 2027-W01"],
                                                  "2027-01-03T12:00": ["weekly 2026-W53"],
                                                  "2026-12-27T12:00": ["weekly 2026-W52"]}


def test_monthly_and_yearly() -> None:
    whens = ["2024-06-01T00:00", "2025-03-15T00:00", "2025-12-31T23:59", "2026-01-01T00:00", "2026-01-20T00:00",
             "2026-02-10T00:00"]
    assert reasons(whens, {"keep_monthly": 3, "keep_yearly": 3}) == {
        "2026-02-10T00:00": ["monthly 2026-02", "yearly 2026"],
        "2026-01-20T00:00": ["monthly 2026-01"],
        "2025-12-31T23:59": ["monthly 2025-12", "yearly 2025"],
        "2024-06-01T00:00": ["yearly 2024"],
    }


def test_rules_count_independently_like_restic() -> None:
    """keep_last 2 and keep_daily 2: the newest point is both "last 1" and today's daily, so the dailies
    still reach yesterday."""
    assert reasons(DAYS, {"keep_last": 2, "keep_daily": 2}) == {
        "2026-11-24T13:00": ["last 1", "daily 2026-11-24"],
        "2026-11-24T01:00": ["last 2"],
        "2026-11-23T08:00": ["daily 2026-11-23"],
    }


def test_protected_points_are_always_kept() -> None:
    kept = reasons(DAYS, {"keep_last": 1}, protected=["2026-11-20T09:00", "2026-11-24T13:00"])
    assert kept == {"2026-11-24T13:00": ["last 1", "protected"], "2026-11-20T09:00": ["protected"]}


def test_newest_point_survives_a_policy_of_zeros() -> None:
    """A policy whose every count is 0 is a policy (unlike {}): it removes all but the newest point."""
    assert reasons(DAYS, {"keep_last": 0, "keep_daily": 0}) == {"2026-11-24T13:00": [NEWEST]}
    assert reasons(DAYS, {"keep_weekly": 0}, protected=["2026-11-22T09:00"]) == {
        "2026-11-24T13:00": [NEWEST], "2026-11-22T09:00": ["protected"]}
    assert plan([], {"keep_last": 0}) == ([], [])


@pytest.mark.parametrize("value, message", [
    ([], "must be a JSON object"),
    ("keep_last=3", "must be a JSON object"),
    (None, "must be a JSON object"),
    ({"keep_dayly": 7}, "unknown retention setting 'keep_dayly'"),
    ({"keep_last": -1}, "keep_last must be a non-negative integer; got -1"),
    ({"keep_daily": 1.5}, "keep_daily must be a non-negative integer; got 1.5"),
    ({"keep_daily": "7"}, "non-negative integer"),
    ({"keep_daily": True}, "non-negative integer; got true"),
    ({"keep_daily": None}, "non-negative integer; got null"),
])
def test_malformed_policies(value: object, message: str) -> None:
    with pytest.raises(Invalid, match=re.escape(message)):
        check_policy(value)


def test_check_policy_keeps_what_was_given() -> None:
    assert check_policy({"keep_yearly": 9, "keep_last": 0}) == {"keep_last": 0, "keep_yearly": 9}
    assert check_policy({}) == {}


def test_policies_file(tmp_path: Path) -> None:
    policies = Policies(tmp_path / "retention.json")
    assert policies.all() == {}
    policies.set(DEFAULT, {"keep_daily": 7})
    policies.set("vm1", {})
    policies.set("vm2", {"keep_last": 2})
    policies.set("vm2", None)
    assert Policies(tmp_path / "retention.json").all() == {DEFAULT: {"keep_daily": 7}, "vm1": {}}
    (tmp_path / "retention.json").write_text('{"vm1": {"keep_last": -1}}')
    with pytest.raises(Corrupt, match=r"retention\.json is unreadable"):
        policies.all()


# ------------------------------------------------------------------------------------------ the API


async def finish(client: Client, job: dict) -> dict:
    """Poll a job until it ends; its result."""
    while job["state"] == "running":
        await asyncio.sleep(0.05)
        job = await client.job(job["id"])
    assert job["state"] == "done", job
    return job["result"]


async def run_prune(client: Client, **kwargs) -> dict:
    return await finish(client, await client.prune(**kwargs))


async def backups(client: Client, vm: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """n points of a VM, each with a different 2-chunk disk: (point id, image), oldest first."""
    out = []
    for i in range(n):
        disk = make_disk("rr", seed=seed + i)
        out.append(((await backup(client, vm, {"d0": disk}))["point_id"], disk))
    return out


def by_vm(result: dict) -> dict[str, dict]:
    return {v["vm"]: v for v in result["vms"]}


async def test_policies_api(server: ServerProcess, admin: Client) -> None:
    assert await admin.retention() == {"default": None, "vms": {}}
    await admin.set_retention({"keep_daily": 7, "keep_last": 3})
    await admin.set_retention({"keep_last": 2}, "vm1")
    await admin.set_retention({}, "vm3")
    assert await admin.retention() == {"default": {"keep_last": 3, "keep_daily": 7},
                                       "vms": {"vm1": {"keep_last": 2}, "vm3": {}}}
    vm1 = await admin.retention("vm1")
    assert (vm1["policy"], vm1["effective"], vm1["source"]) == ({"keep_last": 2}, {"keep_last": 2}, "vm")
    vm2 = await admin.retention("vm2")
    assert (vm2["policy"], vm2["effective"], vm2["source"]) == (None, {"keep_last": 3, "keep_daily": 7}, "default")
    await admin.set_retention(None, "vm1")
    assert (await admin.retention("vm1"))["source"] == "default"
    await admin.set_retention(None)
    assert (await admin.retention("vm1"))["source"] is None
    assert json.loads((server.data / "retention.json").read_text()) == {"vm3": {}}


@pytest.mark.parametrize("path", ["/retention", "/vms/vm1/retention"])
async def test_malformed_policies_are_refused(server: ServerProcess, admin: Client, path: str) -> None:
    for body, message in [([1], "must be a JSON object"), ({"keep_last": -2}, "non-negative integer"),
                          ({"keep_last": 2.0}, "non-negative integer"), ({"keep_hours": 1}, "unknown retention")]:
        with pytest.raises(ApiError) as e:
            await admin.json("PUT", path, body)
        assert e.value.status == 422 and message in e.value.message, body
    with pytest.raises(ApiError) as e:
        await admin._request("PUT", path, data=b"{not json")
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        await admin.json("PUT", "/vms/..bad/retention", {})
    assert e.value.status == 422 and "VM id" in e.value.message
    for body, message in [({"policy": {"keep_last": "1"}}, "non-negative integer"), ({"dry_run": "no"}, "dry_run"),
                          ({"dryrun": False}, "the body may hold"), ({"vm": "../x"}, "VM id")]:
        with pytest.raises(ApiError) as e:
            await admin.json("POST", "/admin/prune", body)
        assert e.value.status == 422 and message in e.value.message, body
    with pytest.raises(ApiError) as e:
        await admin.prune(vm="nosuchvm")
    assert e.value.status == 404
    assert await admin.retention() == {"default": None, "vms": {}}


async def test_roles(server: ServerProcess, admin: Client, collector: Client) -> None:
    (pid, _), = await backups(admin, "vm1", 1, seed=1)
    reader_token = (await admin.create_token("reader", "r"))["token"]
    async with server.client(reader_token) as reader:
        for client in (reader, collector):
            for call in (lambda c: c.set_retention({"keep_last": 1}), lambda c: c.set_retention({}, "vm1"),
                         lambda c: c.set_retention(None), lambda c: c.prune(),
                         lambda c: c.protect(pid), lambda c: c.protect(pid, False)):
                with pytest.raises(ApiError) as e:
                    await call(client)
                assert e.value.status == 403
        assert (await reader.retention("vm1"))["source"] is None
        with pytest.raises(ApiError) as e:
            await collector.retention()
        assert e.value.status == 403
        assert (await reader.point(pid))["protected"] is False


async def test_dry_run_then_prune(server: ServerProcess, admin: Client) -> None:
    vm1 = await backups(admin, "vm1", 4, seed=10)
    vm2 = await backups(admin, "vm2", 2, seed=20)
    await admin.set_retention({"keep_last": 2}, "vm1")
    dry = await run_prune(admin)
    assert dry["dry_run"] and (dry["kept"], dry["removed"]) == (4, 2)
    plan1 = by_vm(dry)["vm1"]
    assert [(p["point_id"], p["reasons"]) for p in plan1["kept"]] == [(vm1[3][0], ["last 1"]),
                                                                       (vm1[2][0], ["last 2"])]
    assert [p["point_id"] for p in plan1["removed"]] == [vm1[1][0], vm1[0][0]]
    assert (plan1["source"], plan1["policy"]) == ("vm", {"keep_last": 2})
    assert "every point is kept" in by_vm(dry)["vm2"]["note"]
    assert len(await admin.points("vm1")) == 4  # the dry run deleted nothing

    done = await run_prune(admin, dry_run=False)
    assert not done["dry_run"] and "garbage collection" in done["note"]
    assert by_vm(done)["vm1"]["removed"] == plan1["removed"]
    assert [p["point_id"] for p in await admin.points("vm1")] == [vm1[2][0], vm1[3][0]]
    assert len(await admin.points("vm2")) == 2
    for pid, _ in vm1[:2]:
        with pytest.raises(ApiError) as e:
            await admin.point(pid)
        assert e.value.status == 404
    freed = await finish(admin, await admin.json("POST", "/admin/gc"))
    assert freed["swept_chunks"] == 2 * 2 + 2  # the two removed disks and their manifest pages
    for pid, disk in vm1[2:] + vm2:
        assert await restore(admin, pid, "d0") == disk
    assert (await run_prune(admin, dry_run=False))["removed"] == 0  # nothing left to do


async def test_protection(server: ServerProcess, admin: Client) -> None:
    points = await backups(admin, "vm1", 3, seed=30)
    oldest, middle, newest = (pid for pid, _ in points)
    shown = await admin.protect(oldest, note="legal hold")
    assert shown["protected"] and shown["protection"]["note"] == "legal hold"
    assert [p["protected"] for p in await admin.points("vm1")] == [True, False, False]
    with pytest.raises(ApiError) as e:
        await admin.delete_point(oldest)
    assert e.value.status == 409 and "protected (legal hold)" in e.value.message and "--off" in e.value.message

    zeros = by_vm(await run_prune(admin, policy={"keep_last": 0}))["vm1"]  # the safety net, dry
    assert {p["point_id"]: p["reasons"] for p in zeros["kept"]} == {newest: [NEWEST], oldest: ["protected"]}
    result = by_vm(await run_prune(admin, dry_run=False, policy={"keep_last": 1}))["vm1"]
    assert (result["source"], result["policy"]) == ("override", {"keep_last": 1})
    assert {p["point_id"]: p["reasons"] for p in result["kept"]} == {newest: ["last 1"], oldest: ["protected"]}
    assert [p["point_id"] for p in result["removed"]] == [middle]
    assert await restore(admin, oldest, "d0") == points[0][1]

    assert (await admin.protect(oldest, False))["protected"] is False
    await admin.delete_point(oldest)
    assert [p["point_id"] for p in await admin.points("vm1")] == [newest]
    for body in ({"protected": "yes"}, {"note": "x"}, {"protected": True, "note": 5},
                 {"protected": True, "note": "x" * 1001}, {"protected": True, "why": ""}):
        with pytest.raises(ApiError) as e:
            await admin.json("PUT", f"/points/{newest}/protection", body)
        assert e.value.status == 422, body
    with pytest.raises(ApiError) as e:
        await admin.protect(oldest)
    assert e.value.status == 404


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], capture_output=True, text=True, cwd=ROOT)


async def test_protection_and_policies_survive_restart_and_index_rebuild(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    try:
        async with srv.client() as admin:
            points = await backups(admin, "vm1", 3, seed=40)
            await admin.protect(points[0][0], note="audit")
            await admin.set_retention({"keep_last": 1})
        srv.restart()
        async with srv.client() as admin:
            assert (await admin.point(points[0][0]))["protection"]["note"] == "audit"
            assert (await admin.retention())["default"] == {"keep_last": 1}
        srv.stop()
        shutil.rmtree(srv.data / "index")
        out = cli("repair", "--rebuild-index", "--data", str(srv.data))
        assert out.returncode == 0 and "3 points" in out.stdout, out.stderr
        out = cli("token", "create", "--role", "admin", "--data", str(srv.data), "--json")
        token = json.loads(out.stdout)["token"]
        srv.start()
        async with srv.client(token) as admin:
            assert [p["protected"] for p in await admin.points("vm1")] == [True, False, False]
            assert (await admin.retention())["default"] == {"keep_last": 1}
            result = by_vm(await run_prune(admin, dry_run=False))["vm1"]
            assert [p["point_id"] for p in result["removed"]] == [points[1][0]]
            assert {p["point_id"]: p["reasons"] for p in result["kept"]} == {points[2][0]: ["last 1"],
                                                                            points[0][0]: ["protected"]}
            assert await restore(admin, points[0][0], "d0") == points[0][1]
    finally:
        srv.stop()


async def test_cli(server: ServerProcess, admin: Client) -> None:
    (old, _), (new, _) = await backups(admin, "vm1", 2, seed=50)
    base = ["--server", server.url, "--token", server.admin_token]
    out = cli("retention", "set", "--vm", "vm1", "--keep-last", "1", "--keep-daily", "0", *base)
    assert out.returncode == 0 and "VM vm1: last 1, daily 0." in out.stdout, out.stderr
    out = cli("retention", "show", "--vm", "vm1", *base)
    assert "prune keeps: last 1, daily 0 (its own)" in out.stdout
    out = cli("retention", "show", *base)
    assert "(default)" in out.stdout and "vm1" in out.stdout
    out = cli("protect", old, "--note", "keep me", *base)
    assert out.returncode == 0 and "is protected (keep me)" in out.stdout, out.stderr
    out = cli("prune", *base)
    assert out.returncode == 0 and "Dry run: 0 points would be removed" in out.stdout, out.stderr
    assert "protected" in out.stdout and "last 1, daily " in out.stdout
    assert "is no longer protected" in cli("protect", old, "--off", *base).stdout
    out = cli("prune", *base)
    assert f"WOULD GO  {old}" in out.stdout and "run again with --yes" in out.stdout
    out = cli("prune", "--keep-last", "2", *base, "--json")
    assert json.loads(out.stdout)["removed"] == 0  # flags override the stored policy
    out = cli("prune", "--yes", *base)
    assert out.returncode == 0 and "Removed 1 points, kept 1" in out.stdout, out.stderr
    assert [p["point_id"] for p in await admin.points("vm1")] == [new]
    out = cli("retention", "set", "--keep-last", "-1", *base)
    assert out.returncode == 2 and "non-negative integer" in out.stderr
    out = cli("retention", "unset", "--vm", "vm1", *base)
    assert out.returncode == 0 and "the repository default applies" in out.stdout
