"""Storage-engine benchmark: a real `chunkyard serve` process driven over loopback HTTP from this process.

Measures the DESIGN §7 engine targets: unique-data ingest (the server alone on pre-compressed frames, and
end to end with the client's BLAKE3 and zstd), `missing` queries, synthetic-full commits of a 1 TiB virtual
disk at 0 % and 1 % change, raw restore streaming, and the server's peak RSS. Each number stands beside a
limit of this machine measured in the same run (benchmarks.common), because the shared 2-core guest varies
between runs.

    python -m benchmarks.engine            # 1 GiB per ingest run, 1 TiB virtual disk: about 40 s here
    python -m benchmarks.engine --quick    # 128 MiB per ingest run, same 1 TiB virtual disk: about 15 s
    python -m benchmarks.engine --encryption-cost --ingest-mib 256 --reps 3
                                           # the cost of encryption (issue #10): the same data stored and read
                                           # in an unencrypted and an encrypted repository, in-process and
                                           # over HTTP, alternating, each repetition in fresh repositories
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aiohttp
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from chunkyard.wire import (
    CODEC_RAW,
    CODEC_ZSTD,
    FRAME_HEADER,
    MAP_RECORD,
    ZERO,
    Client,
    Frame,
    bitmap_get,
    digest,
    encode_frames,
    is_zero,
)
from repo_server.engine import Repository, init_repository
from repo_server.engine.chunk_store import NewChunk

from .common import (
    ChunkyardServer,
    CodecRates,
    DiskRates,
    LoopbackRates,
    MiB,
    PhaseMeter,
    Row,
    disk_rates,
    elapsed,
    file_corpus,
    format_table,
    loopback_http_rates,
    machine_info,
    markdown_table,
    measure_codecs,
    post_in_pieces,
    process_cpu_seconds,
    rocksdb_multiget_rate,
    source_state,
    vm_like_chunks,
    write_json,
)

CHUNK = MiB
DISK = "d0"
HOST = "bench-host"
MISSING_BATCH = 65536
PAGE_ENTRIES = 4096  # digests per manifest page (DESIGN §2)
TINY_FRAMES_PER_REQUEST = 4096
MAP_RECORDS_PER_REQUEST = 262_144  # 10 MiB map bodies
INGEST, E2E, MISSING, COMMITS, RESTORE = "ingest, server only", "ingest, end to end", "missing", "commits", "restore"
MISSING_SCOPED = "missing, tenant-scoped"
DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "engine.json"


@dataclass(frozen=True)
class Sizes:
    ingest_mib: int = 1024
    """Disk size of each ingest run; the server-only and end-to-end runs each get their own unique disk."""
    present_digests: int = 262_144
    """Distinct small chunks stored so that half of every `missing` batch is present."""
    missing_calls: int = 8
    virtual_gib: int = 1024
    commit_reps: int = 5
    corpus_mib: int = 96
    disk_probe_mib: int = 256
    loopback_mib: int = 1024
    in_flight: int = 4
    body_mib: int = 24


QUICK = Sizes(ingest_mib=128, present_digests=65_536, missing_calls=4, commit_reps=3, corpus_mib=32,
              disk_probe_mib=64, loopback_mib=256)


def entries_of(chunks: Sequence[bytes], frames: Sequence[Frame]) -> list[tuple[int, bytes]]:
    """Map records of a disk: ZERO for zero chunks, else the digest of the next frame (frames skip zeros)."""
    digests = iter(f.digest for f in frames)
    return [(i, ZERO if is_zero(c) else next(digests)) for i, c in enumerate(chunks)]


def bodies_of(frames: Sequence[Frame], limit: int) -> list[bytes]:
    """Upload bodies of whole frames, each filled up to about `limit` bytes."""
    bodies, batch, size = [], [], 0
    for f in frames:
        batch.append(f)
        size += FRAME_HEADER.size + len(f.payload)
        if size >= limit:
            bodies.append(encode_frames(batch))
            batch, size = [], 0
    if batch:
        bodies.append(encode_frames(batch))
    return bodies


async def new_session(client: Client, vm_id: str, size: int, base: str | None) -> str:
    session = await client.create_session(host=HOST, vm={"id": vm_id, "name": vm_id}, base=base,
                                          disks=[{"disk_id": DISK, "name": f"{DISK}.vhdx", "size": size}])
    return session["session_id"]


# ------------------------------------------------------------------------------------------ ingest

async def ingest_server_only(server: ChunkyardServer, client: Client, chunks: list[bytes], frames: list[Frame],
                             vm_id: str, sizes: Sizes) -> dict:
    """Upload frames compressed before the clock starts: what the server sustains when the collector
    has already done its part. Bodies go out in 1 MiB pieces so the client's transport is not the limit."""
    sid = await new_session(client, vm_id, len(chunks) * CHUNK, None)
    bitmap = await client.missing(sid, [f.digest for f in frames])
    if not all(bitmap_get(bitmap, i) for i in range(len(frames))):
        raise RuntimeError("the server already holds chunks of a fresh run: the data is not unique")
    bodies = bodies_of(frames, sizes.body_mib * MiB)
    url = f"{server.url}/api/v1/sessions/{sid}/chunks"
    gate = asyncio.Semaphore(sizes.in_flight)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.admin_token}"}) as http:

        async def send(body: bytes) -> dict:
            async with gate:
                return json.loads(await post_in_pieces(http, url, body))

        start = time.perf_counter()
        results = await asyncio.gather(*(send(b) for b in bodies))
        upload_s = elapsed(start)
    if sum(r["stored"] for r in results) != len(frames):
        raise RuntimeError(f"stored {sum(r['stored'] for r in results)} of {len(frames)} unique chunks")
    start = time.perf_counter()
    await client.map(sid, DISK, entries_of(chunks, frames))
    map_s = elapsed(start)
    start = time.perf_counter()
    point = await client.commit(sid)
    commit_s = elapsed(start)
    return {"point_id": point["point_id"], "disk_bytes": len(chunks) * CHUNK,
            "raw_bytes": sum(f.raw_len for f in frames), "body_bytes": sum(map(len, bodies)),
            "requests": len(bodies), "in_flight": sizes.in_flight, "upload_s": upload_s, "map_s": map_s,
            "commit_s": commit_s}


_local = threading.local()


def _hash(chunks: Sequence[bytes]) -> list[bytes]:
    return [ZERO if is_zero(c) else digest(c) for c in chunks]


def _compress(pairs: Sequence[tuple[bytes, bytes]]) -> list[Frame]:
    """zstd-1 frames for (digest, chunk) pairs, raw where zstd does not shrink; one compressor per thread."""
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=1)
    out = []
    for d, chunk in pairs:
        packed = cctx.compress(chunk)
        out.append(Frame(d, CODEC_ZSTD, len(chunk), packed) if len(packed) < len(chunk)
                   else Frame(d, CODEC_RAW, len(chunk), chunk))
    return out


async def ingest_end_to_end(client: Client, chunks: list[bytes], vm_id: str, sizes: Sizes,
                            group: int = 32) -> dict:
    """A collector's whole backup of a disk in memory, on the clock: session, then per 32-chunk group
    BLAKE3 → `missing` → zstd-1 (2 worker threads) → `Client.upload`, `in_flight` groups at a time,
    then map and commit."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(2, thread_name_prefix="collector")
    gate = asyncio.Semaphore(sizes.in_flight)
    entries: list[tuple[int, bytes]] = []
    counts = {"stored": 0, "body_bytes": 0, "requests": 0}

    async def group_task(sid: str, first: int) -> None:
        async with gate:
            part = chunks[first : first + group]
            digests = await loop.run_in_executor(pool, _hash, part)
            entries.extend(enumerate(digests, first))
            todo = {d: c for d, c in zip(digests, part, strict=True) if d != ZERO}
            asked = list(todo)
            if not asked:
                return
            bitmap = await client.missing(sid, asked)
            send = [(d, todo[d]) for n, d in enumerate(asked) if bitmap_get(bitmap, n)]
            half = len(send) // 2
            parts = await asyncio.gather(*(loop.run_in_executor(pool, _compress, p)
                                           for p in (send[:half], send[half:]) if p))
            frames = [f for p in parts for f in p]
            if frames:
                result = await client.upload(sid, frames)  # awaited first: `x += await` loses updates
                counts["stored"] += result["stored"]
                counts["body_bytes"] += sum(FRAME_HEADER.size + len(f.payload) for f in frames)
                counts["requests"] += 1

    try:
        start = time.perf_counter()
        sid = await new_session(client, vm_id, len(chunks) * CHUNK, None)
        await asyncio.gather(*(group_task(sid, first) for first in range(0, len(chunks), group)))
        await client.map(sid, DISK, sorted(entries))
        point = await client.commit(sid)
        seconds = elapsed(start)
    finally:
        pool.shutdown()
    raw = sum(len(c) for c in chunks if not is_zero(c))
    if counts["stored"] != sum(1 for c in chunks if not is_zero(c)):
        raise RuntimeError(f"end to end stored {counts['stored']} chunks; expected every non-zero chunk")
    return {"point_id": point["point_id"], "raw_bytes": raw, "seconds": seconds} | counts


# ------------------------------------------------------------------------------------------ missing

async def missing_queries(client: Client, vm_id: str, sizes: Sizes, rng: random.Random, run: str) -> dict:
    """Sequential `missing` calls of 65536 digests, half of them stored, half unknown.

    To have hundreds of thousands of distinct present digests without hundreds of GiB of data, the index is
    first seeded with small chunks (64 bytes each: a valid short last chunk, never mapped), stamped with the
    run id so that they are new even in a repository an earlier run filled.
    """
    sid = await new_session(client, vm_id, CHUNK, None)
    present = []
    bodies = []
    for start in range(0, sizes.present_digests, TINY_FRAMES_PER_REQUEST):
        frames = []
        for _ in range(min(TINY_FRAMES_PER_REQUEST, sizes.present_digests - start)):
            data = run.encode() + rng.randbytes(64 - len(run))
            frames.append(Frame(digest(data), CODEC_RAW, len(data), data))
        present += [f.digest for f in frames]
        bodies.append(encode_frames(frames))
    gate = asyncio.Semaphore(sizes.in_flight)

    async def seed(body: bytes) -> int:
        async with gate:
            return json.loads(await client.binary("POST", f"/sessions/{sid}/chunks", body))["stored"]

    start = time.perf_counter()
    stored = sum(await asyncio.gather(*(seed(b) for b in bodies)))
    seed_s = elapsed(start)
    if stored != len(present):
        raise RuntimeError(f"seeded {stored} of {len(present)} small chunks")
    times = []
    for _ in range(sizes.missing_calls):
        half = MISSING_BATCH // 2
        query = rng.sample(present, half) + [rng.randbytes(32) for _ in range(MISSING_BATCH - half)]
        rng.shuffle(query)
        start = time.perf_counter()
        bitmap = await client.missing(sid, query)
        times.append(elapsed(start))
        if int.from_bytes(bitmap, "little").bit_count() != MISSING_BATCH - half:
            raise RuntimeError("`missing` answered a wrong number of absent digests")
    await client.abort(sid)
    return {"present": len(present), "seed_s": seed_s, "call_s": times,
            "digests_per_s": MISSING_BATCH * len(times) / sum(times)}


# ------------------------------------------------------------------------------------------ commits

def map_bodies(entries: Sequence[tuple[int, bytes]]) -> list[bytes]:
    return [b"".join(MAP_RECORD.pack(i, d) for i, d in entries[start : start + MAP_RECORDS_PER_REQUEST])
            for start in range(0, len(entries), MAP_RECORDS_PER_REQUEST)]


async def synthetic_full(client: Client, digests: list[bytes], vm_id: str, sizes: Sizes,
                         rng: random.Random) -> dict:
    """Commits of a large virtual disk whose manifest cycles over real 1 MiB chunks.

    A full map of every index, its commit, then incrementals of base=latest: with nothing mapped (0 %) and
    with 1 % of indices remapped to other stored chunks (map sent before the clock starts). The final
    manifest is read back and compared, so the timings are of commits that did their work.
    """
    n = sizes.virtual_gib * 1024
    k = len(digests)
    current = array("I", (i % k for i in range(n)))
    bodies = map_bodies([(i, digests[c]) for i, c in enumerate(current)])
    sid = await new_session(client, vm_id, n * CHUNK, None)
    start = time.perf_counter()
    for body in bodies:
        await client.binary("POST", f"/sessions/{sid}/disks/{DISK}/map", body)
    full_map_s = elapsed(start)
    start = time.perf_counter()
    await client.commit(sid)
    full_commit_s = elapsed(start)

    zero_s = []
    for _ in range(sizes.commit_reps):
        sid = await new_session(client, vm_id, n * CHUNK, "latest")
        start = time.perf_counter()
        point = await client.commit(sid)
        zero_s.append(elapsed(start))
        if point["stats"]["changed_bytes"] != 0:
            raise RuntimeError(f"a commit with nothing mapped changed {point['stats']['changed_bytes']} bytes")

    changed = round(n * 0.01)
    one_map_s, one_s, touched = [], [], 0
    for _ in range(sizes.commit_reps):
        sid = await new_session(client, vm_id, n * CHUNK, "latest")
        entries = []
        for i in sorted(rng.sample(range(n), changed)):
            current[i] = (current[i] + 1) % k
            entries.append((i, digests[current[i]]))
        touched = max(touched, len({i // PAGE_ENTRIES for i, _ in entries}))
        start = time.perf_counter()
        for body in map_bodies(entries):
            await client.binary("POST", f"/sessions/{sid}/disks/{DISK}/map", body)
        one_map_s.append(elapsed(start))
        start = time.perf_counter()
        point = await client.commit(sid)
        one_s.append(elapsed(start))
        if point["stats"]["changed_bytes"] != changed * CHUNK:
            raise RuntimeError(f"a 1 % commit changed {point['stats']['changed_bytes']} bytes, "
                               f"expected {changed * CHUNK}")
    manifest = await client.disk_map(point["point_id"], DISK)
    if manifest != b"".join(digests[c] for c in current):
        raise RuntimeError("the last synthetic full's manifest differs from what was mapped")
    return {"chunks": n, "pages": -(-n // PAGE_ENTRIES), "touched_pages": touched, "distinct_digests": k,
            "changed": changed,
            "full_map_s": full_map_s, "full_commit_s": full_commit_s, "zero_s": zero_s,
            "one_map_s": one_map_s, "one_s": one_s}


# ------------------------------------------------------------------------------------------ restore

async def restore_raw(client: Client, point_id: str, size: int) -> float:
    """Seconds to stream a whole raw disk through `Client.stream_disk`, discarding the bytes."""
    got = 0
    start = time.perf_counter()
    async for block in client.stream_disk(point_id, DISK):
        got += len(block)
    seconds = elapsed(start)
    if got != size:
        raise RuntimeError(f"restore streamed {got} bytes of {size}")
    return seconds


# ------------------------------------------------------------------------------------------ encryption cost

MODES = ("plain", "encrypted")
ENGINE_BATCH = 24  # chunks per put: about one upload body
ENCRYPTION_TARGET = 0.10  # DESIGN §7 / issue #10: less than 10 % throughput loss


def engine_store_and_read(data: Path, frames: Sequence[Frame], encrypt: bool) -> dict:
    """In-process, no HTTP: put the pre-compressed frames into a fresh repository (chunk ids, sealing, pack
    appends, one fdatasync per batch, index) in upload-sized batches, then read every chunk back (open,
    decompress, check the id) with the page cache warm. Wall and CPU seconds (this process) of each."""
    init_repository(data, encrypt=encrypt)
    repo = Repository(data)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, len(frames), ENGINE_BATCH):
            batch = frames[first : first + ENGINE_BATCH]
            ids = repo.chunk_ids([f.digest for f in batch])
            repo.chunks.put([NewChunk(i, f.codec, f.raw_len, f.payload) for i, f in zip(ids, batch, strict=True)])
        store_s, store_cpu = elapsed(start), time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        locations = repo.index.locate_many(repo.chunk_ids([f.digest for f in frames]))
        got = 0
        with repo.chunks.reader() as reader:
            for loc in locations:
                assert loc is not None
                got += len(reader.read(loc))
        read_s, read_cpu = elapsed(start), time.process_time() - cpu
        if got != sum(f.raw_len for f in frames):
            raise RuntimeError(f"read back {got} bytes of {sum(f.raw_len for f in frames)}")
        return {"store_s": store_s, "read_s": read_s, "store_cpu": store_cpu, "read_cpu": read_cpu,
                "stored_bytes": repo.chunks.stored_bytes}
    finally:
        repo.close()


async def http_ingest_and_restore(data: Path, log: Path, chunks: list[bytes], frames: list[Frame],
                                  sizes: Sizes, encrypt: bool) -> dict:
    """Through a real server over a fresh repository: the server-only ingest of pre-compressed frames
    (upload, map, commit) and the raw restore stream of the resulting point; wall seconds, and the server
    process's CPU seconds of each (the whole ingest including map and commit; the restore)."""
    if not encrypt:  # ChunkyardServer reuses an existing repository; `chunkyard init` encrypts by default
        subprocess.run([sys.executable, "-m", "chunkyard.cli", "init", "--data", str(data), "--no-encrypt"],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    with ChunkyardServer(data, log=log) as server:
        async with server.client() as client:
            if (await client.repository())["encryption"] != ("aes-256-gcm" if encrypt else "none"):
                raise RuntimeError(f"{data} is not the repository this run asked for")
            cpu = process_cpu_seconds(server.pid)
            ingest = await ingest_server_only(server, client, chunks, frames, "bench-encryption", sizes)
            ingest_cpu, cpu = process_cpu_seconds(server.pid) - cpu, process_cpu_seconds(server.pid)
            restore_s = await restore_raw(client, ingest["point_id"], ingest["disk_bytes"])
            restore_cpu = process_cpu_seconds(server.pid) - cpu
    return {"upload_s": ingest["upload_s"], "restore_s": restore_s, "ingest_cpu": ingest_cpu,
            "restore_cpu": restore_cpu, "disk_bytes": ingest["disk_bytes"]}


def aes_gcm_rate(frames: Sequence[Frame]) -> float:
    """MiB per CPU-second of AES-256-GCM sealing the compressed payloads on one thread: the cipher's own share."""
    aead = AESGCM(secrets.token_bytes(32))
    nonce = secrets.token_bytes(12)
    cpu = time.process_time()
    for f in frames:
        aead.encrypt(nonce, f.payload, b"")  # one nonce is fine for a speed probe, never for data
    return sum(len(f.payload) for f in frames) / MiB / (time.process_time() - cpu)


def encryption_cost(sizes: Sizes, reps: int, tmp: Path, run: str) -> dict:
    """Each repetition measures both modes on the same data, in alternating order, in fresh repositories."""
    corpus = file_corpus(sizes.corpus_mib * MiB)
    chunks = vm_like_chunks(sizes.ingest_mib, CHUNK, corpus=corpus, seed=3, nonce=run.encode() + b"/encryption")
    del corpus
    codec, frames = measure_codecs(chunks)
    raw = sum(f.raw_len for f in frames) / MiB
    disk = len(chunks) * CHUNK / MiB
    reps_out: list[dict] = []
    for rep in range(reps):
        order = MODES if rep % 2 == 0 else MODES[::-1]
        one: dict[str, dict] = {}
        for mode in order:
            print(f"repetition {rep + 1}/{reps}: {mode} ...", flush=True)
            encrypt = mode == "encrypted"
            engine = engine_store_and_read(tmp / f"engine-{rep}-{mode}", frames, encrypt)
            http = asyncio.run(http_ingest_and_restore(tmp / f"http-{rep}-{mode}", tmp / f"server-{rep}-{mode}.log",
                                                       chunks, frames, sizes, encrypt))
            one[mode] = {"store": raw / engine["store_s"], "read": raw / engine["read_s"],
                         "ingest": raw / http["upload_s"], "restore": disk / http["restore_s"],
                         "store_cpu": raw / engine["store_cpu"], "read_cpu": raw / engine["read_cpu"],
                         "ingest_cpu": raw / http["ingest_cpu"], "restore_cpu": disk / http["restore_cpu"],
                         "stored_bytes": engine["stored_bytes"]}
        reps_out.append(one)
    return {"raw_mib": raw, "disk_mib": disk, "codec": asdict(codec), "aes_gcm": aes_gcm_rate(frames),
            "reps": reps_out}


ENCRYPTION_ROWS = {
    "store": "store, in-process (ids, seal, pack append, fdatasync per 24 chunks, index)",
    "read": "read, in-process (open, decompress, check id; page cache warm)",
    "ingest": "ingest over HTTP (server only, pre-compressed frames; upload)",
    "restore": "raw restore stream over HTTP",
}


def encryption_table(result: dict) -> tuple[str, list[dict]]:
    """Median and min–max per mode, and the encrypted/plain ratio per repetition (its median and range).
    Each measurement twice: MiB per wall-clock second (what the target is about) and MiB per CPU-second of
    the process doing the work (what a busy shared machine disturbs least)."""
    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"

    lines, rows = [], []
    for key, name in [(k, f"{n}, wall") for k, n in ENCRYPTION_ROWS.items()] + \
                     [(f"{k}_cpu", f"{n}, per CPU-second") for k, n in ENCRYPTION_ROWS.items()]:
        plain = [r["plain"][key] for r in result["reps"]]
        sealed = [r["encrypted"][key] for r in result["reps"]]
        ratios = [s / p for s, p in zip(sealed, plain, strict=True)]
        ratio = statistics.median(ratios)
        loss = 1 - ratio
        verdict = "PASS" if loss < ENCRYPTION_TARGET else "FAIL"
        lines.append([name, spread(plain), spread(sealed), f"{ratio:.3f} ({min(ratios):.3f}–{max(ratios):.3f})",
                      f"{loss:+.1%}", verdict])
        rows.append({"name": name, "plain": plain, "encrypted": sealed, "ratios": ratios, "median_ratio": ratio,
                     "loss": loss, "passed": loss < ENCRYPTION_TARGET})
    head = ["MiB/s (median, min–max)", "unencrypted", "encrypted", "encrypted / unencrypted (median, min–max)",
            "loss", "< 10 %"]
    return markdown_table(head, lines), rows


def encryption_main(args: argparse.Namespace, sizes: Sizes, argv: Sequence[str] | None) -> int:
    began = time.perf_counter()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="chunkyard-bench-enc-") as tmp:
        print(f"test data: {sizes.ingest_mib} MiB of VM-like chunks, {args.reps} repetitions ...", flush=True)
        result = encryption_cost(sizes, args.reps, Path(tmp), secrets.token_hex(4))
    table, rows = encryption_table(result)
    codec = result["codec"]
    print(f"\nEncryption cost ({info['cpu']}, {info['nproc']} cores; {result['raw_mib']:.0f} MiB non-zero data "
          f"in a {result['disk_mib']:.0f} MiB disk, zstd-1 ratio {codec['ratio']:.2f}; AES-256-GCM alone "
          f"{result['aes_gcm']:,.0f} MiB per CPU-second of compressed data):\n")
    print(table)
    json_path = args.json if args.json != DEFAULT_JSON else DEFAULT_JSON.with_name("encryption.json")
    write_json(json_path, {
        "benchmark": "engine --encryption-cost", "command": " ".join(
            [Path(sys.executable).name, "-m", "benchmarks.engine", *(argv if argv is not None else sys.argv[1:])]),
        "sizes": asdict(sizes), "reps": args.reps, "machine": info, "source": source_state(),
        "duration_s": elapsed(began), "rows": rows, "details": result,
    })
    print(f"\n{sum(not r['passed'] for r in rows)} row(s) over the 10 % target (median of the per-repetition "
          f"ratios); JSON: {json_path}")
    return 0


# ------------------------------------------------------------------------------------------ report

def build_rows(codec: CodecRates, disk: DiskRates, net: LoopbackRates, rdb: float, result: dict,
               meter: PhaseMeter) -> tuple[list[Row], list[Row]]:
    """(machine-limit rows, engine rows) for the table and the JSON."""
    mibs = "MiB/s"
    limits = [
        Row("zstd-1 compress, 1 core", codec.compress, mibs, note=f"ratio {codec.ratio:.2f} on the ingest data"),
        Row("zstd-1 decompress, 1 core", codec.decompress, mibs),
        Row("BLAKE3, 1 thread", codec.blake3, mibs),
        Row("verify = decompress + BLAKE3, 1 core", codec.verify, mibs, note="the server's per-byte work"),
        Row("disk write, fdatasync every 32 MiB", disk.write, mibs, note="data dir's filesystem"),
        Row("fdatasync of a 4 KiB append", disk.fdatasync_ms, "ms", note="median of 50"),
        Row("loopback HTTP POST, 1 MiB writes, 4 in flight", net.upload, mibs, note="aiohttp → aiohttp sink"),
        Row("loopback HTTP POST, one write per body", net.upload_one_write, mibs,
            note="how chunkyard.wire.Client sends"),
        Row("loopback HTTP GET stream", net.download, mibs),
        Row("RocksDB multi-get, 65536 keys, half present", rdb, "keys/s", note="in-process, flushed"),
    ]
    ingest, e2e, missing, commits = result["ingest"], result["e2e"], result["missing"], result["commits"]
    restore_s, memory = result["restore_s"], meter.phases[RESTORE]
    ms = [1000 * s for s in commits["zero_s"]], [1000 * s for s in commits["one_s"]]

    def commit_floor(read: int, written: int) -> float:
        """ms a durable commit cannot beat here: manifest pages read and written at the verify rate, one group
        commit for the new pages, and the point file, its directory and the index synced."""
        page_mib = PAGE_ENTRIES * 32 / MiB
        return (read + written) * page_mib / codec.verify * 1000 + (3 + (written > 0)) * disk.fdatasync_ms

    tib = commits["chunks"] * CHUNK / (1 << 40)
    touched = commits["touched_pages"]
    vdisk = f"{tib:g} TiB" if tib >= 1 else f"{commits['chunks'] // 1024} GiB"
    rows = [
        Row("ingest, server only (pre-compressed frames)", ingest["raw_bytes"] / MiB / ingest["upload_s"], mibs,
            codec.verify, "verify, 1 core",
            note=f"{ingest['raw_bytes'] / MiB:.0f} MiB unique, {ingest['requests']} bodies, "
                 f"{ingest['in_flight']} in flight; server "
                 f"{meter.server_cpu_per_gib(INGEST, ingest['raw_bytes']):.1f} core-s/GiB; {meter.cores(INGEST)}"),
        Row("ingest, end to end (client BLAKE3 + zstd-1)", e2e["raw_bytes"] / MiB / e2e["seconds"], mibs,
            codec.compress, "zstd-1 compress, 1 core", 0.7 * codec.compress, target_text="≥ 0.7 × limit",
            note=f"{e2e['raw_bytes'] / MiB:.0f} MiB: session, missing, upload, map, commit; server "
                 f"{meter.server_cpu_per_gib(E2E, e2e['raw_bytes']):.1f} core-s/GiB; {meter.cores(E2E)}"),
        Row("`missing`, 65536 digests, half present", missing["digests_per_s"], "digests/s", rdb,
            "RocksDB multi-get", 500_000, target_text="≥ 500,000",
            note=f"{len(missing['call_s'])} calls; index seeded with {missing['present']:,} small chunks"),
        Row("`missing`, tenant-scoped token (+ possession)", result["missing_scoped"]["digests_per_s"], "digests/s",
            rdb / 2, "2 RocksDB multi-gets", note="present = stored and possessed by the tenant"),
        Row(f"map, full {vdisk} disk", commits["chunks"] / commits["full_map_s"], "records/s", rdb,
            "RocksDB multi-get", note=f"{commits['chunks']:,} records in {commits['full_map_s']:.2f} s, "
                                      f"cycling over {commits['distinct_digests']} digests"),
        Row(f"commit, first full of {vdisk}", commits["full_commit_s"] * 1000, "ms",
            commit_floor(0, commits["pages"]), f"floor, {commits['pages']} new pages",
            note=f"{commits['pages']} manifest pages"),
        Row(f"commit, {vdisk} at 0 % change", statistics.median(ms[0]), "ms", commit_floor(0, 0),
            "floor, 3 fdatasyncs", 20, False, "≤ 20 ms", note=f"median of {len(ms[0])}, max {max(ms[0]):.1f} ms"),
        Row(f"map, 1 % of {vdisk} ({commits['changed']:,} records)",
            statistics.median(commits["one_map_s"]) * 1000, "ms", note="median"),
        Row(f"commit, {vdisk} at 1 % change", statistics.median(ms[1]), "ms", commit_floor(touched, touched),
            f"floor, {touched} pages rewritten", 500, False, "≤ 500 ms",
            note=f"median of {len(ms[1])}, max {max(ms[1]):.0f} ms"),
        Row("restore, raw stream", ingest["disk_bytes"] / MiB / restore_s, mibs, codec.verify, "verify, 1 core",
            1024, target_text="≥ 1 GiB/s",
            note=f"{ingest['disk_bytes'] / MiB:.0f} MiB incl. zero chunks, warm page cache; {meter.cores(RESTORE)}"),
        Row("server peak RSS (VmHWM)", memory["VmHWM"] / MiB, "MiB", target=512, higher_is_better=False,
            target_text="≤ 512 MiB at 10 M chunks",
            note=f"only {result['repository']['chunk_count']:,} chunks stored: a FAIL is conclusive, a PASS is not"),
    ]
    if tib < 1:
        for row in rows:
            if "change" in row.name:
                row.target, row.target_text = None, f"({row.target_text} at 1 TiB)"
    return limits, rows


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: about 15 s")
    p.add_argument("--ingest-mib", type=int, help="disk size of each ingest run (default 1024, quick 128)")
    p.add_argument("--virtual-gib", type=int, help="virtual disk of the commit test (default 1024)")
    p.add_argument("--present-digests", type=int, help="small chunks seeded for `missing` (default 262144)")
    p.add_argument("--missing-calls", type=int, help="sequential `missing` calls (default 8)")
    p.add_argument("--commit-reps", type=int, help="repetitions of each incremental commit (default 5)")
    p.add_argument("--data", type=Path, help="repository directory to use (created if empty; kept)")
    p.add_argument("--encryption-cost", action="store_true",
                   help="only measure the cost of encryption: store, read, HTTP ingest and raw restore, unencrypted "
                        "vs encrypted on the same data (uses --ingest-mib and --reps)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of --encryption-cost (default 3)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    overrides = {name: getattr(args, name) for name in
                 ("ingest_mib", "virtual_gib", "present_digests", "missing_calls", "commit_reps")}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if (sizes.ingest_mib < 8 or sizes.virtual_gib < 1 or sizes.present_digests < MISSING_BATCH // 2
            or sizes.missing_calls < 1 or sizes.commit_reps < 1 or args.reps < 1):
        p.error(f"sizes too small: ingest ≥ 8 MiB, virtual ≥ 1 GiB, present digests ≥ {MISSING_BATCH // 2}, "
                "calls and repetitions ≥ 1")
    return args, sizes


async def drive(server: ChunkyardServer, meter: PhaseMeter, sizes: Sizes, ingest_chunks: list[bytes],
                frames: list[Frame], e2e_chunks: list[bytes], run: str) -> dict:
    """Every timed phase against the running server, in order."""
    rng = random.Random(11)
    async with server.client() as client:
        if (await client.repository())["chunk_size"] != CHUNK:
            raise SystemExit(f"the repository at {server.data} does not use 1 MiB chunks")
        with meter(INGEST):
            ingest = await ingest_server_only(server, client, ingest_chunks, frames, f"bench-ingest-{run}", sizes)
        with meter(E2E):
            e2e = await ingest_end_to_end(client, e2e_chunks, f"bench-e2e-{run}", sizes)
        with meter(MISSING):
            missing = await missing_queries(client, f"bench-missing-{run}", sizes, rng, run)
        # The same for a tenant-scoped collector: "present" also needs the tenant's possession (one more
        # multi-get); its uploads of the seed chunks are what records that possession.
        scoped = (await client.create_token("collector", f"bench {run}", tenant=f"bench-{run}"))["token"]
        async with Client(server.url, scoped) as tenant_client:
            with meter(MISSING_SCOPED):
                missing_scoped = await missing_queries(tenant_client, f"bench-missing-t-{run}", sizes, rng,
                                                       run + "t")
        with meter(COMMITS):
            commits = await synthetic_full(client, [f.digest for f in frames], f"bench-vdisk-{run}", sizes, rng)
        with meter(RESTORE):
            restore_s = await restore_raw(client, ingest["point_id"], ingest["disk_bytes"])
        repository = await client.repository()
    return {"ingest": ingest, "e2e": e2e, "missing": missing, "missing_scoped": missing_scoped, "commits": commits,
            "restore_s": restore_s, "repository": repository}


def main(argv: Sequence[str] | None = None) -> int:
    args, sizes = parse_args(argv)
    if args.encryption_cost:
        return encryption_main(args, sizes, argv)
    began = time.perf_counter()
    info = machine_info()
    run = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="chunkyard-bench-") as tmp:
        data = args.data.resolve() if args.data else Path(tmp) / "data"
        print(f"test data: 2 × {sizes.ingest_mib} MiB of VM-like chunks ...", flush=True)
        corpus = file_corpus(sizes.corpus_mib * MiB)
        nonce = run.encode()
        ingest_chunks = vm_like_chunks(sizes.ingest_mib, CHUNK, corpus=corpus, seed=1, nonce=nonce + b"/ingest")
        e2e_chunks = vm_like_chunks(sizes.ingest_mib, CHUNK, corpus=corpus, seed=2, nonce=nonce + b"/e2e")
        del corpus
        with ChunkyardServer(data, log=Path(tmp) / "server.log" if not args.data else None) as server:
            meter = PhaseMeter(server.pid)  # the server idles during the probes: other CPU use shows up
            with meter("limits: zstd and BLAKE3"):
                codec, frames = measure_codecs(ingest_chunks)
            disk = disk_rates(data, sizes.disk_probe_mib * MiB)  # not metered: writeback is kernel "other" CPU
            with meter("limits: RocksDB"):
                rdb = rocksdb_multiget_rate(Path(tmp))
            print("limits: loopback HTTP ...", flush=True)  # not metered: its sink process is "other" CPU
            net = loopback_http_rates(sizes.loopback_mib * MiB)
            result = asyncio.run(drive(server, meter, sizes, ingest_chunks, frames, e2e_chunks, run))
    limits, rows = build_rows(codec, disk, net, rdb, result, meter)
    print(f"\nMachine limits ({info['cpu']}, {info['nproc']} cores, Python {info['python']}):\n")
    print(format_table(limits))
    print("\nEngine:\n")
    print(format_table(rows))
    duration = elapsed(began)
    write_json(args.json, {
        "benchmark": "engine", "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.engine",
                                                     *(argv if argv is not None else sys.argv[1:])]),
        "sizes": asdict(sizes), "machine": info, "source": source_state(), "duration_s": duration,
        "contended_phases": meter.contended(),
        "limits": [r.to_json() for r in limits], "rows": [r.to_json() for r in rows],
        "repository": result["repository"], "phases": meter.phases,
        "details": {k: result[k] for k in ("ingest", "e2e", "missing", "missing_scoped", "commits", "restore_s")},
        "data": {"zero_share": sum(map(is_zero, ingest_chunks)) / len(ingest_chunks), "zstd1_ratio": codec.ratio},
    })
    failed = [r.name for r in rows if r.passed is False]
    if meter.contended():
        print(f"\nWARNING: other processes used CPU during: {', '.join(meter.contended())} (see the notes); "
              "numbers of those phases are low")
    print(f"\n{len(failed)} target(s) missed; {duration:.0f} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
