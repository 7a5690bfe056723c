"""Hyper-V operations against recorded host answers: parsing, job polling, checkpoint fallbacks, the
change-query loop, reference-point mapping, and malformed answers.

No Windows host can run here: the host is faked at pywinrm's transport boundary and answers with
the recorded outputs in tests/hyperv/recorded, modelled on documented WMI behaviour (return codes,
job states, ErrorDescription texts) and on what Windows PowerShell 5.1's ConvertTo-Json prints
(upper-case GUIDs, `\\/Date(ms)\\/` dates, `\\u0027` for quotes).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from collectors.sources.hyperv import HostRefused, HostTimeout, HyperVError, parse_config
from collectors.sources.hyperv.host import HyperVHost
from collectors.sources.hyperv.winrm_shell import WinRMShell, make_protocol
from tests.hyperv.fakehost import Answer, FakeHyperV, FakeWinRM, recorded

from .conftest import PASSWORD_ENV

GiB = 1 << 30
WEB01 = "5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B9A88"
SNAPSHOT = "Microsoft:6F1E2D3C-4B5A-4968-8776-5A4B3C2D1E0F"


@pytest.fixture
def hv(monkeypatch: pytest.MonkeyPatch):
    """(host, fake): a HyperVHost whose answers come from `fake.queue`."""
    monkeypatch.setenv(PASSWORD_ENV, "pw")
    config = parse_config({"host": "hv01.lab.example", "user": "LAB\\svc", "password_env": PASSWORD_ENV})
    fake = FakeHyperV([])
    shell = WinRMShell(make_protocol(config, FakeWinRM(fake)), host=config.host, user=config.user,
                       command_timeout=10)
    yield HyperVHost(shell, job_timeout=30), fake
    shell.close()


def queue(fake, *answers: tuple[str, str | object]) -> None:
    """Queue recorded files (by name) or literal results for operations, in order."""
    for op, answer in answers:
        fake.queue[op].append(Answer.file(answer) if isinstance(answer, str) else Answer.result(answer))


def created(job_outcome: str) -> list[tuple[str, str]]:
    """A CreateSnapshot that starts a job which is polled to `job_outcome`."""
    if job_outcome == "job_completed.json":
        return [("create_checkpoint", "create_checkpoint_started.json"), ("job", "job_running.json"),
                ("job", "job_completed.json"), ("job_result", "job_result_snapshot.json")]
    return [("create_checkpoint", "create_checkpoint_started.json"), ("job", job_outcome)]


def test_list_vms(hv) -> None:
    host, fake = hv
    queue(fake, ("vms", "vms.json"))
    web, legacy, appliance, odd = host.list_vms()
    assert (web.id, web.name, web.state, web.version) == (WEB01, "web01", "running", "9.0")
    assert [d.virtual_disk_id for d in web.disks] == ["4a3c5c67-0f5b-4d4e-9d1b-5d2e3c8a1f00",
                                                      "0e7f2b19-6d3a-4c85-b1e4-9a2f7c3d5e61"]
    assert web.disks[0].size == 64 * GiB and web.disks[1].path.endswith(".avhdx")
    assert (legacy.state, legacy.disks[0].format, legacy.disks[0].virtual_disk_id) == ("off", 2, "")
    assert appliance.state == "running"
    assert (odd.name, odd.state, odd.disks) == ("O'Brien & Sons $vm `test`", "saved", ())


def test_inventory(hv) -> None:
    host, fake = hv
    queue(fake, ("inventory", "inventory.json"))
    inventory = host.inventory(WEB01)
    assert inventory.state == "running"
    assert [s.name for s in inventory.snapshots] == ["Before patching", "chunkyard-col1-20261124T230000Z",
                                                     "web01 - Backup - (11/24/2026 - 23:30:02)"]
    assert inventory.snapshots[0].created == datetime(2026, 11, 24, 9, 20, tzinfo=UTC)
    assert inventory.reference_points == {"Microsoft:F3B1C9D2-8E47-4A6B-9C05-2D7E1F3A8B64": 2,
                                          "Microsoft:0A1B2C3D-4E5F-4061-8293-A4B5C6D7E8F9": 1}


def test_checkpoint_job_runs_then_completes(hv) -> None:
    host, fake = hv
    queue(fake, *created("job_completed.json"))
    taken = host.take_checkpoint(WEB01, "running", saved_state_fallback=True)
    assert (taken.instance_id, taken.consistency, taken.notes) == (SNAPSHOT, "application", ())
    assert [op for op, _ in fake.calls] == ["create_checkpoint", "job", "job", "job_result"]
    assert fake.calls[0][1] == {"VmId": WEB01, "ConsistencyLevel": 1}
    assert fake.calls[3][1] == {"JobId": "A6F2C8E1-3B7D-4F0A-9C2E-5D8B1A4F7E30",
                                "ClassName": "Msvm_VirtualSystemSettingData"}


def test_application_consistency_refused_falls_back_to_crash(hv) -> None:
    host, fake = hv
    queue(fake, *created("job_failed_application_consistency.json"), *created("job_completed.json"))
    taken = host.take_checkpoint(WEB01, "running", saved_state_fallback=True)
    assert taken.consistency == "crash"
    assert "Production checkpoints cannot be created for 'appliance01'" in taken.notes[0]
    assert "(job state 10, error 32768)" in taken.notes[0]
    assert [p["ConsistencyLevel"] for p in fake.ops("create_checkpoint")] == [1, 2]


def test_no_integration_services_takes_the_saved_state_path(hv) -> None:
    host, fake = hv
    queue(fake, *created("job_failed_application_consistency.json"),
          *created("job_failed_no_integration_services.json"),
          ("set_state", "method_done.json"), *created("job_completed.json"), ("set_state", "method_done.json"))
    taken = host.take_checkpoint(WEB01, "running", saved_state_fallback=True)
    assert taken.consistency == "saved-state" and len(taken.notes) == 3
    assert "Backup (volume shadow copy) integration service is not enabled" in taken.notes[1]
    assert [p["RequestedState"] for p in fake.ops("set_state")] == [6, 2]  # saved, then running again
    assert [p["ConsistencyLevel"] for p in fake.ops("create_checkpoint")] == [1, 2, 2]


def test_saved_state_path_resumes_the_vm_even_when_the_checkpoint_fails(hv) -> None:
    host, fake = hv
    queue(fake, *created("job_failed_application_consistency.json"),
          *created("job_failed_no_integration_services.json"), ("set_state", "method_done.json"),
          *created("job_failed_no_integration_services.json"), ("set_state", "method_done.json"))
    with pytest.raises(HostRefused, match=r"integration service"):
        host.take_checkpoint(WEB01, "running", saved_state_fallback=True)
    assert [p["RequestedState"] for p in fake.ops("set_state")] == [6, 2]


def test_saved_state_fallback_off_refuses_with_both_reasons(hv) -> None:
    host, fake = hv
    queue(fake, *created("job_failed_application_consistency.json"),
          *created("job_failed_no_integration_services.json"))
    with pytest.raises(HostRefused, match=r"could take no checkpoint: application-consistent.*crash-consistent"):
        host.take_checkpoint(WEB01, "running", saved_state_fallback=False)
    assert not fake.ops("set_state")


@pytest.mark.parametrize("state", ["off", "saved"])
def test_vm_not_running_is_checkpointed_as_is(hv, state: str) -> None:
    host, fake = hv
    queue(fake, *created("job_completed.json"))
    taken = host.take_checkpoint(WEB01, state, saved_state_fallback=True)
    assert taken.consistency == "saved-state" and f"the VM was {state}" in taken.notes[0]
    assert fake.ops("create_checkpoint") == [{"VmId": WEB01, "ConsistencyLevel": 2}]
    assert not fake.ops("set_state")


def test_job_timeout(hv) -> None:
    host, fake = hv
    host.job_timeout = 0.1
    queue(fake, ("create_checkpoint", "create_checkpoint_started.json"), *[("job", "job_running.json")] * 500)
    with pytest.raises(HostTimeout, match=r"CreateSnapshot .job A6F2C8E1-.*did not finish within 0 s"):
        host.take_checkpoint(WEB01, "off", saved_state_fallback=True)


def test_method_return_codes(hv) -> None:
    host, fake = hv
    queue(fake, ("destroy_checkpoint", {"ReturnValue": 32775, "Job": None, "Result": None}),
          ("destroy_checkpoint", "method_done.json"))
    with pytest.raises(HostRefused, match=r"DestroySnapshot returned 32775 .invalid state for this operation") as e:
        host.destroy_checkpoint(SNAPSHOT)
    assert e.value.code == 32775
    host.destroy_checkpoint(SNAPSHOT)  # 0: done without a job


def test_change_query_loops_on_processed_length(hv) -> None:
    host, fake = hv
    queue(fake, ("changes", "changes_first_window.json"), ("changes", "changes_second_window.json"))
    ranges = host.changed_ranges("D:\\Hyper-V\\web01\\Virtual Hard Disks\\web01-sys.vhdx",
                                 "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000004", 64 * GiB)
    assert ranges == [(0, 524288), (1048576, 2097152), (3 * GiB, 1048576), (64 * GiB - 1048576, 1048576)]
    assert [(p["Offset"], p["Length"]) for p in fake.ops("changes")] == [(0, 64 * GiB), (32 * GiB, 32 * GiB)]


def test_change_query_failures(hv) -> None:
    host, fake = hv
    path, rct = "D:\\web01.vhdx", "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000004"
    queue(fake, ("changes", "changes_invalid_parameter.json"))
    with pytest.raises(HostRefused, match=r"GetVirtualDiskChanges returned 32773 .invalid parameter"):
        host.changed_ranges(path, rct, 64 * GiB)
    queue(fake, ("changes", "changes_job_started.json"), ("job", "job_failed_rct_invalid.json"))
    with pytest.raises(HostRefused, match=r"resilient change tracking identifier is not valid"):
        host.changed_ranges(path, rct, 64 * GiB)
    queue(fake, ("changes", "error_file_not_found.json"))
    with pytest.raises(HyperVError, match=r"cannot find the file"):
        host.changed_ranges(path, rct, 64 * GiB)


@pytest.mark.parametrize(("answer", "message"), [
    ({"ProcessedByteLength": 0, "ChangedByteOffsets": [], "ChangedByteLengths": []}, "no progress"),
    ({"ProcessedByteLength": 65 * GiB, "ChangedByteOffsets": [], "ChangedByteLengths": []}, "no progress"),
    ({"ProcessedByteLength": GiB, "ChangedByteOffsets": [1], "ChangedByteLengths": []}, "1 offsets but 0 lengths"),
    ({"ProcessedByteLength": GiB, "ChangedByteOffsets": [64 * GiB], "ChangedByteLengths": [1]}, "outside the disk"),
    ({"ProcessedByteLength": GiB, "ChangedByteOffsets": [-1], "ChangedByteLengths": [1]}, "outside the disk"),
    ({"ProcessedByteLength": GiB, "ChangedByteOffsets": ["0"], "ChangedByteLengths": [1]}, "outside the disk"),
    ({"ProcessedByteLength": "1", "ChangedByteOffsets": [], "ChangedByteLengths": []}, "'ProcessedByteLength' should"),
    ({"ProcessedByteLength": GiB, "ChangedByteOffsets": None, "ChangedByteLengths": []}, "'ChangedByteOffsets'"),
])
def test_change_query_malformed_answers(hv, answer: dict, message: str) -> None:
    host, fake = hv
    queue(fake, ("changes", {"ReturnValue": 0, "Job": None, "Result": None} | answer))
    with pytest.raises(HyperVError, match=message):
        host.changed_ranges("D:\\web01.vhdx", "rctX:1", 64 * GiB)


def test_reference_point_maps_rct_ids_by_virtual_disk_id(hv) -> None:

    host, fake = hv
    queue(fake, ("convert_checkpoint", "convert_started.json"), ("job", "job_completed.json"),
          ("job_result", "job_result_reference_point.json"), ("reference_point", "reference_point.json"))
    point = host.convert_checkpoint(SNAPSHOT)
    assert point == "Microsoft:D4E5F6A7-B8C9-4D0E-9F1A-2B3C4D5E6F70"
    info = host.reference_point(point)
    assert info.rct_ids == {
        "4a3c5c67-0f5b-4d4e-9d1b-5d2e3c8a1f00": "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000004",
        "0e7f2b19-6d3a-4c85-b1e4-9a2f7c3d5e61": "rctX:1d2c3b4a:5e6f:4a7b:8c9d:0e1f2a3b4c5d:00000002",
    }
    assert fake.ops("job_result")[0]["ClassName"] == "Msvm_VirtualSystemReferencePoint"

    answer = recorded("reference_point.json")["result"]
    answer["Disks"].reverse()  # resolution goes by identifier, never by position
    answer["Disks"][0]["VirtualDiskId"] = None  # the host could not resolve one disk
    queue(fake, ("reference_point", answer))
    info = host.reference_point(point)
    assert list(info.rct_ids) == ["4a3c5c67-0f5b-4d4e-9d1b-5d2e3c8a1f00"]
    assert info.unresolved == (answer["Disks"][0]["Identifier"],)

    answer["ResilientChangeTrackingIdentifiers"].pop()
    queue(fake, ("reference_point", answer))
    with pytest.raises(HyperVError, match=r"lists 2 disks but 1 RCT ids"):
        host.reference_point(point)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda v: v.clear(), None),
    (lambda v: v[0].pop("Disks"), "field 'Disks' is missing"),
    (lambda v: v[0].update(EnabledState="2"), "'EnabledState' should be int, got str"),
    (lambda v: v[0].update(EnabledState=True), "'EnabledState' should be int, got bool"),
    (lambda v: v[0]["Disks"][0].update(Size=None), "'Size' should be int, got NoneType"),
    (lambda v: v[0]["Disks"][0].update(VirtualDiskId="not-a-guid"), "'not-a-guid' is not a GUID"),
    (lambda v: v[0].update(Disks={"Path": "x"}), "'Disks' should be list, got dict"),
    (lambda v: v.append("web02"), "expected an object, got str"),
    (lambda v: v[0].update(Id=1), "'Id' should be str, got int"),
    (lambda v: v[0].update(Id="HV01"), "'HV01' is not a GUID"),
])
def test_malformed_vm_list(hv, mutate, message: str | None) -> None:

    host, fake = hv
    answer = recorded("vms.json")["result"]
    mutate(answer)
    queue(fake, ("vms", answer))
    if message is None:
        assert host.list_vms() == []
        return
    with pytest.raises(HyperVError, match=f"host answer to vms: .*{message}"):
        host.list_vms()


def test_malformed_dates_and_checkpoint_types(hv) -> None:

    host, fake = hv
    answer = recorded("inventory.json")["result"]
    answer["Snapshots"][0]["Created"] = "yesterday"
    queue(fake, ("inventory", answer))
    with pytest.raises(HyperVError, match=r"'yesterday' is not a date"):
        host.inventory(WEB01)
    answer = recorded("checkpoint.json")["result"] | {"Type": "Microsoft:Hyper-V:Snapshot:Realized"}
    queue(fake, ("checkpoint", answer))
    with pytest.raises(HyperVError, match=r"not a recovery checkpoint"):
        host.checkpoint(SNAPSHOT)
    queue(fake, ("job_result", []), ("create_checkpoint", "create_checkpoint_started.json"),
          ("job", "job_completed.json"))
    fake.queue["job_result"].rotate()  # the empty result belongs after the job
    with pytest.raises(HyperVError, match=r"job names 0 Msvm_VirtualSystemSettingData results"):
        host.create_checkpoint(WEB01, 1)
