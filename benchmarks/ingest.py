"""Ingest benchmark: the collector pipeline backs up a realistic fleet (benchmarks.fleet) into real servers.

Per run, on a private copy of the fleet's lab: a full backup of every VM (day 0), then each day the day's churn
(written through qemu-io and journaled, as RCT would report it) and an incremental of every VM (plan "tracked"),
then an unchanged re-read of every VM with Options(full=True) (plan "compare": no change tracking). The same
steps go into three repositories at once, with 256 KiB, 1 MiB and 4 MiB chunks, so dedup ratio and throughput can
be weighed per chunk size on identical data; the DESIGN §7 rows are those of the 1 MiB repository (the default).

Backups run in this process (`collectors.pipeline.run_backup`, as `chunkyard backup` runs it), timed from the
checkpoint to its release. The collector's peak memory is taken from a separate `chunkyard backup` process (a full
read of the largest VM into a fresh repository) under GNU time, so it is the collector's own VmHWM.

    python -m benchmarks.ingest --scale smoke          # one benchmark of the suite (see benchmarks.suite)
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from chunkyard.progress import Progress
from chunkyard.units import format_size
from collectors.pipeline import Options, run_backup
from collectors.sources.lab import LabSource

from .common import ROOT, ChunkyardServer, Limits, MiB, PhaseMeter, Row, disk_usage, elapsed, run_measured
from .fleet import Fleet, churn_lab, copy_lab

KiB = 1 << 10
DEFAULT_CHUNK = MiB


def size_label(n: int) -> str:
    """'256 KiB', '1 MiB': a chunk size as the tables name it."""
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


async def backup_vm(server: ChunkyardServer, lab: Path, vm: str, options: Options) -> dict:
    """One backup of one lab VM, timed from taking the checkpoint to releasing it."""
    start = time.perf_counter()
    async with server.client() as client:
        with LabSource(lab).begin(vm) as backup:
            result = await run_backup(client, backup, options=options, progress=Progress(None, vm, io.StringIO()))
    seconds = elapsed(start)
    disk = result.disks[0]
    return {"vm": vm, "seconds": seconds, "plan": disk.plan, "read": result.read_bytes, "sent": result.sent_bytes,
            "new": result.server_stats.get("new_bytes", 0), "uploaded": result.uploaded_chunks,
            "changed_chunks_bytes": result.server_stats.get("changed_bytes", 0), "point_id": result.point_id,
            "disk_id": disk.disk_id}


async def backup_all(server: ChunkyardServer, lab: Path, fleet: Fleet, options: Options) -> list[dict]:
    """Every VM in turn, as one collector works through a host's VMs."""
    return [await backup_vm(server, lab, vm.name, options) for vm in fleet.vms]


def collector_memory(fleet: Fleet, lab: Path, work: Path) -> dict:
    """Peak RSS of a `chunkyard backup` process reading the largest VM in full into a fresh repository: every
    chunk is hashed, most are compressed and uploaded, the most a collector holds."""
    vm = max(fleet.vms, key=lambda v: v.allocated)
    with ChunkyardServer(work / "data-collector", log=work / "server-collector.log") as server:
        measured = run_measured([sys.executable, "-m", "chunkyard.cli", "backup", "--source", f"lab:{lab}",
                                 "--vm", vm.name, "--server", server.url, "--token", server.admin_token, "--json"],
                                cwd=ROOT)  # this tree's code, as the servers run it
    result = json.loads(measured.stdout)
    return {"vm": vm.name, "disk_bytes": vm.size, "read": result["read_bytes"], "max_rss": measured.max_rss,
            "seconds": measured.seconds, "cpu_s": measured.cpu_s}


def run(fleet: Fleet, work: Path, limits: Limits) -> dict:
    """One run: returns rows for the tables, details for the JSON, and the default repository for restore."""
    lab = copy_lab(fleet, work / "lab")
    with ExitStack() as stack:
        servers = {cs: stack.enter_context(ChunkyardServer(work / f"data-{cs // KiB}k", chunk_size=f"{cs // KiB}KiB",
                                                           log=work / f"server-{cs // KiB}k.log"))
                   for cs in fleet.scale.chunk_sizes}
        meters = {cs: PhaseMeter(s.pid) for cs, s in servers.items()}
        phases: dict[int, dict[str, list[dict]]] = {cs: {} for cs in servers}
        changed: dict[int, dict[str, int]] = {}

        def step(name: str, options: Options) -> None:
            for cs, server in servers.items():
                with meters[cs](f"{size_label(cs)}: {name}"):
                    phases[cs][name] = asyncio.run(backup_all(server, lab, fleet, options))

        step("day 0 full", Options())
        for day in range(1, fleet.scale.days + 1):
            print(f"churn: day {day} ...", flush=True)
            changed[day] = churn_lab(fleet, lab, day)
            step(f"day {day}", Options())
        step("unchanged re-read", Options(full=True))
        repos = {}
        for cs, server in servers.items():
            repos[cs] = asyncio.run(_repository(server)) | {"disk_usage": disk_usage(server.data)}
    memory = collector_memory(fleet, lab, work)
    details = {"phases": {size_label(cs): p for cs, p in phases.items()}, "changed": changed,
               "repositories": {size_label(cs): r for cs, r in repos.items()},
               "meters": {size_label(cs): m.phases for cs, m in meters.items()},
               "contended": [p for m in meters.values() for p in m.contended()], "collector": memory}
    last = f"day {fleet.scale.days}"
    restore_points = [(b["vm"], b["point_id"], b["disk_id"]) for b in phases[DEFAULT_CHUNK][last]]
    return {"rows": rows(fleet, limits, phases, changed, repos, meters, memory),
            "chunk_rows": chunk_rows(fleet, phases, changed, repos, meters), "details": details,
            "repository": {"data": str(servers[DEFAULT_CHUNK].data), "points": restore_points}}


async def _repository(server: ChunkyardServer) -> dict:
    async with server.client() as client:
        return await client.repository()


def _totals(backups: Sequence[dict]) -> dict:
    return {k: sum(b[k] for b in backups) for k in ("seconds", "read", "sent", "new")}


def rct_checks(fleet: Fleet, phases: dict[str, list[dict]], changed: dict[int, dict[str, int]],
               unique_rate: float) -> list[dict]:
    """Every VM-day incremental against DESIGN's bound: wall ≤ 1.5 × changed ÷ unique-ingest rate + 0.5 s."""
    out = []
    for day in range(1, fleet.scale.days + 1):
        for b in phases[f"day {day}"]:
            bound = 1.5 * changed[day][b["vm"]] / unique_rate + 0.5
            out.append({"day": day, "vm": b["vm"], "seconds": b["seconds"], "bound": bound,
                        "read_bound": 1.5 * b["read"] / unique_rate + 0.5,
                        "changed": changed[day][b["vm"]], "read": b["read"], "plan": b["plan"]})
    return out


def rows(fleet: Fleet, limits: Limits, phases: dict, changed: dict, repos: dict, meters: dict,
         memory: dict) -> list[Row]:
    """The DESIGN §7 rows of the default (1 MiB) repository."""
    p, repo, meter = phases[DEFAULT_CHUNK], repos[DEFAULT_CHUNK], meters[DEFAULT_CHUNK]
    mibs = "MiB/s"
    full = _totals(p["day 0 full"])
    first = p["day 0 full"][0]
    unique_rate = first["new"] / first["seconds"]
    checks = rct_checks(fleet, p, changed, unique_rate)
    worst = max(checks, key=lambda c: c["seconds"] / c["bound"])
    widened = max(checks, key=lambda c: c["seconds"] / c["read_bound"])
    incr = [b for day in range(1, fleet.scale.days + 1) for b in p[f"day {day}"]]
    incr_changed = sum(c["changed"] for c in checks)
    incr_s = sum(b["seconds"] for b in incr)
    reread = _totals(p["unchanged re-read"])
    cores = meter.cores(f"{size_label(DEFAULT_CHUNK)}: day 0 full")
    reread_cores = meter.cores(f"{size_label(DEFAULT_CHUNK)}: unchanged re-read")
    server_peak = max(ph["VmHWM"] for ph in meter.phases.values())
    return [
        Row("full backup of the fleet (day 0)", full["read"] / MiB / full["seconds"], mibs, limits.one.compress,
            "zstd-1 compress, 1 thread",
            note=f"{len(fleet.vms)} VMs, {format_size(full['read'])} read in {full['seconds']:.1f} s, "
                 f"{format_size(full['new'])} new; {cores}"),
        Row(f"unique ingest ({first['vm']} full, first in the repository)", unique_rate / MiB, mibs,
            limits.one.compress, "zstd-1 compress, 1 thread", 0.7 * limits.one.compress,
            target_text="≥ 0.7 × limit",
            note=f"{format_size(first['new'])} new of {format_size(first['read'])} read in "
                 f"{first['seconds']:.2f} s (rate of new bytes)"),
        Row("RCT incremental, worst VM-day: wall ÷ bound", worst["seconds"] / worst["bound"], "×", target=1.0,
            higher_is_better=False, target_text="≤ 1.5 × changed ÷ unique rate + 0.5 s",
            note=f"{sum(c['seconds'] <= c['bound'] for c in checks)} of {len(checks)} VM-days within; worst "
                 f"{worst['vm']} day {worst['day']}: {worst['seconds']:.2f} s for {format_size(worst['changed'])} "
                 f"changed ({format_size(worst['read'])} read), bound {worst['bound']:.2f} s"),
        Row("RCT incremental, worst VM-day, bound on chunk-widened changes", widened["seconds"] / widened["read_bound"],
            "×", note="the same bound with the bytes the collector must read (changed ranges widened to whole "
                      f"chunks) instead of the changed bytes: {widened['vm']} day {widened['day']}, "
                      f"{widened['seconds']:.2f} s, bound {widened['read_bound']:.2f} s"),
        Row("RCT incremental, changed bytes per second", incr_changed / MiB / incr_s, mibs, unique_rate / MiB,
            "unique ingest", note=f"{len(incr)} incrementals: {format_size(incr_changed)} changed, "
                                  f"{format_size(sum(b['read'] for b in incr))} read (whole chunks), "
                                  f"{format_size(sum(b['new'] for b in incr))} new, {incr_s:.1f} s"),
        Row("unchanged full re-read (no RCT)", reread["read"] / MiB / reread["seconds"], mibs, limits.all.blake3,
            f"BLAKE3, {limits.threads} threads", 2048, target_text="≥ 2 GiB/s",
            note=f"{format_size(reread['read'])} read and hashed, {format_size(reread['new'])} new; page cache "
                 f"read {limits.disk.cached_read or 0:,.0f} MiB/s; {reread_cores}"),
        Row("dedup ratio (logical ÷ unique)", repo["dedup_ratio"], "×",
            note=f"{format_size(repo['logical_bytes'])} logical over {repo['point_count']} points, "
                 f"{format_size(repo['unique_bytes'])} unique, compression {repo['compression_ratio']:.2f}×, "
                 f"{format_size(repo['disk_usage'])} on disk"),
        Row("server peak RSS (VmHWM)", server_peak / MiB, "MiB", target=512, higher_is_better=False,
            target_text="≤ 512 MiB at 10 M chunks",
            note=f"only {repo['chunk_count']:,} chunks stored: a FAIL is conclusive, a PASS is not"),
        Row("collector peak RSS (`chunkyard backup` process)", memory["max_rss"] / MiB, "MiB", target=256,
            higher_is_better=False, target_text="≤ 256 MiB, any disk size",
            note=f"full read of {memory['vm']} ({format_size(memory['read'])} of a "
                 f"{format_size(memory['disk_bytes'])} disk) into a fresh repository, {memory['seconds']:.1f} s"),
    ]


def chunk_rows(fleet: Fleet, phases: dict, changed: dict, repos: dict, meters: dict) -> list[Row]:
    """Per chunk size: unique and stored bytes, size on disk, full and incremental throughput, read amplification,
    server memory. The limit column holds the 1 MiB repository's number, so ratio = this size ÷ default. (The
    server's own dedup ratio counts logical bytes in whole chunks, so it is not comparable across chunk sizes.)"""
    if len(fleet.scale.chunk_sizes) < 2:
        return []
    out = []
    days = range(1, fleet.scale.days + 1)
    changed_total = sum(sum(changed[d].values()) for d in days)

    def measures(cs: int) -> dict[str, tuple[float, str, bool]]:
        p, repo = phases[cs], repos[cs]
        full = _totals(p["day 0 full"])
        incr = [b for d in days for b in p[f"day {d}"]]
        reread = _totals(p["unchanged re-read"])
        return {
            "unique bytes": (repo["unique_bytes"] / MiB, "MiB", False),
            "stored bytes (compressed)": (repo["stored_bytes"] / MiB, "MiB", False),
            "repository on disk": (repo["disk_usage"] / MiB, "MiB", False),
            "full backup of the fleet": (full["read"] / MiB / full["seconds"], "MiB/s", True),
            "incrementals, wall": (sum(b["seconds"] for b in incr), "s", False),
            "incrementals, read ÷ changed": (sum(b["read"] for b in incr) / changed_total, "×", False),
            "unchanged re-read": (reread["read"] / MiB / reread["seconds"], "MiB/s", True),
            "server peak RSS": (max(ph["VmHWM"] for ph in meters[cs].phases.values()) / MiB, "MiB", False),
        }

    default = measures(DEFAULT_CHUNK)
    for cs in fleet.scale.chunk_sizes:
        for what, (value, unit, higher) in measures(cs).items():
            base = default[what][0]
            out.append(Row(f"{size_label(cs)}: {what}", value, unit, base if cs != DEFAULT_CHUNK else None,
                           "1 MiB" if cs != DEFAULT_CHUNK else "", higher_is_better=higher,
                           note=f"{statistics.median(b['seconds'] for b in phases[cs]['day 1']):.2f} s median "
                                "incremental" if what == "incrementals, wall" else ""))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .suite import main as suite_main

    return suite_main(["--only", "ingest", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
