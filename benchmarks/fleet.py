"""A realistic Hyper-V-like VM fleet for the benchmarks: real ext4 guest filesystems in dynamic VHDX disks, in the
lab format (collectors/sources/lab.py), with day-by-day churn made of the writes a running guest makes.

Synthetic disks dedup and compress the way their generator decides; backup tools are judged on real disks. So:

- **Template.** One ext4 image (`mkfs.ext4 -d`) of a Debian root made by debootstrap (`--os debootstrap`, cached),
  or, where debootstrap or its mirror is not available, of this machine's own /usr files (`--os host`), plus a
  set of "common software" (directories of this machine's /usr/lib and /usr/share) every VM has.
- **Clones.** Every VM starts as a byte copy of the template (same blocks at the same offsets, as VMs cloned from
  one image), then gets its own changes written into the filesystem with debugfs, where ext4 puts new files: its
  own "installed packages" (other /usr directories), a database file of 8 KiB pages, logs, files written and
  deleted again (their blocks keep the old bytes, as on a used disk), and on every third VM zeroed free space
  (as after `fstrim`/sdelete). Then `qemu-img convert` to a dynamic VHDX with Hyper-V's 32 MiB blocks.
- **Days.** Each day changes 1-5 % of each disk (DESIGN's sizing guidance: 1-2 % typical, 2-5 % in busy
  estates): in-place page writes into the database file with a hot set (45 %), new file versions written to
  free blocks (35 %), log appends after each log's last block (15 %), and ext4 journal and inode-table
  writes (5 %). Patches are computed once at build time and kept beside the fleet; at run time `churn_lab` writes
  them through qemu-io and records them in the lab change journal (what RCT reports), and `churn_raw` writes them
  into raw exports for tools that back up image files.

The fleet is built once per scale (and per FLEET_FORMAT) under benchmarks/out/cache/ and reused.

    python -m benchmarks.fleet --scale smoke     # build or reuse a fleet, print what it holds
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from chunkyard.vdisk import open_vhdx
from collectors.sources.base import DiskInfo, Range, VmInfo
from collectors.sources.lab import (
    LabSource,
    _batches,
    _merge,
    _run,
    _save_tracking,
    _tool,
    _Tracking,
    _vm_lock,
    _write_config,
)

from .common import MiB, elapsed, walk_files, write_json

CACHE = Path(__file__).resolve().parent / "out" / "cache"
FLEET_FORMAT = 1  # bump when the generator changes: fleets built by another format are rebuilt
BLOCK = 4096  # ext4 block: every change is block-aligned, as a guest's writes are
PAGE_BLOCKS = 2  # database pages are 8 KiB
VHDX_BLOCK = 32 * MiB  # Hyper-V's default for dynamic disks
DISK_FILE = "sys.vhdx"
DEBOOTSTRAP_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "openssh-server", "python3", "perl", "rsyslog", "cron",
    "logrotate", "iproute2", "iputils-ping", "curl", "ca-certificates", "less", "vim-tiny", "sudo", "locales",
    "procps", "netbase", "kmod", "linux-image-amd64",
)
HOST_OS_ROOTS = ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/share/man", "/usr/share/doc")
POOL_ROOTS = ("/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/python3/dist-packages", "/usr/share",
              "/usr/libexec")
PACKAGE_SIZE = (64 * 1024, 640 * MiB)  # smaller directories are not packages; larger would swamp a VM
CHURN_SHARES = (("db", 0.45), ("files", 0.35), ("log", 0.15), ("metadata", 0.05))
HOT_PAGES = 0.2  # share of database pages that take HOT_WRITES of the page writes
HOT_WRITES = 0.8
ZERO_FREE_EVERY = 3  # every third VM has its free space zeroed
RUN_FIELDS = ("runs", "restore_vms", "chunk_sizes")
_UNSAFE_NAME = re.compile(r'["\\\x00-\x1f\x7f]')  # what a debugfs command line cannot quote


@dataclass(frozen=True)
class Scale:
    """Size of a fleet and of a suite run over it."""

    name: str
    vms: int
    disk_mib: int
    days: int
    os: str
    """"debootstrap" (falls back to "host" when it cannot run) or "host"."""
    os_mib: int
    """Size of the guest OS when it is made of this machine's files."""
    common_mib: int
    extra_mib: tuple[int, int]
    db_mib: tuple[int, int]
    log_mib: tuple[int, int]
    deleted_mib: tuple[int, int]
    churn_percent: tuple[float, float] = (1.0, 5.0)
    # The runs over the fleet (not part of the fleet's cache key):
    runs: int = 3
    restore_vms: int = 2
    chunk_sizes: tuple[int, ...] = (256 * 1024, MiB, 4 * MiB)
    """Repositories the ingest benchmark fills side by side; the DESIGN rows are those of 1 MiB."""

    def fleet_key(self) -> str:
        """A hash of what shapes the fleet; run-only fields are left out so changing them keeps the cache."""
        shape = {k: v for k, v in asdict(self).items() if k not in RUN_FIELDS}
        return hashlib.sha256(json.dumps([FLEET_FORMAT, shape]).encode()).hexdigest()[:10]


SCALES = {
    "smoke": Scale("smoke", vms=3, disk_mib=256, days=2, os="host", os_mib=64, common_mib=16, extra_mib=(12, 32),
                   db_mib=(8, 16), log_mib=(2, 4), deleted_mib=(4, 8), runs=1, restore_vms=3),
    "small": Scale("small", vms=4, disk_mib=3072, days=3, os="debootstrap", os_mib=768, common_mib=192,
                   extra_mib=(128, 448), db_mib=(96, 256), log_mib=(16, 48), deleted_mib=(64, 192), runs=3,
                   restore_vms=2),
    "full": Scale("full", vms=5, disk_mib=6144, days=2, os="debootstrap", os_mib=768, common_mib=384,
                  extra_mib=(384, 1280), db_mib=(256, 768), log_mib=(48, 128), deleted_mib=(128, 512), runs=1,
                  restore_vms=2, chunk_sizes=(MiB,)),
}


@dataclass(frozen=True)
class FleetVm:
    name: str
    vm_id: str
    disk_id: str
    size: int
    allocated: int
    """Bytes in allocated VHDX blocks: what a full backup reads."""
    composition: dict


@dataclass(frozen=True)
class Fleet:
    """A built fleet: its day-0 lab and its day patches."""

    dir: Path
    scale: Scale
    os_source: str
    vms: list[FleetVm]
    build_s: float
    template_bytes: int

    @property
    def lab0(self) -> Path:
        return self.dir / "lab0"

    @property
    def virtual_bytes(self) -> int:
        return sum(vm.size for vm in self.vms)

    @property
    def allocated_bytes(self) -> int:
        return sum(vm.allocated for vm in self.vms)

    def patch(self, day: int, vm: FleetVm) -> tuple[list[Range], Path, dict]:
        """Day `day`'s writes to a VM: merged extents, the file holding their bytes in extent order, and a summary."""
        base = self.dir / "days" / f"day{day:02d}" / vm.name
        doc = json.loads(base.with_suffix(".json").read_text())
        return [tuple(e) for e in doc["extents"]], base.with_suffix(".bin"), doc["summary"]

    def to_json(self) -> dict:
        return {"dir": str(self.dir), "scale": asdict(self.scale), "os_source": self.os_source,
                "vms": [asdict(vm) for vm in self.vms], "build_s": self.build_s,
                "template_bytes": self.template_bytes, "virtual_bytes": self.virtual_bytes,
                "allocated_bytes": self.allocated_bytes}

    @classmethod
    def load(cls, directory: Path, scale: Scale) -> Fleet:
        doc = json.loads((directory / "fleet.json").read_text())
        return cls(directory, scale, doc["os_source"], [FleetVm(**vm) for vm in doc["vms"]], doc["build_s"],
                   doc["template_bytes"])


# ------------------------------------------------------------------------------------------ guest OS and packages

@dataclass(frozen=True)
class Package:
    """A directory of this machine standing in for an installed package: its files and their total size."""

    path: Path
    files: tuple[Path, ...]
    size: int

    @property
    def dest(self) -> PurePosixPath:
        """Where the package lands in a guest: its own directory, so no two packages or OS files collide."""
        return PurePosixPath("/srv/apps", str(self.path).strip("/").replace("/", "_"))


def _safe(path: Path) -> bool:
    """A file debugfs can copy: a name it can quote, and readable by this user (CI does not run as root)."""
    return not _UNSAFE_NAME.search(str(path)) and os.access(path, os.R_OK)


@functools.cache
def package_pool() -> tuple[Package, ...]:
    """Directories under POOL_ROOTS whose size makes them package-like, in sorted order (deterministic per
    machine). Directories that are themselves pool roots are split into their children instead."""
    roots = {Path(r) for r in POOL_ROOTS if Path(r).is_dir()}
    out = []
    for root in sorted(roots):
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            if path in roots or any(r.is_relative_to(path) for r in roots):
                continue
            files = tuple(f for f in walk_files(path) if _safe(f))
            size = sum(f.stat().st_size for f in files)
            if PACKAGE_SIZE[0] <= size <= PACKAGE_SIZE[1]:
                out.append(Package(path, files, size))
    if not out:
        raise RuntimeError(f"no package-like directories under {', '.join(POOL_ROOTS)}")
    return tuple(out)


def pick_packages(pool: Sequence[Package], rng: random.Random, target: int, exclude: set[Path]) -> list[Package]:
    """Random packages not in `exclude` until about `target` bytes."""
    chosen, total = [], 0
    for pkg in rng.sample(list(pool), len(pool)):
        if pkg.path in exclude or total + pkg.size > target * 1.1:
            continue
        chosen.append(pkg)
        total += pkg.size
        if total >= target:
            break
    return chosen


def _codename() -> str:
    with open("/etc/os-release") as f:
        return next((line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("VERSION_CODENAME=")),
                    "bookworm")


def apt_mirror(codename: str) -> str:
    """The Debian mirror this machine's apt uses for `codename` (deb822 .sources or one-line .list files)."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and codename in suites.group(1).split():
                return uris.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if match.group(2) == codename:
                return match.group(1)
    return "http://deb.debian.org/debian"


def debootstrap_root() -> tuple[Path, str]:
    """A Debian root made by debootstrap from this machine's apt mirror, cached; raises RuntimeError when
    debootstrap cannot run here (not root, not installed, mirror unreachable)."""
    codename = _codename()
    base = CACHE / f"debootstrap-{codename}"
    root, marker = base / "root", base / "complete.json"
    if marker.exists():
        return root, json.loads(marker.read_text())["source"]
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (benchmarks/install-peers.sh installs it)")
    mirror = apt_mirror(codename)
    tmp = base / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"fleet: debootstrap {codename} from {mirror} (once; cached in {base}) ...", flush=True)
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(DEBOOTSTRAP_PACKAGES)}", codename, str(tmp),
           mirror]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed: {(result.stdout + result.stderr).strip()[-500:]}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    source = f"debootstrap {codename} minbase + {len(DEBOOTSTRAP_PACKAGES)} packages from {mirror}"
    marker.write_text(json.dumps({"source": source, "packages": DEBOOTSTRAP_PACKAGES, "created": time.time()}))
    return root, source


def host_os_files(size: int) -> list[Path]:
    """This machine's program, library and documentation files, round-robin over HOST_OS_ROOTS, up to `size`."""
    walkers = [walk_files(Path(r)) for r in HOST_OS_ROOTS if Path(r).is_dir()]
    out, total = [], 0
    while walkers and total < size:
        for walker in list(walkers):
            path = next(walker, None)
            if path is None:
                walkers.remove(walker)
            elif _safe(path) and path.stat().st_size <= 64 * MiB:
                out.append(path)
                total += path.stat().st_size
    return out


# ------------------------------------------------------------------------------------------ ext4 images

class Ext4Script:
    """A debugfs command file that writes files into an ext4 image without mounting it (no root, no loop device),
    so ext4's own allocator places them, as it would in a running guest."""

    def __init__(self, known_dirs: Iterable[str] = ("/",), existing_files: Iterable[str] = ()):
        self.lines: list[str] = []
        self.dirs = set(known_dirs)
        self.files = set(existing_files)  # written over by rm + write: the old blocks are freed, as on a guest

    def mkdirs(self, path: PurePosixPath) -> None:
        for parent in [*reversed(path.parents), path]:
            if str(parent) not in self.dirs:
                self.dirs.add(str(parent))
                self.lines.append(f'mkdir "{parent}"')

    def write(self, src: Path, dest: PurePosixPath) -> None:
        self.mkdirs(dest.parent)
        if str(dest) in self.files:
            self.lines.append(f'rm "{dest}"')
        self.files.add(str(dest))
        self.lines.append(f'write "{src}" "{dest}"')

    def rm(self, dest: PurePosixPath) -> None:
        self.files.discard(str(dest))
        self.lines.append(f'rm "{dest}"')

    def run(self, image: Path) -> None:
        """Apply to the image; any complaint from debugfs (full filesystem, missing source) is an error."""
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs", dir=image.parent) as f:
            f.write("\n".join(self.lines) + "\n")
            f.flush()
            result = subprocess.run(["debugfs", "-w", "-f", f.name, str(image)], capture_output=True, text=True)
        problems = [line for line in result.stderr.splitlines()[1:] if line.strip()]  # line 0: the version banner
        if result.returncode or problems:
            raise RuntimeError(f"debugfs on {image.name}: " + "; ".join(problems[:5] or [result.stderr[-300:]]))
        self.lines = []


def debugfs_blocks(image: Path, path: str) -> list[int]:
    """Physical blocks of a file (or <8>, the journal) in file order."""
    out = subprocess.run(["debugfs", "-R", f'blocks "{path}"', str(image)], capture_output=True, text=True,
                         check=True).stdout
    return [int(b) for b in out.split()]


@dataclass
class FsMap:
    """What dumpe2fs says about an image: free blocks and inode-table ranges."""

    blocks: int
    free: bytearray  # 1 = free
    inode_tables: list[tuple[int, int]]  # [first, last]


def dumpe2fs(image: Path) -> FsMap:
    """Free blocks and inode tables of an image, from its own block bitmaps (no mount needed)."""
    text = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True, check=True).stdout
    blocks = int(re.search(r"^Block count:\s+(\d+)", text, re.M).group(1))
    free = bytearray(blocks)
    for line in re.findall(r"^\s+Free blocks: (.*)$", text, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            first, _, last = part.partition("-")
            free[int(first) : int(last or first) + 1] = b"\1" * (int(last or first) - int(first) + 1)
    tables = [(int(a), int(b)) for a, b in re.findall(r"Inode table at (\d+)-(\d+)", text)]
    return FsMap(blocks, free, tables)


def block_runs(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted block numbers → (first block, count) runs."""
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


# ------------------------------------------------------------------------------------------ guest data

_FIRST = ("anna", "ben", "carla", "dmitri", "elif", "farid", "greta", "hiro", "ines", "jonas", "kemal", "lena",
          "marco", "nadia", "olga", "pavel", "quinn", "rosa", "sven", "tomas", "uma", "vera", "wei", "yusuf")
_LAST = ("meyer", "kowalski", "garcia", "nguyen", "okafor", "rossi", "schmidt", "tanaka", "novak", "silva",
         "jansen", "dubois", "haddad", "larsen", "moreau", "petrov")
_CITY = ("berlin", "lyon", "porto", "krakow", "oslo", "graz", "turin", "ghent", "brno", "aarhus", "basel")
_LOG = (
    "{host} sshd[{pid}]: Accepted publickey for deploy from 10.{a}.{b}.{c} port {port} ssh2: ED25519 SHA256:{h}",
    "{host} sshd[{pid}]: pam_unix(sshd:session): session opened for user deploy(uid=1000) by (uid=0)",
    "{host} CRON[{pid}]: (root) CMD (command -v debian-sa1 > /dev/null && debian-sa1 1 1)",
    "{host} systemd[1]: Started session-{port}.scope - Session {port} of User deploy.",
    "{host} kernel: [{up}.{port}] EXT4-fs (sda1): mounted filesystem with ordered data mode. Quota mode: none.",
    "{host} app[{pid}]: INFO request id={h} method=GET path=/api/v2/orders/{port} status=200 ms={b}",
    "{host} app[{pid}]: WARN slow query took {port} ms: SELECT * FROM orders WHERE customer_id = {pid}",
    "{host} postgres[{pid}]: LOG:  checkpoint complete: wrote {b} buffers ({c}.{a}%); sync files={a}",
    "{host} nginx: 10.{a}.{b}.{c} - - \"GET /static/app.{h}.js HTTP/1.1\" 200 {port} \"-\" \"Mozilla/5.0\"",
    "{host} systemd-logind[{pid}]: Removed session {port}.",
)


@functools.cache
def _rows_pool() -> bytes:
    """About 2 MiB of database rows (ids, names, mail addresses, amounts, dates): the body text of db pages."""
    rng = random.Random("fleet-rows")
    rows = []
    for n in range(30_000):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        rows.append(f"{n + 100000}|{first} {last}|{first}.{last}@example.{rng.choice(('com', 'org', 'net'))}|"
                    f"{rng.choice(_CITY)}|{rng.randrange(1, 10**6) / 100:.2f}|2026-{rng.randint(1, 12):02d}-"
                    f"{rng.randint(1, 28):02d}|{rng.choice(('open', 'paid', 'shipped', 'void'))}\n")
    return "".join(rows).encode()


def db_page(rng: random.Random, page_no: int, lsn: int, tag: bytes) -> bytes:
    """An 8 KiB database page: header (page number, LSN, owner), rows cut from the pool at a random offset,
    and the page's free space as zeros, as B-tree pages keep it."""
    pool = _rows_pool()
    size = PAGE_BLOCKS * BLOCK
    fill = rng.randrange(size // 3, size - 64)
    start = rng.randrange(len(pool) - fill)
    header = b"PGDB" + page_no.to_bytes(4, "little") + lsn.to_bytes(8, "little") + tag[:16].ljust(16, b"\0")
    return (header + pool[start : start + fill]).ljust(size, b"\0")


def log_text(rng: random.Random, size: int, host: str, clock: float) -> bytes:
    """Syslog-like lines of `host`, timestamps advancing from `clock`, exactly `size` bytes."""
    parts, total = [], 0
    while total < size:
        clock += rng.expovariate(2.0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(clock)) + f".{int(clock % 1 * 1e6):06d}+00:00"
        line = stamp + " " + rng.choice(_LOG).format(
            host=host, pid=rng.randrange(300, 99999), a=rng.randrange(256), b=rng.randrange(256),
            c=rng.randrange(256), port=rng.randrange(1024, 65536), h=f"{rng.getrandbits(64):016x}",
            up=rng.randrange(10**6)) + "\n"
        parts.append(line.encode())
        total += len(line)
    return b"".join(parts)[:size]


def metadata_block(rng: random.Random) -> bytes:
    """A 4 KiB filesystem-metadata-like block: small records (inode numbers, sizes, times), zero tail."""
    records = b"".join(rng.randrange(1 << 20).to_bytes(4, "little") + rng.randrange(1 << 30).to_bytes(4, "little")
                       + (1_764_000_000 + rng.randrange(10**6)).to_bytes(8, "little")
                       for _ in range(rng.randrange(16, 200)))
    return records.ljust(BLOCK, b"\0")


def file_bytes(path: Path, limit: int) -> bytes:
    """The first `limit` bytes of a file: the content of a "new version" of one."""
    with open(path, "rb") as f:
        return f.read(limit)


def concat_files(files: Sequence[Path], size: int) -> bytes:
    """Files' contents one after another (like an archive), `size` bytes (wrapping round the list)."""
    out = bytearray()
    for path in itertools.cycle(files):
        if len(out) >= size:
            break
        out += file_bytes(path, size - len(out))
        out += bytes(-len(out) % 512)
    return bytes(out[:size])


# ------------------------------------------------------------------------------------------ per-VM build

@dataclass
class VmLayout:
    """Where a VM's live structures lie on its disk, for the day-by-day churn."""

    name: str
    size: int
    free: bytearray
    db_blocks: list[int]
    hot_pages: list[int]
    log_tails: list[int]
    journal: list[int]
    inode_tables: list[tuple[int, int]]
    files: list[Path]
    journal_cursor: int = 0
    lsn: int = 1 << 32
    clock: float = 1_764_000_000.0
    summary: dict = field(default_factory=dict)


def _vm_plan(scale: Scale, index: int, pool: Sequence[Package], template: set[Path]) -> dict:
    rng = random.Random(f"fleet:{scale.name}:vm:{index}")

    def size(bounds: tuple[int, int]) -> int:
        return rng.randrange(bounds[0], bounds[1] + 1) * MiB

    extras = pick_packages(pool, rng, size(scale.extra_mib), template)
    return {"extras": extras, "db": size(scale.db_mib) // (PAGE_BLOCKS * BLOCK) * PAGE_BLOCKS * BLOCK,
            "log": size(scale.log_mib), "deleted": size(scale.deleted_mib),
            "zero_free": index % ZERO_FREE_EVERY == ZERO_FREE_EVERY - 1, "rng": rng}


def build_vm(image: Path, tmp: Path, name: str, scale: Scale, plan: dict, known_dirs: set[str],
             known_files: set[str]) -> VmLayout:
    """Write a VM's own files into its clone of the template and return where its live structures lie."""
    rng: random.Random = plan["rng"]
    script = Ext4Script(known_dirs, known_files)
    for pkg in plan["extras"]:
        for f in pkg.files:
            script.write(f, pkg.dest / f.relative_to(pkg.path))
    tag = name.encode()
    db = tmp / "db"
    with open(db, "wb") as f:
        for page in range(plan["db"] // (PAGE_BLOCKS * BLOCK)):
            f.write(db_page(rng, page, page, tag))
    script.write(db, PurePosixPath("/var/lib/appdb/orders.db"))
    logs = ("/var/log/syslog", "/var/log/auth.log", f"/var/log/app/{name}.log")
    for i, dest in enumerate(logs):
        (tmp / f"log{i}").write_bytes(log_text(rng, plan["log"] // len(logs), name, 1_760_000_000.0))
        script.write(tmp / f"log{i}", PurePosixPath(dest))
    (tmp / "hostname").write_text(name + "\n")
    script.write(tmp / "hostname", PurePosixPath("/etc/hostname"))
    (tmp / "machine-id").write_text(uuid.UUID(int=rng.getrandbits(128)).hex + "\n")
    script.write(tmp / "machine-id", PurePosixPath("/etc/machine-id.vm"))
    pool_files = [f for pkg in package_pool() for f in pkg.files]
    deleted = []
    left = plan["deleted"]
    while left > 0:  # old package archives and caches, removed later: their bytes stay on disk
        n = min(left, rng.randrange(4, 64) * MiB)
        path = tmp / f"deleted{len(deleted)}"
        path.write_bytes(concat_files(rng.sample(pool_files, 200), n))
        deleted.append(PurePosixPath(f"/var/cache/old/archive{len(deleted)}.tar"))
        script.write(path, deleted[-1])
        left -= n
    script.run(image)
    deleted_blocks = [b for d in deleted for b in debugfs_blocks(image, str(d))]
    for d in deleted:
        script.rm(d)
    script.run(image)
    if plan["zero_free"]:
        with open(image, "r+b") as f:
            for first, count in block_runs(deleted_blocks):
                os.pwrite(f.fileno(), bytes(count * BLOCK), first * BLOCK)
    fs = dumpe2fs(image)
    db_blocks = debugfs_blocks(image, "/var/lib/appdb/orders.db")
    pages = len(db_blocks) // PAGE_BLOCKS
    return VmLayout(
        name=name, size=scale.disk_mib * MiB, free=fs.free, db_blocks=db_blocks,
        hot_pages=rng.sample(range(pages), max(1, int(pages * HOT_PAGES))),
        log_tails=[debugfs_blocks(image, p)[-1] for p in logs], journal=debugfs_blocks(image, "<8>"),
        inode_tables=fs.inode_tables, files=rng.sample(pool_files, min(len(pool_files), 5000)),
        summary={"packages": [str(p.path) for p in plan["extras"]],
                 "package_bytes": sum(p.size for p in plan["extras"]), "db_bytes": plan["db"],
                 "log_bytes": plan["log"], "deleted_bytes": plan["deleted"], "zero_free": plan["zero_free"]})


# ------------------------------------------------------------------------------------------ day churn

def _allocate(layout: VmLayout, rng: random.Random, blocks: int, goal: int | None = None) -> list[int]:
    """Take `blocks` free blocks, contiguous where possible from a goal (random unless given), as ext4's
    allocator does for a new file or an append."""
    free = layout.free
    out: list[int] = []
    pos = rng.randrange(len(free)) if goal is None else goal
    while len(out) < blocks:
        start = free.find(1, pos)
        if start < 0:
            start = free.find(1)
            if start < 0:
                raise RuntimeError(f"{layout.name}: the filesystem is full; lower the churn or the fill")
        stop = free.find(0, start)
        stop = len(free) if stop < 0 else stop
        stop = min(stop, start + blocks - len(out))
        free[start:stop] = bytes(stop - start)
        out.extend(range(start, stop))
        pos = stop
    return out


def plan_day(layout: VmLayout, rng: random.Random, percent: float) -> tuple[dict[int, bytes], dict]:
    """One day of a running guest: block → new 4 KiB content, and the bytes per kind of write."""
    budget = round(layout.size * percent / 100 / BLOCK)
    writes: dict[int, bytes] = {}
    mix = {}
    for kind, share in CHURN_SHARES:
        want = round(budget * share)
        before = len(writes)
        if kind == "db":
            pages = len(layout.db_blocks) // PAGE_BLOCKS
            chosen: set[int] = set()
            while len(chosen) < min(pages, want // PAGE_BLOCKS):
                hot = rng.random() < HOT_WRITES
                chosen.add(rng.choice(layout.hot_pages) if hot else rng.randrange(pages))
            for page in sorted(chosen):
                layout.lsn += rng.randrange(1, 5000)
                data = db_page(rng, page, layout.lsn, layout.name.encode())
                for k in range(PAGE_BLOCKS):
                    writes[layout.db_blocks[page * PAGE_BLOCKS + k]] = data[k * BLOCK : (k + 1) * BLOCK]
        elif kind == "files":
            while len(writes) - before < want:
                data = file_bytes(rng.choice(layout.files), 8 * MiB) or b"\n"
                n = min(-(-len(data) // BLOCK), want - (len(writes) - before))
                data = data.ljust(n * BLOCK, b"\0")
                for k, block in enumerate(_allocate(layout, rng, n)):
                    writes[block] = data[k * BLOCK : (k + 1) * BLOCK]
        elif kind == "log":
            per_log = -(-want // len(layout.log_tails))
            for i, tail in enumerate(layout.log_tails):
                text = log_text(rng, per_log * BLOCK, layout.name, layout.clock)
                blocks = _allocate(layout, rng, per_log, goal=tail + 1)
                layout.log_tails[i] = blocks[-1]
                for k, block in enumerate(blocks):
                    writes[block] = text[k * BLOCK : (k + 1) * BLOCK]
            layout.clock += 86_400
        else:
            for _ in range(want * 3 // 4):  # jbd2 writes its journal sequentially, wrapping round
                writes[layout.journal[layout.journal_cursor]] = metadata_block(rng)
                layout.journal_cursor = (layout.journal_cursor + 1) % len(layout.journal)
            for _ in range(want - want * 3 // 4):
                first, last = rng.choice(layout.inode_tables)
                writes[rng.randint(first, last)] = metadata_block(rng)
        mix[kind] = (len(writes) - before) * BLOCK
    return writes, mix


def save_patch(writes: dict[int, bytes], base: Path, summary: dict) -> None:
    """extents (merged byte ranges) in base.json, their bytes in extent order in base.bin."""
    base.parent.mkdir(parents=True, exist_ok=True)
    blocks = sorted(writes)
    with open(base.with_suffix(".bin"), "wb") as f:
        for b in blocks:
            f.write(writes[b])
    extents = [(first * BLOCK, count * BLOCK) for first, count in block_runs(blocks)]
    write_json(base.with_suffix(".json"), {"extents": extents, "summary": summary})


# ------------------------------------------------------------------------------------------ build

def fleet_dir(scale: Scale) -> Path:
    """Where the fleet of a scale is cached: one directory per fleet shape, so a changed scale builds anew."""
    return CACHE / f"fleet-{scale.name}-{scale.fleet_key()}"


def load_or_build(scale: Scale, *, rebuild: bool = False) -> Fleet:
    """The cached fleet of this scale, built first if missing (or if `rebuild`)."""
    target = fleet_dir(scale)
    if (target / "fleet.json").exists() and not rebuild:
        return Fleet.load(target, scale)
    shutil.rmtree(target, ignore_errors=True)
    work = target.with_name(target.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    need = int((scale.vms * 0.7 + 1.5) * scale.disk_mib * MiB)  # the VHDX files and two raw images at a time
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"building the {scale.name} fleet needs about {need >> 30} GiB free in {work.parent}")
    try:
        _build(work, scale)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    work.rename(target)
    return Fleet.load(target, scale)


def _build(work: Path, scale: Scale) -> None:
    began = time.perf_counter()
    qemu_img = _tool("qemu-img")
    pool = package_pool()
    root, os_source = None, ""
    if scale.os == "debootstrap":
        try:
            root, os_source = debootstrap_root()
        except RuntimeError as e:
            print(f"fleet: {e}; the guest OS is made of this machine's files instead", file=sys.stderr)
    # What the OS image already has: debugfs refuses to make a directory or write a file again.
    dirs, files = {"/"}, set()
    for d, _, names in os.walk(root) if root else ():
        rel = "/" + str(Path(d).relative_to(root)).removeprefix(".")
        dirs.add(rel.rstrip("/") or "/")
        files.update(str(PurePosixPath(rel, n)) for n in names)
    script = Ext4Script(dirs, files)
    if root is None:
        for path in host_os_files(scale.os_mib * MiB):
            script.write(path, PurePosixPath(path))
        os_source = f"this machine's files ({', '.join(HOST_OS_ROOTS)}), {scale.os_mib} MiB"
    rng = random.Random(f"fleet:{scale.name}:template")
    common = pick_packages(pool, rng, scale.common_mib * MiB, set())
    for pkg in common:
        for f in pkg.files:
            script.write(f, pkg.dest / f.relative_to(pkg.path))
    template = work / "template.raw"
    print(f"fleet: template ext4 image ({os_source}; {len(common)} common packages) ...", flush=True)
    with open(template, "wb") as f:
        f.truncate(scale.disk_mib * MiB)
    mkfs = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-L", "guest", "-U", str(uuid.UUID(int=1)),
            "-E", "lazy_itable_init=0,nodiscard,root_owner=0:0"]
    subprocess.run([*mkfs, *(["-d", str(root)] if root else []), str(template)], check=True, capture_output=True)
    known_dirs, known_files = set(script.dirs), set(script.files)
    script.run(template)
    template_bytes = sum(1 for b in dumpe2fs(template).free if not b) * BLOCK
    lab = work / "lab0"
    lab.mkdir()
    host = f"lab-{socket.gethostname()}"
    layouts, vms = [], []
    common_paths = {p.path for p in common}
    for index in range(scale.vms):
        name = f"vm{index + 1:02d}"
        print(f"fleet: {name} ...", flush=True)
        plan = _vm_plan(scale, index, pool, common_paths)
        tmp = work / "tmp"
        tmp.mkdir()
        image = work / f"{name}.raw"
        subprocess.run(["cp", "--sparse=always", str(template), str(image)], check=True)
        layout = build_vm(image, tmp, name, scale, plan, known_dirs, known_files)
        shutil.rmtree(tmp)
        vm_dir = lab / name
        (vm_dir / "config").mkdir(parents=True)
        _run([qemu_img, "convert", "-q", "-t", "unsafe", "-f", "raw", "-O", "vhdx", "-o",
              f"subformat=dynamic,block_size={VHDX_BLOCK}", str(image), str(vm_dir / DISK_FILE)])
        image.unlink()
        info = VmInfo(str(uuid.UUID(int=random.Random(f"id:{scale.name}:{index}").getrandbits(128))), name, host)
        disk = DiskInfo(str(uuid.UUID(int=random.Random(f"disk:{scale.name}:{index}").getrandbits(128))),
                        DISK_FILE, scale.disk_mib * MiB)
        _write_config(vm_dir / "config", info, [disk], random.Random(f"config:{index}"))
        write_json(vm_dir / "vm.json", {"id": info.id, "name": name, "created": time.time(),
                                        "disks": [{"disk_id": disk.disk_id, "file": DISK_FILE, "size": disk.size}]})
        _save_tracking(vm_dir, {disk.disk_id: _Tracking.start(disk.disk_id, 1)})
        with open_vhdx(vm_dir / DISK_FILE) as reader:
            allocated = sum(n for _, n in reader.allocated_ranges())
        layouts.append(layout)
        vms.append(FleetVm(name, info.id, disk.disk_id, disk.size, allocated, layout.summary))
    template.unlink()
    allocated_share = template_bytes * scale.vms / max(1, sum(vm.allocated for vm in vms))
    write_json(lab / "lab.json", {"host": host, "seed": 1, "template_share": round(min(1.0, allocated_share), 3),
                                  "created": time.time()})
    for day in range(1, scale.days + 1):
        print(f"fleet: day {day} churn ...", flush=True)
        for layout in layouts:
            rng = random.Random(f"fleet:{scale.name}:{layout.name}:day:{day}")
            percent = rng.uniform(*scale.churn_percent)
            writes, mix = plan_day(layout, rng, percent)
            save_patch(writes, work / "days" / f"day{day:02d}" / layout.name,
                       {"percent": round(percent, 2), "bytes": len(writes) * BLOCK, "mix": mix})
    write_json(work / "fleet.json", {
        "format": FLEET_FORMAT, "scale": asdict(scale), "os_source": os_source, "build_s": elapsed(began),
        "template_bytes": template_bytes, "common_packages": [str(p.path) for p in common],
        "vms": [asdict(vm) for vm in vms]})


# ------------------------------------------------------------------------------------------ using a fleet

def copy_lab(fleet: Fleet, dest: Path) -> Path:
    """A private copy of the day-0 lab that a run may churn (the cached one stays as built)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(fleet.lab0, dest)
    return dest


def _extent_data(extents: Sequence[Range], data: Path) -> Iterator[tuple[int, bytes]]:
    with open(data, "rb") as f:
        for offset, length in extents:
            yield offset, f.read(length)


def churn_lab(fleet: Fleet, lab: Path, day: int) -> dict[str, int]:
    """Apply day `day` to every VM of a lab copy: journal first (as lab.churn does), then the writes through
    qemu-io, as a guest writes through its hypervisor. Returns the changed bytes per VM."""
    qemu_io = _tool("qemu-io")
    source = LabSource(lab)
    changed = {}
    for vm in fleet.vms:
        extents, data, summary = fleet.patch(day, vm)
        target = source._find(vm.name)
        with _vm_lock(target.dir):
            tracking = target.load_tracking()
            tracking[vm.disk_id].record(_merge(extents))
            _save_tracking(target.dir, tracking)
            pieces = _extent_data(extents, data)
            with tempfile.TemporaryDirectory(prefix=".churn-", dir=lab) as tmp:
                for batch in _batches(extents):
                    commands = []
                    for i, (offset, length) in enumerate(batch):
                        _, content = next(pieces)
                        Path(tmp, str(i)).write_bytes(content)
                        commands += ["-c", f"write -q -s {i} {offset} {length}"]
                    _run([qemu_io, "-f", "vhdx", *commands, str((target.dir / DISK_FILE).absolute())], cwd=Path(tmp))
        changed[vm.name] = summary["bytes"]
    return changed


def export_raw(fleet: Fleet, dest: Path) -> dict[str, Path]:
    """Day-0 disks as sparse raw images (qemu-img convert), one file per VM: what image-file tools back up."""
    dest.mkdir(parents=True, exist_ok=True)
    qemu_img = _tool("qemu-img")
    out = {}
    for vm in fleet.vms:
        out[vm.name] = dest / f"{vm.name}.raw"
        _run([qemu_img, "convert", "-q", "-t", "unsafe", "-f", "vhdx", "-O", "raw",
              str(fleet.lab0 / vm.name / DISK_FILE), str(out[vm.name])])
    return out


def churn_raw(fleet: Fleet, raws: dict[str, Path], day: int) -> dict[str, int]:
    """Apply day `day` to raw exports (the same bytes churn_lab writes into the VHDX)."""
    changed = {}
    for vm in fleet.vms:
        extents, data, summary = fleet.patch(day, vm)
        with open(raws[vm.name], "r+b") as f:
            for offset, content in _extent_data(extents, data):
                os.pwrite(f.fileno(), content, offset)
        changed[vm.name] = summary["bytes"]
    return changed


def sample_chunks(fleet: Fleet, size: int, chunk_size: int = MiB) -> list[bytes]:
    """Non-zero chunks read from every VM's day-0 disk, evenly spaced over its allocated ranges: the data of the
    machine-limit probes is the fleet's own (OS, packages, database, logs) in its real proportions."""
    per_vm = max(1, size // chunk_size // len(fleet.vms))
    chunks = []
    for vm in fleet.vms:
        with open_vhdx(fleet.lab0 / vm.name / DISK_FILE) as reader:
            starts = [o for offset, n in reader.allocated_ranges() for o in range(offset, offset + n, chunk_size)]
            stride = max(1, len(starts) // (per_vm * 2))
            taken = 0
            for start in starts[::stride]:
                data = reader.read(start, chunk_size)
                if data.count(0) != len(data):
                    chunks.append(data)
                    taken += 1
                    if taken == per_vm:
                        break
    return chunks


def describe(fleet: Fleet) -> str:
    """A short Markdown summary of a fleet: source, sizes, and per-VM composition and churn."""
    gib = 1 << 30
    lines = [f"fleet `{fleet.scale.name}`: {len(fleet.vms)} VMs × {fleet.scale.disk_mib / 1024:g} GiB virtual "
             f"({fleet.virtual_bytes / gib:.1f} GiB), {fleet.allocated_bytes / gib:.2f} GiB in allocated VHDX "
             f"blocks; template {fleet.template_bytes / gib:.2f} GiB of {fleet.os_source}; built in "
             f"{fleet.build_s:.0f} s", "",
             "| VM | allocated | packages | database | logs | deleted | free space | "
             + " | ".join(f"day {d}" for d in range(1, fleet.scale.days + 1)) + " |",
             "|" + "---|" * (7 + fleet.scale.days)]
    for vm in fleet.vms:
        c = vm.composition
        days = [fleet.patch(d, vm)[2] for d in range(1, fleet.scale.days + 1)]
        lines.append(f"| {vm.name} | {vm.allocated / MiB:,.0f} MiB | {len(c['packages'])} "
                     f"({c['package_bytes'] / MiB:,.0f} MiB) | {c['db_bytes'] / MiB:,.0f} MiB | "
                     f"{c['log_bytes'] / MiB:,.0f} MiB | "
                     f"{c['deleted_bytes'] / MiB:,.0f} MiB | {'zeroed' if c['zero_free'] else 'as left'} | "
                     + " | ".join(f"{s['percent']:.1f} % ({s['bytes'] / MiB:,.0f} MiB)" for s in days) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="smoke")
    parser.add_argument("--rebuild", action="store_true", help="build again even if a cached fleet exists")
    args = parser.parse_args(argv)
    fleet = load_or_build(SCALES[args.scale], rebuild=args.rebuild)
    print(describe(fleet))
    print(f"\nlab: {fleet.lab0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
