"""Fleet server routes against a real server process; the test plays the pull collector's HTTP side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

from .fleet_server import INVENTORY, Api, fleet_server, job, real_points, result


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


async def test_register_dispatch_progress_result_history(srv: ServerProcess, api: Api) -> None:
    points = await real_points(srv)
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

    for item in items:
        await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=points[item["vm"]["id"]]), status=204)
    items.append(await api.ok("GET", "/collectors/col1/work?wait=5"))  # hv1's second VM, now its turn
    assert items[2]["host"] == "hv1"
    await api.ok("POST", f"/work/{items[2]['work_id']}/result", result(point_id=points[items[2]["vm"]["id"]]),
                 status=204)
    again = result(point_id=points[items[0]["vm"]["id"]])
    await api.ok("POST", f"/work/{first}/result", again, status=204)  # a retry: no double count
    run = await wait_run(api, run_id)
    assert run["state"] == "succeeded" and run["finished"] is not None
    assert {i["vm"]["id"] for i in items} == {"vm-a", "vm-b", "vm-d"}
    assert run["totals"]["bytes_read"] == 3000 and run["totals"]["succeeded"] == 3
    assert await api.ok("POST", f"/work/{first}/progress", progress) == {"cancel": True}

    runs = (await api.ok("GET", "/backup-jobs/nightly/runs?limit=5"))["runs"]
    assert [r["run_id"] for r in runs] == [run_id] and "vms" not in runs[0]
    listed = (await api.ok("GET", "/backup-jobs"))["jobs"]
    assert listed[0]["last_run"] == {"run_id": run_id, "state": "succeeded", "finished": run["finished"]}


async def test_failed_vm_is_retried_then_fails_the_run(api: Api) -> None:
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-*", retries=1, retry_delay_s=0.5), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    first = await api.ok("GET", "/collectors/col1/work?wait=5")
    await api.ok("POST", f"/work/{first['work_id']}/result", result(False, error="VSS writer timed out"), status=204)
    run = await api.ok("GET", f"/runs/{run_id}")
    vm = run["vms"][0]
    assert (vm["state"], vm["attempt"], vm["error"]) == ("retrying", 1, "VSS writer timed out")
    assert run["state"] == "running" and vm["retry_at"] >= time.time() - 1
    second = await api.ok("GET", "/collectors/col1/work?wait=5")  # after retry_delay_s
    assert second["vm"] == first["vm"] and second["work_id"] != first["work_id"]
    assert await api.ok("POST", f"/work/{first['work_id']}/progress",
                        {"phase": "x", "done_bytes": 0, "rate_bytes_per_s": 0}) == {"cancel": True}
    await api.ok("POST", f"/work/{second['work_id']}/result", result(False, error="still broken"), status=204)
    run = await wait_run(api, run_id)
    assert run["state"] == "failed" and run["vms"][0]["attempt"] == 2 and run["vms"][0]["error"] == "still broken"
    assert run["totals"]["failed"] == 1


async def test_silent_collector_work_fails_and_is_retried(srv: ServerProcess, api: Api) -> None:
    points = await real_points(srv, ["vm-c"])
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-c", retries=1, retry_delay_s=0), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    first = await api.ok("GET", "/collectors/col1/work?wait=5")
    second = await api.ok("GET", "/collectors/col1/work?wait=10")  # fleet_silent_seconds is 3 in these tests
    assert second["vm"]["id"] == "vm-c" and second["work_id"] != first["work_id"]
    run = await api.ok("GET", f"/runs/{run_id}")
    assert run["vms"][0]["attempt"] == 2 and run["state"] == "running"
    assert "silent" in run["vms"][0]["error"]  # the failed attempt's reason stays until this one reports
    await api.ok("POST", f"/work/{first['work_id']}/result", result(ok=False), status=204)  # superseded
    got, answer = await api.call("POST", f"/work/{first['work_id']}/result", result(point_id="late"))
    assert got == 422 and answer["error"] == "bad_point"  # a late success must name a real point of this run
    assert (await api.ok("GET", f"/runs/{run_id}"))["vms"][0]["state"] == "running"
    await api.ok("POST", f"/work/{second['work_id']}/result", result(point_id=points["vm-c"]), status=204)
    run = await wait_run(api, run_id)
    assert run["state"] == "succeeded" and run["vms"][0]["point_id"] == points["vm-c"]
    assert run["vms"][0]["error"] is None


async def test_max_per_host_and_partial(srv: ServerProcess, api: Api) -> None:
    points = await real_points(srv, ["vm-a", "vm-b", "vm-c"])
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(host_pattern="HV1", max_per_host=2), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    items = [await api.ok("GET", "/collectors/col1/work?wait=5") for _ in range(2)]
    assert (await api.call("GET", "/collectors/col1/work?wait=0.3"))[0] == 204  # hv1 has 2 running
    await api.ok("POST", f"/work/{items[0]['work_id']}/result", result(False, error="disk gone"), status=204)
    items.append(await api.ok("GET", "/collectors/col1/work?wait=5"))
    assert len({i["vm"]["id"] for i in items}) == 3 and {i["host"] for i in items} == {"hv1"}
    for item in items[1:]:
        await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=points[item["vm"]["id"]]), status=204)
    run = await wait_run(api, run_id)
    assert run["state"] == "partial" and run["totals"]["failed"] == 1 and run["totals"]["succeeded"] == 2


async def test_job_crud_and_delete_cancels(api: Api) -> None:
    await api.ok("POST", "/collectors", INVENTORY)
    created = await api.ok("POST", "/backup-jobs", job(retention={"keep_last": 3}), status=201)
    assert created["tenant"] == "" and created["retention"] == {"keep_last": 3} and created["max_per_host"] == 1
    assert (await api.call("POST", "/backup-jobs", job()))[0] == 409
    replaced = await api.ok("PUT", "/backup-jobs/nightly", {"collector": "col1", "schedule": "hourly",
                                                             "enabled": False})
    assert replaced["schedule"] == "hourly" and replaced["retention"] is None and replaced["next_run"] is None
    assert (await api.ok("GET", "/backup-jobs/nightly"))["enabled"] is False
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]  # disabled: manual still runs
    assert (await api.call("POST", "/backup-jobs/nightly/run"))[0] == 409  # already running
    item = await api.ok("GET", "/collectors/col1/work?wait=5")
    await api.ok("DELETE", "/backup-jobs/nightly", status=204)
    run = await api.ok("GET", f"/runs/{run_id}")
    assert run["state"] == "failed" and {v["error"] for v in run["vms"]} == {"cancelled: the job was deleted"}
    assert await api.ok("POST", f"/work/{item['work_id']}/progress",
                        {"phase": "reading", "done_bytes": 1, "rate_bytes_per_s": 1}) == {"cancel": True}
    assert (await api.call("GET", "/backup-jobs/nightly"))[0] == 404
    assert (await api.ok("GET", "/backup-jobs"))["jobs"] == []


async def test_nothing_to_back_up_fails_the_run_with_a_reason(api: Api) -> None:
    await api.ok("POST", "/backup-jobs", job(collector="ghost"), status=201)
    run = await wait_run(api, (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"])
    assert run["state"] == "failed" and "has not registered" in run["error"]
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job("other", vm_pattern="nomatch*"), status=201)
    run = await wait_run(api, (await api.ok("POST", "/backup-jobs/other/run", status=202))["run_id"])
    assert run["state"] == "failed" and "matches" in run["error"]


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_mid_run_retries_the_interrupted_vm(srv: ServerProcess, api: Api, how: str) -> None:
    points = await real_points(srv, ["vm-a", "vm-b", "vm-c"])
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(host_pattern="hv1", retries=1, retry_delay_s=0, max_per_host=3),
                 status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    done = await api.ok("GET", "/collectors/col1/work?wait=5")
    await api.ok("POST", f"/work/{done['work_id']}/result", result(point_id=points[done["vm"]["id"]]),
                 status=204)
    interrupted = await api.ok("GET", "/collectors/col1/work?wait=5")
    srv.stop() if how == "stop" else srv.kill()
    srv.start()
    run = await api.ok("GET", f"/runs/{run_id}")  # the history survived
    by_id = {v["vm"]["id"]: v for v in run["vms"]}
    assert by_id[done["vm"]["id"]]["state"] == "succeeded"
    assert by_id[done["vm"]["id"]]["point_id"] == points[done["vm"]["id"]]
    lost = by_id[interrupted["vm"]["id"]]
    assert lost["state"] == "interrupted" and lost["attempt"] == 1  # its result may still come (the grace)
    assert (await api.call("POST", "/collectors", INVENTORY))[0] == 200  # the collector comes back
    items = [await api.ok("GET", "/collectors/col1/work?wait=5")]  # the VM never started
    # Its result at once: held through the grace below without progress, it would go silent (3 s here) too.
    await api.ok("POST", f"/work/{items[0]['work_id']}/result", result(point_id=points[items[0]["vm"]["id"]]),
                 status=204)
    items.append(await api.ok("GET", "/collectors/col1/work?wait=10"))  # the interrupted one, after the grace
    assert {i["vm"]["id"] for i in items} == {v["vm"]["id"] for v in run["vms"]} - {done["vm"]["id"]}
    retried = next(i for i in items if i["vm"] == interrupted["vm"])
    assert retried["work_id"].endswith(".2")
    vm = next(v for v in (await api.ok("GET", f"/runs/{run_id}"))["vms"] if v["vm"] == interrupted["vm"])
    assert "interrupted" in vm["error"]  # the failed attempt's reason stays visible during the retry
    await api.ok("POST", f"/work/{interrupted['work_id']}/result", result(ok=False), status=204)  # superseded
    await api.ok("POST", f"/work/{retried['work_id']}/result", result(point_id=points[retried["vm"]["id"]]),
                 status=204)
    run = await wait_run(api, run_id)
    assert run["state"] == "succeeded" and {v["point_id"] for v in run["vms"]} == set(points.values())


@pytest.mark.parametrize("missed", ["run", "skip"])
async def test_missed_run_policy(srv: ServerProcess, api: Api, missed: str) -> None:
    # Runs of a job that selects no VM finish at once, so the job never has a run in the way.
    await api.ok("POST", "/backup-jobs", job(schedule="*:*:0/2", vm_pattern="none", missed=missed), status=201)
    deadline = time.monotonic() + 10
    while not (await api.ok("GET", "/backup-jobs/nightly/runs"))["runs"] and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    runs = (await api.ok("GET", "/backup-jobs/nightly/runs"))["runs"]
    assert runs and {r["trigger"] for r in runs} == {"schedule"}
    srv.stop()
    stopped = time.time()
    await asyncio.sleep(2.5)  # at least one occurrence passes while the server is down
    srv.start()
    after = (await api.ok("GET", "/backup-jobs/nightly/runs?limit=1000"))["runs"]
    new = sorted((r for r in after if r["started"] > stopped), key=lambda r: r["started"])
    if missed == "run":  # one catch-up run, made at startup before any new scheduled one
        assert [r["trigger"] for r in new][:1] == ["missed"]
        assert [r["trigger"] for r in after].count("missed") == 1
    else:
        assert "missed" not in [r["trigger"] for r in after]


async def test_shutdown_answers_waiting_long_polls(srv: ServerProcess, api: Api) -> None:
    await api.ok("POST", "/collectors", INVENTORY)
    poll = asyncio.create_task(api.call("GET", "/collectors/col1/work?wait=60"))
    await asyncio.sleep(0.5)  # the poll is waiting inside the server
    await asyncio.get_running_loop().run_in_executor(None, srv.stop)
    assert (await poll)[0] == 204  # answered at shutdown, not cut off by a kill after the stop timeout
    assert srv.proc is not None and srv.proc.returncode == 0


async def test_a_poll_whose_client_hung_up_gets_no_work(srv: ServerProcess, api: Api) -> None:
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-c"), status=201)
    gone = Api(srv.url, srv.admin_token)
    poll = asyncio.create_task(gone.call("GET", "/collectors/col1/work?wait=30"))
    await asyncio.sleep(0.5)
    poll.cancel()
    await gone.close()  # the connection closes while the server waits
    await asyncio.sleep(0.5)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    await asyncio.sleep(1)  # several ticks: the abandoned poll must not take the work
    assert (await api.ok("GET", f"/runs/{run_id}"))["vms"][0]["state"] == "queued"
    item = await api.ok("GET", "/collectors/col1/work?wait=5")
    assert item["vm"]["id"] == "vm-c" and item["work_id"].endswith(".1")


async def test_ok_needs_the_vms_committed_point(srv: ServerProcess, api: Api) -> None:
    points = await real_points(srv, ["vm-a", "vm-c"])
    await api.ok("POST", "/collectors", INVENTORY)
    await api.ok("POST", "/backup-jobs", job(vm_pattern="db-c"), status=201)
    run_id = (await api.ok("POST", "/backup-jobs/nightly/run", status=202))["run_id"]
    item = await api.ok("GET", "/collectors/col1/work?wait=5")
    for wrong in (points["vm-a"], "0" * 32, "no-such-point"):  # another VM's point, an unknown one, garbage
        got, answer = await api.call("POST", f"/work/{item['work_id']}/result", result(point_id=wrong))
        assert got == 422 and answer["error"] == "bad_point" and "vm-c" in answer["message"], answer
    assert (await api.ok("GET", f"/runs/{run_id}"))["vms"][0]["state"] == "running"
    await api.ok("POST", f"/work/{item['work_id']}/result", result(point_id=points["vm-c"], consistency=None),
                 status=204)
    vm = (await wait_run(api, run_id))["vms"][0]
    assert vm["state"] == "succeeded" and vm["consistency"] == "crash"  # taken from the point when not reported
