"""The data path: host files (frozen VHDX/AVHDX, configuration files) read over SMB or locally.

Disk data never crosses WinRM. Windows paths the host reports are mapped to what the collector can
open: a configured prefix (`paths`: `D:\\VMs` -> `\\\\hv01\\VMs` or a local directory), else the
admin share (`D:\\x` -> `\\\\host\\D$\\x`), else the path itself (UNC paths, or `data_path = "local"`
when the collector runs on the host). Files are opened read-only with share_access "rw" (an
exclusive open would fail on, or lock out, files Hyper-V holds) and unbuffered, so each read is one
large SMB READ instead of 64 KiB round trips.
"""

from __future__ import annotations

import errno
import ntpath
import os
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

import smbclient
from smbprotocol.exceptions import SMBAuthenticationError, SMBException, SMBOSError, SMBResponseException

from chunkyard.vdisk import VhdxDisk, VhdxError, open_vhdx

from ..base import Range
from .config import HyperVConfig
from .errors import HostAccessDenied, HyperVError

ACCESS_DENIED = 0xC0000022  # STATUS_ACCESS_DENIED
LOGON_FAILURE = 0xC000006D  # STATUS_LOGON_FAILURE


def _components(windows_path: str) -> tuple[str, list[str]]:
    """(drive or \\\\server\\share, path components) of a normalised Windows path."""
    drive, rest = ntpath.splitdrive(ntpath.normpath(windows_path))
    return drive, [p for p in rest.split("\\") if p]


def _key(drive: str, parts: list[str]) -> list[str]:
    """Windows paths compare case-insensitively."""
    return [drive.lower(), *(p.lower() for p in parts)]


class PathMapper:
    """Maps host paths (`D:\\VMs\\a.vhdx`) to collector paths (UNC or local)."""

    def __init__(self, host: str, mapping: dict[str, str], *, admin_shares: bool, local: bool):
        self.host = host
        self.local = local
        self.admin_shares = admin_shares
        rules = [(_key(*_components(prefix)), target) for prefix, target in mapping.items()]
        self.rules = sorted(rules, key=lambda rule: -len(rule[0]))  # the longest prefix wins

    def map(self, windows_path: str) -> str:
        drive, parts = _components(windows_path)
        if not drive or ".." in parts:
            raise HyperVError(f"host path {windows_path!r} is not an absolute Windows path")
        key = _key(drive, parts)
        for prefix, target in self.rules:
            if key[: len(prefix)] == prefix:
                return self._join(target, parts[len(prefix) - 1 :])
        if self.local:
            return windows_path
        if drive.startswith("\\\\"):
            return ntpath.join(drive, *parts)
        if self.admin_shares:
            return ntpath.join(f"\\\\{self.host}\\{drive[0].upper()}$", *parts)
        raise HyperVError(f"no hyperv.paths entry covers {windows_path} and admin_shares is off; map {drive}\\ "
                          "(or a folder under it) to a share in hyperv.paths")

    @staticmethod
    def _join(target: str, parts: list[str]) -> str:
        if target.startswith("\\\\"):
            return ntpath.join(target, *parts)
        return os.path.join(target, *parts)


class NamedFile:
    """A file object whose `name` is the host's Windows path, so VHDX errors and parent lookups use it."""

    def __init__(self, raw: BinaryIO, name: str):
        self.raw = raw
        self.name = name

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


class HostFiles:
    """Opens host files for reading, over SMB (one connection cache per source) or locally."""

    def __init__(self, config: HyperVConfig):
        self.config = config
        self.mapper = PathMapper(config.host, config.paths, admin_shares=config.admin_shares,
                                 local=config.data_path == "local")
        self._connections: dict = {}
        self._password: str | None = None

    def open(self, windows_path: str) -> NamedFile:
        """An unbuffered read-only handle; FileNotFoundError when the file does not exist."""
        target = self.mapper.map(windows_path)
        if not target.startswith("\\\\"):
            try:
                return NamedFile(open(target, "rb", buffering=0), windows_path)
            except FileNotFoundError:
                raise
            except OSError as e:
                raise self._error(target, windows_path, e, None) from None
        if self._password is None and self.config.transport != "kerberos":
            self._password = self.config.password()
        try:
            raw = smbclient.open_file(
                target, mode="rb", buffering=0, share_access="rw",
                username=self.config.user, password=self._password, port=self.config.smb_port,
                encrypt=self.config.smb_encrypt or None, connection_cache=self._connections,
            )
        except SMBOSError as e:
            if e.errno == errno.ENOENT:
                raise FileNotFoundError(errno.ENOENT, f"{target} does not exist", windows_path) from None
            raise self._error(target, windows_path, e, e.ntstatus) from None
        except SMBAuthenticationError as e:
            raise self._error(target, windows_path, e, LOGON_FAILURE) from None
        except SMBResponseException as e:
            raise self._error(target, windows_path, e, e.status) from None
        except (SMBException, ValueError, OSError) as e:  # ValueError: smbclient could not set up the session
            raise self._error(target, windows_path, e, None) from None
        return NamedFile(raw, windows_path)

    def _error(self, target: str, windows_path: str, error: Exception, status: int | None) -> HyperVError:
        if status in (ACCESS_DENIED, LOGON_FAILURE):
            return HostAccessDenied(f"SMB denied {self.config.user} access to {target} (host path {windows_path}): "
                                    f"{error}; the account needs read access to that share")
        return HyperVError(f"cannot open {target} (host path {windows_path}): {error}")

    def read_file(self, windows_path: str, limit: int) -> bytes:
        """A whole small file (configuration); HyperVError when it is larger than `limit`."""
        handle = self.open(windows_path)
        try:
            parts, size = [], 0
            while piece := handle.read(1 << 20):
                size += len(piece)
                if size > limit:
                    raise HyperVError(f"{windows_path} is larger than {limit >> 20} MiB")
                parts.append(piece)
            return b"".join(parts)
        finally:
            handle.close()

    def open_vhdx(self, windows_path: str) -> VhdxDisk:
        """The VHDX (or AVHDX with its parents) at a host path, parents found through the same mapping."""
        handle = self.open(windows_path)
        try:
            return open_vhdx(handle, name=windows_path, parent_opener=self._parent)
        except BaseException:
            handle.close()
            raise

    def _parent(self, locator: dict[str, str], child: str) -> NamedFile | None:
        """A differencing disk's parent: relative_path next to the child, then absolute_win32_path."""
        candidates = []
        if relative := locator.get("relative_path"):
            candidates.append(ntpath.normpath(ntpath.join(ntpath.dirname(child), relative)))
        if absolute := locator.get("absolute_win32_path"):
            candidates.append(absolute.removeprefix("\\\\?\\"))
        for candidate in candidates:
            try:
                return self.open(candidate)
            except FileNotFoundError:
                continue
        return None

    def close(self) -> None:
        smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self._connections)


class PooledDisk:
    """One frozen disk behind several handles, so the pipeline's reads overlap on the wire.

    A VhdxDisk serialises reads on its handle; each extra handle is opened (and its metadata and BAT
    parsed) only when all others are busy. Satisfies the DiskReader protocol."""

    def __init__(self, open_one: Callable[[], VhdxDisk], handles: int):
        self._open_one = open_one
        self._limit = max(1, handles)
        first = open_one()
        self._all = [first]
        self._free: queue.SimpleQueue[VhdxDisk] = queue.SimpleQueue()
        self._free.put(first)
        self._lock = threading.Lock()
        self.virtual_size = first.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        disk = self._take()
        try:
            return disk.read(offset, length)
        except (OSError, SMBException, VhdxError) as e:
            raise HyperVError(f"reading {disk.name} at offset {offset} failed: {e}") from None
        finally:
            self._free.put(disk)

    def read_into(self, offset: int, out: memoryview) -> None:
        disk = self._take()
        try:
            disk.read_into(offset, out)
        except (OSError, SMBException, VhdxError) as e:
            raise HyperVError(f"reading {disk.name} at offset {offset} failed: {e}") from None
        finally:
            self._free.put(disk)

    def _take(self) -> VhdxDisk:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = len(self._all) < self._limit
            if grow:
                self._all.append(None)  # reserve the slot before the slow open
        if not grow:
            return self._free.get()
        try:
            disk = self._open_one()
        except BaseException:
            with self._lock:
                self._all.remove(None)
            raise
        with self._lock:
            self._all[self._all.index(None)] = disk
        return disk

    def allocated_ranges(self) -> list[Range]:
        return self._all[0].allocated_ranges()

    def close(self) -> None:
        for disk in self._all:
            if disk is not None:
                disk.close()
        self._all = []


def open_frozen_disk(files: HostFiles, windows_path: str, virtual_disk_id: str, size: int,
                     handles: int) -> PooledDisk:
    """A reader of the frozen disk, after checking that the mapped file is the disk the host named.

    A wrong path mapping would otherwise back up some other disk without complaint."""

    def open_one() -> VhdxDisk:
        try:
            disk = files.open_vhdx(windows_path)
        except VhdxError as e:
            raise HyperVError(str(e)) from None
        except FileNotFoundError:
            raise HyperVError(f"{windows_path} (mapped to {files.mapper.map(windows_path)}) does not exist; "
                              "check hyperv.paths") from None
        if str(disk.virtual_disk_id) != virtual_disk_id or disk.virtual_size != size:
            disk.close()
            raise HyperVError(
                f"{files.mapper.map(windows_path)} is not the disk the host reported for {windows_path}: it has "
                f"VirtualDiskId {disk.virtual_disk_id} and {disk.virtual_size} bytes, the host said "
                f"{virtual_disk_id} and {size} bytes; check hyperv.paths")
        return disk

    return PooledDisk(open_one, handles)
