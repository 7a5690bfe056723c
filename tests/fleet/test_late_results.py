"""Results that arrive after a server restart (docs/architecture.md "Fleet operations", late results):
work running when the server died is "interrupted", not failed, for fleet_silent_seconds; its result in
that window is the attempt's result, and a success of a superseded attempt still ends the VM's backup."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ServerProcess

from .fleet_server import INVENTORY, Api, fleet_server, job, real_points, result

GRACE = 6.0  # fleet_silent_seconds: the grace after a restart


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    server, _ = fleet_server(tmp_path, silent=GRACE)
    server.start()
    yield server
    server.stop()


class FreshApi(Api):
    """A new connection per request: a kept-alive one would die with the SIGKILLed server."""

    def __init__(self, url: str, token: str):
        self.url = url + "/api/v1"
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"},
                                             connector=aiohttp.TCPConnector(force_close=True))


@pytest.fixture
async def api(srv: ServerProcess) -> AsyncIterator[Api]:
    client = FreshApi(srv.url, srv.admin_token)
    yield client
    await client.close()


async def vm_of(api: Api, run_id: str) -> dict:
    return (await api.ok("GET", f"/runs/{run_id}"))["vms"][0]


async def until_state(api: Api, run_id: str, state: str, timeout: float = GRACE + 10) -> dict:
    deadline = time.monotonic() + timeout
    while (vm := await vm_of(api, run_id))["state"] != state:
        assert time.monotonic() < deadline, vm
        await asyncio.sleep(0.1)
    return vm


async def killed_mid_backup(srv: ServerProcess, api: Api, *, retries: int = 1) -> tuple[str, dict, str]:
    """A one-VM run whose backup committed (a real point) just before the server was SIGKILLed and started
    again, its result undelivered: (run_id, work item, point id)."""
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-c", retries=retries, retry_delay_s=0), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    item = await api.ok("GET", "/collectors/col1/work?wait=5")
    point = (await real_points(srv, ["vm-c"]))["vm-c"]
    srv.kill()
    srv.start()
    return run_id, item, point


async def test_result_within_the_grace_counts_and_nothing_is_retried(srv: ServerProcess, api: Api) -> None:
    run_id, item, point = await killed_mid_backup(srv, api)
    vm = await vm_of(api, run_id)
    assert vm["state"] == "interrupted" and vm["attempt"] == 1 and vm["work_id"] == item["work_id"]
    run = await api.ok("GET", f"/runs/{run_id}")
    assert run["state"] == "running" and run["totals"]["interrupted"] == 1
    assert (await api.call("GET", "/collectors/col1/work?wait=1"))[0] == 204  # no retry during the grace
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)
    vm = await until_state(api, run_id, "succeeded")
    assert vm["point_id"] == point and vm["attempt"] == 1 and vm["error"] is None
    assert (await api.ok("GET", f"/runs/{run_id}"))["state"] == "succeeded"
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)  # a re-post
    await asyncio.sleep(GRACE + 1)  # the grace passes: the recorded success stays, nothing is retried
    assert (await api.call("GET", "/collectors/col1/work?wait=1"))[0] == 204
    assert (await vm_of(api, run_id)) | {"last_contact": None} == vm | {"last_contact": None}


async def test_failure_within_the_grace_is_the_attempts_failure(srv: ServerProcess, api: Api) -> None:
    run_id, item, _ = await killed_mid_backup(srv, api)
    await api.ok("POST", f"/work/{item['work_id']}/result", result(ok=False, error="disk vanished"), status=204)
    vm = await vm_of(api, run_id)
    assert vm["state"] == "retrying" and vm["error"] == "disk vanished"  # the collector's reason, not "interrupted"
    retry = await api.ok("GET", "/collectors/col1/work?wait=5")  # retried at once (retry_delay_s 0)
    assert retry["work_id"].endswith(".2")


async def test_progress_within_the_grace_makes_it_live_again(srv: ServerProcess, api: Api) -> None:
    run_id, item, point = await killed_mid_backup(srv, api)
    report = {"phase": "upload", "done_bytes": 5, "total_bytes": 10, "rate_bytes_per_s": 1.0}
    assert await api.ok("POST", f"/work/{item['work_id']}/progress", report) == {"cancel": False}
    vm = await vm_of(api, run_id)
    assert vm["state"] == "running" and vm["progress"]["phase"] == "upload"
    srv.stop()  # persisted as running: a second restart makes it interrupted again
    srv.start()
    assert (await vm_of(api, run_id))["state"] == "interrupted"
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)
    assert (await vm_of(api, run_id))["state"] == "succeeded"


async def test_no_result_in_the_grace_fails_the_attempt_then_a_late_success_still_wins(
        srv: ServerProcess, api: Api) -> None:
    old = (await real_points(srv, ["vm-c"]))["vm-c"]  # a point of this VM from before the run
    run_id, item, point = await killed_mid_backup(srv, api)
    vm = await until_state(api, run_id, "retrying")
    assert "interrupted" in vm["error"] and f"{GRACE:g} s" in vm["error"]
    retry = await api.ok("GET", "/collectors/col1/work?wait=5")
    assert retry["work_id"].endswith(".2")
    report = {"phase": "read", "done_bytes": 1, "total_bytes": 10, "rate_bytes_per_s": 1.0}
    assert await api.ok("POST", f"/work/{retry['work_id']}/progress", report) == {"cancel": False}
    # A late failure of the superseded attempt changes nothing: the retry decides.
    await api.ok("POST", f"/work/{item['work_id']}/result", result(ok=False, error="late"), status=204)
    vm = await vm_of(api, run_id)
    assert vm["state"] == "running" and vm["work_id"] == retry["work_id"]
    # A late success with a point made before this run is refused; the real one wins.
    got, answer = await api.call("POST", f"/work/{item['work_id']}/result", result(point_id=old))
    assert got == 422 and answer["error"] == "bad_point" and "during this run" in answer["message"], answer
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)
    vm = await vm_of(api, run_id)
    assert vm["state"] == "succeeded" and vm["point_id"] == point and vm["work_id"] == item["work_id"]
    assert vm["attempt"] == 2 and vm["error"] is None
    assert (await api.ok("GET", f"/runs/{run_id}"))["state"] == "succeeded"
    # The retry is told to stop, and whatever it reports afterwards is ignored.
    assert await api.ok("POST", f"/work/{retry['work_id']}/progress", report) == {"cancel": True}
    await api.ok("POST", f"/work/{retry['work_id']}/result", result(ok=False, error="cancelled by the server"),
                 status=204)
    assert (await vm_of(api, run_id))["point_id"] == point


async def test_a_late_success_counts_before_the_retry_is_handed_out(srv: ServerProcess, api: Api) -> None:
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-c", retries=1, retry_delay_s=3600), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    item = await api.ok("GET", "/collectors/col1/work?wait=5")
    point = (await real_points(srv, ["vm-c"]))["vm-c"]
    srv.kill()
    srv.start()
    vm = await until_state(api, run_id, "retrying")
    assert vm["retry_at"] > time.time() + 3000
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)
    vm = await vm_of(api, run_id)
    assert vm["state"] == "succeeded" and vm["retry_at"] is None and vm["attempt"] == 1
    assert (await api.ok("GET", f"/runs/{run_id}"))["state"] == "succeeded"


async def test_a_late_success_after_the_run_finished_changes_nothing(srv: ServerProcess, api: Api) -> None:
    run_id, item, point = await killed_mid_backup(srv, api, retries=0)
    vm = await until_state(api, run_id, "failed")
    assert (await api.ok("GET", f"/runs/{run_id}"))["state"] == "failed"
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=point), status=204)
    assert await vm_of(api, run_id) == vm  # a finished run's history (and its notifications) is final
