"""Tenants over real HTTP: two tenants with scoped admin, collector and reader tokens on one real server.

Isolation of every catalog and download route, /repository, token scoping, VM ownership, and the
`missing` side channel: dedup stays global, but a tenant learns nothing of another tenant's data.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest

from chunkyard.wire import ApiError, Client, bitmap_get, digest, make_frame
from tests.conftest import ROOT, ServerProcess
from tests.helpers import MiB, backup, chunks_of, make_disk, restore

CHUNK = MiB


@dataclass
class Tenant:
    name: str
    admin: Client
    collector: Client
    reader: Client


async def refused(call: Awaitable, status: int, code: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        await call
    assert info.value.status == status, info.value
    if code is not None:
        assert info.value.code == code, info.value
    return info.value


async def drain(client: Client, pid: str, disk: str, fmt: str) -> bytes:
    out = bytearray()
    async for data in client.stream_disk(pid, disk, fmt=fmt):
        out += data
    return bytes(out)


@pytest.fixture
async def tenants(server: ServerProcess, admin: Client):
    made: dict[str, Tenant] = {}
    clients = []
    for name in ("acme", "globex"):
        roles = {}
        for role in ("admin", "collector", "reader"):
            token = (await admin.create_token(role, f"{name} {role}", tenant=name))["token"]
            roles[role] = server.client(token)
            clients.append(roles[role])
        made[name] = Tenant(name, **roles)
    yield made
    for c in clients:
        await c.close()


def session_body(vm_id: str, size: int) -> dict:
    return {"host": "h1", "vm": {"id": vm_id, "name": vm_id}, "base": None,
            "disks": [{"disk_id": "d0", "name": "d0.vhdx", "size": size}]}


async def test_every_catalog_and_download_route_is_isolated(server: ServerProcess, admin: Client, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    disk_a, disk_g = make_disk("rrzc", seed=1), make_disk("rcr", seed=2)
    a = await backup(acme.collector, "vm-acme", {"d0": disk_a}, commit=False)
    await acme.collector.put_blob(a["session_id"], "vm.json", b'{"acme": 1}')
    a |= await acme.collector.commit(a["session_id"])
    g = await backup(globex.collector, "vm-globex", {"d0": disk_g})
    gpid = g["point_id"]

    # Each tenant sees its own VM only; the operator sees both.
    assert [v["id"] for v in await acme.reader.vms()] == ["vm-acme"]
    assert [v["id"] for v in await globex.admin.vms()] == ["vm-globex"]
    assert sorted(v["id"] for v in await admin.vms()) == ["vm-acme", "vm-globex"]
    assert {v["id"]: v["tenant"] for v in await admin.vms()} == {"vm-acme": "acme", "vm-globex": "globex"}
    assert (await acme.reader.point(a["point_id"]))["tenant"] == "acme"
    assert await restore(acme.reader, a["point_id"], "d0") == disk_a
    assert await acme.reader.blob(a["point_id"], "vm.json") == b'{"acme": 1}'

    # Another tenant's objects answer exactly like objects that do not exist.
    unknown = "0" * 20
    for client in (acme.reader, acme.admin):
        gone = await refused(client.points("vm-globex"), 404, "vm_not_found")
        assert gone.message == (await refused(client.points("vm-nobody"), 404, "vm_not_found")).message.replace(
            "vm-nobody", "vm-globex")
        for call, pid in ((client.point, gpid), (client.point, unknown)):
            assert "globex" not in (await refused(call(pid), 404, "point_not_found")).message
        await refused(client.disk_map(gpid, "d0"), 404, "point_not_found")
        await refused(drain(client, gpid, "d0", "raw"), 404, "point_not_found")
        await refused(drain(client, gpid, "d0", "vhdx"), 404, "point_not_found")
        await refused(client.blob(gpid, "vm.json"), 404, "point_not_found")
        await refused(client.retention("vm-globex"), 404, "vm_not_found")
    await refused(acme.collector.disk_map(gpid, "d0"), 404, "point_not_found")
    await refused(acme.admin.delete_point(gpid), 404, "point_not_found")
    await refused(acme.admin.protect(gpid), 404, "point_not_found")
    await refused(acme.admin.set_retention({"keep_last": 1}, "vm-globex"), 404, "vm_not_found")
    await refused(acme.admin.set_retention(None, "vm-globex"), 404, "vm_not_found")
    await refused(acme.admin.prune(vm="vm-globex", dry_run=False), 404, "vm_not_found")
    # The repository default applies to every tenant: only the operator sets it.
    await refused(acme.admin.set_retention({"keep_last": 1}), 403, "operator_only")
    await refused(acme.admin.set_retention(None), 403, "operator_only")

    # Retention listings show a tenant its own VMs' policies only.
    await admin.set_retention({"keep_last": 5}, "vm-globex")
    await acme.admin.set_retention({"keep_last": 2}, "vm-acme")
    assert (await acme.reader.retention())["vms"] == {"vm-acme": {"keep_last": 2}}
    assert set((await admin.retention())["vms"]) == {"vm-acme", "vm-globex"}

    # A tenant's prune covers its VMs only, even with a policy that would remove everything else.
    g2 = await backup(globex.collector, "vm-globex", {"d0": disk_g})
    job = await acme.admin.prune(dry_run=False, policy={"keep_last": 1})
    while job["state"] == "running":
        job = await acme.admin.job(job["id"])
    assert job["state"] == "done", job
    assert [v["vm"] for v in job["result"]["vms"]] == ["vm-acme"]
    assert len(await globex.reader.points("vm-globex")) == 2
    # Jobs: a tenant sees its own only.
    assert [j["id"] for j in (await acme.admin.json("GET", "/jobs"))["jobs"]] == [job["id"]]
    await refused(globex.admin.job(job["id"]), 404, "job_not_found")

    # Whole-repository maintenance and figures are the operator's.
    for path in ("/admin/gc", "/admin/verify", "/tiers/sync"):
        await refused(acme.admin.json("POST", path, {}), 403, "operator_only")
    for path in ("/metrics", "/tiers"):
        await refused(acme.reader._request("GET", path), 403, "operator_only")

    # /repository: a tenant's own figures, never the global unique/stored bytes.
    mine = await acme.reader.repository()
    assert mine["tenant"] == "acme" and mine["vm_count"] == 1 and mine["point_count"] == 1
    assert mine["logical_bytes"] == 3 * CHUNK  # r, r, c allocated; the zero chunk is not
    assert not {"unique_bytes", "stored_bytes", "chunk_count", "pack_count", "dedup_ratio"} & set(mine)
    theirs = await globex.collector.repository()
    assert (theirs["vm_count"], theirs["point_count"], theirs["logical_bytes"]) == (1, 2, 2 * 3 * CHUNK)
    everything = await admin.repository()
    assert everything["point_count"] == 3 and "stored_bytes" in everything

    # VM ids are owned by the tenant that first opened a session for them.
    stolen = await refused(globex.collector.create_session(
        host="h1", vm={"id": "vm-acme", "name": "x"}, disks=[{"disk_id": "d0", "size": CHUNK}]), 403, "vm_not_yours")
    assert "acme" not in stolen.message.replace("vm-acme", "")
    await refused(globex.collector.create_session(host="h1", vm={"id": "vm-x", "name": "x"}, base=a["point_id"],
                                                  disks=[{"disk_id": "d0", "size": CHUNK}]), 404, "point_not_found")
    # A tenant's open session is invisible to the other tenant's admin.
    open_a = await acme.collector.create_session(host="h1", vm={"id": "vm-acme", "name": "a"},
                                                 disks=[{"disk_id": "d0", "size": CHUNK}])
    for call in (globex.admin.session(open_a["session_id"]), globex.admin.abort(open_a["session_id"]),
                 globex.admin.missing(open_a["session_id"], [digest(b"x")])):
        await refused(call, 404, "session_not_found")
    assert (await admin.session(open_a["session_id"]))["tenant"] == "acme"
    # The operator may back up into a tenant's VM; the point then belongs to that tenant.
    op = await backup(admin, "vm-acme", {"d0": disk_a})
    assert (await acme.reader.point(op["point_id"]))["tenant"] == "acme"
    assert g2["point_id"] in [p["point_id"] for p in await admin.points("vm-globex")]


async def test_token_scoping(server: ServerProcess, admin: Client, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    made = await acme.admin.create_token("collector", "acme host 2")
    assert made["tenant"] == "acme"  # a scoped admin's tokens are its tenant's by default
    assert (await acme.admin.create_token("reader", "r", tenant="acme"))["tenant"] == "acme"
    for other in ("globex", ""):
        await refused(acme.admin.create_token("admin", "escalate", tenant=other), 403, "forbidden")
    listed = await acme.admin.tokens()
    assert {t["tenant"] for t in listed} == {"acme"} and made["id"] in {t["id"] for t in listed}
    assert {t["tenant"] for t in await admin.tokens()} == {"", "acme", "globex"}
    globex_ids = [t["id"] for t in await globex.admin.tokens()]
    unknown = await refused(acme.admin.revoke_token("ffffffffffffffff"), 404, "token_not_found")
    for token_id in globex_ids:
        foreign = await refused(acme.admin.revoke_token(token_id), 404, "token_not_found")
        assert foreign.message.replace(token_id, "X") == unknown.message.replace("ffffffffffffffff", "X")
    assert [t["id"] for t in await globex.admin.tokens()] == globex_ids
    await acme.admin.revoke_token(made["id"])
    assert made["id"] not in {t["id"] for t in await acme.admin.tokens()}
    # The operator creates tokens for any tenant; a tenant collector of a fresh tenant works at once.
    initech = await admin.create_token("collector", "i", tenant="initech")
    async with server.client(initech["token"]) as c:
        await backup(c, "vm-initech", {"d0": make_disk("r", seed=9)})
    assert [v["id"] for v in await acme.reader.vms()] == []


async def open_session(client: Client, vm_id: str, size: int) -> str:
    return (await client.json("POST", "/sessions", session_body(vm_id, size)))["session_id"]


async def test_missing_does_not_reveal_other_tenants_chunks(server: ServerProcess, admin: Client, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    disk = make_disk("rrrrcz", seed=5)
    pieces = [p for p in chunks_of(disk, CHUNK) if any(p)]
    digests = [digest(p) for p in pieces]
    await backup(acme.collector, "vm-a", {"d0": disk})
    before = await admin.repository()

    # Globex holds the very same disk: it must upload every chunk (the bitmap is all ones) ...
    sid = await open_session(globex.collector, "vm-g", len(disk))
    bitmap = await globex.collector.missing(sid, digests)
    assert all(bitmap_get(bitmap, i) for i in range(len(digests)))
    answer = await globex.collector.upload(sid, [make_frame(p) for p in pieces])
    # ... and the upload's answer counts from globex's view: nothing was a "duplicate" for it.
    assert (answer["stored"], answer["duplicate"]) == (len(pieces), 0)
    await globex.collector.map(sid, "d0", list(enumerate(digest(p) for p in chunks_of(disk, CHUNK)))[:-1])
    point = await globex.collector.commit(sid)
    assert point["stats"]["new_bytes"] == len(pieces) * CHUNK
    # ... which the repository stored once: it holds no more chunks or bytes than before.
    after = await admin.repository()
    for key in ("chunk_count", "unique_bytes", "stored_bytes"):
        assert after[key] == before[key], key
    assert await restore(globex.reader, point["point_id"], "d0") == disk

    # Globex's second backup finds its own chunks present.
    sid = await open_session(globex.collector, "vm-g2", len(disk))
    assert not any(await globex.collector.missing(sid, digests))
    again = await globex.collector.upload(sid, [make_frame(pieces[0])])
    assert (again["stored"], again["duplicate"]) == (0, 1)
    await globex.collector.abort(sid)

    # Possession is per tenant: a chunk only globex has is still missing for acme, and an operator
    # session (unscoped) sees every stored chunk at full speed.
    own_g = make_disk("r", seed=77)
    await backup(globex.collector, "vm-g", {"d0": own_g})
    sid = await open_session(acme.collector, "vm-a", len(disk))
    bitmap = await acme.collector.missing(sid, [*digests, digest(own_g)])
    assert [bitmap_get(bitmap, i) for i in range(len(digests) + 1)] == [False] * len(digests) + [True]
    sid = await open_session(admin, "vm-operator", len(disk))
    assert not any(await admin.missing(sid, [*digests, digest(own_g)]))


async def test_mapping_a_guessed_digest_cannot_steal_another_tenants_data(server: ServerProcess, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    secret = make_disk("rr", seed=11)
    a = await backup(acme.collector, "vm-a", {"d0": secret})
    target = digest(secret[:CHUNK])  # the attacker guessed (or learned) the digest of acme's first chunk

    sid = await open_session(globex.collector, "vm-thief", len(secret))
    attack = await refused(globex.collector.map(sid, "d0", [(0, target)]), 422, "unknown_chunk")
    absent = await refused(globex.collector.map(sid, "d0", [(0, digest(b"never stored"))]), 422, "unknown_chunk")
    assert attack.message == absent.message  # not even the wording tells stored from absent
    point = await globex.collector.commit(sid)  # nothing was mapped: the point is all zeros
    assert await restore(globex.reader, point["point_id"], "d0") == bytes(len(secret))
    # Naming acme's point as a base, or reading its map, is refused like an unknown point.
    await refused(globex.collector.create_session(host="h", vm={"id": "vm-thief", "name": "t"}, base=a["point_id"],
                                                  disks=[{"disk_id": "d0", "size": len(secret)}]), 404,
                  "point_not_found")
    await refused(globex.reader.disk_map(a["point_id"], "d0"), 404, "point_not_found")
    # With the bytes in hand (proof of possession), globex may map the chunk.
    sid = await open_session(globex.collector, "vm-thief", len(secret))
    await globex.collector.upload(sid, [make_frame(secret[:CHUNK])])
    assert (await globex.collector.map(sid, "d0", [(0, target)]))["mapped"] == 1
    await globex.collector.abort(sid)


async def test_gc_drops_possession_and_rebuild_restores_it(server: ServerProcess, admin: Client, tenants):
    acme, globex = tenants["acme"], tenants["globex"]
    disk = make_disk("rr", seed=21)
    digests = [digest(p) for p in chunks_of(disk, CHUNK)]
    a = await backup(acme.collector, "vm-a", {"d0": disk})
    await admin.delete_point(a["point_id"])
    job = await admin.json("POST", "/admin/gc", {})
    while job["state"] == "running":
        job = await admin.job(job["id"])
    assert job["result"]["swept_chunks"] >= 2
    # Globex stores the same content afterwards; acme's old possession went with the sweep, so acme's
    # `missing` must not say "present" (that would reveal globex has it).
    g = await backup(globex.collector, "vm-g", {"d0": disk})
    assert g["uploaded"] == 2
    sid = await open_session(acme.collector, "vm-a", len(disk))
    bitmap = await acme.collector.missing(sid, digests)
    assert all(bitmap_get(bitmap, i) for i in range(2))
    await acme.collector.abort(sid)

    # An index rebuild recreates possession from the point files (each knows its tenant).
    server.stop()
    done = subprocess.run([sys.executable, "-m", "chunkyard.cli", "repair", "--rebuild-index", "--data",
                           str(server.data)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "possession" in done.stdout
    server.start()
    async with server.client(globex.collector.token) as gc, server.client(acme.collector.token) as ac:
        sid = await open_session(gc, "vm-g", len(disk))
        assert not any(await gc.missing(sid, digests))
        sid = await open_session(ac, "vm-a", len(disk))
        bitmap = await ac.missing(sid, digests)
        assert all(bitmap_get(bitmap, i) for i in range(2))
        # VM ownership survives the rebuild too.
        await refused(ac.create_session(host="h", vm={"id": "vm-g", "name": "g"},
                                        disks=[{"disk_id": "d0", "size": CHUNK}]), 403, "vm_not_yours")


async def test_malformed_tenant_and_expiry_fields(server: ServerProcess, admin: Client):
    before = await admin.tokens()
    bad = [
        {"role": "reader", "tenant": "ACME"}, {"role": "reader", "tenant": "a/b"}, {"role": "reader", "tenant": 7},
        {"role": "reader", "tenant": "x" * 65}, {"role": "reader", "tenant": None},
        {"role": "reader", "tenant": "\u00e9t\u00e9"}, {"role": "reader", "tenant": ["a"]},
        {"role": "reader", "expires_in": 0}, {"role": "reader", "expires_in": -5},
        {"role": "reader", "expires_in": "3600"}, {"role": "reader", "expires_in": True},
        {"role": "reader", "expires_in": 1e12}, {"role": "reader", "expires_in": float("inf")},
        {"role": "reader", "expires": 1}, {"role": "reader", "expires": "tomorrow"},
        {"role": "reader", "expires": 1e15}, {"role": "reader", "expires_in": 60, "expires": 4e9},
        {"role": "reader", "tenant_id": "acme"}, {"name": "no role", "tenant": "acme"},
    ]
    for body in bad:
        error = await refused(admin.json("POST", "/tokens", body), 422)
        assert error.message, body
    assert await admin.tokens() == before
    for garbage in (b"\xff\xfe", b'{"role": "reader", "tenant": ', b"[]"):
        resp = await admin._session.post(admin.base + "/tokens", data=garbage)
        assert resp.status in (400, 422)
        resp.release()
    assert await admin.tokens() == before


async def test_expired_tokens_are_refused_with_a_clear_message(server: ServerProcess, admin: Client, tmp_path):
    short = await admin.create_token("reader", "short", expires_in=1)
    assert short["expires"] is not None
    async with server.client(short["token"]) as c:
        await c.vms()
        import asyncio

        await asyncio.sleep(1.3)
        expired = await refused(c.vms(), 401, "token_expired")
        assert "expired" in expired.message and short["id"] in expired.message
    async with server.client("cy_unknown") as c:
        unknown = await refused(c.vms(), 401, "unauthorized")
        assert "expired" not in unknown.message
    listed = {t["id"]: t for t in await admin.tokens()}
    assert listed[short["id"]]["expired"] is True
    await admin.revoke_token(short["id"])  # expired records are kept until revoked

    # The CLI: --expires with a duration, the list shows tenant and expiry.
    env_server = ["--server", server.url, "--token", server.admin_token]
    made = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--role", "collector",
                           "--name", "acme-collector-1", "--tenant", "acme", "--expires", "30d", *env_server],
                          cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert "tenant acme" in made.stdout and "expires" in made.stdout
    listed = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "list", *env_server],
                            cwd=ROOT, capture_output=True, text=True)
    assert "TENANT" in listed.stdout and "EXPIRES" in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.endswith("acme-collector-1"))
    assert "acme" in row and "never" not in row
    for bad in ("0", "-3d", "soon", "12x"):
        failed = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--role", "reader",
                                 "--expires", bad, *env_server], cwd=ROOT, capture_output=True, text=True)
        assert failed.returncode == 2 and "--expires" in failed.stderr and "Traceback" not in failed.stderr


def test_offline_token_create_with_tenant_and_expiry(tmp_path: Path):
    data = tmp_path / "data"
    ServerProcess(data)  # only initialises the repository
    made = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--data", str(data), "--role",
                           "reader", "--tenant", "acme", "--expires", "2w", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    import json

    token = json.loads(made.stdout)
    assert token["tenant"] == "acme" and token["expires"] - token["created"] == pytest.approx(14 * 86400, abs=5)
    bad = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--data", str(data), "--role",
                          "reader", "--tenant", "Not Valid"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "tenant" in bad.stderr and "Traceback" not in bad.stderr


async def test_pins_still_protect_a_tenants_present_chunks_from_gc(server: ServerProcess, admin: Client, tenants):
    acme = tenants["acme"]
    disk = make_disk("rrc", seed=31)
    entries = list(enumerate(digest(p) for p in chunks_of(disk, CHUNK)))
    first = await backup(acme.collector, "vm-a", {"d0": disk})
    sid = await open_session(acme.collector, "vm-a", len(disk))
    assert not any(await acme.collector.missing(sid, [d for _, d in entries]))  # present: possessed and stored
    await admin.delete_point(first["point_id"])  # now only the session's pins hold the chunks
    job = await admin.json("POST", "/admin/gc", {})
    while job["state"] == "running":
        job = await admin.job(job["id"])
    assert job["state"] == "done", job
    assert (await acme.collector.map(sid, "d0", entries))["mapped"] == 3
    point = await acme.collector.commit(sid)
    assert await restore(acme.reader, point["point_id"], "d0") == disk

    # An operator backing up into acme's VM gives acme possession of what that point references.
    other = make_disk("rr", seed=32)
    await backup(admin, "vm-a", {"d0": other})
    sid = await open_session(acme.collector, "vm-a", len(other))
    assert not any(await acme.collector.missing(sid, [digest(p) for p in chunks_of(other, CHUNK)]))


def test_token_store_keeps_expired_records(tmp_path: Path):
    import time

    from repo_server.engine import Invalid, Repository, init_repository

    init_repository(tmp_path / "d", encrypt=False)
    repo = Repository(tmp_path / "d")
    try:
        token, info = repo.tokens.create("reader", "soon", "acme", time.time() + 0.3)
        assert repo.tokens.verify(token) == info and not info.expired()
        time.sleep(0.4)
        assert repo.tokens.verify(token) is None
        assert repo.tokens.lookup(token) == info and info.expired()
        assert [t.id for t in repo.tokens.list("acme")] == [info.id] and repo.tokens.list("globex") == []
        with pytest.raises(Invalid):
            repo.tokens.create("reader", "past", "", time.time() - 1)
        assert repo.tokens.revoke(info.id) == info
        assert repo.tokens.lookup(token) is None
    finally:
        repo.close()


async def test_gc_drops_possession_a_tenant_no_longer_references(server: ServerProcess, admin: Client, tenants):
    """Upload a guessed chunk, abort, wait for a GC, ask `missing`: "present" would mean another tenant keeps
    that chunk stored. GC drops possession that none of the tenant's points or open sessions reference."""
    acme, globex = tenants["acme"], tenants["globex"]
    secret = make_disk("rr", seed=41)
    digests = [digest(p) for p in chunks_of(secret, CHUNK)]
    await backup(acme.collector, "vm-a", {"d0": secret})
    kept = await backup(globex.collector, "vm-g", {"d0": make_disk("r", seed=42)})
    probe = await open_session(globex.collector, "vm-g", len(secret))
    await globex.collector.upload(probe, [make_frame(p) for p in chunks_of(secret, CHUNK)])
    assert not any(await globex.collector.missing(probe, digests))  # its own upload: possessed
    await globex.collector.abort(probe)
    holding = await open_session(globex.collector, "vm-g", len(secret))  # an open session that pinned one chunk
    assert not any(await globex.collector.missing(holding, digests[:1]))
    job = await admin.json("POST", "/admin/gc", {})
    while job["state"] == "running":
        job = await admin.job(job["id"])
    assert job["state"] == "done", job
    assert job["result"]["possession_dropped"] >= 1
    assert job["result"]["swept_chunks"] == 0  # acme keeps both chunks stored
    fresh = await open_session(globex.collector, "vm-g", len(secret))
    bitmap = await globex.collector.missing(fresh, digests)
    # The pinned chunk stays possessed (the open session relies on it); the other must be uploaded again.
    assert [bitmap_get(bitmap, i) for i in range(2)] == [False, True]
    assert (await globex.collector.map(holding, "d0", [(0, digests[0])]))["mapped"] == 1
    # Possession backed by the tenant's own point survives.
    own = digest(make_disk("r", seed=42))
    assert not any(await globex.collector.missing(fresh, [own]))
    assert kept["point_id"]


async def test_possession_of_referenced_chunks_survives_gcs_during_backups(server: ServerProcess, admin: Client,
                                                                          tenants):
    """GCs run while a tenant backs up (sessions opened, chunks uploaded, points committed mid-GC): afterwards
    every point restores and the tenant still possesses every chunk its points reference."""
    import asyncio

    acme = tenants["acme"]
    disks = {f"vm-{i}": make_disk("rrcr", seed=60 + i) for i in range(4)}
    points: dict[str, str] = {}

    async def backups() -> None:
        for round_ in range(2):
            for vm, disk in disks.items():
                changed = make_disk("r", seed=600 + round_) + disk[CHUNK:]
                disks[vm] = changed
                points[vm] = (await backup(acme.collector, vm, {"d0": changed}))["point_id"]

    async def gcs() -> None:
        for _ in range(4):
            job = await admin.json("POST", "/admin/gc", {"compact_below": 0.9})
            while job["state"] == "running":
                await asyncio.sleep(0.01)
                job = await admin.job(job["id"])
            assert job["state"] == "done", job

    await asyncio.gather(backups(), gcs())
    await gcs()  # and once more with everything quiet
    for vm, disk in disks.items():
        assert await restore(acme.reader, points[vm], "d0") == disk
        sid = await open_session(acme.collector, vm, len(disk))
        assert not any(await acme.collector.missing(sid, [digest(p) for p in chunks_of(disk, CHUNK)]))
        await acme.collector.abort(sid)


async def test_collector_pipeline_with_scoped_tokens_on_file_disks(server: ServerProcess, admin: Client, tenants,
                                                                   tmp_path: Path):
    """The real collector (`chunkyard backup --source file:`) for two tenants backing up the same disk image:
    the second tenant sends every chunk, the repository stores them once, and its next run sends nothing."""
    import json

    tokens = {t["name"]: t for t in await admin.tokens()}
    image = tmp_path / "disk.img"
    image.write_bytes(make_disk("rrczr", seed=70, tail=12345))

    async def run(tenant: str, vm: str) -> dict:
        token = (await admin.create_token("collector", f"{tenant} pipeline", tenant=tenant))["token"]
        done = subprocess.run([sys.executable, "-m", "chunkyard.cli", "backup", "--source", f"file:{image}",
                               "--vm", vm, "--state", str(tmp_path / tenant), "--json", "--server", server.url,
                               "--token", token], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert "acme reader" in tokens
    first = await run("acme", "web-a")
    before = await admin.repository()
    second = await run("globex", "web-g")
    after = await admin.repository()
    assert second["uploaded_chunks"] == first["uploaded_chunks"] == 5  # r r c r + the short tail
    assert second["sent_bytes"] == first["sent_bytes"]
    assert second["server_stats"]["new_bytes"] == first["server_stats"]["new_bytes"]
    for key in ("chunk_count", "unique_bytes", "stored_bytes"):
        assert after[key] == before[key], key
    third = await run("globex", "web-g")
    assert third["uploaded_chunks"] == 0 and third["sent_bytes"] == 0
    point = await tenants["globex"].reader.point(third["point_id"])
    assert await restore(tenants["globex"].reader, third["point_id"], point["disks"][0]["disk_id"]) == \
        image.read_bytes()
