"""The file and block-device source: any VHDX, raw image or block device, backed up as one disk.

There is no change tracking: the pipeline reads every allocated range and compares digests with the
previous point's map, so unchanged chunks are neither uploaded nor mapped. The caller is responsible
for consistency (e.g. an LVM snapshot it made); the point records "crash".
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

from chunkyard.vdisk import VhdxError, open_vhdx

from .base import Backup, DiskInfo, DiskReader, Range, Source, SourceError, VmInfo

VHDX_SIGNATURE = b"vhdxfile"


class RawDiskReader:
    """A raw image or block device. Sparse files report their holes as unallocated (SEEK_DATA/SEEK_HOLE)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.virtual_size = os.lseek(self._fd, 0, os.SEEK_END)
        self._is_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.virtual_size - offset))
        parts = []
        while length:
            data = os.pread(self._fd, length, offset)
            if not data:
                raise SourceError(f"{self.path}: short read at offset {offset} (the file shrank during the backup?)")
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def read_into(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < len(out):
            n = os.preadv(self._fd, [out[done:]], offset + done)
            if not n:
                raise SourceError(f"{self.path}: short read at offset {offset + done} (the file shrank during the "
                                  "backup?)")
            done += n

    def allocated_ranges(self) -> list[Range]:
        if self._is_device:
            return [(0, self.virtual_size)] if self.virtual_size else []
        ranges: list[Range] = []
        pos = 0
        while pos < self.virtual_size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            ranges.append((start, end - start))
            pos = end
        return ranges

    def close(self) -> None:
        os.close(self._fd)


def disk_id_for(path: Path) -> str:
    """A stable, path-safe disk id from the file name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip(".-") or "disk"
    return stem[:128]


def open_image(path: Path) -> DiskReader:
    with open(path, "rb") as f:
        is_vhdx = f.read(8) == VHDX_SIGNATURE
    if is_vhdx:
        try:
            return open_vhdx(path)
        except VhdxError as e:
            raise SourceError(str(e)) from None
    return RawDiskReader(path)


class FileBackup(Backup):
    def __init__(self, vm: VmInfo, path: Path):
        self.vm = vm
        self.path = path
        reader = open_image(path)
        try:
            size = reader.virtual_size
        finally:
            reader.close()
        self.disks = [DiskInfo(disk_id_for(path), path.name, size)]
        self.consistency = "crash"

    def changed_ranges(self, disk_id: str, since: str | None) -> list[Range] | None:
        return None

    def open_disk(self, disk_id: str) -> DiskReader:
        return open_image(self.path)

    def config_files(self) -> dict[str, bytes]:
        return {}

    def tracking_ids(self) -> dict[str, str]:
        return {}

    def release(self, committed: bool) -> None:
        """Nothing to release: the caller owns the image's consistency."""


class FileSource(Source):
    """`file:PATH` (a VHDX or raw image) or `blockdev:DEV`; the VM is named by the caller."""

    def __init__(self, path: Path, vm_name: str, *, block_device: bool = False):
        self.path = Path(path)
        self.vm_name = vm_name
        if not self.path.exists():
            raise SourceError(f"{self.path} does not exist")
        mode = self.path.stat().st_mode
        if block_device and not stat.S_ISBLK(mode):
            raise SourceError(f"{self.path} is not a block device; use file:{self.path} for an image file")
        if not block_device and not stat.S_ISREG(mode):
            raise SourceError(f"{self.path} is not a regular file; use blockdev:{self.path} for a device")

    def vms(self) -> list[VmInfo]:
        return [VmInfo(self.vm_name, self.vm_name, socket.gethostname())]

    def begin(self, vm: str) -> Backup:
        if vm != self.vm_name:
            raise SourceError(f"this source holds one VM, {self.vm_name!r}; got {vm!r}")
        return FileBackup(self.vms()[0], self.path)
