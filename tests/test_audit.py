"""The audit log: every administrative action leaves one JSON line in data/audit.log (who, what, when, target,
outcome), readable at GET /audit (a tenant-scoped admin: its tenant's records only) and with `chunkyard audit`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chunkyard.wire import ApiError, Client
from repo_server.engine.audit import AuditLog
from tests.conftest import ROOT, ServerProcess
from tests.helpers import backup, make_disk


async def finish(client: Client, job: dict) -> dict:
    while job["state"] == "running":
        job = await client.job(job["id"])
    return job


def records(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in (server.data / "audit.log").read_text().splitlines()]


async def test_admin_actions_are_audited(server: ServerProcess, admin: Client):
    admin_id = next(t["id"] for t in await admin.tokens())
    collector = await admin.create_token("collector", "host 7")
    async with server.client(collector["token"]) as c:
        p1 = (await backup(c, "vm1", {"d0": make_disk("rr", seed=1)}))["point_id"]
        p2 = (await backup(c, "vm1", {"d0": make_disk("rc", seed=1)}))["point_id"]
    await admin.protect(p1, note="legal hold")
    with pytest.raises(ApiError):
        await admin.delete_point(p1)  # refused: protected
    await admin.protect(p1, False)
    await admin.delete_point(p1)
    await admin.set_retention({"keep_last": 1}, "vm1")
    await admin.set_retention({"keep_daily": 3})
    await admin.set_retention(None)
    await finish(admin, await admin.prune(dry_run=True))
    await finish(admin, await admin.json("POST", "/admin/gc", {}))
    await finish(admin, await admin.json("POST", "/admin/verify", {"mode": "all"}))
    await admin.json("POST", "/tiers/sync", {})
    await admin.revoke_token(collector["id"])

    got = [(r["action"], r["target"], r["outcome"]) for r in records(server)]
    expected = [
        ("token.create", collector["id"], "ok"),
        ("point.protect", p1, "ok"),
        ("point.delete", p1, "failed"),
        ("point.protect", p1, "ok"),
        ("point.delete", p1, "ok"),
        ("retention.set", "vm1", "ok"),
        ("retention.set", "*", "ok"),
        ("retention.unset", "*", "ok"),
        ("prune", None, "started"), ("prune", None, "done"),
        ("gc", None, "started"), ("gc", None, "done"),
        ("verify", None, "started"), ("verify", None, "done"),
        ("tier.sync", None, "ok"),
        ("token.revoke", collector["id"], "ok"),
    ]
    assert got == expected
    first, failed = records(server)[0], records(server)[2]
    assert first["who"] == {"token_id": admin_id, "name": "initial admin", "tenant": ""}
    assert first["details"] == {"role": "collector", "name": "host 7", "expires": None}
    assert failed["details"]["error"] == "point_protected"
    assert all(isinstance(r["time"], float) for r in records(server))

    # GET /audit: newest first, limited.
    newest = await admin.audit(limit=3)
    assert [r["action"] for r in newest] == ["token.revoke", "tier.sync", "verify"]
    assert len(await admin.audit(limit=10000)) == len(expected)
    assert p2  # the second point stays untouched

    # `chunkyard audit` prints them oldest first.
    done = subprocess.run([sys.executable, "-m", "chunkyard.cli", "audit", "--limit", "4", "--server", server.url,
                           "--token", server.admin_token], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ACTION" in lines[0] and len(lines) == 5
    assert "token.revoke" in lines[-1] and "verify" in lines[1]


async def test_tenant_admins_see_their_own_records_and_denials_are_recorded(server: ServerProcess, admin: Client):
    acme = await admin.create_token("admin", "acme admin", tenant="acme")
    await admin.create_token("reader", "globex reader", tenant="globex")
    async with server.client(acme["token"]) as a:
        await a.create_token("collector", "acme collector")
        with pytest.raises(ApiError) as info:
            await a.json("POST", "/admin/gc", {})
        assert info.value.status == 403
        mine = await a.audit()
        assert [(r["action"], r["outcome"]) for r in mine] == [("gc", "denied"), ("token.create", "ok"),
                                                                 ("token.create", "ok")]
        assert all("globex" not in json.dumps(r) for r in mine)
        assert mine[0]["who"]["tenant"] == "acme"
    everything = await admin.audit()
    assert {r["tenant"] for r in everything} == {"acme", "globex"}
    # The operator's changes to an acme VM's policy are on acme's record too.
    collector = await admin.create_token("collector", "acme host", tenant="acme")
    async with server.client(collector["token"]) as c:
        await c.create_session(host="h", vm={"id": "vm-acme", "name": "a"}, disks=[{"disk_id": "d0", "size": 4096}])
    await admin.set_retention({"keep_last": 2}, "vm-acme")
    async with server.client(acme["token"]) as a:
        newest = (await a.audit(limit=1))[0]
    assert (newest["action"], newest["target"], newest["who"]["tenant"]) == ("retention.set", "vm-acme", "")

    reader = await admin.create_token("reader", "r")
    async with server.client(reader["token"]) as r:
        with pytest.raises(ApiError) as info:
            await r.audit()
        assert info.value.status == 403


async def test_malformed_audit_queries(server: ServerProcess, admin: Client):
    before = await admin.audit()
    for bad in ("0", "-1", "abc", "10001", "", "1.5", "99999999999999999999999", "%00"):
        with pytest.raises(ApiError) as info:
            await admin.json("GET", f"/audit?limit={bad}")
        assert (info.value.status, info.value.code) == (422, "bad_limit"), bad
    assert await admin.audit() == before
    done = subprocess.run([sys.executable, "-m", "chunkyard.cli", "audit", "--limit", "0", "--server", server.url,
                           "--token", server.admin_token], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--limit" in done.stderr


def test_log_reads_past_torn_and_garbage_lines(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.log")
    who = {"token_id": "t", "name": "n", "tenant": "acme"}
    for i in range(3000):  # several read blocks
        log.append(who, "point.delete", f"p{i}", tenant="acme" if i % 2 else "globex")
    with open(log.path, "ab") as f:
        f.write(b'["a list"]\n\xff\xfe garbage\n{"time": 1, "who": {"tenant": "ac')  # torn by a crash
    newest = log.tail(5)
    assert [r["target"] for r in newest] == ["p2999", "p2998", "p2997", "p2996", "p2995"]
    assert [r["target"] for r in log.tail(3, "globex")] == ["p2998", "p2996", "p2994"]
    assert len(log.tail(10000)) == 3000
    log.append(who, "gc", None)  # appending after a torn line starts a fresh line
    assert log.tail(1)[0]["action"] == "gc"
    assert AuditLog(tmp_path / "absent.log").tail(10) == []


def test_offline_commands_are_audited(tmp_path: Path):
    data = tmp_path / "data"
    ServerProcess(data)  # initialises the repository
    run = [sys.executable, "-m", "chunkyard.cli"]
    made = subprocess.run([*run, "token", "create", "--data", str(data), "--role", "reader", "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    token_id = json.loads(made.stdout)["id"]
    subprocess.run([*run, "token", "revoke", "--data", str(data), token_id], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run([*run, "repair", "--rebuild-index", "--data", str(data)], cwd=ROOT, check=True,
                   capture_output=True)
    lines = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    assert [(r["action"], r["target"]) for r in lines] == [("token.create", token_id), ("token.revoke", token_id),
                                                           ("repair", "rebuild-index")]
    assert all(r["who"]["token_id"] is None and r["who"]["name"].startswith("local user") for r in lines)
    assert lines[2]["details"]["tokens_kept"] >= 1
