"""The Hyper-V source: recovery checkpoint -> RCT changes -> frozen disks over SMB -> reference point.

One backup of one VM (HyperVBackup), in the order the pipeline drives it:
1. begin: remove this collector's stale checkpoints (a crashed run's), take a recovery checkpoint at
   the best consistency the VM allows, tag it `chunkyard-<collector id>-<UTC time>`, read its frozen
   disks (VirtualDiskId, path, size) and configuration location.
2. changed_ranges: GetVirtualDiskChanges on the frozen disk since the stored RCT id; None (full read)
   when that is impossible, with the reason kept in `fallback_reason[disk_id]`.
3. open_disk / config_files: the frozen VHDX/AVHDX chain and the checkpoint's .vmcx/.vmrs/.vmgs, read
   over SMB (never ExportSystemDefinition, which leaves disk merging switched off).
4. tracking_ids: convert the checkpoint into a reference point (this merges the checkpoint away, so
   only after every disk was read) and return its RCT ids keyed by VirtualDiskId.
5. release: a checkpoint that still exists is always destroyed. Committed: older RCT reference points
   are destroyed (a kept one makes later merges fail). Not committed: the new reference point is
   destroyed, so the next run asks for changes since the last committed point, which still exists.

The tracking id stored on the server is JSON {v, point, rct, disk, size}: GetVirtualDiskChanges needs
the RCT id, and the reference point id tells whether that id can still be valid.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import ntpath
import re
from collections.abc import Callable
from datetime import UTC, datetime

from ..base import Backup, DiskInfo, DiskReader, Range, Source, SourceError, VmInfo
from .config import HyperVConfig
from .errors import HostRefused, HyperVError
from .host import (
    RCT_REFERENCE_POINT,
    RECOVERY_SNAPSHOT,
    VHDX_FORMAT,
    Checkpoint,
    HostDisk,
    HostVm,
    HyperVHost,
    Snapshot,
)
from .smb import HostFiles, open_frozen_disk
from .winrm_shell import Transport, WinRMShell, make_protocol

log = logging.getLogger(__name__)

CONFIG_LIMIT = 64 << 20  # the server's blob limit; a saved-state .vmrs with guest memory is larger
CONFIG_EXTENSIONS = (".vmcx", ".vmrs", ".vmgs")
TRACKING_VERSION = 1
MIN_RCT_VERSION = (6, 2)
NOT_ASKED = "no tracked base for this disk (first backup, new or resized disk, or a --full run)"


def encode_tracking(point: str, rct: str, disk_id: str, size: int) -> str:
    return json.dumps({"v": TRACKING_VERSION, "point": point, "rct": rct, "disk": disk_id, "size": size},
                      separators=(",", ":"))


def decode_tracking(token: str) -> dict | None:
    """The fields of a tracking id this source wrote, or None for anything else."""
    try:
        data = json.loads(token)
    except (json.JSONDecodeError, TypeError):
        return None
    types = {"v": int, "point": str, "rct": str, "disk": str, "size": int}
    if not isinstance(data, dict) or data.get("v") != TRACKING_VERSION:
        return None
    if any(not isinstance(data.get(k), t) for k, t in types.items()):
        return None
    return data


def blob_name(file_name: str) -> str:
    """A configuration file name the server accepts as a blob name."""
    return re.sub(r"[^A-Za-z0-9._{}-]", "_", file_name).lstrip(".")[:128] or "config"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


class HyperVBackup(Backup):
    """One backup of one VM on the host. Created by HyperVSource.begin()."""

    def report(self) -> dict[str, object]:
        notes = {"consistency_notes": list(self.consistency_notes),
                 "full_reads": {d: r for d, r in self.fallback_reason.items() if r},
                 "warnings": self.warnings, "cleanup_errors": self.cleanup_errors}
        return {k: v for k, v in notes.items() if v}

    def __init__(self, config: HyperVConfig, host: HyperVHost, files: HostFiles, vm: HostVm):
        self.config = config
        self.host = host
        self.files = files
        self.host_vm = vm
        self.vm = VmInfo(vm.id.lower(), vm.name, config.host)
        self.disks: list[DiskInfo] = []
        self.consistency = "crash"
        self.consistency_notes: tuple[str, ...] = ()
        self.checkpoint_name = f"chunkyard-{config.collector_id}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        self.checkpoint: Checkpoint | None = None
        self.fallback_reason: dict[str, str | None] = {}  # disk id -> why it is read in full (None: RCT used)
        self.untracked: dict[str, str] = {}  # disk id -> why the new reference point gives it no RCT id
        self.removed_stale: list[str] = []  # names of stale checkpoints of this collector removed at begin
        self.pruned: list[str] = []  # reference points destroyed after the commit
        self.warnings: list[str] = []
        self.cleanup_errors: list[str] = []
        self._frozen: dict[str, HostDisk] = {}
        self._snapshot: str | None = None  # a checkpoint of ours that exists on the host
        self._new_point: str | None = None
        self._points_before: set[str] = set()
        self._based_on: set[str] = set()

    # ------------------------------------------------------------------ begin

    def start(self) -> None:
        """Take the checkpoint; on any failure clean up what exists and re-raise."""
        try:
            self._start()
        except BaseException:
            self.end(committed=False)
            raise

    def _start(self) -> None:
        inventory = self.host.inventory(vm_id := self.host_vm.id)
        self._remove_stale(inventory.snapshots)
        self._points_before = {p for p, kind in inventory.reference_points.items() if kind == RCT_REFERENCE_POINT}
        taken = self.host.take_checkpoint(vm_id, inventory.state,
                                          saved_state_fallback=self.config.saved_state_fallback)
        self._snapshot = taken.instance_id
        self.consistency, self.consistency_notes = taken.consistency, taken.notes
        try:
            self.host.rename_checkpoint(taken.instance_id, self.checkpoint_name)
        except HostRefused as e:  # the backup works untagged; only a crash would leave it behind unnoticed
            self._warn(f"could not tag the checkpoint as {self.checkpoint_name}: {e}")
        self.checkpoint = self.host.checkpoint(taken.instance_id)
        for disk in self.checkpoint.disks:
            if disk.format != VHDX_FORMAT:
                raise HyperVError(f"VM {self.vm.name}: {disk.path} is not a VHDX (format {disk.format}); only "
                                  "VHDX disks can be backed up (Convert-VHD it, or detach it)")
            if not disk.virtual_disk_id:
                raise HyperVError(f"VM {self.vm.name}: the host reports no VirtualDiskId for {disk.path}")
            if disk.virtual_disk_id in self._frozen:
                raise HyperVError(f"VM {self.vm.name}: {disk.path} and {self._frozen[disk.virtual_disk_id].path} "
                                  f"share VirtualDiskId {disk.virtual_disk_id} (a copied disk?); give one a new id "
                                  "with Set-VHD -ResetDiskIdentifier")
            self._frozen[disk.virtual_disk_id] = disk
        if not self._frozen:
            raise HyperVError(f"VM {self.vm.name} has no VHDX disk to back up")
        self.disks = [DiskInfo(d.virtual_disk_id, ntpath.basename(d.path), d.size) for d in self.checkpoint.disks]
        self.fallback_reason = dict.fromkeys(self._frozen, NOT_ASKED)
        log.info("VM %s: %s checkpoint %s with %d disk(s)", self.vm.name, self.consistency, self.checkpoint_name,
                 len(self.disks))

    def _remove_stale(self, snapshots: tuple[Snapshot, ...]) -> None:
        """Recovery checkpoints this collector tagged in an earlier run that died before cleaning up."""
        prefix = f"chunkyard-{self.config.collector_id}-"
        for snapshot in snapshots:
            if snapshot.type == RECOVERY_SNAPSHOT and snapshot.name.startswith(prefix):
                try:
                    self.host.destroy_checkpoint(snapshot.instance_id)
                    self.removed_stale.append(snapshot.name)
                    log.warning("VM %s: removed stale checkpoint %s (created %s)", self.vm.name, snapshot.name,
                                snapshot.created)
                except HyperVError as e:
                    self._warn(f"could not remove stale checkpoint {snapshot.name}: {e}")

    # ------------------------------------------------------------------ the Backup interface

    def changed_ranges(self, disk_id: str, since: str | None) -> list[Range] | None:
        reason, ranges = self._changes(disk_id, since)
        self.fallback_reason[disk_id] = reason
        if reason:
            log.warning("VM %s disk %s: reading everything: %s", self.vm.name, disk_id, reason)
        return ranges

    def _changes(self, disk_id: str, since: str | None) -> tuple[str | None, list[Range] | None]:
        disk = self._frozen[disk_id]
        if since is None:
            return "no change-tracking id stored for this disk", None
        token = decode_tracking(since)
        if token is None:
            return f"the stored change-tracking id is not one this source wrote: {since[:80]!r}", None
        if _version(self.host_vm.version) < MIN_RCT_VERSION:
            return f"VM configuration version {self.host_vm.version} has no RCT (6.2 or later needed)", None
        if token["disk"] != disk_id:
            return f"the stored id belongs to disk {token['disk']} (VirtualDiskId changed)", None
        if token["size"] != disk.size:
            return f"the virtual size changed from {token['size']} to {disk.size} bytes", None
        if token["point"] not in self._points_before:
            return (f"reference point {token['point']} no longer exists on the host (deleted, VM moved, "
                    "imported or restored)"), None
        self._based_on.add(token["point"])
        try:
            return None, self.host.changed_ranges(disk.path, token["rct"], disk.size)
        except HyperVError as e:
            return f"the change query failed (RCT reset or invalid id): {e}", None

    def open_disk(self, disk_id: str) -> DiskReader:
        disk = self._frozen[disk_id]
        return open_frozen_disk(self.files, disk.path, disk.virtual_disk_id, disk.size, self.config.reads_in_flight)

    def config_files(self) -> dict[str, bytes]:
        """The checkpoint's own .vmcx/.vmrs/.vmgs; a missing or unreadable one is a warning, not a failure."""
        if self.checkpoint is None:
            raise HyperVError("the backup has no checkpoint (begin failed)")
        vmcx = ntpath.join(self.checkpoint.config_root, self.checkpoint.config_file)
        stem = ntpath.splitext(vmcx)[0]
        out = {}
        for extension in CONFIG_EXTENSIONS:
            path = stem + extension
            try:
                out[blob_name(ntpath.basename(path))] = self.files.read_file(path, CONFIG_LIMIT)
            except FileNotFoundError:
                if extension == ".vmcx":
                    self._warn(f"configuration file {path} not found")
            except HyperVError as e:
                self._warn(f"configuration file {path} not backed up: {e}")
        return out

    def tracking_ids(self) -> dict[str, str]:
        if self._snapshot is None:
            raise HyperVError("no checkpoint to convert into a reference point")
        point = self.host.convert_checkpoint(self._snapshot)
        self._snapshot = None  # converting deleted the checkpoint (its AVHDX now merges)
        self._new_point = point
        info = self.host.reference_point(point)
        ids = {}
        for disk in self.disks:
            rct = info.rct_ids.get(disk.disk_id)
            if rct is None:
                self.untracked[disk.disk_id] = (f"reference point {point} has no RCT id for this disk "
                                                f"(unresolved identifiers: {', '.join(info.unresolved) or 'none'})")
                log.warning("VM %s disk %s: %s", self.vm.name, disk.disk_id, self.untracked[disk.disk_id])
                continue
            ids[disk.disk_id] = encode_tracking(point, rct, disk.disk_id, disk.size)
        return ids

    def release(self, committed: bool) -> None:
        try:
            if self._snapshot is not None:
                self._cleanup("destroy checkpoint", self.host.destroy_checkpoint, self._snapshot)
                self._snapshot = None
            if self._new_point is not None and not committed:
                self._cleanup("destroy the new reference point", self.host.destroy_reference_point, self._new_point)
            if self._new_point is not None and committed:
                self._prune()
        finally:
            self.files.close()
            self.host.shell.close()

    def _cleanup(self, what: str, action: Callable[[str], None], target: str) -> None:
        try:
            action(target)
        except HyperVError as e:
            self.cleanup_errors.append(f"{what} {target}: {e}")
            log.error("VM %s: could not %s %s (a tagged checkpoint is removed by the next run): %s", self.vm.name,
                      what, target, e)

    def _prune(self) -> None:
        """Reference points older than the committed one: all RCT ones, or those this run was based on."""
        old = self._points_before if self.config.prune_reference_points == "all" else self._based_on
        for point in sorted(old - {self._new_point}):
            try:
                self.host.destroy_reference_point(point)
                self.pruned.append(point)
            except HyperVError as e:
                self._warn(f"could not destroy old reference point {point}: {e}")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("VM %s: %s", self.vm.name, message)


class HyperVSource(Source):
    """VMs of one Hyper-V host, driven over WinRM; `transport` replaces the HTTP layer (tests only)."""

    def __init__(self, config: HyperVConfig, *, transport: Transport | None = None):
        self.config = config
        self.transport = transport

    def _host(self) -> HyperVHost:
        shell = WinRMShell(make_protocol(self.config, self.transport), host=self.config.host,
                           user=self.config.user, command_timeout=self.config.command_timeout)
        return HyperVHost(shell, job_timeout=self.config.job_timeout)

    def _selected(self, vm: HostVm) -> bool:
        def match(patterns: tuple[str, ...]) -> bool:
            return any(p.lower() == vm.id.lower() or fnmatch.fnmatchcase(vm.name.lower(), p.lower()) for p in patterns)

        return match(self.config.vms) and not match(self.config.exclude)

    def host_vms(self) -> list[HostVm]:
        """The selected VMs with their state and current disks."""
        host = self._host()
        try:
            return [vm for vm in host.list_vms() if self._selected(vm)]
        finally:
            host.shell.close()

    def vms(self) -> list[VmInfo]:
        return [VmInfo(vm.id.lower(), vm.name, self.config.host) for vm in self.host_vms()]

    def begin(self, vm: str) -> HyperVBackup:
        host = self._host()
        try:
            everything = host.list_vms()
            found = [v for v in everything if v.id.lower() == vm.strip("{}").lower() or v.name == vm]
            if not found:
                raise SourceError(f"no VM named {vm!r} on {self.config.host}; VMs there: "
                                  f"{', '.join(sorted(v.name for v in everything)) or 'none'}")
            if len(found) > 1:
                raise SourceError(f"{len(found)} VMs on {self.config.host} are named {vm!r}; use the id: "
                                  f"{', '.join(v.id for v in found)}")
            if not self._selected(found[0]):
                raise SourceError(f"VM {vm!r} is not selected by hyperv.vms / hyperv.exclude")
            backup = HyperVBackup(self.config, host, HostFiles(self.config), found[0])
        except BaseException:
            host.shell.close()
            raise
        backup.start()
        return backup
