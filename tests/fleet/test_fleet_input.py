"""Fleet routes refuse bad input with a JSON error and a fitting status, and change nothing when they do;
roles and tenants: a scoped token sees and touches only its own tenant's collectors, jobs, runs and work."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

from .fleet_server import INVENTORY, Api, fleet_server, job, result

TOKENS = (("admin", "acme-admin", "acme"), ("collector", "acme-col", "acme"), ("reader", "acme-reader", "acme"),
          ("admin", "beta-admin", "beta"), ("collector", "beta-col", "beta"), ("reader", "beta-reader", "beta"),
          ("collector", "root-col", ""), ("reader", "root-reader", ""))
GARBAGE = bytes(range(256)) * 4


@pytest.fixture
def tenant_srv(tmp_path: Path) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    server, tokens = fleet_server(tmp_path, tokens=TOKENS)
    server.start()
    yield server, tokens
    server.stop()


@pytest.fixture
async def apis(tenant_srv: tuple[ServerProcess, dict[str, str]]) -> AsyncIterator[dict[str, Api]]:
    server, tokens = tenant_srv
    clients = {name: Api(server.url, token) for name, token in tokens.items()} | {"root": Api(server.url,
                                                                                                server.admin_token)}
    yield clients
    for client in clients.values():
        await client.close()


async def _work(apis: dict[str, Api]) -> str:
    """An acme collector registered, an acme job running, one work item handed out: its work_id."""
    await apis["acme-col"].ok("POST", "/collectors", INVENTORY)
    await apis["acme-admin"].ok("POST", "/backup-jobs", job(), status=201)
    await apis["acme-admin"].ok("POST", "/backup-jobs/nightly/run", status=202)
    return (await apis["acme-col"].ok("GET", "/collectors/col1/work?wait=5"))["work_id"]


BAD_BODIES = [
    (b"{not json", 400, "bad_json"), (GARBAGE, 400, "bad_json"), (b"[]", 422, None), (b"null", 422, None),
    (b'"text"', 422, None), (b"12", 422, None), (b"{}", 422, None),
]


@pytest.mark.parametrize(("route", "method", "role"), [
    ("/collectors", "POST", "acme-col"), ("/work/{work}/progress", "POST", "acme-col"),
    ("/work/{work}/result", "POST", "acme-col"), ("/backup-jobs", "POST", "acme-admin"),
    ("/backup-jobs/nightly", "PUT", "acme-admin"), ("/backup-jobs/nightly/run", "POST", "acme-admin"),
])
async def test_bad_bodies_on_every_json_route(apis: dict[str, Api], route: str, method: str, role: str) -> None:
    work = await _work(apis)
    before = await apis["root"].ok("GET", "/backup-jobs")
    for raw, status, code in BAD_BODIES:
        if route.endswith("/run") and raw == b"{}":
            continue  # {} is a valid (empty) options body
        got, answer = await apis[role].call(method, route.format(work=work), raw=raw)
        assert got == status, (raw[:20], got, answer)
        assert set(answer) == {"error", "message"} and answer["message"]
        if code:
            assert answer["error"] == code
    got, answer = await apis[role].call(method, route.format(work=work), raw=b"x" * (2 << 20))
    assert got == 413
    assert await apis["root"].ok("GET", "/backup-jobs") == before  # nothing changed


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "../x"}, "job name"), ({"name": 5}, "job name"), ({"name": "x" * 300}, "job name"),
    ({"collector": None}, "collector name"), ({"schedule": "mon..fri 25:00"}, "hour 25 is out of range"),
    ({"schedule": "sometimes"}, "mon..fri 22:00"), ({"schedule": 22}, "must be a string"),
    ({"schedule": "*" * 5000}, "at most 200"), ({"retention": {"keep_forever": 1}}, "unknown retention"),
    ({"retention": {"keep_last": -1}}, "keep_last"), ({"retention": []}, "JSON object"),
    ({"tier": "nowhere"}, "not a configured [[tier]]"), ({"max_per_host": 0}, "max_per_host"),
    ({"max_per_host": True}, "max_per_host"), ({"max_per_host": 1.5}, "max_per_host"),
    ({"max_per_host": 10**30}, "max_per_host"), ({"retries": -1}, "retries"), ({"retries": "2"}, "retries"),
    ({"retry_delay_s": 1e12}, "retry_delay_s"), ({"bandwidth_mib_s": 0}, "bandwidth_mib_s"),
    ({"bandwidth_mib_s": "fast"}, "bandwidth_mib_s"), ({"missed": "later"}, "missed"),
    ({"enabled": "yes"}, "enabled"), ({"host_pattern": ""}, "host_pattern"), ({"vm_pattern": ["*"]}, "vm_pattern"),
    ({"vm_pattern": "x" * 201}, "vm_pattern"), ({"surprise": 1}, "unknown job field"),
    ({"tenant": "beta"}, "tenant 'acme'"),
])
async def test_bad_job_fields(apis: dict[str, Api], fields: dict, message: str) -> None:
    got, answer = await apis["acme-admin"].call("POST", "/backup-jobs", job() | fields)
    assert got == 422 and message in answer["message"], answer
    missing = job()
    del missing["schedule"]
    got, answer = await apis["acme-admin"].call("POST", "/backup-jobs", missing)
    assert got == 422 and "schedule" in answer["message"]
    assert (await apis["root"].ok("GET", "/backup-jobs"))["jobs"] == []


async def test_bad_collector_work_and_query_input(apis: dict[str, Api]) -> None:
    col = apis["acme-col"]
    for body in ({"name": "c", "hosts": "hv1"}, {"name": "c", "hosts": [{"host": "hv1"}]},
                 {"name": "c", "hosts": [{"host": "../h", "vms": []}]},
                 {"name": "c", "hosts": [{"host": "h", "vms": [{"id": "../x", "name": "x"}]}]},
                 {"name": "c", "hosts": [{"host": "h", "vms": [{"id": "x", "name": ""}]}]},
                 {"name": "c", "hosts": [{"host": "h", "vms": ["x"]}]}, {"name": "c", "version": 3, "hosts": []},
                 {"name": "", "hosts": []}, {"hosts": []}):
        got, answer = await col.call("POST", "/collectors", body)
        assert got == 422, (body, answer)
    assert (await apis["root"].ok("GET", "/collectors"))["collectors"] == []
    assert (await col.call("GET", "/collectors/col1/work?wait=1"))[0] == 404  # not registered
    work = await _work(apis)
    for query in ("wait=61", "wait=-1", "wait=abc", "wait=nan", "wait=1e400"):
        got, answer = await col.call("GET", f"/collectors/col1/work?{query}")
        assert got == 422 and "wait" in answer["message"], query
    for query in ("limit=0", "limit=1001", "limit=x", "limit=1.5"):
        assert (await apis["acme-admin"].call("GET", f"/backup-jobs/nightly/runs?{query}"))[0] == 422
    for body in ({"phase": 1, "done_bytes": 0, "rate_bytes_per_s": 0}, {"phase": "x" * 65, "done_bytes": 0},
                 {"phase": "p", "done_bytes": -1, "rate_bytes_per_s": 0},
                 {"phase": "p", "done_bytes": 2**64, "rate_bytes_per_s": 0},
                 {"phase": "p", "done_bytes": 1, "total_bytes": "x", "rate_bytes_per_s": 0},
                 {"phase": "p", "done_bytes": True, "rate_bytes_per_s": 0}):
        assert (await col.call("POST", f"/work/{work}/progress", body))[0] == 422, body
    for body in ({"ok": "yes"}, {"ok": True}, result(bytes_read=-5, point_id="p"), result(duration_s="long"),
                 result(point_id=7), result(False, error=["x"]), result(consistency="c" * 100, point_id="p")):
        assert (await col.call("POST", f"/work/{work}/result", body))[0] == 422, body
    run = (await apis["acme-admin"].ok("GET", "/backup-jobs/nightly/runs"))["runs"][0]
    assert run["state"] == "running" and run["totals"]["running"] == 1 and run["totals"]["bytes_read"] == 0
    for bad in ("nope", "x.y.z", f"{work}0", "..%2F..%2Fjobs", "a" * 500):
        assert (await col.call("POST", f"/work/{bad}/progress", {"phase": "p", "done_bytes": 0,
                                                                 "rate_bytes_per_s": 0}))[0] == 404, bad
        assert (await col.call("POST", f"/work/{bad}/result", result(point_id="p")))[0] == 404
    assert (await apis["acme-admin"].call("GET", "/runs/nope"))[0] == 404
    long = await col.call("POST", f"/work/{work}/result", result(False, error="e" * 100_000))
    assert long[0] == 204
    run = await apis["acme-admin"].ok("GET", f"/runs/{run['run_id']}")
    assert len(run["vms"][0]["error"]) == 4000  # kept, cut to a sane length


async def test_roles(apis: dict[str, Api]) -> None:
    work = await _work(apis)
    reader, col = apis["acme-reader"], apis["acme-col"]
    assert (await reader.call("POST", "/backup-jobs", job("x")))[0] == 403
    assert (await reader.call("POST", "/backup-jobs/nightly/run"))[0] == 403
    assert (await reader.call("DELETE", "/backup-jobs/nightly"))[0] == 403
    assert (await reader.call("GET", "/collectors/col1/work?wait=0"))[0] == 403
    assert (await reader.call("POST", f"/work/{work}/result", result(point_id="p")))[0] == 403
    assert (await col.call("GET", "/backup-jobs"))[0] == 403
    assert (await col.call("GET", "/collectors"))[0] == 403
    assert (await col.call("POST", "/backup-jobs", job("x")))[0] == 403
    unauthenticated = Api(col.url.removesuffix("/api/v1"), "wrong")
    try:
        assert (await unauthenticated.call("GET", "/backup-jobs"))[0] == 401
    finally:
        await unauthenticated.close()
    assert (await reader.ok("GET", "/backup-jobs/nightly"))["name"] == "nightly"


async def test_tenants_see_only_their_own(apis: dict[str, Api]) -> None:
    work = await _work(apis)
    run_id = work.rsplit(".", 2)[0]
    await apis["beta-col"].ok("POST", "/collectors", INVENTORY)  # the same collector name in another tenant
    await apis["beta-admin"].ok("POST", "/backup-jobs", job(schedule="daily"), status=201)  # and the same job name
    for name in ("beta-admin", "beta-reader"):
        beta = apis[name]
        assert [j["tenant"] for j in (await beta.ok("GET", "/backup-jobs"))["jobs"]] == ["beta"]
        assert [c["tenant"] for c in (await beta.ok("GET", "/collectors"))["collectors"]] == ["beta"]
        assert (await beta.call("GET", f"/runs/{run_id}"))[0] == 404
        assert (await beta.ok("GET", "/backup-jobs/nightly"))["schedule"] == "daily"
        assert (await beta.ok("GET", "/backup-jobs/nightly/runs"))["runs"] == []
    beta_col = apis["beta-col"]
    assert (await beta_col.call("GET", "/collectors/col1/work?wait=0.5"))[0] == 204  # acme's work is not its
    assert (await beta_col.call("POST", f"/work/{work}/progress", {"phase": "p", "done_bytes": 0,
                                                                   "rate_bytes_per_s": 0}))[0] == 404
    assert (await beta_col.call("POST", f"/work/{work}/result", result(point_id="p")))[0] == 404
    assert (await apis["beta-admin"].call("POST", "/backup-jobs", job("x", tenant="acme")))[0] == 422
    # the unscoped operator sees both tenants; a name both use needs ?tenant=
    root = apis["root"]
    assert sorted(j["tenant"] for j in (await root.ok("GET", "/backup-jobs"))["jobs"]) == ["acme", "beta"]
    assert sorted(c["tenant"] for c in (await root.ok("GET", "/collectors"))["collectors"]) == ["acme", "beta"]
    got, answer = await root.call("GET", "/backup-jobs/nightly")
    assert got == 409 and "?tenant=" in answer["message"]
    assert (await root.ok("GET", "/backup-jobs/nightly?tenant=beta"))["schedule"] == "daily"
    assert (await root.ok("GET", f"/runs/{run_id}"))["tenant"] == "acme"
    created = await root.ok("POST", "/backup-jobs", job("ops", tenant="beta"), status=201)
    assert created["tenant"] == "beta"
    assert "ops" in {j["name"] for j in (await apis["beta-reader"].ok("GET", "/backup-jobs"))["jobs"]}
    assert (await apis["acme-reader"].call("GET", "/backup-jobs/ops"))[0] == 404
    # an unscoped collector token is its own tenant ""; its collectors are not acme's
    assert (await apis["root-col"].call("GET", "/collectors/col1/work?wait=0"))[0] == 404
    assert json.dumps(await apis["acme-reader"].ok("GET", "/backup-jobs")).count("beta") == 0
