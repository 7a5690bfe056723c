"""The lab source: a local stand-in Hyper-V host, so anyone can try, test and benchmark Chunkyard without Windows.

A lab is a directory:

    DIR/lab.json                 host name, seed, template share
    DIR/<vm>/vm.json             VM id, name and disks
    DIR/<vm>/<disk>.vhdx         real dynamic VHDX, made by qemu-img and changed by qemu-io
    DIR/<vm>/config/*            small stand-ins for the .vmcx/.vmgs/.vmrs files
    DIR/<vm>/tracking.json       per disk: tracking generation and change journal (RCT's role)
    DIR/<vm>/checkpoint.json     present while a backup holds a checkpoint

It imitates the Hyper-V RCT flow (research/hyperv_rct_vhdx.md §1): `begin` takes a "recovery checkpoint" that
freezes the disks (`churn` refuses while it exists), `changed_ranges` answers from the journal as
GetVirtualDiskChanges would, and `reset_tracking` plays a lost RCT. There is no AVHDX: the frozen disk is the VHDX.

A checkpoint.json left by a killed collector cannot be told from a live one, so the next `begin` of that VM takes
it over (replaces it and logs a warning), as backup tools clean up lingering recovery checkpoints; the killed
backup's late `release` then leaves the new checkpoint alone. begin, release, churn and reset of one VM are
serialised by an flock on DIR/<vm>/.lock, so a begin waits for a running churn and never sees half of it.
"""

from __future__ import annotations

import bisect
import fcntl
import functools
import itertools
import json
import logging
import math
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from chunkyard.vdisk import VhdxDisk, VhdxError, open_vhdx

from .base import Backup, DiskInfo, Range, Source, SourceError, VmInfo

log = logging.getLogger(__name__)

LAB_FILE = "lab.json"
VM_FILE = "vm.json"
TRACKING_FILE = "tracking.json"
CHECKPOINT_FILE = "checkpoint.json"
CONFIG_DIR = "config"
LOCK_FILE = ".lock"

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB  # data and changes are aligned to this, like a guest filesystem's clusters (but not to 1 MiB)
VHDX_BLOCK_SIZE = MiB  # small blocks keep zero regions unallocated even on small lab disks (Hyper-V uses 32 MiB)
DATA_FRACTION = 0.65  # share of the virtual size that holds data; the rest stays zero
TEXT_FRACTION = 0.6  # share of the data that is text-like (about 3x with zstd-1); the rest is random
JOURNAL_KEEP = 100  # tracking ids kept per disk; an older one answers None (full read), like an expired RCT id
CHURN_RANDOM_SHARE = 0.3  # share of churn extents placed anywhere (often free space) instead of on data
QEMU_IO_BATCH = (256, 64 * MiB)  # writes and bytes per qemu-io run: few processes, bounded temporary files

_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------ files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Atomic and durable (tmp, fsync, rename): readers and crashes see the old file or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, doc: dict[str, Any], indent: int | None = 2) -> None:
    _write_file(path, json.dumps(doc, indent=indent).encode())


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{path} is missing; {fix}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} is unreadable ({e}); {fix}") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path} is malformed (not a JSON object); {fix}")
    return doc


@contextmanager
def _parsing(path: Path, fix: str) -> Iterator[None]:
    """Turns any shape error met while reading a lab file into a SourceError naming the file and the fix."""
    try:
        yield
    except KeyError as e:
        raise SourceError(f"{path} is malformed (missing {e}); {fix}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise SourceError(f"{path} is malformed ({e}); {fix}") from None


def _expect(value: Any, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"expected {kind.__name__}, found {json.dumps(value)[:60]}")
    return value


def _component(name: str) -> str:
    """Names from vm.json become paths: refuse anything that could leave the VM folder."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    return name


@contextmanager
def _vm_lock(vm_dir: Path) -> Iterator[None]:
    """Serialises begin, release, churn and reset of one VM across processes; the kernel drops it if a holder dies."""
    with open(vm_dir / LOCK_FILE, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_checkpoint(vm_dir: Path) -> dict[str, Any] | None:
    """checkpoint.json; {} if present but unreadable (still a checkpoint), None if there is none."""
    try:
        doc = json.loads((vm_dir / CHECKPOINT_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _open(path: Path) -> VhdxDisk:
    try:
        return open_vhdx(path)
    except (OSError, VhdxError) as e:
        raise SourceError(f"cannot open the lab disk {path}: {e}") from None


# ------------------------------------------------------------------------------------------ tools


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SourceError(f"{name} is not installed; the lab needs it (Debian/Ubuntu: apt-get install qemu-utils)")
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    """Runs a qemu tool; its own message goes into the SourceError."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        message = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise SourceError(f"{Path(cmd[0]).name} failed (exit {result.returncode}): {message}")


# ------------------------------------------------------------------------------------------ ranges


def _merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted union of (offset, length) ranges; touching ranges join."""
    merged: list[Range] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], start + length)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        elif length:
            merged.append((start, length))
    return merged


# ------------------------------------------------------------------------------------------ tracking


def _new_tracking_id(disk_id: str, generation: int) -> str:
    """Starts with the disk id, so an id of another disk (or lab) never matches."""
    return f"{disk_id}:{generation}:{secrets.token_hex(4)}"


@dataclass
class _Tracking:
    """One disk's change tracking: a generation and its journal of (tracking id, ranges changed to reach it)."""

    disk_id: str
    generation: int
    journal: list[tuple[str, list[Range]]]

    @classmethod
    def start(cls, disk_id: str, generation: int) -> _Tracking:
        return cls(disk_id, generation, [(_new_tracking_id(disk_id, generation), [])])

    @property
    def current(self) -> str:
        return self.journal[-1][0]

    def changes_since(self, since: str | None) -> list[Range] | None:
        ids = [tracking_id for tracking_id, _ in self.journal]
        if since not in ids:
            return None  # no id, another disk's, older than the kept journal or than a reset
        return _merge(r for _, ranges in self.journal[ids.index(since) + 1 :] for r in ranges)

    def record(self, ranges: list[Range]) -> str:
        self.journal.append((_new_tracking_id(self.disk_id, self.generation), ranges))
        del self.journal[:-JOURNAL_KEEP]
        return self.current


def _save_tracking(vm_dir: Path, tracking: dict[str, _Tracking]) -> None:
    disks = {t.disk_id: {"generation": t.generation, "journal": [{"id": i, "ranges": r} for i, r in t.journal]}
             for t in tracking.values()}
    _write_json(vm_dir / TRACKING_FILE, {"disks": disks}, indent=None)


# ------------------------------------------------------------------------------------------ the source


@dataclass(frozen=True)
class _Vm:
    dir: Path
    info: VmInfo
    disks: list[DiskInfo]

    def disk(self, disk_id: str) -> DiskInfo:
        for disk in self.disks:
            if disk.disk_id == disk_id:
                return disk
        raise SourceError(f"VM {self.info.name} has no disk {disk_id!r}; its disks: "
                          + ", ".join(f"{d.disk_id} ({d.name})" for d in self.disks))

    def load_tracking(self) -> dict[str, _Tracking]:
        path = self.dir / TRACKING_FILE
        fix = (f"run `chunkyard lab reset-tracking {self.dir.parent} --vm {self.info.name}` "
               "(the next backup then reads every disk in full)")
        doc = _read_json(path, fix)
        with _parsing(path, fix):
            disks = _expect(doc["disks"], dict)
            tracking = {}
            for disk in self.disks:
                entry = _expect(disks[disk.disk_id], dict)
                journal = [(_expect(e["id"], str), [(_expect(o, int), _expect(n, int)) for o, n in e["ranges"]])
                           for e in _expect(entry["journal"], list)]
                if not journal:
                    raise ValueError(f"the journal of disk {disk.disk_id} is empty")
                tracking[disk.disk_id] = _Tracking(disk.disk_id, _expect(entry["generation"], int), journal)
        return tracking


def _load_vm(path: Path, host: str) -> _Vm:
    fix = "restore it from a copy, or create a new lab with `chunkyard lab init`"
    doc = _read_json(path, fix)
    with _parsing(path, fix):
        info = VmInfo(id=_expect(doc["id"], str), name=_expect(doc["name"], str), host=host)
        disks = [DiskInfo(disk_id=_component(_expect(d["disk_id"], str)), name=_component(_expect(d["file"], str)),
                          size=_expect(d["size"], int)) for d in _expect(doc["disks"], list)]
        if not disks:
            raise ValueError("the VM has no disks")
    return _Vm(path.parent, info, disks)


class LabBackup(Backup):
    """A backup of one lab VM. The checkpoint is checkpoint.json: while it exists churn refuses, so the VHDX the
    backup reads is frozen. Tracking ids are captured at begin."""

    consistency = "application"

    def __init__(self, vm: _Vm, tracking: dict[str, _Tracking], backup_id: str) -> None:
        self.vm = vm.info
        self.disks = vm.disks
        self._vm = vm
        self._tracking = tracking
        self.backup_id = backup_id

    def changed_ranges(self, disk_id: str, since: str | None) -> list[Range] | None:
        self._vm.disk(disk_id)  # an unknown disk is a SourceError, not "unknown changes"
        return self._tracking[disk_id].changes_since(since)

    def open_disk(self, disk_id: str) -> VhdxDisk:
        return _open(self._vm.dir / self._vm.disk(disk_id).name)

    def config_files(self) -> dict[str, bytes]:
        config = self._vm.dir / CONFIG_DIR
        try:
            return {p.name: p.read_bytes() for p in sorted(config.iterdir()) if p.is_file()}
        except OSError as e:
            raise SourceError(f"cannot read the configuration of VM {self.vm.name} in {config}: {e}") from None

    def tracking_ids(self) -> dict[str, str]:
        return {disk_id: t.current for disk_id, t in self._tracking.items()}

    def release(self, committed: bool) -> None:
        """Removes our checkpoint.json whether committed or not: journal ids stay valid, so there is nothing to
        roll back. A checkpoint taken over by a later begin belongs to that backup and stays."""
        path = self._vm.dir / CHECKPOINT_FILE
        with _vm_lock(self._vm.dir):
            checkpoint = _read_checkpoint(self._vm.dir)
            if checkpoint is not None and checkpoint.get("backup_id") == self.backup_id:
                path.unlink()
                _fsync_dir(self._vm.dir)


class LabSource(Source):
    """The VMs of one lab directory (see the module docstring)."""

    def __init__(self, dir: str | os.PathLike[str]) -> None:
        self.dir = Path(dir)
        path = self.dir / LAB_FILE
        fix = f"{self.dir} is not a usable lab; create one with `chunkyard lab init DIR --vms N --disk-size SIZE`"
        doc = _read_json(path, fix)
        with _parsing(path, fix):
            self.host = _expect(doc["host"], str)
            self.seed = _expect(doc["seed"], int)
            self.template_share = _expect(doc["template_share"], float)

    def vms(self) -> list[VmInfo]:
        return [vm.info for vm in self._vms()]

    def _vms(self) -> list[_Vm]:
        """Every visible subdirectory is a VM folder, so a lost vm.json is reported rather than hiding the VM."""
        folders = sorted(p for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [_load_vm(folder / VM_FILE, self.host) for folder in folders]

    def _find(self, vm: str) -> _Vm:
        vms = self._vms()
        for candidate in vms:
            if vm in (candidate.info.name, candidate.info.id):
                return candidate
        names = ", ".join(v.info.name for v in vms) or "none"
        raise SourceError(f"no VM {vm!r} in the lab {self.dir}; its VMs: {names}")

    def begin(self, vm: str) -> LabBackup:
        """Takes the checkpoint; one left by a killed collector is taken over (see the module docstring)."""
        target = self._find(vm)
        with _vm_lock(target.dir):
            tracking = target.load_tracking()
            stale = _read_checkpoint(target.dir)
            if stale is not None:
                log.warning("VM %s: taking over the checkpoint of backup %s (pid %s, taken %s), which never ended",
                            target.info.name, stale.get("backup_id"), stale.get("pid"), stale.get("taken"))
            backup_id = uuid.uuid4().hex
            _write_json(target.dir / CHECKPOINT_FILE, {
                "backup_id": backup_id, "taken": time.time(), "pid": os.getpid(), "host": socket.gethostname(),
                "tracking_ids": {disk_id: t.current for disk_id, t in tracking.items()}})
        return LabBackup(target, tracking, backup_id)


# ------------------------------------------------------------------------------------------ content


def _pages(n: float) -> int:
    """`n` rounded to whole pages, at least one."""
    return max(PAGE, round(n / PAGE) * PAGE)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """Sizes spread like files: as many small as large."""
    return _pages(math.exp(rng.uniform(math.log(low), math.log(high))))


_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_WEIGHTS = (12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, 0.8,
                   0.15, 0.15, 0.1, 0.07)
_SEPARATORS = (" ", ", ", ". ", "\n", ": ", " = ", "; ", "\t")
_SEPARATOR_WEIGHTS = (12, 1, 1, 1, 1, 1, 1, 1)


@functools.cache
def _text_pool() -> bytes:
    """About 5 MiB of pseudo-text: Zipf-distributed made-up words, which zstd-1 compresses about 3x like text, logs
    and configuration files do. Fixed seed: all labs share it, but blocks cut from it at random never repeat."""
    rng = random.Random("chunkyard-lab-text")
    # sorted: set order depends on PYTHONHASHSEED, and the pool must not
    vocab = sorted({"".join(rng.choices(_LETTERS, _LETTER_WEIGHTS, k=rng.randint(2, 11))) for _ in range(2000)})
    words = rng.choices(vocab, cum_weights=list(itertools.accumulate(1 / r for r in range(1, len(vocab) + 1))),
                        k=600_000)
    separators = rng.choices(_SEPARATORS, _SEPARATOR_WEIGHTS, k=len(words))
    return "".join(itertools.chain.from_iterable(zip(words, separators, strict=True))).encode()


def _content(rng: random.Random, length: int) -> bytes:
    """Disk-like bytes: pieces of 16-256 KiB, TEXT_FRACTION of them text-like, spliced from slices of the pool at
    random offsets (so blocks do not dedup by accident), the rest random (incompressible, like media or
    encrypted files)."""
    pool = _text_pool()
    parts = []
    left = length
    while left:
        piece = min(left, _log_uniform(rng, 16 * KiB, 256 * KiB))
        left -= piece
        if rng.random() >= TEXT_FRACTION:
            parts.append(rng.randbytes(piece))
            continue
        while piece:
            n = min(piece, rng.randrange(512, 8 * KiB))
            start = rng.randrange(len(pool) - n)
            parts.append(pool[start : start + n])
            piece -= n
    return b"".join(parts)


Extent = tuple[int, int, bool]  # offset, length, part of the template


def _layout(seed: int, disk_index: int, size: int, template_share: float) -> list[Extent]:
    """Where data lies on disk `disk_index` of every VM, identical across VMs so template bytes sit at identical
    offsets. Runs of files (4 KiB-aligned extents of 4 KiB-1 MiB, small holes between some) alternate with free
    gaps sized so that about DATA_FRACTION of the disk holds data. Whole runs, picked in random order until
    template_share of the data is reached, form the template (the OS image every VM was cloned from): long
    shared stretches dedup like real clones, and the share holds even on small disks with few runs."""
    rng = random.Random(f"layout:{seed}:{disk_index}")
    runs: list[list[Range]] = []
    offset = 0
    while offset < size:
        run = _log_uniform(rng, 256 * KiB, 12 * MiB)
        end = min(offset + run, size)
        runs.append([])
        while offset < end:
            length = min(_log_uniform(rng, PAGE, MiB), end - offset)
            runs[-1].append((offset, length))
            offset += length
            if rng.random() < 0.25:
                offset += _log_uniform(rng, PAGE, 64 * KiB)
        offset += _pages(run * (1 - DATA_FRACTION) / DATA_FRACTION * rng.uniform(0.2, 1.8))
    sizes = [sum(n for _, n in run) for run in runs]
    goal, template = template_share * sum(sizes), 0.0
    shared = set()
    for i in rng.sample(range(len(runs)), len(runs)):
        if template + sizes[i] / 2 <= goal:
            shared.add(i)
            template += sizes[i]
    return [(offset, length, i in shared) for i, run in enumerate(runs) for offset, length in run]


class _Converter:
    """Has qemu-img turn raw images into dynamic VHDX (it skips zeros, so blocks without data stay unallocated) in
    a background thread, one at a time, while Python generates the next disk: about 25 % faster on 2 cores, with
    at most two raw files on disk. Cache mode "unsafe" skips the final flush: a lab that a crash damaged is made
    again, not repaired, and the flush made init disk-bound."""

    def __init__(self, qemu_img: str) -> None:
        self._qemu_img = qemu_img
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future[None] | None = None

    def submit(self, raw: Path, vhdx: Path) -> None:
        self.wait()
        self._pending = self._pool.submit(self._convert, raw, vhdx)

    def wait(self) -> None:
        """Until the last conversion is done; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _Converter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown()  # waits for a running conversion, which may still be writing into the lab

    def _convert(self, raw: Path, vhdx: Path) -> None:
        _run([self._qemu_img, "convert", "-q", "-t", "unsafe", "-f", "raw", "-O", "vhdx",
              "-o", f"subformat=dynamic,block_size={VHDX_BLOCK_SIZE}", str(raw), str(vhdx)])
        raw.unlink()


def _make_disk(converter: _Converter, path: Path, size: int, layout: list[Extent], template_key: str,
               own_key: str) -> None:
    """Writes the extents into a sparse raw file and queues its conversion to `path`."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset, length, in_template in layout:
            rng = random.Random(f"{template_key if in_template else own_key}:{offset}")
            os.pwrite(f.fileno(), _content(rng, length), offset)
    converter.submit(raw, path)


def _write_config(config_dir: Path, vm: VmInfo, disks: list[DiskInfo], rng: random.Random) -> None:
    """Small stand-ins for Hyper-V's configuration (.vmcx), guest state (.vmgs) and runtime state (.vmrs)."""
    settings = {"id": vm.id, "name": vm.name, "version": "10.0", "generation": 2, "processors": 2,
                "memory_mb": 4096, "disks": [d.name for d in disks]}
    vmcx = b"VMCX\0\2\0\0" + json.dumps(settings).encode()
    _write_file(config_dir / f"{vm.name}.vmcx", vmcx.ljust(32 * KiB, b"\0"))
    _write_file(config_dir / f"{vm.name}.vmgs", rng.randbytes(256 * KiB))
    _write_file(config_dir / f"{vm.name}.vmrs", rng.randbytes(16 * KiB))


def _make_vm(lab_dir: Path, converter: _Converter, host: str, seed: int, index: int, layouts: list[list[Extent]],
             size: int) -> VmInfo:
    info = VmInfo(id=str(uuid.uuid4()), name=f"vm{index + 1:02d}", host=host)
    vm_dir = lab_dir / info.name
    (vm_dir / CONFIG_DIR).mkdir(parents=True)
    disks = []
    for disk_index, layout in enumerate(layouts):
        disk = DiskInfo(str(uuid.uuid4()), "sys.vhdx" if disk_index == 0 else f"data{disk_index}.vhdx", size)
        _make_disk(converter, vm_dir / disk.name, size, layout, f"template:{seed}:{disk_index}",
                   f"vm:{seed}:{index}:{disk_index}")
        disks.append(disk)
    _write_config(vm_dir / CONFIG_DIR, info, disks, random.Random(f"config:{seed}:{index}"))
    _write_json(vm_dir / VM_FILE, {
        "id": info.id, "name": info.name, "created": time.time(),
        "disks": [{"disk_id": d.disk_id, "file": d.name, "size": d.size} for d in disks]})
    _save_tracking(vm_dir, {d.disk_id: _Tracking.start(d.disk_id, 1) for d in disks})
    return info


def init_lab(dir: str | os.PathLike[str], vms: int, disk_size: int, template_share: float = 0.5, seed: int = 1,
             disks_per_vm: int = 1) -> list[VmInfo]:
    """Creates a lab of `vms` VMs with `disks_per_vm` dynamic VHDX disks of `disk_size` bytes each. About
    DATA_FRACTION of each disk holds data, template_share of it identical in every VM (same bytes, same offsets),
    the rest unique per VM; zero regions stay unallocated. Disk contents depend only on the seed; VM and disk ids
    are new every time. Built in a temporary sibling directory and renamed into place, so a failed init leaves
    nothing behind."""
    target = Path(dir).absolute()
    if vms < 1 or disks_per_vm < 1:
        raise SourceError("a lab needs at least one VM with at least one disk")
    if disk_size < 4 * MiB or disk_size % PAGE:
        raise SourceError(f"the disk size must be a multiple of 4 KiB and at least 4 MiB, not {disk_size} bytes")
    if not 0 <= template_share <= 1:
        raise SourceError(f"the template share must be between 0 and 1, not {template_share}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SourceError(f"{target} exists and is not an empty directory; pick a new one")
    qemu_img = _tool("qemu-img")
    host = f"lab-{socket.gethostname()}"
    layouts = [_layout(seed, disk_index, disk_size, template_share) for disk_index in range(disks_per_vm)]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    try:
        work.chmod(0o755)
        with _Converter(qemu_img) as converter:
            infos = [_make_vm(work, converter, host, seed, i, layouts, disk_size) for i in range(vms)]
            converter.wait()
        _write_json(work / LAB_FILE, {"host": host, "seed": seed, "template_share": float(template_share),
                                      "created": time.time()})
        if target.exists():
            target.rmdir()
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return infos


# ------------------------------------------------------------------------------------------ churn and reset


def _plan_changes(rng: random.Random, size: int, allocated: list[Range], percent: float) -> list[Range]:
    """Non-overlapping 4 KiB-aligned extents of 4 KiB-1 MiB covering `percent` % of the disk: most start on
    allocated data (files rewritten), CHURN_RANDOM_SHARE anywhere (often free space: new files)."""
    pages = size // PAGE
    taken = bytearray(pages)  # 1 = already planned; one byte per page is fine at lab sizes
    data = [(offset // PAGE, length // PAGE) for offset, length in allocated if length >= PAGE]
    data_ends = list(itertools.accumulate(n for _, n in data))
    want = max(1, round(pages * percent / 100))
    extents = []
    while want:
        if data_ends and rng.random() >= CHURN_RANDOM_SHARE:
            i = rng.randrange(data_ends[-1])
            k = bisect.bisect_right(data_ends, i)
            start = data[k][0] + i - (data_ends[k] - data[k][1])
        else:
            start = rng.randrange(pages)
        start = taken.find(0, start)
        if start < 0:
            start = taken.find(0)
        stop = min(start + _log_uniform(rng, PAGE, MiB) // PAGE, start + want, pages)
        if (end := taken.find(1, start, stop)) >= 0:
            stop = end
        taken[start:stop] = b"\1" * (stop - start)
        extents.append((start * PAGE, (stop - start) * PAGE))
        want -= stop - start
    return extents


def _batches(extents: list[Range]) -> Iterator[list[Range]]:
    max_count, max_bytes = QEMU_IO_BATCH
    batch: list[Range] = []
    size = 0
    for extent in extents:
        if batch and (len(batch) == max_count or size + extent[1] > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(extent)
        size += extent[1]
    if batch:
        yield batch


def _write_changes(qemu_io: str, path: Path, extents: list[Range], rng: random.Random) -> None:
    """Writes new content over the extents through qemu-io, as a guest would through the hypervisor. `write -s`
    fills a write from a file read from its start, so each extent gets its own file in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=".churn-", dir=path.parent) as tmp:
        for batch in _batches(extents):
            commands = []
            for i, (offset, length) in enumerate(batch):
                Path(tmp, f"{i}.bin").write_bytes(_content(rng, length))
                commands += ["-c", f"write -q -s {i}.bin {offset} {length}"]
            _run([qemu_io, "-f", "vhdx", *commands, str(path.absolute())], cwd=Path(tmp))


def churn(dir: str | os.PathLike[str], vm: str, percent: float, seed: int | None = None) -> dict[str, Any]:
    """Changes about `percent` % of each disk of a VM, like a running guest, and records the exact changed ranges
    under a new tracking id per disk. Refused while a backup holds a checkpoint: the disks are frozen then.
    Returns {"tracking_ids": {disk_id: id}, "ranges": {disk_id: merged ranges}, "bytes": total changed}."""
    if not 0 < percent <= 100:
        raise SourceError(f"the percentage to change must be above 0 and at most 100, not {percent}")
    target = LabSource(dir)._find(vm)
    qemu_io = _tool("qemu-io")
    rng = random.Random(seed)
    with _vm_lock(target.dir):
        if _read_checkpoint(target.dir) is not None:
            raise SourceError(f"VM {target.info.name}: a backup holds a checkpoint; wait for it to end (if its "
                              "collector was killed, the next backup of this VM takes the checkpoint over)")
        tracking = target.load_tracking()
        plans: dict[str, list[Range]] = {}
        for disk in target.disks:
            with _open(target.dir / disk.name) as reader:
                plans[disk.disk_id] = _plan_changes(rng, disk.size, reader.allocated_ranges(), percent)
        # Journal first: if the writes fail half-way the journal over-reports, which costs a re-read; writing
        # first and then failing to record would make the next incremental backup miss changes.
        ranges = {disk_id: _merge(extents) for disk_id, extents in plans.items()}
        ids = {disk_id: tracking[disk_id].record(changed) for disk_id, changed in ranges.items()}
        _save_tracking(target.dir, tracking)
        for disk in target.disks:
            _write_changes(qemu_io, target.dir / disk.name, plans[disk.disk_id], rng)
    return {"tracking_ids": ids, "ranges": ranges, "bytes": sum(n for rs in ranges.values() for _, n in rs)}


def reset_tracking(dir: str | os.PathLike[str], vm: str) -> dict[str, str]:
    """Invalidates every tracking id of a VM (new generation, journal cleared), as when RCT is lost: the next
    backup's changed_ranges answers None and the pipeline reads every allocated range. Allowed during a backup,
    whose ids then answer None next time, as after a real RCT loss. Also the repair for a damaged tracking.json.
    Returns the new ids per disk."""
    target = LabSource(dir)._find(vm)
    with _vm_lock(target.dir):
        try:
            generation = max(t.generation for t in target.load_tracking().values())
        except SourceError:
            generation = 0
        tracking = {d.disk_id: _Tracking.start(d.disk_id, generation + 1) for d in target.disks}
        _save_tracking(target.dir, tracking)
    return {disk_id: t.current for disk_id, t in tracking.items()}


def lab_status(dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What `chunkyard lab list` shows: per VM its info and checkpoint (None, or checkpoint.json's content), per
    disk its info, allocated bytes and current tracking id."""
    out = []
    for vm in LabSource(dir)._vms():
        tracking = vm.load_tracking()
        disks = []
        for disk in vm.disks:
            with _open(vm.dir / disk.name) as reader:
                allocated = sum(n for _, n in reader.allocated_ranges())
            disks.append({"disk": disk, "allocated": allocated, "tracking_id": tracking[disk.disk_id].current})
        out.append({"vm": vm.info, "checkpoint": _read_checkpoint(vm.dir), "disks": disks})
    return out
