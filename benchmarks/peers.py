"""Chunkyard beside restic and borg (Debian packages, local repositories) on the same fleet disks, day by day.

The disks are raw images exported from the fleet's day-0 VHDX (sparse files), changed each day with exactly the
bytes the ingest benchmark writes into the VHDX. Raw, not VHDX, for fairness: restic and borg know nothing of VHDX,
and a raw image is what they would back up from a block device or an LVM snapshot. Every tool runs as its own
process per backup (GNU time gives its peak RSS) and gets the same files in the same page-cache state:

- Chunkyard: `chunkyard backup --source file:IMAGE` per VM (no change tracking: reads every allocated range and
  compares digests with the previous point), into a `chunkyard serve` process on loopback, 1 MiB chunks, zstd-1.
- restic 0.14: `restic backup` of the image directory; repository format 2 (zstd "auto" compression); restic
  cannot run unencrypted, and 0.14 has no --insecure-no-password, so a fixed password from the environment.
- borg 1.2: `borg create`, `borg init -e none`, `--chunker-params fixed,1048576` (borg's fixed chunker, which its
  docs recommend for disk images, at Chunkyard's chunk size), `--sparse`, `--compression zstd,1`.

Backup throughput = the images' virtual bytes ÷ wall time, the same numerator for every tool. Restores write the
latest backup of the scale's `restore_vms` images as plain (non-sparse) files, checked against the source.

    python -m benchmarks.peers --scale smoke       # one benchmark of the suite (see benchmarks.suite)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import blake3

from chunkyard.units import format_size

from .common import ROOT, ChunkyardServer, Measured, MiB, Row, disk_usage, run_measured
from .fleet import Fleet, churn_raw, export_raw

GiB = 1 << 30
RESTIC_PASSWORD = "chunkyard-benchmark"  # a local throwaway repository; restic 0.14 cannot run without one
RESTIC_BLOB_OVERHEAD = 32  # nonce and MAC of each encrypted blob


def file_digest(path: Path) -> bytes:
    """BLAKE3 of a whole file on every core: checks a restore without weighing on the run."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(path)
    return h.digest()


class Tool(ABC):
    """One backup tool with its own repository under `work`."""

    name = ""

    def __init__(self, work: Path, images: Path):
        self.work, self.images = work, images
        self.repo = work / f"repo-{self.name}"

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def run(self, *args: str, cwd: Path | None = None) -> Measured:
        return run_measured(list(args), cwd=cwd or self.work, env=self.env())

    @abstractmethod
    def init(self) -> None:
        """Create the tool's repository (and start what it needs)."""

    @abstractmethod
    def backup(self, day: int) -> list[Measured]:
        """Back up the day's images into the repository; one measurement per run of the tool."""

    @abstractmethod
    def restore(self, day: int, vm: str, dest: Path) -> tuple[Measured, Path]:
        """Restore one image of the day's backup under `dest`; the measurement and the restored file."""

    @abstractmethod
    def unique_bytes(self) -> int:
        """Uncompressed bytes of the distinct chunks the repository holds (dedup only, before compression)."""

    def close(self) -> None:  # noqa: B027 - an optional hook: only some tools start a process
        """Stop what `init` started."""


class Restic(Tool):
    name = "restic"

    def env(self) -> dict[str, str]:
        return super().env() | {"RESTIC_REPOSITORY": str(self.repo), "RESTIC_PASSWORD": RESTIC_PASSWORD,
                                "RESTIC_CACHE_DIR": str(self.work / "restic-cache")}

    def init(self) -> None:
        self.run("restic", "init", "--repository-version", "2")

    def backup(self, day: int) -> list[Measured]:
        return [self.run("restic", "backup", "--quiet", "--host", "bench", "--tag", f"day{day}",
                         self.images.name)]

    def restore(self, day: int, vm: str, dest: Path) -> tuple[Measured, Path]:
        m = self.run("restic", "restore", "latest", "--host", "bench", "--target", str(dest), "--include",
                     f"/{self.images.name}/{vm}.raw")  # snapshots keep the last component of the backed-up path
        return m, dest / self.images.name / f"{vm}.raw"

    def unique_bytes(self) -> int:
        """From the index files: 0.14's `stats --mode raw-data` only knows compressed sizes."""
        total = 0
        for index in self.run("restic", "list", "index").stdout.split():
            doc = json.loads(self.run("restic", "cat", "index", index).stdout)
            total += sum(b.get("uncompressed_length", b["length"] - RESTIC_BLOB_OVERHEAD)
                         for p in doc["packs"] for b in p["blobs"] if b["type"] == "data")
        return total


class Borg(Tool):
    name = "borg"

    def env(self) -> dict[str, str]:
        return super().env() | {"BORG_REPO": str(self.repo), "BORG_BASE_DIR": str(self.work / "borg-base"),
                                "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}

    def init(self) -> None:
        self.run("borg", "init", "--encryption", "none")

    def backup(self, day: int) -> list[Measured]:
        return [self.run("borg", "create", "--compression", "zstd,1", "--chunker-params", "fixed,1048576",
                         "--sparse", f"::day{day}", self.images.name)]

    def restore(self, day: int, vm: str, dest: Path) -> tuple[Measured, Path]:
        dest.mkdir(parents=True, exist_ok=True)
        return self.run("borg", "extract", f"::day{day}", f"{self.images.name}/{vm}.raw", cwd=dest), \
            dest / self.images.name / f"{vm}.raw"

    def unique_bytes(self) -> int:
        return json.loads(self.run("borg", "info", "--json").stdout)["cache"]["stats"]["unique_size"]


class Chunkyard(Tool):
    name = "chunkyard"

    def env(self) -> dict[str, str]:
        """The CLI runs in the peers' work directory, so put this tree first on the path: otherwise a venv's
        editable install of another checkout would be imported and measured instead of this code."""
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        return env

    def init(self) -> None:
        self.server = ChunkyardServer(self.repo, log=self.work / "server-peers.log")
        self.server.start()
        self.points: dict[str, tuple[str, str]] = {}

    def _cli(self, *args: str) -> Measured:
        return self.run(sys.executable, "-m", "chunkyard.cli", *args, "--server", self.server.url, "--token",
                        self.server.admin_token, "--json")

    def backup(self, day: int) -> list[Measured]:
        out = []
        for image in sorted(self.images.glob("*.raw")):
            m = self._cli("backup", "--source", f"file:{image}", "--vm", image.stem)
            result = json.loads(m.stdout)
            self.points[image.stem] = (result["point_id"], result["disks"][0]["disk_id"])
            out.append(m)
        return out

    def restore(self, day: int, vm: str, dest: Path) -> tuple[Measured, Path]:
        dest.mkdir(parents=True, exist_ok=True)
        point_id, disk_id = self.points[vm]
        return self._cli("restore", point_id, "--disk", disk_id, "--format", "raw", "-o", str(dest / f"{vm}.raw")), \
            dest / f"{vm}.raw"

    def unique_bytes(self) -> int:
        async def stats() -> dict:
            async with self.server.client() as client:
                return await client.repository()

        return asyncio.run(stats())["unique_bytes"]

    def close(self) -> None:
        self.server.stop()


TOOLS = (Chunkyard, Restic, Borg)
NOTES = {
    ("data reduction (virtual ÷ repository on disk)", "restic"):
        "dedup and compression together; restic's zstd \"auto\" is zstd's default level (3), the others level 1",
    ("dedup only (virtual ÷ unique uncompressed bytes)", "borg"):
        "borg --sparse restarts its 1 MiB grid at every data range after a hole (a zero 4 KiB block in the sparse "
        "image), which realigns files that sit at other offsets in other VMs; holes are not counted as data",
    ("restore to a file", None): "Chunkyard fsyncs and reads the file back to verify it; restic and borg leave "
                                 "the data in the page cache",
}


def run(fleet: Fleet, work: Path, rct_incremental_s: float | None = None) -> dict:
    """Every tool backs up every day and restores the last; rows compare Chunkyard with each peer.

    `rct_incremental_s`: the ingest run's total wall time of the RCT incrementals on the same days (1 MiB), so the
    rows can also show what change tracking adds on top of the like-for-like comparison.
    """
    work.mkdir(parents=True, exist_ok=True)
    print("peers: exporting raw images ...", flush=True)
    raws = export_raw(fleet, work / "images")
    tools = [cls(work, work / "images") for cls in TOOLS]
    days = range(0, fleet.scale.days + 1)
    backups: dict[str, dict[int, list[Measured]]] = {t.name: {} for t in tools}
    try:
        for t in tools:
            t.init()
        for day in days:
            if day:
                churn_raw(fleet, raws, day)
            for t in tools:
                print(f"peers: {t.name} backup, day {day} ...", flush=True)
                backups[t.name][day] = t.backup(day)
        result = {t.name: {"repo_bytes": disk_usage(t.repo), "unique_bytes": t.unique_bytes()} for t in tools}
        restores: dict[str, list[Measured]] = {t.name: [] for t in tools}
        for vm in fleet.vms[: fleet.scale.restore_vms]:
            want = file_digest(raws[vm.name])
            for t in tools:
                print(f"peers: {t.name} restore {vm.name} ...", flush=True)
                dest = work / f"restore-{t.name}"
                m, restored = t.restore(fleet.scale.days, vm.name, dest)
                if file_digest(restored) != want:
                    raise RuntimeError(f"{t.name} restored {vm.name} with different bytes ({restored})")
                restores[t.name].append(m)
                shutil.rmtree(dest)
    finally:
        for t in tools:
            t.close()
    for name in result:
        result[name] |= {"backups": {d: [_m(m) for m in ms] for d, ms in backups[name].items()},
                         "restores": [_m(m) for m in restores[name]]}
    return {"rows": rows(fleet, result, rct_incremental_s), "details": result}


def _m(m: Measured) -> dict:
    return {"seconds": m.seconds, "max_rss": m.max_rss, "cpu_s": m.cpu_s}


def rows(fleet: Fleet, result: dict, rct_incremental_s: float | None) -> list[Row]:
    """Chunkyard's number in `measured`, the peer's in the limit column: ratio = Chunkyard ÷ peer."""
    virtual, n_days = fleet.virtual_bytes, fleet.scale.days
    restored = sum(vm.size for vm in fleet.vms[: fleet.scale.restore_vms])

    def measures(name: str) -> dict[str, tuple[float, str, bool, str]]:
        """what → (value, unit, higher is better, the absolute numbers behind it)."""
        r = result[name]
        seconds = {d: sum(m["seconds"] for m in ms) for d, ms in r["backups"].items()}
        incr = sum(s for d, s in seconds.items() if d)
        restore_s = sum(m["seconds"] for m in r["restores"])
        logical = virtual * len(seconds)
        return {
            "backup, day 0 (full)": (virtual / MiB / seconds[0], "MiB/s", True, f"{seconds[0]:.1f} s"),
            f"backup, days 1–{n_days} (incremental)": (virtual * n_days / MiB / incr, "MiB/s", True, f"{incr:.1f} s"),
            "backup, all days": (logical / MiB / sum(seconds.values()), "MiB/s", True,
                                 f"{sum(seconds.values()):.1f} s"),
            "data reduction (virtual ÷ repository on disk)": (logical / r["repo_bytes"], "×", True,
                                                              format_size(r["repo_bytes"])),
            "dedup only (virtual ÷ unique uncompressed bytes)": (logical / r["unique_bytes"], "×", True,
                                                                 format_size(r["unique_bytes"])),
            "restore to a file": (restored / MiB / restore_s, "MiB/s", True, f"{restore_s:.1f} s"),
            "backup peak RSS": (max(m["max_rss"] for ms in r["backups"].values() for m in ms) / MiB, "MiB", False,
                                ""),
        }

    ours = measures("chunkyard")
    out = []
    for peer in ("restic", "borg"):
        theirs = measures(peer)
        for what, (value, unit, higher, detail) in ours.items():
            target, text = None, ""
            if what == "backup, all days":
                target, text = 2 * theirs[what][0], "≥ 2 × peer"
            elif what.startswith("data reduction"):
                target, text = theirs[what][0], "≥ peer"
            notes = [f"Chunkyard {detail}, {peer} {theirs[what][3]}" if detail else "",
                     NOTES.get((what, peer), NOTES.get((what, None), ""))]
            out.append(Row(f"{what}: Chunkyard vs {peer}", value, unit, theirs[what][0], peer, target,
                           higher_is_better=higher, target_text=text, note="; ".join(filter(None, notes))))
        if rct_incremental_s:
            incr = theirs[f"backup, days 1–{n_days} (incremental)"][0]
            out.append(Row(f"backup, days 1–{n_days}: Chunkyard lab RCT vs {peer}",
                           virtual * n_days / MiB / rct_incremental_s, "MiB/s", incr, peer,
                           note="Chunkyard reads only the journaled changes of the VHDX (ingest run)"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .suite import main as suite_main

    return suite_main(["--only", "peers", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
