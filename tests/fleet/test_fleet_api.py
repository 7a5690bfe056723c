"""Fleet server routes against a real server process; the test plays the pull collector's HTTP side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

from .fleet_server import INVENTORY, Api, fleet_server, job, result


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    server, _ = fleet_server(tmp_path, silent=3.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def api(srv: ServerProcess) -> AsyncIterator[Api]:
    client = Api(srv.url, srv.admin_token)
    yield client
    await client.close()


async def wait_run(api: Api, run_id: str, states: tuple[str, ...] = ("succeeded", "partial", "failed"),
                   timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = await api.ok("GET", f"/runs/{run_id}")
        if run["state"] in states or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.1)


async def test_register_dispatch_progress_result_history(api: Api) -> None:
    answer = await api.ok("POST", "/collectors", INVENTORY)
    assert answer == {"name": "col1", "poll_seconds": 2.0}
    assert (await api.ok("POST", "/collectors", INVENTORY))["name"] == "col1"  # idempotent
    collectors = (await api.ok("GET", "/collectors"))["collectors"]
    assert [(c["name"], c["version"], c["online"], len(c["hosts"])) for c in collectors] == [
        ("col1", "test-1", True, 2)]

    created = await api.ok("POST", "/backup-jobs", job(vm_pattern="WEB-*", bandwidth_mib_s=2), status=201)
    assert created["next_run"] > time.time() and created["last_run"] is None
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    run = await api.ok("GET", f"/runs/{run_id}")
    assert run["trigger"] == "manual" and run["state"] == "queued"
    assert sorted(v["vm"]["name"] for v in run["vms"]) == ["web-a", "web-b", "web-d"]  # case-insensitive pattern

    items = [await api.ok("GET", "/collectors/col1/work?wait=5") for _ in range(2)]
    assert sorted(i["host"] for i in items) == ["hv1", "hv2"]  # max_per_host 1: one VM per host at a time
    status, _ = await api.call("GET", "/collectors/col1/work?wait=0.5")
    assert status == 204
    assert items[0]["options"] == {"bandwidth_bytes_per_s": 2 << 20, "full": False}
    assert items[0]["job"] == "nightly" and items[0]["run_id"] == run_id

    first = items[0]["work_id"]
    progress = {"phase": "reading", "done_bytes": 10, "total_bytes": 100, "rate_bytes_per_s": 5.5}
    assert await api.ok("POST", f"/work/{first}/progress", progress) == {"cancel": False}
    run = await api.ok("GET", f"/runs/{run_id}")
    assert run["state"] == "running"
    assert next(v for v in run["vms"] if v["work_id"] == first)["progress"] == progress

    for n, item in enumerate(items):
        await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=f"p{n}"), status=204)
    items.append(await api.ok("GET", "/collectors/col1/work?wait=5"))  # hv1's second VM, now its turn
    assert items[2]["host"] == "hv1"
    await api.ok("POST", f"/work/{items[2]['work_id']}/result", result(point_id="p2"), status=204)
    await api.ok("POST", f"/work/{first}/result", result(point_id="p0"), status=204)  # a retry: no double count
    run = await wait_run(api, run_id)
    assert run["state"] == "succeeded" and run["finished"] is not None
    assert {i["vm"]["id"] for i in items} == {"vm-a", "vm-b", "vm-d"}
    assert run["totals"]["bytes_read"] == 3000 and run["totals"]["succeeded"] == 3
    assert await api.ok("POST", f"/work/{first}/progress", progress) == {"cancel": True}

    runs = (await api.ok("GET", "/backup-jobs/nightly/runs?limit=5"))["runs"]
    assert [r["run_id"] for r in runs] == [run_id] and "vms" not in runs[0]
    listed = (await api.ok("GET", "/backup-jobs"))["jobs"]
    assert listed[0]["last_run"] == {"run_id": run_id, "state": "succeeded", "finished": run["finished"]}
