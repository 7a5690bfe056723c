"""Hyper-V operations over WMI (root\\virtualization\\v2), each one script run through the shell.

This layer knows the WMI contract: return values (0 done, 4096 job started, others refused), job
polling, which class a job's result is, and the shape of every answer. Answers are checked field
by field, so a truncated or foreign answer is a HyperVError that names the operation and the field,
never a KeyError deep in the backup.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..base import Range
from .errors import HostRefused, HostTimeout, HyperVError
from .winrm_shell import WinRMShell

log = logging.getLogger(__name__)

APPLICATION_CONSISTENT, CRASH_CONSISTENT = 1, 2  # Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel
RUNNING, SAVED = 2, 6  # Msvm_ComputerSystem.RequestStateChange
RCT_REFERENCE_POINT = 2  # Msvm_VirtualSystemReferencePoint.ReferencePointType
RECOVERY_SNAPSHOT = "Microsoft:Hyper-V:Snapshot:Recovery"
VHDX_FORMAT = 3
JOB_STARTED = 4096
JOB_RUNNING_STATES = {2, 3, 4, 5, 6}  # New, Starting, Running, Suspended, Shutting Down
JOB_COMPLETED = 7
JOB_POLL_SECONDS = 10  # one job query waits on the host up to this long

STATES = {2: "running", 3: "off", 6: "saved", 9: "paused", 32768: "paused", 32769: "saved"}
RETURN_VALUES = {
    1: "not supported", 2: "failed", 3: "timeout", 4: "invalid parameter", 5: "invalid state", 6: "invalid type",
    32768: "failed", 32769: "access denied", 32770: "not supported", 32771: "status is unknown",
    32772: "timeout", 32773: "invalid parameter", 32774: "system is in use", 32775: "invalid state for this operation",
    32776: "incorrect data type", 32777: "system is not available", 32778: "out of memory", 32779: "file not found",
}
METHODS = {
    "create_checkpoint": "CreateSnapshot", "rename_checkpoint": "ModifySystemSettings",
    "destroy_checkpoint": "DestroySnapshot", "convert_checkpoint": "ConvertToReferencePoint",
    "destroy_reference_point": "DestroyReferencePoint", "changes": "GetVirtualDiskChanges",
    "set_state": "RequestStateChange",
}
_MS_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")


# ---------------------------------------------------------------------------------------------- answers


def field(op: str, obj: Any, key: str, kind: type, *, optional: bool = False) -> Any:
    """obj[key] checked to be of `kind` (None allowed when optional)."""
    if not isinstance(obj, dict):
        raise HyperVError(f"host answer to {op}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise HyperVError(f"host answer to {op}: field {key!r} is missing")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise HyperVError(f"host answer to {op}: field {key!r} should be {kind.__name__}, "
                          f"got {type(value).__name__} {value!r:.60}")
    return value


def items(op: str, value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise HyperVError(f"host answer to {op}: {what} should be a list, got {type(value).__name__}")
    return value


def guid(op: str, value: str) -> str:
    """A GUID as the lower-case canonical form (WMI writes them in braces, upper case)."""
    try:
        return str(uuid.UUID(value.strip().strip("{}")))
    except ValueError:
        raise HyperVError(f"host answer to {op}: {value!r:.60} is not a GUID") from None


def timestamp(op: str, value: Any) -> datetime | None:
    """A date as Windows PowerShell 5.1 serialises it ("/Date(ms)/") or as ISO 8601."""
    if value is None:
        return None
    if isinstance(value, str):
        match = _MS_DATE.match(value)
        if match:
            return datetime.fromtimestamp(int(match.group(1)) / 1000, UTC)
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    raise HyperVError(f"host answer to {op}: {value!r:.60} is not a date")


@dataclass(frozen=True)
class HostDisk:
    path: str  # Windows path on the host
    virtual_disk_id: str  # lower-case GUID, stable across the VHDX -> AVHDX chain; "" if the host has none
    size: int  # virtual size in bytes
    format: int  # 2 VHD, 3 VHDX, 4 VHD Set


@dataclass(frozen=True)
class HostVm:
    id: str  # the VM GUID as the host spells it (Msvm_ComputerSystem.Name)
    name: str
    state: str  # running | off | saved | paused | other
    version: str  # configuration version; RCT needs 6.2 or later
    disks: tuple[HostDisk, ...]


@dataclass(frozen=True)
class Snapshot:
    instance_id: str
    name: str
    type: str
    created: datetime | None


@dataclass(frozen=True)
class Inventory:
    state: str
    snapshots: tuple[Snapshot, ...]
    reference_points: dict[str, int]  # InstanceID -> ReferencePointType


@dataclass(frozen=True)
class Checkpoint:
    instance_id: str
    name: str
    config_root: str
    config_file: str
    disks: tuple[HostDisk, ...]


@dataclass(frozen=True)
class ReferencePoint:
    instance_id: str
    rct_ids: dict[str, str]  # VirtualDiskId -> RCT id
    unresolved: tuple[str, ...]  # disk identifiers whose VirtualDiskId the host could not tell


@dataclass(frozen=True)
class CheckpointTaken:
    instance_id: str
    consistency: str  # application | crash | saved-state
    notes: tuple[str, ...]  # why a better level was not reached


def _state(code: int) -> str:
    return STATES.get(code, "other")


def _disk(op: str, raw: Any) -> HostDisk:
    return HostDisk(
        path=field(op, raw, "Path", str),
        virtual_disk_id=guid(op, raw["VirtualDiskId"]) if field(op, raw, "VirtualDiskId", str) else "",
        size=field(op, raw, "Size", int),
        format=field(op, raw, "Format", int),
    )


# ---------------------------------------------------------------------------------------------- host


class HyperVHost:
    """The operations the Hyper-V source needs, on one host, through one shell."""

    def __init__(self, shell: WinRMShell, *, job_timeout: float):
        self.shell = shell
        self.job_timeout = job_timeout

    # -- inventory

    def list_vms(self) -> list[HostVm]:
        op = "vms"
        vms = []
        for raw in items(op, self.shell.run(op), "the VM list"):
            disks = tuple(_disk(op, d) for d in field(op, raw, "Disks", list))
            vm_id = field(op, raw, "Id", str)
            guid(op, vm_id)  # a VM's Name is its GUID; anything else is not a VM
            vms.append(HostVm(vm_id, field(op, raw, "Name", str),
                              _state(field(op, raw, "EnabledState", int)),
                              field(op, raw, "Version", str, optional=True) or "", disks))
        return vms

    def inventory(self, vm_id: str) -> Inventory:
        op = "inventory"
        raw = self.shell.run(op, VmId=vm_id)
        snapshots = tuple(
            Snapshot(field(op, s, "InstanceID", str), field(op, s, "Name", str), field(op, s, "Type", str),
                     timestamp(op, field(op, s, "Created", str, optional=True)))
            for s in field(op, raw, "Snapshots", list))
        points = {field(op, p, "InstanceID", str): field(op, p, "Type", int)
                  for p in field(op, raw, "ReferencePoints", list)}
        return Inventory(_state(field(op, raw, "EnabledState", int)), snapshots, points)

    # -- methods and jobs

    def call(self, op: str, **params: Any) -> None:
        """Invoke a WMI method and wait for its job, if it started one."""
        self._done(op, self.shell.run(op, **params))

    def make(self, op: str, result_class: str, **params: Any) -> str:
        """Invoke a WMI method that creates something; return the InstanceID of what it made."""
        raw = self.shell.run(op, **params)
        job = self._done(op, raw)
        if job is None:
            return field(op, raw, "Result", str)
        made = items("job_result", self.shell.run("job_result", JobId=job, ClassName=result_class),
                     "the job's results")
        if len(made) != 1 or not isinstance(made[0], str):
            raise HyperVError(f"{METHODS[op]} finished, but its job names {len(made)} {result_class} results "
                              f"instead of one: {made!r:.200}")
        return made[0]

    def _done(self, op: str, raw: Any) -> str | None:
        """Check a method's return value; wait for its job (returning the job id) when one started."""
        value = field(op, raw, "ReturnValue", int)
        if value == JOB_STARTED:
            job = field(op, raw, "Job", str)
            self.wait_job(job, METHODS[op])
            return job
        if value != 0:
            raise HostRefused(f"{METHODS[op]} returned {value} ({RETURN_VALUES.get(value, 'unknown code')})", value)
        return None

    def wait_job(self, job_id: str, what: str) -> None:
        """Poll Msvm_ConcreteJob until it completes; HostRefused with the host's text when it fails."""
        op = "job"
        deadline = time.monotonic() + self.job_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HostTimeout(f"{what} (job {job_id}) did not finish within {self.job_timeout:.0f} s")
            raw = self.shell.run(op, JobId=job_id, WaitSeconds=max(1, min(JOB_POLL_SECONDS, int(remaining))))
            state = field(op, raw, "JobState", int)
            if state == JOB_COMPLETED:
                return
            if state not in JOB_RUNNING_STATES:
                code = field(op, raw, "ErrorCode", int)
                text = (field(op, raw, "ErrorDescription", str, optional=True)
                        or field(op, raw, "ErrorSummaryDescription", str, optional=True) or "no description")
                text = " ".join(text.split())  # the host's description spans lines; a log line should not
                raise HostRefused(f"{what} failed on the host (job state {state}, error {code}): {text}", code)
            log.debug("%s: job %s at %s%%", what, job_id, field(op, raw, "PercentComplete", int))

    # -- checkpoints

    def create_checkpoint(self, vm_id: str, level: int) -> str:
        return self.make("create_checkpoint", "Msvm_VirtualSystemSettingData", VmId=vm_id, ConsistencyLevel=level)

    def take_checkpoint(self, vm_id: str, state: str, *, saved_state_fallback: bool) -> CheckpointTaken:
        """A recovery checkpoint at the best consistency the VM allows: application, crash, saved state."""
        if state in ("off", "saved"):
            snapshot = self.create_checkpoint(vm_id, CRASH_CONSISTENT)
            return CheckpointTaken(snapshot, "saved-state", (f"the VM was {state}: no guest I/O in flight",))
        notes: list[str] = []
        for level, name in ((APPLICATION_CONSISTENT, "application"), (CRASH_CONSISTENT, "crash")):
            try:
                return CheckpointTaken(self.create_checkpoint(vm_id, level), name, tuple(notes))
            except HostRefused as e:
                notes.append(f"{name}-consistent checkpoint refused: {e}")
                log.warning("VM %s: %s", vm_id, notes[-1])
        if not saved_state_fallback or state != "running":
            raise HostRefused(f"VM {vm_id} ({state}) could take no checkpoint: " + "; ".join(notes))
        self.call("set_state", VmId=vm_id, RequestedState=SAVED)
        try:
            snapshot = self.create_checkpoint(vm_id, CRASH_CONSISTENT)
        finally:
            self.call("set_state", VmId=vm_id, RequestedState=RUNNING)
        notes.append("the VM was saved for the checkpoint and resumed right after")
        return CheckpointTaken(snapshot, "saved-state", tuple(notes))

    def rename_checkpoint(self, snapshot_id: str, name: str) -> None:
        self.call("rename_checkpoint", SnapshotId=snapshot_id, Name=name)

    def checkpoint(self, snapshot_id: str) -> Checkpoint:
        op = "checkpoint"
        raw = self.shell.run(op, SnapshotId=snapshot_id)
        kind = field(op, raw, "Type", str)
        if kind != RECOVERY_SNAPSHOT:
            raise HyperVError(f"checkpoint {snapshot_id} is {kind!r}, not a recovery checkpoint")
        disks = tuple(_disk(op, d) for d in field(op, raw, "Disks", list))
        return Checkpoint(field(op, raw, "InstanceID", str), field(op, raw, "Name", str),
                          field(op, raw, "ConfigurationDataRoot", str), field(op, raw, "ConfigurationFile", str),
                          disks)

    def destroy_checkpoint(self, snapshot_id: str) -> None:
        self.call("destroy_checkpoint", SnapshotId=snapshot_id)

    # -- reference points and change tracking

    def convert_checkpoint(self, snapshot_id: str) -> str:
        return self.make("convert_checkpoint", "Msvm_VirtualSystemReferencePoint", SnapshotId=snapshot_id)

    def reference_point(self, point_id: str) -> ReferencePoint:
        """The point's RCT ids keyed by VirtualDiskId (VirtualDiskIdentifiers[i] pairs with RCT id [i])."""
        op = "reference_point"
        raw = self.shell.run(op, ReferencePointId=point_id)
        identifiers = field(op, raw, "VirtualDiskIdentifiers", list)
        rct_ids = field(op, raw, "ResilientChangeTrackingIdentifiers", list)
        if len(identifiers) != len(rct_ids):
            raise HyperVError(f"reference point {point_id} lists {len(identifiers)} disks but {len(rct_ids)} "
                              "RCT ids; cannot tell which id belongs to which disk")
        resolved = {field(op, d, "Identifier", str): field(op, d, "VirtualDiskId", str, optional=True)
                    for d in field(op, raw, "Disks", list)}
        by_disk: dict[str, str] = {}
        unresolved = []
        for identifier, rct in zip(identifiers, rct_ids, strict=True):
            if not isinstance(identifier, str) or not isinstance(rct, str):
                raise HyperVError(f"host answer to {op}: disk identifiers and RCT ids must be strings")
            disk_id = resolved.get(identifier)
            if disk_id:
                by_disk[guid(op, disk_id)] = rct
            else:
                unresolved.append(identifier)
        return ReferencePoint(field(op, raw, "InstanceID", str), by_disk, tuple(unresolved))

    def destroy_reference_point(self, point_id: str) -> None:
        self.call("destroy_reference_point", ReferencePointId=point_id)

    def changed_ranges(self, path: str, limit_id: str, size: int) -> list[Range]:
        """GetVirtualDiskChanges over the whole disk, continuing from ProcessedByteLength until done."""
        op = "changes"
        offset = 0
        ranges: list[Range] = []
        while offset < size:
            raw = self.shell.run(op, Path=path, LimitId=limit_id, Offset=offset, Length=size - offset)
            self._done(op, raw)
            processed = field(op, raw, "ProcessedByteLength", int)
            offsets = field(op, raw, "ChangedByteOffsets", list)
            lengths = field(op, raw, "ChangedByteLengths", list)
            if len(offsets) != len(lengths):
                raise HyperVError(f"{op} on {path}: {len(offsets)} offsets but {len(lengths)} lengths")
            if not 0 < processed <= size - offset:
                raise HyperVError(f"{op} on {path}: processed {processed} bytes of the {size - offset} asked "
                                  f"for at offset {offset}; no progress")
            for start, length in zip(offsets, lengths, strict=True):
                if (not isinstance(start, int) or not isinstance(length, int) or isinstance(start, bool)
                        or start < 0 or length < 0 or start + length > size):
                    raise HyperVError(f"{op} on {path}: range ({start!r}, {length!r}) lies outside the disk "
                                      f"({size} bytes)")
                if length:
                    ranges.append((start, length))
            offset += processed
        return ranges
