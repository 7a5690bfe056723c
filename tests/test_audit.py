"""The audit log: every administrative action leaves one JSON line in data/audit.log (who, what, when, target,
outcome), readable at GET /audit (a tenant-scoped admin: its tenant's records only) and with `chunkyard audit`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from chunkyard.config import ConfigError, load_config
from chunkyard.wire import ApiError, Client
from repo_server.engine.audit import MANY, AuditLog, RefusalThrottle
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


async def test_bad_input_to_the_maintenance_starters_is_recorded_as_refused(server: ServerProcess, admin: Client):
    bad = [("/admin/gc", b'{"compact_below": 5}', 422), ("/admin/gc", b'{"compact_below": "0.5"}', 422),
           ("/admin/gc", b"[1, 2]", 422), ("/admin/gc", b"\xff\xfe garbage", 400),
           ("/admin/verify", b'{"mode": "everything"}', 422), ("/admin/verify", b'{"percent": 1e308}', 422),
           ("/admin/verify", b'"all"', 422), ("/admin/prune", b'{"dry_run": "no"}', 422),
           ("/admin/prune", b'{"vm": "' + b"x" * 5000 + b'"}', 422),
           ("/admin/prune", b'{"vm": ' + b"7" * 5000 + b"}", 400), ("/admin/prune", b'{"unknown": 1}', 422),
           ("/admin/gc", b"{" * 2_000_000, 413)]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_token}"}) as http:
        for path, body, status in bad:
            async with http.post(server.url + "/api/v1" + path, data=body) as r:
                assert r.status == status, (path, body[:40], await r.text())
    got = records(server)
    assert len(got) == len(bad)  # one record each, nothing started
    for record, (path, _, status) in zip(got, bad, strict=True):
        assert record["action"] == path.rsplit("/", 1)[1] and record["outcome"] == "refused", record
        assert record["details"].get("status", 422) == status and record["details"]["message"]  # Invalid: 422
    assert (await admin.json("GET", "/jobs"))["jobs"] == []  # and no job started


def test_refusal_throttle_windows_and_bounds():
    t = RefusalThrottle(window=60, max_keys=2)
    a, b = ("10.0.0.1", "unauthorized", None), ("10.0.0.2", "unauthorized", None)
    assert t.add(a, {"n": 1}, 0) == {"n": 1, "count": 1, "since": 0}  # a quiet key: recorded at once
    assert t.add(a, {"n": 2}, 10) is None and t.add(a, {"n": 3}, 20) is None  # then only counted
    assert t.due(59.9) == []
    assert t.due(60) == [{"n": 3, "count": 2, "since": 10}]  # the summary, when the window has passed
    assert t.add(a, {"n": 4}, 70) is None  # the summary opened a new window: still one record per window
    assert t.due(130) == [{"n": 4, "count": 1, "since": 70}]
    assert t.due(200) == []  # a window with nothing: the key is forgotten
    assert t.add(a, {"n": 5}, 201) == {"n": 5, "count": 1, "since": 201}
    assert t.add(a, {"n": 6}, 205) is None
    # The next refusal after the window carries the counted ones when no due() ran in between.
    assert t.add(a, {"n": 7}, 300) == {"n": 7, "count": 2, "since": 205}
    assert t.add(b, {"n": 8}, 300)["count"] == 1
    flood = [t.add((f"10.1.0.{i}", "unauthorized", None), {"source": f"10.1.0.{i}"}, 301) for i in range(500)]
    assert flood[0] == {"source": MANY[0], "count": 1, "since": 301}  # beyond max_keys: one shared key
    assert flood[1:] == [None] * 499
    assert t.due(361) == [{"source": MANY[0], "count": 499, "since": 301}]


AUDIT_WINDOW = 3.0


async def test_refused_tokens_on_admin_routes_are_recorded_throttled_and_never_the_secret(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text(f"[server]\naudit_refusal_window_seconds = {AUDIT_WINDOW}\n")
    server = ServerProcess(tmp_path / "data", config=config)
    server.start()
    try:
        async with server.client() as admin:
            old = await admin.create_token("admin", "old acme admin", tenant="acme", expires_in=1)
        await asyncio.sleep(1.2)
        unknown = "cy_" + "A" * 43
        sent = {"unauthorized": 0, "token_expired": 0}
        started = time.time()
        async with aiohttp.ClientSession() as http:
            async def attempt(method: str, path: str, header: str | None) -> int:
                headers = {} if header is None else {"Authorization": header}
                async with http.request(method, server.url + "/api/v1" + path, headers=headers) as r:
                    return r.status

            for i in range(60):  # a scanner: admin routes, bad and missing tokens
                method, path = [("POST", "/admin/gc"), ("GET", "/tokens"), ("GET", "/audit"),
                                ("DELETE", "/tokens/0123456789abcdef"), ("POST", "/backup-jobs")][i % 5]
                header = [f"Bearer {unknown}", None, "Basic YWRtaW46YWRtaW4=", "Bearer \u00ff garbage"][i % 4]
                assert await attempt(method, path, header) == 401
                sent["unauthorized"] += 1
            for _ in range(10):
                assert await attempt("POST", "/admin/gc", f"Bearer {old['token']}") == 401
                sent["token_expired"] += 1
            for path in ("/vms", "/repository", "/collectors"):  # not administrative: no record
                assert await attempt("GET", path, f"Bearer {unknown}") == 401
        assert time.time() - started < AUDIT_WINDOW  # all within one window (else the counts split)

        def refusals() -> list[dict]:
            return [r for r in records(server) if r["action"] == "auth.refused"]

        first = refusals()
        assert len(first) == 2  # one per source, reason and token; the rest only counted
        by_error = {r["details"]["error"]: r for r in first}
        anon, expired = by_error["unauthorized"], by_error["token_expired"]
        assert anon["who"] == {"token_id": None, "name": "anonymous", "tenant": ""}
        assert anon["outcome"] == "refused" and anon["target"] == "POST /api/v1/admin/gc"
        assert anon["details"]["source"] == "127.0.0.1" and anon["details"]["count"] == 1
        assert expired["who"] == {"token_id": old["id"], "name": "old acme admin", "tenant": "acme"}
        assert expired["tenant"] == "acme"  # on the tenant's own record too

        deadline = time.monotonic() + AUDIT_WINDOW + 15
        while sum(r["details"]["count"] for r in refusals()) < sum(sent.values()):
            assert time.monotonic() < deadline, refusals()
            await asyncio.sleep(0.2)
        summaries = refusals()[2:]
        assert len(summaries) == 2 and all(r["details"]["count"] > 1 for r in summaries)
        totals = {e: sum(r["details"]["count"] for r in refusals() if r["details"]["error"] == e) for e in sent}
        assert totals == sent

        # The next flood is held for the window's summary, and a shutdown writes what is still counted.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {unknown}"}) as http:
            for _ in range(5):
                async with http.get(server.url + "/api/v1/tokens") as r:
                    assert r.status == 401
        held = len(refusals())
        server.stop()
        assert len(refusals()) in (held, held + 1)
        assert sum(r["details"]["count"] for r in refusals()) == sum(sent.values()) + 5
        text = (server.data / "audit.log").read_text()
        assert unknown not in text and old["token"] not in text and "YWRtaW46YWRtaW4" not in text
    finally:
        server.stop()


def test_refusal_window_setting_is_checked(tmp_path: Path):
    for bad in ('"60"', "-1", "0", "true", "[60]"):
        config = tmp_path / "bad.toml"
        config.write_text(f"[server]\naudit_refusal_window_seconds = {bad}\n")
        with pytest.raises(ConfigError, match="audit_refusal_window_seconds"):
            load_config(config)
    config.write_text("[server]\naudit_refusal_window_seconds = 5\n")
    assert load_config(config).audit_refusal_window_seconds == 5
