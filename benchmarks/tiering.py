"""Tiering benchmark: copy-mode upload and move-mode cloud restore, against moto (S3) and Azurite (Azure Blob),
each beside a plain SDK transfer of the same bytes measured in the same run (ratio = ours ÷ plain).

Per store and repetition, on a fresh repository (1 MiB chunks, 8 MiB packs) and a fresh bucket:
1. ingest `--mib` of incompressible data as one point through the HTTP API (not measured);
2. upload: `POST /tiers/sync` on a copy-mode tier until the tier reports it caught up: every sealed pack goes
   up (conditional create, HEAD check, `concurrency` = 4 in parallel);
   plain: the same pack files with `put_object` / `upload_blob`, 4 threads;
3. restart the server with the tier in move mode (`move_after_days = 0`): every pack is verified and leaves
   local disk (not measured);
4. cloud restore: the raw disk streamed through the server with a cold cache (every record a ranged GET,
   several in flight), the bytes checked against the source afterwards;
   plain: the same pack objects downloaded whole with `get_object` / `download_blob`, 4 threads.

The emulators run as their own processes (moto's server, Azurite's blob service in memory) on loopback, so
neither side shares a GIL with them. The machine is shared: the server's, this process's and other processes'
cores are reported per phase, and each row is the median of `--runs` repetitions with its min–max.

    python -m benchmarks.tiering [--mib 128] [--runs 3] [--stores s3,azure] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import boto3
import zstandard
from azure.storage.blob import BlobServiceClient
from botocore.config import Config

from chunkyard.wire import make_frame
from repo_server.api.catalog import REMOTE_READ_AHEAD

from .common import (
    ROOT,
    ChunkyardServer,
    MiB,
    PhaseMeter,
    Row,
    aggregate,
    elapsed,
    format_table,
    free_port,
    machine_info,
    process_cpu_seconds,
    source_state,
    write_json,
)

OUT = ROOT / "benchmarks" / "out" / "tiering"
AZURITE = ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
CHUNK = MiB
PACK_MIB = 8
THREADS = 4  # the tier's default concurrency, and the plain transfers' threads
STORES = ("s3", "azure")


# ------------------------------------------------------------------------------------------ emulators

class Emulator:
    """moto's S3 server or Azurite's blob service as a child process on a free loopback port."""

    def __init__(self, kind: str, work: Path):
        self.kind, self.port = kind, free_port()
        if kind == "s3":
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            if not AZURITE.exists():
                raise SystemExit(f"{AZURITE} is missing: run scripts/install-system-deps.sh (npm azurite@3.35.0)")
            cmd = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
                   "--silent", "--skipApiVersionCheck", "--disableTelemetry"]
        self.log = open(work / f"{kind}-emulator.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"the {kind} emulator did not start (log: {self.log.name})") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={self.endpoint}/devstoreaccount1;")

    def env(self) -> dict[str, str]:
        return dict(AWS_ENV) if self.kind == "s3" else {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        if self.kind == "s3":
            self.s3().create_bucket(Bucket=name)
        else:
            with BlobServiceClient.from_connection_string(self.connection_string) as service:
                service.create_container(name)
        return name

    def s3(self):
        return boto3.client("s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"},
                                                                            max_pool_connections=THREADS * 2))

    def tier_toml(self, bucket: str, mode: str) -> str:
        where = (f'kind = "s3"\nbucket = "{bucket}"\nendpoint = "{self.endpoint}"\npath_style = true\n'
                 'region = "us-east-1"\n' if self.kind == "s3" else f'kind = "azure"\ncontainer = "{bucket}"\n')
        return (f"[server]\npack_size_mib = {PACK_MIB}\n\n[[tier]]\nname = \"bench\"\n{where}mode = \"{mode}\"\n"
                f"move_after_days = 0\ninterval_seconds = 3600\nconcurrency = {THREADS}\n")

    @contextmanager
    def cpu(self, meter: PhaseMeter, phase: str) -> Iterator[None]:
        """The emulator's CPU seconds during a phase, into the meter's record of it (the meter counts them
        as "other" otherwise: the emulator is a child this process does not wait for)."""
        before = process_cpu_seconds(self.proc.pid)
        yield
        meter.phases[phase]["emulator_cpu_s"] = process_cpu_seconds(self.proc.pid) - before

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


# ------------------------------------------------------------------------------------------ plain SDK transfers

def parallel(fn: Callable[..., object], items: Sequence, threads: int = THREADS) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda item: fn(*item) if isinstance(item, tuple) else fn(item), items))
    return elapsed(start)


def ranges(packs: list[Path]) -> list[tuple[Path, int, int]]:
    """Every pack in CHUNK-sized ranges: roughly the ranged GETs a cloud restore makes (one per record)."""
    return [(p, start, min(p.stat().st_size, start + CHUNK)) for p in packs for start in range(0, p.stat().st_size,
                                                                                              CHUNK)]


def plain_transfers(emulator: Emulator, packs: list[Path]) -> tuple[float, float, float]:
    """Seconds to upload the pack files to a fresh bucket, to download them back whole (THREADS threads), and
    to download them in 1 MiB ranges (REMOTE_READ_AHEAD threads, as a restore stream), with the plain SDK."""
    bucket = emulator.new_bucket()
    if emulator.kind == "s3":
        client = emulator.s3()

        def put(path: Path) -> None:
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=path.name, Body=f)

        def get(path: Path) -> None:
            client.get_object(Bucket=bucket, Key=path.name)["Body"].read()

        def get_range(path: Path, start: int, end: int) -> None:
            client.get_object(Bucket=bucket, Key=path.name, Range=f"bytes={start}-{end - 1}")["Body"].read()

        try:
            return (parallel(put, packs), parallel(get, packs),
                    parallel(get_range, ranges(packs), REMOTE_READ_AHEAD))
        finally:
            client.close()
    with BlobServiceClient.from_connection_string(emulator.connection_string) as service:
        container = service.get_container_client(bucket)

        def upload(path: Path) -> None:
            with open(path, "rb") as f:
                container.upload_blob(path.name, f, length=path.stat().st_size, max_concurrency=1)

        def download(path: Path) -> None:
            container.download_blob(path.name, max_concurrency=1).readall()

        def download_range(path: Path, start: int, end: int) -> None:
            container.download_blob(path.name, offset=start, length=end - start, max_concurrency=1).readall()

        return (parallel(upload, packs), parallel(download, packs),
                parallel(download_range, ranges(packs), REMOTE_READ_AHEAD))


# ------------------------------------------------------------------------------------------ our side

async def ingest(server: ChunkyardServer, image: bytes) -> str:
    """One point of one disk through the HTTP API."""
    cctx = zstandard.ZstdCompressor(level=1)
    frames = [make_frame(image[i : i + CHUNK], cctx) for i in range(0, len(image), CHUNK)]
    async with server.client() as client:
        session = await client.create_session(host="bench", vm={"id": "vm1", "name": "VM1"}, base=None,
                                              disks=[{"disk_id": "d0", "name": "d0.vhdx", "size": len(image)}])
        sid = session["session_id"]
        for start in range(0, len(frames), 16):
            await client.upload(sid, frames[start : start + 16])
        await client.map(sid, "d0", [(i, f.digest) for i, f in enumerate(frames)])
        return (await client.commit(sid))["point_id"]


async def sync_until(server: ChunkyardServer, done: Callable[[dict], bool], timeout: float = 600) -> dict:
    """POST /tiers/sync, then poll the tier until it has caught up with the request and `done` holds."""
    async with server.client() as client:
        requested = (await client.json("POST", "/tiers/sync"))["requested"]
        deadline = time.monotonic() + timeout
        while True:
            (tier,) = (await client.json("GET", "/tiers"))["tiers"]
            if tier["error"]:
                raise RuntimeError(f"the tier failed: {tier['error']}")
            if (tier["synced_at"] or 0) >= requested and done(tier):
                return tier
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tier did not catch up in {timeout} s: {tier}")
            await asyncio.sleep(0.02)


async def stream(server: ChunkyardServer, point_id: str) -> tuple[bytes, float]:
    async with server.client() as client:
        out = bytearray()
        start = time.perf_counter()
        async for block in client.stream_disk(point_id, "d0"):
            out += block
        return bytes(out), elapsed(start)


def one_run(emulator: Emulator, image: bytes, work: Path) -> dict:
    """Upload and cloud restore through a real server, and the plain transfers of the same packs."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{emulator.kind}-", dir=work))
    data, config, bucket = run_dir / "data", run_dir / "server.toml", emulator.new_bucket()
    config.write_text(emulator.tier_toml(bucket, "copy"))
    server = ChunkyardServer(data, log=run_dir / "server.log", config=config)
    result: dict = {"store": emulator.kind, "image_bytes": len(image)}
    try:
        server.start()
        meter = PhaseMeter(server.pid)
        point_id = asyncio.run(ingest(server, image))
        with emulator.cpu(meter, "upload"), meter("upload"):
            tier = asyncio.run(sync_until(server, lambda t: t["pending_packs"] == 0))
        packs = sorted((data / "packs").glob("*/*.pack"))
        result |= {"packs": len(packs), "pack_bytes": sum(p.stat().st_size for p in packs),
                   "upload_s": meter.phases["upload"]["wall_s"], "uploaded_bytes": tier["uploaded_bytes"],
                   "upload_phase": meter.phases["upload"], "upload_cores": cores(meter, "upload")}
        result["plain_upload_s"], result["plain_download_s"], result["plain_ranged_s"] = plain_transfers(emulator,
                                                                                                        packs)
        server.stop()

        config.write_text(emulator.tier_toml(bucket, "move"))
        server.start()
        meter = PhaseMeter(server.pid)
        asyncio.run(sync_until(server, lambda t: t["local_bytes"] == 0 and t["moved_packs"] > 0))
        if list((data / "packs").glob("*/*.pack")):
            raise RuntimeError("packs are still on local disk after the move pass")
        with emulator.cpu(meter, "cloud restore"), meter("cloud restore"):
            restored, seconds = asyncio.run(stream(server, point_id))
        if hashlib.sha256(restored).digest() != hashlib.sha256(image).digest():
            raise RuntimeError("the cloud restore differs from the source image")
        (tier,) = asyncio.run(_tiers(server))
        result |= {"restore_s": seconds, "cloud_reads": tier["cloud_reads"],
                   "cloud_read_bytes": tier["cloud_read_bytes"], "restore_phase": meter.phases["cloud restore"],
                   "restore_cores": cores(meter, "cloud restore")}
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


async def _tiers(server: ChunkyardServer) -> list[dict]:
    async with server.client() as client:
        return (await client.json("GET", "/tiers"))["tiers"]


# ------------------------------------------------------------------------------------------ report

def cores(meter: PhaseMeter, phase: str) -> str:
    """Average busy cores during a phase: server, this process, the emulator, and everything else."""
    p = meter.phases[phase]
    emulator = p["emulator_cpu_s"]
    return (f"cores: server {p['server_cpu_s'] / p['wall_s']:.1f}, client {p['client_cpu_s'] / p['wall_s']:.1f}, "
            f"emulator {emulator / p['wall_s']:.1f}, other {max(0.0, p['other_cpu_s'] - emulator) / p['wall_s']:.1f}")


def rows_of(run: dict) -> list[Row]:
    mib = run["pack_bytes"] / MiB
    name = {"s3": "S3 (moto)", "azure": "Azure Blob (Azurite)"}[run["store"]]
    sdk = {"s3": "boto3", "azure": "azure-storage-blob"}[run["store"]]
    return [
        Row(f"{name}: upload, copy-mode sync", mib / run["upload_s"], "MiB/s", mib / run["plain_upload_s"],
            f"plain {sdk} upload, {THREADS} threads",
            note=f"{run['packs']} packs, {mib:.0f} MiB; {run['upload_cores']}"),
        Row(f"{name}: cloud restore, raw stream, cold cache", run["image_bytes"] / MiB / run["restore_s"], "MiB/s",
            mib / run["plain_download_s"], f"plain {sdk} download, {THREADS} threads",
            note=f"{run['cloud_reads']} ranged GETs; plain {sdk} in 1 MiB ranged GETs, {REMOTE_READ_AHEAD} threads: "
                 f"{mib / run['plain_ranged_s']:.0f} MiB/s; {run['restore_cores']}"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tiering", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="size of the backed-up disk (default 128 MiB)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per store (default 3; median reported)")
    parser.add_argument("--stores", default=",".join(STORES), help="s3, azure or both (default both)")
    parser.add_argument("--json", type=Path, default=OUT / "tiering.json", help="where to write every run")
    args = parser.parse_args(argv)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not args.stores or set(args.stores) - set(STORES) or args.runs < 1 or not 8 <= args.mib <= 65536:
        parser.error("--stores takes s3 and/or azure, --runs ≥ 1, --mib 8-65536")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(AWS_ENV)  # boto3 and the server processes read credentials from the environment
    image = random.Random(7).randbytes(args.mib * MiB)  # incompressible: pack bytes ≈ disk bytes
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiering-", dir=OUT))
    started, machine = time.time(), machine_info()  # the load average before the run
    runs: list[dict] = []
    try:
        for kind in args.stores:
            emulator = Emulator(kind, work)
            os.environ.update(emulator.env())
            try:
                for n in range(args.runs):
                    print(f"{kind}: run {n + 1} of {args.runs} ...", flush=True)
                    runs.append(one_run(emulator, image, work))
            finally:
                emulator.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = aggregate([rows_of(r) for r in runs])
    table = format_table(rows, limit_head="plain SDK, same bytes, same run")
    print(table)
    write_json(args.json, {"benchmark": "tiering", "args": {"mib": args.mib, "runs": args.runs, "stores": args.stores},
                           "machine": machine, "source": source_state(), "seconds": round(time.time() - started),
                           "rows": [r.to_json() for r in rows], "runs": runs, "table": table})
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
