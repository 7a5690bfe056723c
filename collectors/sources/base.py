"""The source interface every collector source implements (lab, file/block device, Hyper-V).

A source lists VMs and starts a backup of one: a consistent, frozen view of each disk (a checkpoint),
the ranges changed since a change-tracking id, readers for the disks, and the VM's configuration files.
The pipeline (collectors/pipeline.py) knows nothing else about where disks come from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol


class SourceError(Exception):
    """A problem with the source (missing VM, checkpoint refused, bad disk); the message says what to do."""


@dataclass(frozen=True)
class VmInfo:
    id: str  # stable identity (Hyper-V: the VM GUID); names can change
    name: str
    host: str


@dataclass(frozen=True)
class DiskInfo:
    disk_id: str  # stable identity (Hyper-V: VirtualDiskId); safe as a path component
    name: str  # file name shown to admins, e.g. "sys.vhdx"
    size: int  # virtual size in bytes


Range = tuple[int, int]  # (offset, length) in virtual-disk bytes


class DiskReader(Protocol):
    """Reads a frozen virtual disk. chunkyard.vdisk.VhdxDisk satisfies this."""

    virtual_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the bytes at `offset`: the pipeline reuses its read buffers."""
        ...

    def allocated_ranges(self) -> list[Range]:
        """Sorted, merged ranges that may hold data; everything else reads as zeros."""
        ...

    def close(self) -> None: ...


class Backup(ABC):
    """One backup of one VM, from checkpoint to cleanup. Use as a context manager: leaving it without
    end(committed=True) rolls the checkpoint back, so a failed run leaves the VM as it was."""

    vm: VmInfo
    disks: list[DiskInfo]
    consistency: str  # "application" | "crash" | "saved-state": what the checkpoint achieved

    @abstractmethod
    def changed_ranges(self, disk_id: str, since: str | None) -> list[Range] | None:
        """Ranges changed since the change-tracking id `since`; None when unknown (no id, id invalid,
        tracking reset): the pipeline then reads every allocated range and compares digests."""

    @abstractmethod
    def open_disk(self, disk_id: str) -> DiskReader:
        """A reader of the frozen disk."""

    @abstractmethod
    def config_files(self) -> dict[str, bytes]:
        """The VM's configuration files (Hyper-V: .vmcx/.vmrs/.vmgs), name -> bytes."""

    @abstractmethod
    def tracking_ids(self) -> dict[str, str]:
        """Change-tracking ids that the next backup passes as `since`, per disk id. Called after every
        disk was read (Hyper-V converts the checkpoint into a reference point here)."""

    @abstractmethod
    def release(self, committed: bool) -> None:
        """Release the checkpoint. committed=True: the server holds the point, older references may go;
        False: roll back so the next backup asks for changes since the last committed id."""

    def report(self) -> dict[str, object]:
        """What an admin should see about this backup beyond the numbers (fallback reasons, warnings,
        consistency notes); empty when there is nothing to say."""
        return {}

    def end(self, committed: bool) -> None:
        """Release once; later calls (e.g. the context exit after a successful end) do nothing."""
        if not getattr(self, "_ended", False):
            self._ended = True
            self.release(committed)

    def __enter__(self) -> Backup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end(committed=False)


class Source(ABC):
    @abstractmethod
    def vms(self) -> list[VmInfo]:
        """VMs this source can back up."""

    @abstractmethod
    def begin(self, vm: str) -> Backup:
        """Freeze the VM's disks (take a checkpoint) and return the backup. `vm` is a name or an id."""
