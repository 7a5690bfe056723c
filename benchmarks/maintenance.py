"""Maintenance benchmark: garbage collection (mark, sweep, compact), `verify all`, and backups that keep
running while GC runs, on a synthetic repository of more than a million chunks, against a real
`chunkyard serve` process.

The repository is built in-process through the engine's own session API (sessions, pinned uploads, map,
commit, point deletes), then cached under benchmarks/out/ and copied for every server run, because GC
consumes its garbage. Its shape is a nightly schedule after a prune: VMs with a full backup and
incrementals, the older points of each VM deleted, one VM decommissioned. Most chunks are "sparse"
256 KiB blocks (a unique 32-byte stamp, then zeros): full-size chunks that `map` accepts and verify really
decompresses and hashes, which take under 100 bytes on disk, so a million of them build in about 1.5 minutes.
A few hundred MiB of VM-like chunks (real file contents) give compaction and verify real bytes to move.

    python -m benchmarks.maintenance            # ~1.03 M chunks: build ~1.5 min once, then 4-5 min
    python -m benchmarks.maintenance --quick    # ~214 k chunks: build 15 s once, then about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp
import blake3
import zstandard

from chunkyard.wire import (
    CODEC_RAW,
    CODEC_ZSTD,
    MAP_RECORD,
    ZERO,
    ApiError,
    Client,
    Frame,
    bitmap_get,
    decode_frames,
    encode_frame,
    is_zero,
)
from repo_server.engine.chunk_store import NewChunk
from repo_server.engine.codec import compress as engine_compress
from repo_server.engine.index import Index
from repo_server.engine.repository import Repository
from repo_server.engine.tokens import TokenInfo

from .common import (
    ChunkyardServer,
    CodecRates,
    DiskRates,
    MiB,
    PhaseMeter,
    Row,
    disk_rates,
    disk_usage,
    elapsed,
    file_corpus,
    format_table,
    machine_info,
    measure_codecs,
    process_memory,
    rocksdb_multiget_rate,
    source_state,
    vm_like_chunks,
    write_json,
)

CHUNK = 256 * 1024  # the smallest chunk size a repository allows: the most chunks per byte of test data
DISK = "d0"
HOST = "bench-host"
OUT = Path(__file__).resolve().parent / "out"
DEFAULT_JSON = OUT / "maintenance.json"
STORE_BATCH = 1024  # chunks per in-process upload during the build
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SINGLE_SEGMENT_FCS4 = 0xA0  # frame header descriptor: single segment, 4-byte content size, no checksum
BLOCK_HEADER = 3


# ------------------------------------------------------------------------------------------ sizes

@dataclass(frozen=True)
class Layout:
    """The synthetic repository (its cache key). Every VM has one disk; `generations` nightly backups each
    (a full, then incrementals of base=latest); all but the latest `keep` points are then deleted, and the
    last `decommissioned` VM-like VMs lose all their points."""

    sparse_vms: int = 8
    sparse_chunks: int = 98_304
    """Chunks per sparse disk (24 GiB virtual, 24 manifest pages)."""
    sparse_change: float = 0.10
    real_vms: int = 3
    real_chunks: int = 512
    """Chunks per VM-like disk (128 MiB)."""
    real_change: float = 0.30
    generations: int = 4
    keep: int = 2
    decommissioned: int = 1
    reuse_pool: int = 128
    """VM-like chunks of each kind (still live, garbage) kept for the ingest loop to send again."""
    corpus_mib: int = 64


@dataclass(frozen=True)
class Load:
    """The backups that run beside GC: `streams` VMs backed up in a loop, base=latest, each backup changing
    `changed` of `disk_chunks` chunks: `reused` of them old VM-like chunks from the build (some still live,
    some garbage that GC is about to sweep), the rest new unique VM-like chunks."""

    streams: int = 4
    disk_chunks: int = 64
    changed: int = 32
    reused: int = 8
    baseline_s: float = 10.0
    """Seconds of backups before GC starts: the rate without GC."""
    body_pool: int = 512
    """Distinct VM-like chunk bodies pre-compressed once; every new chunk is one of them with a fresh stamp."""
    stall_s: float = 30.0
    """A GC whose progress stands still this long is declared stalled (deadlocked)."""
    verify_after: bool = True
    """Run `verify all` after the loaded GC (a full pass over every chunk: the longest step)."""
    disk_probe_mib: int = 256


QUICK_LAYOUT = Layout(sparse_vms=4, sparse_chunks=40_960, real_chunks=128, reuse_pool=64, corpus_mib=32)
QUICK_LOAD = Load(baseline_s=4.0, body_pool=256, stall_s=15.0, verify_after=False, disk_probe_mib=64)


# ------------------------------------------------------------------------------------------ frames

def zstd_blocks(frame: bytes) -> bytes:
    """The blocks of a zstd frame, without its header (and checksum): to be spliced after another block."""
    if frame[:4] != ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    fhd, pos = frame[4], 5
    single, fcs_flag, dict_flag, checksum = fhd >> 5 & 1, fhd >> 6, fhd & 3, fhd >> 2 & 1
    pos += (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    return frame[pos : len(frame) - 4 * checksum]


@dataclass(frozen=True)
class Body:
    """The 256 KiB chunk minus its first 32 bytes, and those bytes compressed once as zstd blocks.

    A new unique chunk is a fresh 32-byte stamp followed by a body. Its zstd frame is a header, one raw
    block holding the stamp, then the body's blocks (references inside them are relative, and nothing
    before the body is referenced), so making it costs a BLAKE3 and a concatenation, not a compression: the
    client stays off the server's two cores while the server does all of its real work on a VM-like frame.
    """

    tail: bytes
    blocks: bytes

    @classmethod
    def of(cls, chunk: bytes, cctx: zstandard.ZstdCompressor) -> Body:
        tail = chunk[32:]
        return cls(tail, zstd_blocks(cctx.compress(tail)))

    def payload(self, stamp: bytes) -> bytes:
        """The zstd frame of stamp + tail."""
        return (ZSTD_MAGIC + bytes([SINGLE_SEGMENT_FCS4]) + struct.pack("<I", len(stamp) + len(self.tail))
                + (len(stamp) << 3).to_bytes(BLOCK_HEADER, "little") + stamp + self.blocks)

    def frame(self, stamp: bytes) -> Frame:
        """The stamped chunk as an upload frame (raw when zstd would not shrink it, as a collector does)."""
        h = blake3.blake3(stamp)
        h.update(self.tail)
        payload, size = self.payload(stamp), len(stamp) + len(self.tail)
        if len(payload) >= size:
            return Frame(h.digest(), CODEC_RAW, size, stamp + self.tail)
        return Frame(h.digest(), CODEC_ZSTD, size, payload)


SPARSE_TAIL = bytes(CHUNK - 32)


def sparse_stamp(key: str) -> bytes:
    return blake3.blake3(key.encode()).digest()


def sparse_digests(stamps: Sequence[bytes]) -> list[bytes]:
    """BLAKE3 of sparse chunks (stamp + zeros): the build's main cost, so it runs in worker processes."""
    out = []
    for stamp in stamps:
        h = blake3.blake3(stamp)
        h.update(SPARSE_TAIL)
        out.append(h.digest())
    return out


# ------------------------------------------------------------------------------------------ build

BUILD_TOKEN = TokenInfo("0000benchbuild00", "admin", "maintenance benchmark build", 0.0)


@dataclass
class Disk:
    """One VM's disk through its backups: the current manifest and every point taken of it."""

    vm_id: str
    number: int
    sparse: bool
    chunks: int
    change: float
    manifest: bytearray
    points: list[tuple[str, bytes, list[str]]] = field(default_factory=list)
    """(point id, manifest, page digests in hex) of each backup, oldest first."""


def split_digests(manifest: bytes) -> Iterator[bytes]:
    return (manifest[i : i + 32] for i in range(0, len(manifest), 32))


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Builder:
    """Nightly backups of every VM through the engine's session API, in-process (no HTTP): sessions,
    pinned uploads, map, commit, exactly as the API handlers call them."""

    def __init__(self, repo: Repository, layout: Layout, corpus: bytes, procs: ProcessPoolExecutor,
                 threads: ThreadPoolExecutor):
        self.repo, self.layout, self.corpus = repo, layout, corpus
        self.procs, self.threads = procs, threads
        self.rng = random.Random(5)
        self.sparse_body = Body.of(bytes(CHUNK), zstandard.ZstdCompressor(level=1))
        self.disks = [Disk(f"sparse-{i}", i, True, layout.sparse_chunks, layout.sparse_change,
                           bytearray(32 * layout.sparse_chunks)) for i in range(layout.sparse_vms)]
        self.disks += [Disk(f"real-{i}", i, False, layout.real_chunks, layout.real_change,
                            bytearray(32 * layout.real_chunks)) for i in range(layout.real_vms)]
        self.reuse: dict[str, list[NewChunk]] = {"live": [], "garbage": []}
        self.kinds = {"sparse": 0, "real": 0, "real_raw_bytes": 0}

    def run(self) -> None:
        for generation in range(self.layout.generations):
            for disk in self.disks:
                self.backup(disk, generation)
            print(f"  generation {generation + 1}/{self.layout.generations}: "
                  f"{self.repo.chunks.chunk_count:,} chunks", flush=True)

    def backup(self, disk: Disk, generation: int) -> None:
        n = disk.chunks
        changed = range(n) if generation == 0 else sorted(self.rng.sample(range(n), round(n * disk.change)))
        if disk.sparse:
            stamps = [sparse_stamp(f"{disk.vm_id}/{generation}/{i}") for i in changed]
            digests = [d for part in self.procs.map(sparse_digests, batched(stamps, 4096)) for d in part]
            chunks = [NewChunk(d, CODEC_ZSTD, CHUNK, self.sparse_body.payload(s))
                      for s, d in zip(stamps, digests, strict=True)]
            entries = list(zip(changed, digests, strict=True))
            self.kinds["sparse"] += len(chunks)
        else:
            raws = vm_like_chunks(len(changed), CHUNK, corpus=self.corpus, seed=1000 * generation + disk.number,
                                  nonce=f"{disk.vm_id}/{generation}".encode())
            chunks = list(self.threads.map(stored_chunk, [r for r in raws if not is_zero(r)]))
            found = iter(c.digest for c in chunks)
            entries = [(i, ZERO if is_zero(r) else next(found)) for i, r in zip(changed, raws, strict=True)]
            self.kinds["real"] += len(chunks)
            self.kinds["real_raw_bytes"] += len(chunks) * CHUNK
            self._keep_for_reuse(disk, generation, chunks)
        sessions = self.repo.sessions
        sid = sessions.create({"host": HOST, "vm": {"id": disk.vm_id},
                               "disks": [{"disk_id": DISK, "size": n * CHUNK}]}, BUILD_TOKEN)["session_id"]
        for part in batched(chunks, STORE_BATCH):
            sessions.store_chunks(sid, list(part))
        sessions.map(sid, DISK, b"".join(MAP_RECORD.pack(i, d) for i, d in entries))
        point = sessions.commit(sid)
        for i, d in entries:
            disk.manifest[32 * i : 32 * i + 32] = d
        disk.points.append((point["point_id"], bytes(disk.manifest), point["disks"][0]["pages"]))

    def _keep_for_reuse(self, disk: Disk, generation: int, chunks: list[NewChunk]) -> None:
        """Old chunks the ingest loop sends again: the newest backup of the first VM-like VM stays live; the
        first backup of a decommissioned VM is all garbage."""
        layout = self.layout
        if disk.number == 0 and generation == layout.generations - 1:
            self.reuse["live"] += chunks[: layout.reuse_pool]
        if disk.number >= layout.real_vms - layout.decommissioned and generation == 0:
            self.reuse["garbage"] += chunks[: layout.reuse_pool]

    def prune(self) -> list[dict]:
        """Delete all but the latest `keep` points of every VM, and every point of decommissioned VMs.
        Returns the kept points (vm, point id, BLAKE3 of the manifest, chunks)."""
        layout = self.layout
        gone = {f"real-{i}" for i in range(layout.real_vms - layout.decommissioned, layout.real_vms)}
        kept = []
        for disk in self.disks:
            keep = 0 if disk.vm_id in gone else layout.keep
            for n, (point_id, manifest, _) in enumerate(disk.points):
                if n < len(disk.points) - keep:
                    self.repo.points.delete(point_id)
                else:
                    kept.append({"vm": disk.vm_id, "point_id": point_id, "chunks": disk.chunks,
                                 "manifest_blake3": blake3.blake3(manifest).hexdigest()})
        return kept

    def expected_garbage(self, kept_ids: set[str]) -> dict[str, int]:
        """Distinct chunks (data and manifest pages) referenced only by deleted points: what GC must sweep."""
        every: set[bytes] = set()
        live: set[bytes] = set()
        pages: set[bytes] = set()
        for disk in self.disks:
            for point_id, manifest, page_hex in disk.points:
                refs = set(split_digests(manifest)) | {bytes.fromhex(p) for p in page_hex}
                pages.update(bytes.fromhex(p) for p in page_hex)
                every |= refs
                if point_id in kept_ids:
                    live |= refs
        every.discard(ZERO)
        live.discard(ZERO)
        pages.discard(ZERO)
        if len(every) != self.repo.chunks.chunk_count:
            raise RuntimeError(f"the index holds {self.repo.chunks.chunk_count:,} chunks, the points reference "
                               f"{len(every):,}: the build is not what it claims")
        return {"chunks": len(every), "garbage": len(every - live), "pages": len(pages),
                "garbage_pages": len(pages - live)}


def stored_chunk(raw: bytes) -> NewChunk:
    """A VM-like chunk as a collector sends it: zstd-1 when that shrinks it (runs in a thread pool)."""
    codec, stored = engine_compress(raw)
    return NewChunk(blake3.blake3(raw).digest(), codec, len(raw), stored)


def write_reuse(path: Path, reuse: dict[str, list[NewChunk]]) -> None:
    """The reuse pool as upload frames, live chunks first (build.json has the counts)."""
    with open(path, "wb") as f:
        for kind in ("live", "garbage"):
            for c in reuse[kind]:
                f.write(encode_frame(Frame(c.digest, c.flags, c.raw_len, bytes(c.stored))))


def build_repository(root: Path, layout: Layout) -> dict:
    """Build the repository into root/data in-process and describe it in root/build.json."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    corpus = file_corpus(layout.corpus_mib * MiB)
    nproc = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(nproc) as procs, ThreadPoolExecutor(nproc) as threads:
        procs.submit(int).result()  # fork the workers now, before RocksDB starts its threads
        ChunkyardServer(root / "data", chunk_size="256KiB")  # runs `chunkyard init`: repo.toml, admin.token
        repo = Repository(root / "data")
        try:
            builder = Builder(repo, layout, corpus, procs, threads)
            builder.run()
            kept = builder.prune()
            expected = builder.expected_garbage({k["point_id"] for k in kept})
            stats = repo.stats()
        finally:
            repo.close()
    write_reuse(root / "reuse.bin", builder.reuse)
    info = {"layout": asdict(layout), "build_s": elapsed(started), "repository": stats, "expected": expected,
            "kinds": builder.kinds, "kept_points": kept,
            "reuse": {kind: len(chunks) for kind, chunks in builder.reuse.items()},
            "disk_bytes": disk_usage(root / "data")}
    (root / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def cached_repository(root: Path, layout: Layout, rebuild: bool) -> dict:
    """The cached build when it was made with this layout, else a new one."""
    path = root / "build.json"
    if not rebuild and path.exists() and (root / "data" / "repo.toml").exists():
        info = json.loads(path.read_text())
        if info["layout"] == asdict(layout):
            return info
    print(f"building the synthetic repository in {root} ...", flush=True)
    return build_repository(root, layout)


# ------------------------------------------------------------------------------------------ limits

def rocksdb_scan_rate(index_dir: Path) -> tuple[int, float]:
    """(keys, keys/s) of one in-process scan of this repository's `chunks` column family: the floor under
    the sweep, which scans it once. Run before the server opens the index."""
    index = Index(index_dir)
    try:
        start = time.perf_counter()
        keys = sum(1 for _ in index.scan("chunks"))
        return keys, keys / elapsed(start)
    finally:
        index.close()


def rocksdb_put_rate(directory: Path, keys: int, batch: int = 1000) -> float:
    """Keys/s written in-process as GC marks are: one Python put per 32-byte key, batches of 1000, a scratch
    index with the repository's options, as many keys as the repository has chunks (so memtable flushes
    count). The floor under the mark phase, which writes one mark per manifest entry."""
    path = directory / f"rocksdb-put-probe-{os.getpid()}"
    index = Index(path)
    digests = list(split_digests(os.urandom(32 * keys)))
    try:
        start = time.perf_counter()
        for part in batched(digests, batch):
            wb = index.batch()
            for d in part:
                wb.put("marks", d, b"")
            index.write(wb)
        return keys / elapsed(start)
    finally:
        index.close()
        shutil.rmtree(path)


@dataclass(frozen=True)
class VerifyFloor:
    """Single-core seconds per chunk to open (AES-GCM, when the repository is encrypted), decompress and
    BLAKE3 each kind of chunk this repository holds: the CPU floor of `verify all` without any I/O."""

    sparse: float
    real: float
    page: float
    encrypted: bool

    def seconds(self, kinds: dict[str, int]) -> float:
        return kinds["sparse"] * self.sparse + kinds["real"] * self.real + kinds["pages"] * self.page


def measure_verify_floor(real: Sequence[bytes], encrypted: bool, samples: int = 2000) -> VerifyFloor:
    """Time the per-chunk work of verify on samples of each kind: sparse chunks, VM-like chunks and manifest
    pages (4096 random digests, stored raw)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from repo_server.engine.codec import decode

    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    sparse_body = Body.of(bytes(CHUNK), zstandard.ZstdCompressor(level=1))
    rng = random.Random(9)

    def per_chunk(chunks: Sequence[NewChunk]) -> float:
        sealed = [aead.encrypt(nonce, bytes(c.stored), b"") if encrypted else c.stored for c in chunks]
        start = time.perf_counter()
        for c, s in zip(chunks, sealed, strict=True):
            stored = aead.decrypt(nonce, s, b"") if encrypted else s
            blake3.blake3(decode(c.flags, c.raw_len, stored)).digest()
        return elapsed(start) / len(chunks)

    sparse = [NewChunk(b"", CODEC_ZSTD, CHUNK, sparse_body.payload(rng.randbytes(32))) for _ in range(samples)]
    pages = [NewChunk(b"", CODEC_RAW, CHUNK // 2, rng.randbytes(CHUNK // 2)) for _ in range(samples // 8)]
    return VerifyFloor(per_chunk(sparse), per_chunk([stored_chunk(r) for r in real if not is_zero(r)]),
                       per_chunk(pages), encrypted)


# ------------------------------------------------------------------------------------------ server runs

class RssSampler:
    """The server's VmRSS every 100 ms on a thread, so the peak of any window is known (VmHWM covers the
    process's whole life)."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), process_memory(self.pid)["VmRSS"]))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, stop: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= stop), default=0)


@dataclass
class JobRun:
    """A maintenance job as this process saw it: the last answer, its span on this process's perf_counter
    clock, and when each phase was first seen (polled every 100 ms)."""

    job: dict
    start: float
    stop: float
    timeline: list[tuple[float, str]]

    @property
    def stalled(self) -> bool:
        return self.job["state"] == "stalled"

    def phase_windows(self) -> dict[str, tuple[float, float]]:
        """Span of each phase: from the job's own phase durations when it finished (laid end to end from its
        start), else from the polls (the first moments, "starting", count to the first real phase)."""
        if self.job["state"] == "done":
            windows, t = {}, self.start
            for name, seconds in self.job["result"]["phases"].items():
                windows[name] = (t, t + seconds)
                t += seconds
        else:
            seen = [(t, phase.split()[0]) for t, phase in self.timeline if phase != "starting"]  # "mark points"
            starts = [self.start] + [t for t, _ in seen[1:]]
            stops = [t for t, _ in seen[1:]] + [self.stop]
            windows = {phase: (a, b) for (_, phase), a, b in zip(seen, starts, stops, strict=True)}
        return {name: (a, b) for name, (a, b) in windows.items() if b > a}


async def run_job(client: Client, path: str, body: dict, stall_s: float | None = None) -> JobRun:
    """Start a job and poll it every 100 ms until it is done; raise if it fails. With `stall_s`, a job whose
    phase and progress count stay unchanged that long is returned with state "stalled" (and `stop` at its
    last progress) instead of being waited for forever."""
    offset = time.time() - time.perf_counter()
    job = await client.json("POST", path, body)
    start = time.perf_counter()
    timeline = [(start, job["phase"])]
    seen, progressed = (job["phase"], job["done"]), start
    while job["state"] == "running":
        await asyncio.sleep(0.1)
        job = await client.json("GET", f"/jobs/{job['id']}")
        now = time.perf_counter()
        if job["phase"] != timeline[-1][1]:
            timeline.append((now, job["phase"]))
        if (job["phase"], job["done"]) != seen:
            seen, progressed = (job["phase"], job["done"]), now
        elif stall_s is not None and now - progressed > stall_s:
            return JobRun(job | {"state": "stalled", "stalled_s": now - progressed}, start, progressed, timeline)
    if job["state"] != "done":
        raise RuntimeError(f"{path} job {job['id']} ended {job['state']}: {job['error']}")
    return JobRun(job, job["started"] - offset, job["finished"] - offset, timeline)


def pack_sizes(data: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (data / "packs").glob("*/*.pack")}


def grown_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes appended to packs between two listings: what compaction copied when nothing else wrote."""
    return sum(max(0, size - before.get(name, 0)) for name, size in after.items())


# ------------------------------------------------------------------------------------------ backups

@dataclass
class Backup:
    point_id: str
    start: float
    stop: float
    changed: int
    uploaded_bytes: int
    reused: dict[str, int]
    """Old chunks sent again, by kind and answer: live_present, garbage_present, garbage_missing."""
    manifest: list[bytes]


class Ingest:
    """Backup loops of `load.streams` VMs over HTTP: each backup copies the latest point (base=latest) and
    changes `load.changed` random chunks, `load.reused` of them old VM-like chunks from the build."""

    def __init__(self, client: Client, load: Load, bodies: Sequence[Body], reuse: Sequence[tuple[str, Frame]],
                 run_id: str):
        self.client, self.load, self.bodies, self.reuse = client, load, bodies, reuse
        self.run_id = run_id
        self.rng = random.Random(17)
        self.made = 0
        self.vms = [f"ingest-{run_id}-{n}" for n in range(load.streams)]
        self.manifests = {vm: [ZERO] * load.disk_chunks for vm in self.vms}
        self.backups: list[Backup] = []

    def new_frame(self) -> Frame:
        self.made += 1
        stamp = blake3.blake3(f"{self.run_id}/{self.made}".encode()).digest()
        return self.bodies[self.rng.randrange(len(self.bodies))].frame(stamp)

    async def first(self, vm: str) -> None:
        """The untimed full backup every stream starts from."""
        self.backups.append(await self.backup(vm, {i: ("new", self.new_frame()) for i in range(self.load.disk_chunks)}))

    async def loop(self, vm: str, stop: asyncio.Event) -> None:
        load = self.load
        while not stop.is_set():
            changed = self.rng.sample(range(load.disk_chunks), load.changed)
            changes = {i: self.reuse[self.rng.randrange(len(self.reuse))] for i in changed[: load.reused]}
            changes |= {i: ("new", self.new_frame()) for i in changed[load.reused :]}
            self.backups.append(await self.backup(vm, changes))

    async def backup(self, vm: str, changes: dict[int, tuple[str, Frame]]) -> Backup:
        client, start = self.client, time.perf_counter()
        session = await client.create_session(host=HOST, vm={"id": vm}, base="latest",
                                              disks=[{"disk_id": DISK, "size": self.load.disk_chunks * CHUNK}])
        sid = session["session_id"]
        distinct = list({f.digest: (kind, f) for kind, f in changes.values()}.values())
        bitmap = await client.missing(sid, [f.digest for _, f in distinct])
        reused = {"live_present": 0, "garbage_present": 0, "garbage_missing": 0}
        todo = []
        for n, (kind, frame) in enumerate(distinct):
            wanted = bitmap_get(bitmap, n)
            if kind == "new" and not wanted:
                raise RuntimeError("the server already holds a chunk made unique for this run")
            if kind == "live" and wanted:
                raise RuntimeError("a chunk of a kept point is missing from the repository")
            if kind != "new":
                reused[f"{kind}_{'missing' if wanted else 'present'}"] += 1
            if wanted:
                todo.append(frame)
        if todo:
            await client.upload(sid, todo)
        await client.map(sid, DISK, sorted((i, f.digest) for i, (_, f) in changes.items()))
        point = await client.commit(sid)
        manifest = self.manifests[vm]
        for i, (_, f) in changes.items():
            manifest[i] = f.digest
        return Backup(point["point_id"], start, time.perf_counter(), len(changes),
                      sum(len(f.payload) for f in todo), reused, list(manifest))

    def rate(self, start: float, stop: float) -> dict:
        """Backups that finished inside a window: changed MiB/s, count, latency percentiles."""
        done = [b for b in self.backups if start <= b.stop <= stop]
        seconds = [b.stop - b.start for b in done]
        mib = sum(b.changed for b in done) * CHUNK / MiB
        return {"backups": len(done), "changed_mib": mib, "mib_s": mib / (stop - start),
                "uploaded_mib": sum(b.uploaded_bytes for b in done) / MiB,
                "p50_s": statistics.median(seconds) if seconds else None,
                "p95_s": sorted(seconds)[int(0.95 * (len(seconds) - 1))] if seconds else None,
                "max_s": max(seconds, default=None),
                "reused": {k: sum(b.reused[k] for b in done) for k in ("live_present", "garbage_present",
                                                                         "garbage_missing")}}


async def restored_exactly(client: Client, point_id: str, manifest: Sequence[bytes]) -> bool:
    """Stream a whole disk and compare every chunk's BLAKE3 with what was mapped there (bit-exact). A stream
    the server breaks off (it does when a chunk is missing or damaged) counts as a failed restore."""
    data = bytearray()
    try:
        async for block in client.stream_disk(point_id, DISK):
            data += block
    except (aiohttp.ClientError, ApiError):
        return False
    if len(data) != len(manifest) * CHUNK:
        return False
    view = memoryview(data)
    return all(chunk_matches(view[i * CHUNK : (i + 1) * CHUNK], d) for i, d in enumerate(manifest))


def chunk_matches(data: bytes | memoryview, expected: bytes) -> bool:
    """Restored bytes against a manifest entry: all zero for ZERO, else the BLAKE3 digest."""
    return is_zero(bytes(data)) if expected == ZERO else blake3.blake3(data).digest() == expected


async def kept_point_intact(client: Client, point: dict, rng: random.Random, samples: int = 16) -> bool:
    """A point kept from the build: its manifest unchanged, and sampled chunks restore to their digests."""
    try:
        manifest = await client.disk_map(point["point_id"], DISK)
        if blake3.blake3(manifest).hexdigest() != point["manifest_blake3"]:
            return False
        for i in rng.sample(range(point["chunks"]), samples):
            data = b""
            async for block in client.stream_disk(point["point_id"], DISK, start=i * CHUNK, stop=(i + 1) * CHUNK):
                data += block
            if not chunk_matches(data, manifest[32 * i : 32 * i + 32]):
                return False
    except (aiohttp.ClientError, ApiError):
        return False
    return True


async def check_points(client: Client, backups: Sequence[Backup], kept: Sequence[dict]) -> dict:
    """After GC: every point committed during the run restored bit-exact, every point kept from the build
    sampled; two streams at a time."""
    gate = asyncio.Semaphore(2)
    rng = random.Random(23)

    async def gated(coro: Awaitable[bool]) -> bool:
        async with gate:
            return await coro

    restored = await asyncio.gather(*(gated(restored_exactly(client, b.point_id, b.manifest)) for b in backups))
    intact = await asyncio.gather(*(gated(kept_point_intact(client, p, rng)) for p in kept))
    return {"committed": len(backups), "restored_exact": sum(restored),
            "failed": [b.point_id for b, ok in zip(backups, restored, strict=True) if not ok],
            "kept": len(kept), "kept_intact": sum(intact),
            "kept_failed": [p["point_id"] for p, ok in zip(kept, intact, strict=True) if not ok]}


# ------------------------------------------------------------------------------------------ scenarios

VERIFY, GC_ALONE = "verify all", "GC alone"
BASELINE, GC_LOADED = "backups, no GC", "GC + backups"
GC_RESTART, CHECKS, VERIFY_AFTER = "GC after restart", "restore checks", "verify all after GC"


def copy_repository(template: Path, work: Path) -> Path:
    """A fresh working copy of the cached repository, written back to disk before any clock starts."""
    data = work / "data"
    shutil.copytree(template / "data", data)
    os.sync()
    return data


async def one_job(server: ChunkyardServer, path: str, body: dict) -> JobRun:
    """Run one job to its end with a client of its own."""
    async with server.client() as client:
        return await run_job(client, path, body)


def run_alone(data: Path, log: Path) -> dict:
    """`verify all`, then GC with nothing else running, each in a fresh server process, so each VmHWM is
    that job's own peak (plus the idle server's)."""
    phases: dict[str, dict] = {}
    with ChunkyardServer(data, log=log) as server:
        idle = server.memory()
        meter = PhaseMeter(server.pid)
        with meter(VERIFY):
            verify = asyncio.run(one_job(server, "/admin/verify", {"mode": "all"}))
        phases |= meter.phases
    with ChunkyardServer(data, log=log) as server:
        meter = PhaseMeter(server.pid)
        before = pack_sizes(data)
        with RssSampler(server.pid) as rss, meter(GC_ALONE):
            gc = asyncio.run(one_job(server, "/admin/gc", {}))
        after = pack_sizes(data)
        phases |= meter.phases
    return {"idle_memory": idle, "verify": verify.job, "gc": gc.job, "gc_rss_peak": rss.peak(gc.start, gc.stop),
            "gc_rss_by_phase": {name: rss.peak(*w) for name, w in gc.phase_windows().items()},
            "packs_before": len(before), "packs_after": len(after), "relocated_bytes": grown_bytes(before, after),
            "phases": phases}


IngestData = tuple[list[Body], list[tuple[str, Frame]]]


async def drive_loaded(server: ChunkyardServer, load: Load, data: IngestData, meter: PhaseMeter,
                       rss: RssSampler) -> tuple[dict, list[Backup]]:
    """Backups without GC for `load.baseline_s`, then GC while they go on. A GC that makes no progress for
    `load.stall_s` is reported as stalled and the backups are abandoned (the server is then killed)."""
    bodies, reuse = data
    async with server.client() as client:
        ingest = Ingest(client, load, bodies, reuse, secrets.token_hex(4))
        await asyncio.gather(*(ingest.first(vm) for vm in ingest.vms))
        stop = asyncio.Event()
        loops = [asyncio.create_task(ingest.loop(vm, stop)) for vm in ingest.vms]
        try:
            with meter(BASELINE):
                start = time.perf_counter()
                await asyncio.sleep(load.baseline_s)
            with meter(GC_LOADED):
                gc = await run_job(client, "/admin/gc", {}, load.stall_s)
        except BaseException:
            for task in loops:
                task.cancel()
            raise
        ended = time.perf_counter()
        if gc.stalled:
            for task in loops:
                task.cancel()
        stop.set()
        for outcome in await asyncio.gather(*loops, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
    result = {"gc": gc.job, "gc_timeline": gc.timeline, "baseline": ingest.rate(start, gc.start),
              "during_gc": ingest.rate(gc.start, gc.stop),
              "during_phase": {name: ingest.rate(*w) for name, w in gc.phase_windows().items()},
              "after_stall": ingest.rate(gc.stop, ended) if gc.stalled else None,
              "rss_peak": {"baseline": rss.peak(start, gc.start), "gc": rss.peak(gc.start, gc.stop)}}
    return result, ingest.backups


async def check_after(server: ChunkyardServer, backups: Sequence[Backup], kept: Sequence[dict], meter: PhaseMeter,
                      gc_first: bool, verify: bool) -> dict:
    """On a fresh server process: finish the collection if the loaded one stalled, restore every point the
    run committed, sample the build's kept points, and (unless quick) `verify all`, which also checks that
    every point's chunks are all present."""
    out = {}
    async with server.client() as client:
        if gc_first:
            with meter(GC_RESTART):
                out["gc_after_restart"] = (await run_job(client, "/admin/gc", {})).job
        with meter(CHECKS):
            out["checks"] = await check_points(client, backups, kept)
        if verify:
            with meter(VERIFY_AFTER):
                out["verify_after"] = (await run_job(client, "/admin/verify", {"mode": "all"})).job
        out["repository"] = await client.repository()
    return out


def run_loaded(data: Path, log: Path, load: Load, ingest: IngestData, kept: list[dict]) -> dict:
    """Backups and GC in one server process, then the checks in a fresh one."""
    with ChunkyardServer(data, log=log) as server:
        meter = PhaseMeter(server.pid)
        with RssSampler(server.pid) as rss:
            result, backups = asyncio.run(drive_loaded(server, load, ingest, meter, rss))
        stalled = result["gc"]["state"] == "stalled"
        if stalled:  # SIGTERM would wait for the stuck job forever: stop it the way a crash would
            server.proc.kill()
            server.proc.wait()
    with ChunkyardServer(data, log=log) as server:  # startup recovery runs first, as after any crash
        after = PhaseMeter(server.pid)
        result |= asyncio.run(check_after(server, backups, kept, after, stalled, load.verify_after))
        result["checks_process"] = {"phases": list(after.phases), "memory": server.memory()}
    return result | {"phases": meter.phases | after.phases}


def ingest_data(root: Path, info: dict, corpus: bytes, load: Load) -> IngestData:
    """Pre-compressed bodies for new chunks, and the build's old chunks (live, garbage) to send again."""
    cctx = zstandard.ZstdCompressor(level=1)
    raws = vm_like_chunks(load.body_pool, CHUNK, corpus=corpus, seed=31, nonce=b"bodies")
    bodies = [Body.of(r, cctx) for r in raws if not is_zero(r)]
    frames = decode_frames((root / "reuse.bin").read_bytes())
    kinds = ["live"] * info["reuse"]["live"] + ["garbage"] * info["reuse"]["garbage"]
    return bodies, [(k, Frame(f.digest, f.codec, f.raw_len, bytes(f.payload)))
                    for k, f in zip(kinds, frames, strict=True)]


# ------------------------------------------------------------------------------------------ report

@dataclass(frozen=True)
class Limits:
    codec: CodecRates
    floor: VerifyFloor
    disk: DiskRates
    scan_keys: int
    scan: float
    multiget: float
    put: float


def limit_rows(limits: Limits) -> list[Row]:
    mibs, floor = "MiB/s", limits.floor
    sealed = "AES-GCM open + " if floor.encrypted else ""
    return [
        Row("zstd-1 decompress, 1 core", limits.codec.decompress, mibs, note="VM-like chunks"),
        Row("BLAKE3, 1 thread", limits.codec.blake3, mibs),
        Row("verify = decompress + BLAKE3, 1 core", limits.codec.verify, mibs, note="VM-like chunks"),
        Row(f"verify floor: {sealed}decompress + BLAKE3 per chunk", floor.sparse * 1e6, "µs",
            note=f"sparse chunk; VM-like {floor.real * 1e6:.0f} µs, manifest page {floor.page * 1e6:.0f} µs"),
        Row("disk write, fdatasync every 32 MiB", limits.disk.write, mibs, note="working copy's filesystem"),
        Row("fdatasync of a 4 KiB append", limits.disk.fdatasync_ms, "ms", note="median of 50"),
        Row("RocksDB scan of this index's `chunks`", limits.scan, "keys/s",
            note=f"in-process, {limits.scan_keys:,} keys"),
        Row("RocksDB multi-get, 65536 keys, half present", limits.multiget, "keys/s", note="in-process, flushed"),
        Row("RocksDB put, 32-byte keys, 1000 per batch", limits.put, "keys/s", note="in-process, as marks are written"),
    ]


MEMORY_TARGET = {"target": 512, "higher_is_better": False, "target_text": "≤ 512 MiB at 10 M chunks"}


def job_seconds(job: dict) -> float:
    return job["finished"] - job["started"]


def alone_rows(info: dict, limits: Limits, alone: dict) -> list[Row]:
    """Verify and GC with nothing else running, beside their floors."""
    kinds = info["kinds"] | {"pages": info["expected"]["pages"]}
    chunks, garbage = info["repository"]["chunk_count"], info["expected"]["garbage"]
    verify, gc, phases = alone["verify"], alone["gc"], alone["phases"]
    vr, gr, verify_s = verify["result"], gc["result"], job_seconds(verify)
    relocated = alone["relocated_bytes"]
    floors = {"mark": gr["marked"] / limits.put, "sweep": chunks / limits.scan + chunks / limits.multiget,
              "compact": relocated / MiB / limits.disk.write}

    def cores(name: str) -> str:
        return f"server {phases[name]['server_cpu_s'] / phases[name]['wall_s']:.1f} cores"

    return [
        Row(f"verify all, {vr['chunks_checked']:,} chunks", verify_s, "s", limits.floor.seconds(kinds),
            "floor: per-chunk CPU × counts", higher_is_better=False,
            note=f"{vr['chunks_checked'] / verify_s:,.0f} chunks/s, {vr['bytes_checked'] / MiB / verify_s:,.0f} MiB/s "
                 f"raw; {len(vr['damaged_chunks'])} damaged; {cores(VERIFY)}"),
        Row("server peak RSS, verify all (VmHWM)", phases[VERIFY]["VmHWM"] / MiB, "MiB", **MEMORY_TARGET,
            note=f"fresh process; {alone['idle_memory']['VmRSS'] / MiB:.0f} MiB idle after start"),
        Row("GC, nothing else running", job_seconds(gc), "s", sum(floors.values()), "sum of the floors below",
            higher_is_better=False,
            note=f"swept {gr['swept_chunks']:,} chunks ({gr['swept_bytes'] / MiB:.0f} MiB), freed "
                 f"{gr['bytes_freed'] / MiB:.0f} MiB; {cores(GC_ALONE)}"),
        Row("  mark", gr["phases"]["mark"], "s", floors["mark"], "marks ÷ RocksDB put rate", higher_is_better=False,
            note=f"{gr['marked']:,} marks from {gr['pages_walked']} pages, "
                 f"{gr['marked'] / gr['phases']['mark']:,.0f}/s"),
        Row("  sweep", gr["phases"]["sweep"], "s", floors["sweep"], "scan + multi-get of every chunk",
            higher_is_better=False, note=f"{chunks / gr['phases']['sweep']:,.0f} chunks/s scanned"),
        Row("  compact", gr["phases"]["compact"], "s", floors["compact"], "copied ÷ disk write",
            higher_is_better=False,
            note=f"packs {alone['packs_before']} → {alone['packs_after']}: {gr['packs_deleted']} deleted, "
                 f"{gr['packs_compacted']} rewritten ({relocated / MiB:.0f} MiB copied)"),
        Row("server peak RSS, GC (VmRSS every 100 ms)", alone["gc_rss_peak"] / MiB, "MiB", **MEMORY_TARGET,
            note=f"fresh process: VmHWM {phases[GC_ALONE]['VmHWM'] / MiB:.0f} MiB; peak in "
                 + ", ".join(f"{k} {v / MiB:.0f}" for k, v in alone["gc_rss_by_phase"].items())),
        Row("GC swept (never more than the garbage)", gr["swept_chunks"], "chunks", garbage, "garbage built",
            target=garbage, higher_is_better=False, target_text="≤ garbage",
            note="exactly the garbage" if gr["swept_chunks"] == garbage else "NOT exactly the garbage"),
    ]


def loaded_rows(loaded: dict, gc_alone_s: float) -> list[Row]:
    """Backups beside GC, and the checks after it."""
    base, during, gc = loaded["baseline"], loaded["during_gc"], loaded["gc"]
    checks, after = loaded["checks"], loaded.get("verify_after", {}).get("result")
    stalled = gc["state"] == "stalled"

    def latency(r: dict) -> str:
        return (f"{r['backups']} backups, p50 {r['p50_s'] * 1000:.0f} ms, p95 {r['p95_s'] * 1000:.0f} ms, "
                f"max {r['max_s'] * 1000:.0f} ms" if r["backups"] else "no backup finished")

    rows = [Row("backups, no GC", base["mib_s"], "MiB/s", note=f"changed data; {latency(base)}"),
            Row("backups during GC" + (" (until it stalled)" if stalled else ""), during["mib_s"], "MiB/s",
                base["mib_s"], "without GC", note=latency(during))]
    rows += [Row(f"  during {name}", r["mib_s"], "MiB/s", base["mib_s"], "without GC", note=latency(r))
             for name, r in loaded["during_phase"].items()]
    if stalled:
        frozen = loaded["after_stall"]
        rows.append(Row("GC with backups running: stalled", gc["stalled_s"], "s without progress", target=0,
                        higher_is_better=False, target_text="completes",
                        note=f"job's last progress: {gc['phase']} {gc['done']:,} of {gc['total']:,}; "
                             f"{frozen['backups']} backups finished meanwhile; server killed, restarted, GC rerun"))
    else:
        rows.append(Row("GC with backups running", job_seconds(gc), "s", gc_alone_s, "GC alone",
                        higher_is_better=False,
                        note=", ".join(f"{k} {v:.1f} s" for k, v in gc["result"]["phases"].items())
                             + f"; swept {gc['result']['swept_chunks']:,}"))
    rows += [
        Row("server peak RSS, GC + backups (VmRSS every 100 ms)", loaded["rss_peak"]["gc"] / MiB, "MiB",
            **MEMORY_TARGET, note=f"{loaded['rss_peak']['baseline'] / MiB:.0f} MiB during backups without GC"),
        Row("server peak RSS, one process after the run (VmHWM)", loaded["checks_process"]["memory"]["VmHWM"] / MiB,
            "MiB", **MEMORY_TARGET, note="ran: " + ", ".join(loaded["checks_process"]["phases"])),
        Row("points committed during the run, restored bit-exact", checks["restored_exact"], "points",
            target=checks["committed"], target_text=f"all {checks['committed']}",
            note=f"after GC; and {checks['kept_intact']} of {checks['kept']} kept points intact (manifest + "
                 "16 sampled chunks each)"),
    ]
    if after is not None:
        ok = after["points_checked"] - len(after["points_damaged"])
        rows.append(Row("verify all after GC + backups: points complete", ok, "points", target=after["points_checked"],
                        target_text=f"all {after['points_checked']}",
                        note=f"{after['chunks_checked']:,} chunks checked, {len(after['damaged_chunks'])} damaged"))
    return rows


def describe(info: dict) -> str:
    """One line on the synthetic repository."""
    stats, kinds, expected = info["repository"], info["kinds"], info["expected"]
    return (f"repository: {stats['chunk_count']:,} chunks ({kinds['sparse']:,} sparse, {kinds['real']:,} VM-like = "
            f"{kinds['real_raw_bytes'] / MiB:.0f} MiB, {expected['pages']} manifest pages), "
            f"{stats['pack_count']} packs, {stats['stored_bytes'] / MiB:.0f} MiB stored, "
            f"{stats['point_count']} points of {stats['vm_count']} VMs after pruning, "
            f"garbage {expected['garbage']:,} chunks ({expected['garbage'] / stats['chunk_count']:.1%}), "
            f"encryption {stats.get('encryption', 'none')}")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Layout, Load]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.maintenance", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~214 k chunks, 4 s of backups before GC, no final verify")
    p.add_argument("--rebuild", action="store_true", help="build the synthetic repository again")
    p.add_argument("--baseline-s", type=float, help="seconds of backups before GC starts (default 10, quick 4)")
    p.add_argument("--streams", type=int, help="backup loops running beside GC (default 4)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    layout, load = (QUICK_LAYOUT, QUICK_LOAD) if args.quick else (Layout(), Load())
    load = replace(load, **{k: v for k, v in (("baseline_s", args.baseline_s), ("streams", args.streams))
                            if v is not None})
    if load.baseline_s <= 0 or load.streams < 1:
        p.error("--baseline-s must be positive and --streams at least 1")
    return args, layout, load


def main(argv: Sequence[str] | None = None) -> int:
    """Build or reuse the repository, measure the limits, run both scenarios, print and write the results."""
    args, layout, load = parse_args(argv)
    began = time.perf_counter()
    info_machine = machine_info()
    root = OUT / f"maintenance-repo-{'quick' if args.quick else 'full'}"
    info = cached_repository(root, layout, args.rebuild)
    print(describe(info), flush=True)
    corpus = file_corpus(layout.corpus_mib * MiB)
    with tempfile.TemporaryDirectory(prefix="chunkyard-maintenance-") as tmp:
        work = Path(tmp)
        print("limits: codecs, disk, RocksDB ...", flush=True)
        sample = vm_like_chunks(256, CHUNK, corpus=corpus, seed=41, nonce=b"limits")
        codec, _ = measure_codecs(sample)
        floor = measure_verify_floor(sample, info["repository"].get("encryption", "none") != "none")
        disk = disk_rates(work, load.disk_probe_mib * MiB)
        data = copy_repository(root, work / "alone")
        scan_keys, scan = rocksdb_scan_rate(data / "index")
        limits = Limits(codec, floor, disk, scan_keys, scan, rocksdb_multiget_rate(work),
                        rocksdb_put_rate(work, scan_keys))
        alone = run_alone(data, work / "server-alone.log")
        shutil.rmtree(work / "alone")
        data = copy_repository(root, work / "loaded")
        print(f"backups: {load.streams} streams, {load.baseline_s:g} s without GC, then during GC ...", flush=True)
        loaded = run_loaded(data, work / "server-loaded.log", load, ingest_data(root, info, corpus, load),
                            info["kept_points"])
    limits_table = limit_rows(limits)
    rows = alone_rows(info, limits, alone) + loaded_rows(loaded, job_seconds(alone["gc"]))
    print(f"\nMachine limits ({info_machine['cpu']}, {info_machine['nproc']} cores, "
          f"Python {info_machine['python']}):\n")
    print(format_table(limits_table))
    print(f"\nMaintenance ({describe(info)}):\n")
    print(format_table(rows))
    duration = elapsed(began)
    phases = alone["phases"] | loaded["phases"]
    contended = [name for name, p in phases.items() if p["other_cpu_s"] / p["wall_s"] > 0.2]
    write_json(args.json, {
        "benchmark": "maintenance",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.maintenance",
                             *(argv if argv is not None else sys.argv[1:])]),
        "layout": asdict(layout), "load": asdict(load), "machine": info_machine, "source": source_state(),
        "duration_s": duration, "build": {k: v for k, v in info.items() if k != "kept_points"},
        "contended_phases": contended, "limits": [r.to_json() for r in limits_table],
        "rows": [r.to_json() for r in rows], "phases": phases,
        "alone": {k: v for k, v in alone.items() if k != "phases"},
        "loaded": {k: v for k, v in loaded.items() if k != "phases"},
    })
    failed = [r.name for r in rows if r.passed is False]
    if contended:
        print(f"\nWARNING: other processes used CPU during: {', '.join(contended)}; numbers of those phases are low")
    print(f"\n{len(failed)} target(s) missed{': ' + '; '.join(failed) if failed else ''}; {duration:.0f} s; "
          f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
