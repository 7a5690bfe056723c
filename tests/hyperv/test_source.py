"""HyperVSource and HyperVBackup against the fake host (WinRM transport boundary) and real Samba:
VM selection, checkpoint consistency levels, stale checkpoints, fallback reasons, pruning, cleanup.

No Windows host can run here; the fake host's answers are modelled on recorded outputs (see
fakehost.py). The pipeline and server are left out; test_end_to_end.py drives them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from collectors.sources import SourceError
from collectors.sources.hyperv import HostAccessDenied, HostRefused, HyperVBackup, HyperVError, HyperVSource
from collectors.sources.hyperv.source import NOT_ASKED, decode_tracking, encode_tracking

from .conftest import Lab, lab_config
from .fakehost import Answer, FakeVm


def cycle(lab: Lab, source: HyperVSource | None = None) -> tuple[HyperVBackup, dict[str, str]]:
    """One committed backup without reading data: checkpoint, configuration, reference point, release."""
    with (source or lab.source()).begin("web01") as b:
        b.config_files()
        ids = b.tracking_ids()
        b.end(committed=True)
    return b, ids


def disk_ids(lab: Lab) -> list[str]:
    return [d.virtual_disk_id.lower() for d in lab.vm.disks]


def test_vm_selection(lab: Lab, samba) -> None:
    other = FakeVm("9F1A3C5E-2B4D-4E6F-8A0C-7E9D1B3F5A24", "web01-test", [], "D:\\x")
    twin = FakeVm("2C8E4F1A-7B3D-4A9E-8C6F-1D0B5E3A7F92", "db01", [], "D:\\y")
    lab.fake.vms.update({other.id: other, twin.id: twin})
    source = HyperVSource(dataclasses.replace(lab.config, vms=("WEB*",), exclude=("*-test",)),
                          transport=lab.transport)
    assert [(v.id, v.name, v.host) for v in source.vms()] == [(lab.vm.id.lower(), "web01", "127.0.0.1")]
    with pytest.raises(SourceError, match=r"not selected"):
        source.begin("web01-test")
    with pytest.raises(SourceError, match=r"no VM named 'web02' on 127.0.0.1; VMs there: db01, web01, web01-test"):
        source.begin("web02")
    twin.name = "web01"
    with pytest.raises(SourceError, match=r"2 VMs on 127.0.0.1 are named 'web01'; use the id"):
        source.begin("web01")
    with source.begin("{" + lab.vm.id + "}") as b:  # the id, as Hyper-V Manager shows it
        assert b.vm.id == lab.vm.id.lower()
    assert lab.transport.shells == set()


def test_stale_checkpoints_of_this_collector_are_removed(lab: Lab) -> None:
    stale = lab.fake.add_snapshot(lab.vm.id, "chunkyard-col1-20261124T230000Z")
    foreign = lab.fake.add_snapshot(lab.vm.id, "web01 - Backup - (11/24/2026 - 23:30:02)")
    other_collector = lab.fake.add_snapshot(lab.vm.id, "chunkyard-col2-20261124T230000Z")
    user = lab.fake.add_snapshot(lab.vm.id, "chunkyard-col1-user", "Microsoft:Hyper-V:Snapshot:Realized")
    with lab.source().begin("web01") as b:
        assert b.removed_stale == ["chunkyard-col1-20261124T230000Z"]
        assert stale not in lab.fake.snapshots
        assert {foreign, other_collector, user} < set(lab.fake.snapshots)
        assert lab.fake.snapshots[b.checkpoint.instance_id]["name"] == b.checkpoint_name
    assert set(lab.fake.snapshots) == {foreign, other_collector, user}  # ours went at release


def test_untagged_checkpoint_is_a_warning(lab: Lab) -> None:
    lab.fake.refuse["rename_checkpoint"] = "The operation is not supported for recovery checkpoints."
    with lab.source().begin("web01") as b:
        assert b.checkpoint.name.startswith("web01 - Backup")
        assert b.warnings == [f"could not tag the checkpoint as {b.checkpoint_name}: ModifySystemSettings failed "
                              "on the host (job state 10, error 32768): The operation is not supported for "
                              "recovery checkpoints."]
    assert not lab.fake.snapshots


@pytest.mark.parametrize("state", [3, 6])
def test_vm_off_or_saved(lab: Lab, state: int) -> None:
    lab.vm.state = state
    lab.vm.application_consistent = lab.vm.crash_consistent = False  # nothing runs in the guest
    with lab.source().begin("web01") as b:
        assert b.consistency == "saved-state"
        assert "the VM was " in b.consistency_notes[0]
    assert not lab.fake.state_changes and lab.vm.state == state


def test_application_consistency_refused(lab: Lab) -> None:
    lab.vm.application_consistent = False
    with lab.source().begin("web01") as b:
        assert b.consistency == "crash"
        assert "Production checkpoints cannot be created for 'web01'" in b.consistency_notes[0]


def test_no_integration_services_saves_the_vm_briefly(lab: Lab) -> None:
    lab.vm.application_consistent = lab.vm.crash_consistent = False
    with lab.source().begin("web01") as b:
        assert b.consistency == "saved-state" and len(b.consistency_notes) == 3
        assert lab.fake.state_changes == [(lab.vm.id, 6), (lab.vm.id, 2)] and lab.vm.state == 2
    source = HyperVSource(dataclasses.replace(lab.config, saved_state_fallback=False), transport=lab.transport)
    with pytest.raises(HostRefused, match=r"could take no checkpoint"):
        source.begin("web01")
    assert not lab.fake.snapshots and lab.transport.shells == set()


def test_access_denied_at_begin_closes_everything(lab: Lab) -> None:
    lab.fake.queue["inventory"].append(Answer.file("error_access_denied.json"))
    with pytest.raises(HostAccessDenied, match=r"inventory failed on the host: Access denied"):
        lab.source().begin("web01")
    assert lab.transport.shells == set() and not lab.fake.snapshots


def test_unusable_disks_abort_and_clean_up(lab: Lab) -> None:
    original = lab.fake.op_checkpoint

    def with_vhd(**params):
        answer = original(**params)
        answer["Disks"][1] |= {"Format": 2, "Path": answer["Disks"][1]["Path"].replace(".vhdx", ".vhd")}
        return answer

    lab.fake.op_checkpoint = with_vhd
    with pytest.raises(HyperVError, match=r"data.vhd is not a VHDX \(format 2\)"):
        lab.source().begin("web01")
    assert not lab.fake.snapshots and len(lab.fake.ops("destroy_checkpoint")) == 1

    def with_twins(**params):
        answer = original(**params)
        answer["Disks"][1]["VirtualDiskId"] = answer["Disks"][0]["VirtualDiskId"]
        return answer

    lab.fake.op_checkpoint = with_twins
    with pytest.raises(HyperVError, match=r"share VirtualDiskId .*Set-VHD -ResetDiskIdentifier"):
        lab.source().begin("web01")
    assert not lab.fake.snapshots


def test_tracking_ids_and_fallback_reasons(lab: Lab) -> None:
    first, ids = cycle(lab)
    sys_id, data_id = disk_ids(lab)
    assert set(ids) == {sys_id, data_id}
    token = decode_tracking(ids[sys_id])
    assert token["point"] in lab.fake.points and token["rct"].startswith("rctX:") and token["disk"] == sys_id
    assert first.fallback_reason == {sys_id: NOT_ASKED, data_id: NOT_ASKED}

    lab.write("sys.vhdx", 3 * 1048576, 4096, 0x42)
    with lab.source().begin("web01") as b:
        assert b.changed_ranges(sys_id, ids[sys_id]) == [(3 * 1048576, 4096)]
        assert b.changed_ranges(data_id, ids[data_id]) == []
        assert b.fallback_reason == {sys_id: None, data_id: None}
        reasons = {
            "none": b._changes(sys_id, None)[0],
            "garbage": b._changes(sys_id, "rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001")[0],
            "other disk": b._changes(sys_id, ids[data_id])[0],
            "resized": b._changes(sys_id, encode_tracking(token["point"], token["rct"], sys_id, 1))[0],
            "gone": b._changes(sys_id, encode_tracking("Microsoft:GONE", token["rct"], sys_id, token["size"]))[0],
        }
        assert b.changed_ranges(sys_id, json.dumps({"v": 2})) is None
        assert "not one this source wrote" in b.fallback_reason[sys_id]
    assert reasons == {
        "none": "no change-tracking id stored for this disk",
        "garbage": "the stored change-tracking id is not one this source wrote: "
                   "'rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001'",
        "other disk": f"the stored id belongs to disk {data_id} (VirtualDiskId changed)",
        "resized": "the virtual size changed from 1 to 67108864 bytes",
        "gone": "reference point Microsoft:GONE no longer exists on the host (deleted, VM moved, imported or restored)",
    }
    lab.vm.version = "5.0"
    with lab.source().begin("web01") as b:
        assert b.changed_ranges(sys_id, ids[sys_id]) is None
        assert b.fallback_reason[sys_id] == "VM configuration version 5.0 has no RCT (6.2 or later needed)"


@pytest.mark.parametrize("policy", ["all", "previous"])
def test_pruning_after_commit(lab: Lab, samba, policy: str) -> None:
    source = HyperVSource(lab_config(samba, prune_reference_points=policy), transport=lab.transport)
    _, ids = cycle(lab, source)
    ours = decode_tracking(next(iter(ids.values())))["point"]
    foreign = "Microsoft:0A1B2C3D-4E5F-4061-8293-A4B5C6D7E8F9"  # another product's RCT reference point
    lab.fake.points[foreign] = {"vm": lab.vm.id, "disks": []}
    with source.begin("web01") as b:
        for disk_id, token in ids.items():
            b.changed_ranges(disk_id, token)
        b.config_files()
        new = decode_tracking(next(iter(b.tracking_ids().values())))["point"]
        b.end(committed=True)
    expected = {foreign, ours} if policy == "all" else {ours}
    assert set(b.pruned) == expected and set(lab.fake.points) == {new} | ({foreign} - expected)


def test_uncommitted_run_keeps_the_previous_reference_point(lab: Lab) -> None:
    cycle(lab)
    before = set(lab.fake.points)
    with lab.source().begin("web01") as b:
        b.config_files()
        b.tracking_ids()  # converted, but the server never committed the point
    assert set(lab.fake.points) == before, "the new reference point is destroyed, the committed one kept"
    assert not lab.fake.snapshots and not b.cleanup_errors


def test_configuration_files_missing_or_failing(lab: Lab) -> None:
    lab.vm.config_dir = None  # the checkpoint's files are not where the host says
    with lab.source().begin("web01") as b:
        assert b.config_files() == {}
        assert b.warnings == [f"configuration file {b.checkpoint.config_root}\\Snapshots\\"
                              f"{b.checkpoint.instance_id.split(':')[1]}.vmcx not found"]


def test_cleanup_failure_is_reported_not_raised(lab: Lab) -> None:
    lab.fake.queue["destroy_checkpoint"].append(Answer.file("error_access_denied.json"))
    with lab.source().begin("web01") as b:
        pass
    assert len(b.cleanup_errors) == 1 and "Access denied" in b.cleanup_errors[0]
    with lab.source().begin("web01") as again:  # the next run finds the tagged checkpoint and removes it
        assert again.removed_stale == [b.checkpoint_name]
