"""Restore benchmark: the latest restore points of fleet VMs, streamed back through the API and restored to files.

Per VM (the scale's `restore_vms`, from the ingest run's 1 MiB repository, whose latest points are synthetic fulls
assembled over several days of incrementals): the raw and the VHDX image through `Client.stream_disk` with the
bytes discarded (what the server and the transport sustain), then `chunkyard restore --format raw|vhdx` to a file
as a process (download, fsync, and its final read-back verification against the point's digest map). Each stands
beside the zstd-1 decompress and verify rates of the same run; DESIGN §7 asks ≥ 1 GiB/s of the stream.

    python -m benchmarks.restore --scale smoke      # one benchmark of the suite (see benchmarks.suite)
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from chunkyard.units import format_size
from collectors.pipeline import Options

from .common import ROOT, ChunkyardServer, Limits, MiB, PhaseMeter, Row, elapsed, run_measured
from .fleet import Fleet
from .ingest import backup_vm

FORMATS = ("raw", "vhdx")


def prepare(fleet: Fleet, work: Path) -> dict:
    """Without an ingest run: full backups of the restore VMs' day-0 disks into a fresh 1 MiB repository."""
    data = work / "data-restore"
    with ChunkyardServer(data, log=work / "server-prepare.log") as server:
        points = []
        for vm in fleet.vms[: fleet.scale.restore_vms]:
            b = asyncio.run(backup_vm(server, fleet.lab0, vm.name, Options()))
            points.append((vm.name, b["point_id"], b["disk_id"]))
    return {"data": str(data), "points": points}


async def stream(server: ChunkyardServer, point_id: str, disk_id: str, fmt: str) -> tuple[int, float, dict]:
    """Bytes and seconds of one whole download through Client.stream_disk, bytes discarded; and the point."""
    async with server.client() as client:
        point = await client.point(point_id)
        start = time.perf_counter()
        got = 0
        async for block in client.stream_disk(point_id, disk_id, fmt=fmt):
            got += len(block)
        return got, elapsed(start), point


def run(fleet: Fleet, work: Path, limits: Limits, repository: dict) -> dict:
    """Restore the repository's points (see the module docstring); rows for the table and details for the JSON."""
    work.mkdir(parents=True, exist_ok=True)
    points = repository["points"][: fleet.scale.restore_vms]
    streams: dict[str, list[dict]] = {}
    files: dict[str, list[dict]] = {}
    with ChunkyardServer(Path(repository["data"]), log=work / "server-restore.log") as server:
        meter = PhaseMeter(server.pid)
        for fmt in FORMATS:
            with meter(f"stream {fmt}"):
                streams[fmt] = []
                for vm, point_id, disk_id in points:
                    got, seconds, point = asyncio.run(stream(server, point_id, disk_id, fmt))
                    disk = point["disks"][0]
                    streams[fmt].append({"vm": vm, "bytes": got, "seconds": seconds, "disk_bytes": disk["size"],
                                         "data_bytes": disk["allocated_chunks"] * point["chunk_size"]})
        for fmt in FORMATS:
            with meter(f"chunkyard restore {fmt}"):
                files[fmt] = []
                for vm, point_id, disk_id in points:
                    out = work / f"{vm}.{fmt}"
                    m = run_measured([sys.executable, "-m", "chunkyard.cli", "restore", point_id, "--disk", disk_id,
                                      "--format", fmt, "-o", str(out), "--server", server.url, "--token",
                                      server.admin_token, "--json"], cwd=ROOT)
                    files[fmt].append({"vm": vm, "bytes": out.stat().st_size, "seconds": m.seconds,
                                       "max_rss": m.max_rss, "cpu_s": m.cpu_s})
                    out.unlink()
    details = {"streams": streams, "files": files, "meter": meter.phases, "contended": meter.contended()}
    return {"rows": rows(limits, streams, files, meter), "details": details}


def rows(limits: Limits, streams: dict[str, list[dict]], files: dict[str, list[dict]], meter: PhaseMeter) -> list[Row]:
    """Streams beside the verify rate (the server's per-byte work); restores to a file beside the disk write."""
    out = []
    for fmt, items in streams.items():
        got, seconds = sum(i["bytes"] for i in items), sum(i["seconds"] for i in items)
        data = sum(i["data_bytes"] for i in items) / sum(i["disk_bytes"] for i in items)
        out.append(Row(f"{fmt} stream (API, bytes discarded)", got / MiB / seconds, "MiB/s", limits.one.verify,
                       "verify, 1 thread", 1024, target_text="≥ 1 GiB/s",
                       note=f"{len(items)} latest points, {format_size(got)} streamed, {data:.0%} of the disks in "
                            f"data chunks (the rest zeros); {meter.cores(f'stream {fmt}')}"))
    for fmt, items in files.items():
        got, seconds = sum(i["bytes"] for i in items), sum(i["seconds"] for i in items)
        out.append(Row(f"`chunkyard restore --format {fmt}` to a file", got / MiB / seconds, "MiB/s",
                       limits.disk.write, "disk write",
                       note=f"{format_size(got)} written, fsynced and read back to verify, process start included; "
                            f"peak RSS {format_size(max(i['max_rss'] for i in items))}"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .suite import main as suite_main

    return suite_main(["--only", "restore", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
