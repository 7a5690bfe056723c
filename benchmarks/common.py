"""Shared pieces of Chunkyard's benchmarks: machine-limit probes, VM-like test data, a real server
process, and the result table.

Every benchmark puts its numbers beside limits of this machine measured in the same run: the 2-core
KVM guest is shared with other work and varies from run to run, so a ratio to a same-run limit is what
stays comparable between runs and machines.

`python -m benchmarks.common sink --port N` runs the loopback HTTP sink that `loopback_http_rates` starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import aiohttp
import blake3
import zstandard
from aiohttp import web
from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, Rdict, WriteBatch

from chunkyard.wire import CODEC_RAW, CODEC_ZSTD, Client, Frame, is_zero

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
FS_BLOCK = 4096
PACKAGES = ("chunkyard", "aiohttp", "rocksdict", "blake3", "zstandard", "crc32c")


def elapsed(start: float) -> float:
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ machine

def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, Python and package versions."""
    cpu = platform.processor() or platform.machine()
    mem_total = 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "loadavg_at_start": os.getloadavg(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def source_state() -> dict:
    """The commit measured and the files changed on top of it (read-only git): the tree moves under a run."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip() or None,
            "changed_files": [line[3:] for line in git("status", "--porcelain").splitlines()]}


def process_memory(pid: int) -> dict[str, int]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measured:
    """A finished command: wall time, its peak RSS and CPU time as GNU time reports them, and its output."""

    seconds: float
    max_rss: int
    """Peak resident memory in bytes (the process's VmHWM)."""
    cpu_s: float
    stdout: str


TIME = "/usr/bin/time"


def run_measured(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run a command to its end under GNU time, which reports its peak memory exactly (no sampling).

    Not wait4() from here: Python starts children with vfork, and exec records the parent's high-water mark
    in the child's ru_maxrss, so a child of a 400 MiB benchmark would show 400 MiB. GNU time forks afresh.
    Raises with the command's stderr on failure.
    """
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        code = subprocess.run([TIME, "-f", "%M %U %S", "-o", report.name, *cmd], cwd=cwd, env=env, stdout=out,
                              stderr=err).returncode
        seconds = elapsed(start)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if code:
            raise RuntimeError(f"{' '.join(cmd)} exited with {code}: {stderr.strip()[-2000:]}")
        rss_kib, user, system = report.read().split()[-3:]
    return Measured(seconds, int(rss_kib) * 1024, float(user) + float(system), stdout)


def disk_usage(path: Path) -> int:
    """Bytes a file or directory tree takes on disk (allocated blocks, as `du` counts them)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(Path(d, f).lstat().st_blocks * 512 for d, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------------------ test data

def walk_files(root: Path) -> Iterator[Path]:
    """Regular files under root (no symlinks), in sorted order, so equal machines give equal data sets."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def file_corpus(size: int, roots: Sequence[Path] | None = None, max_file: int = 4 * MiB) -> bytes:
    """Real file contents (Python sources and modules, ELF binaries, gzipped man pages, docs), each padded
    to a 4 KiB block as on a guest filesystem.

    Synthetic text compresses unrealistically well or badly; real files give zstd the mix a used VM disk
    gives it (text shrinks a lot, binaries some, gzip not at all; with `vm_like_chunks`' random share, zstd-1
    measured 2.0 here). Files are taken round-robin from the roots in sorted order, so equal machines give
    equal corpora.
    """
    roots = roots or (Path(sys.base_prefix) / "lib", Path("/usr/bin"), Path("/usr/share/man"),
                      Path("/usr/share/doc"))
    walkers = [walk_files(r) for r in roots if r.is_dir()]
    out = bytearray()
    while walkers and len(out) < size:
        for walker in list(walkers):
            path = next(walker, None)
            if path is None:
                walkers.remove(walker)
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(max_file)
            except OSError:
                continue
            out += data
            out += bytes(-len(data) % FS_BLOCK)
    if len(out) < size:
        raise RuntimeError(f"only {len(out)} bytes of files under {', '.join(map(str, roots))}; need {size}")
    return bytes(out[:size])


@dataclass(frozen=True)
class DataMix:
    """Shares of chunk kinds in VM-like data; the rest are windows of real file contents."""

    zero: float = 0.12
    random: float = 0.06


def vm_like_chunks(count: int, chunk_size: int, *, corpus: bytes, seed: int, nonce: bytes,
                   mix: DataMix = DataMix()) -> list[bytes]:
    """Chunks like a used VM disk: file contents at 4 KiB-aligned offsets, incompressible runs and
    all-zero chunks (one shared object).

    Every non-zero chunk starts with a 32-byte stamp of (nonce, n), so no two chunks dedup, within a
    run or against an earlier run on the same repository: a benchmark of unique ingest stays unique.
    """
    rng = random.Random(seed)
    zero = bytes(chunk_size)
    offsets = (len(corpus) - chunk_size) // FS_BLOCK
    if offsets < 0:
        raise ValueError(f"the corpus ({len(corpus)} bytes) is smaller than one chunk ({chunk_size})")
    chunks = []
    for n in range(count):
        kind = rng.random()
        if kind < mix.zero:
            chunks.append(zero)
            continue
        if kind < mix.zero + mix.random:  # BLAKE3's XOF: incompressible, deterministic and fast
            body = bytearray(blake3.blake3(nonce + n.to_bytes(8, "little"), key=bytes(32)).digest(chunk_size))
        else:
            start = rng.randrange(offsets + 1) * FS_BLOCK
            body = bytearray(corpus[start : start + chunk_size])
        body[:32] = blake3.blake3(nonce + n.to_bytes(8, "little")).digest()
        chunks.append(bytes(body))
    return chunks


# ------------------------------------------------------------------------------------------ probes

@dataclass(frozen=True)
class CodecRates:
    """Single-core rates on one data set, in MiB/s of raw bytes, and the zstd ratio (raw ÷ compressed)."""

    compress: float
    decompress: float
    blake3: float
    ratio: float

    @property
    def verify(self) -> float:
        """Decompress then BLAKE3 on one core: the per-byte work a server does to trust a chunk."""
        return 1 / (1 / self.decompress + 1 / self.blake3)


def measure_codecs(chunks: Sequence[bytes], level: int = 1) -> tuple[CodecRates, list[Frame]]:
    """Time zstd compress and decompress and BLAKE3 of the non-zero chunks on one thread.

    Returns the rates and the upload frames built from that same compression (stored raw where zstd does
    not shrink a chunk), so a benchmark reuses the work it just timed instead of compressing twice.
    """
    data = [c for c in chunks if not is_zero(c)]
    raw = sum(map(len, data)) / MiB
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    start = time.perf_counter()
    packed = [cctx.compress(c) for c in data]
    t_compress = elapsed(start)
    start = time.perf_counter()
    for p in packed:
        dctx.decompress(p)
    t_decompress = elapsed(start)
    start = time.perf_counter()
    digests = [blake3.blake3(c).digest() for c in data]
    t_blake3 = elapsed(start)
    frames = [Frame(d, CODEC_ZSTD, len(c), p) if len(p) < len(c) else Frame(d, CODEC_RAW, len(c), c)
              for d, c, p in zip(digests, data, packed, strict=True)]
    rates = CodecRates(raw / t_compress, raw / t_decompress, raw / t_blake3,
                       raw * MiB / sum(len(p) for p in packed))
    return rates, frames


@dataclass(frozen=True)
class DiskRates:
    write: float
    """Sequential write, MiB/s, with an fdatasync every 32 MiB (how a pack is group-committed)."""
    fdatasync_ms: float
    """Median latency of appending 4 KiB and fdatasync: the floor of any durable small write."""
    read: float | None = None
    """Sequential read of the probe file after its pages were dropped from the page cache, MiB/s."""
    cached_read: float | None = None
    """Sequential read of the same file from the page cache, MiB/s: where a backup of a warm disk reads."""


def _read_rate(fd: int, size: int, block: int) -> float:
    start = time.perf_counter()
    offset = 0
    while offset < size:
        n = len(os.pread(fd, block, offset))
        if not n:
            break
        offset += n
    return offset / MiB / elapsed(start)


def disk_rates(directory: Path, size: int = 256 * MiB, sync_every: int = 32 * MiB, block: int = 4 * MiB,
               small_syncs: int = 50) -> DiskRates:
    """Probe the filesystem that holds `directory` with a temporary file (removed afterwards).

    The cold read drops only the probe file's own pages (POSIX_FADV_DONTNEED after its data is synced), so
    the probe never evicts anyone else's cache.
    """
    path = directory / f".bench-disk-probe-{os.getpid()}"
    buf = os.urandom(block)  # random, so a compressing filesystem cannot flatter the number
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        written = 0
        while written < size:
            written += os.write(fd, buf)
            if written % sync_every < block:
                os.fdatasync(fd)
        os.fdatasync(fd)
        write = written / MiB / elapsed(start)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read = _read_rate(fd, written, block)
        cached_read = _read_rate(fd, written, block)
        small = os.urandom(FS_BLOCK)
        latencies = []
        for _ in range(small_syncs):
            start = time.perf_counter()
            os.write(fd, small)
            os.fdatasync(fd)
            latencies.append(elapsed(start))
    finally:
        os.close(fd)
        path.unlink()
    return DiskRates(write, statistics.median(latencies) * 1000, read, cached_read)


def threaded_codec_rates(chunks: Sequence[bytes], threads: int, level: int = 1) -> CodecRates:
    """zstd and BLAKE3 rates of `threads` threads, each through its own share of the non-zero chunks, in MiB/s.

    Both libraries release the GIL, so this is what `threads` cores give a pipeline that works chunk by chunk in a
    thread pool, as the collector and the server do; with threads=1 it is `measure_codecs` without the frames.
    """
    data = [c for c in chunks if not is_zero(c)]
    parts = [data[i::threads] for i in range(threads)]
    raw = sum(map(len, data)) / MiB

    def compress(part: list[bytes]) -> list[bytes]:
        cctx = zstandard.ZstdCompressor(level=level)
        return [cctx.compress(c) for c in part]

    def decompress(part: list[bytes]) -> int:
        dctx = zstandard.ZstdDecompressor()
        return sum(len(dctx.decompress(p)) for p in part)

    def hash_all(part: list[bytes]) -> int:
        return len([blake3.blake3(c).digest() for c in part])

    with ThreadPoolExecutor(threads) as pool:
        def timed(fn: Callable[[list], object], work: list[list]) -> tuple[float, list]:
            start = time.perf_counter()
            out = list(pool.map(fn, work))
            return elapsed(start), out

        t_compress, packed = timed(compress, parts)
        t_decompress, _ = timed(decompress, packed)
        t_blake3, _ = timed(hash_all, parts)
    stored = sum(len(p) for part in packed for p in part)
    return CodecRates(raw / t_compress, raw / t_decompress, raw / t_blake3, raw * MiB / stored)


def rocksdb_multiget_rate(directory: Path, keys: int = 262_144, batch: int = 65_536, rounds: int = 4) -> float:
    """Digests/s of multi-gets of `batch` keys, half present, on a flushed RocksDB with the index's table
    options (lz4, 10-bit bloom filter, block cache): the floor under a `missing` query, with no HTTP."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_compression_type(DBCompressionType.lz4())
    table = BlockBasedOptions()
    table.set_block_cache(Cache(128 * MiB))
    table.set_bloom_filter(10, False)
    table.set_cache_index_and_filter_blocks(True)
    opts.set_block_based_table_factory(table)
    path = directory / f"rocksdb-probe-{os.getpid()}"
    rng = random.Random(7)
    present = [rng.randbytes(32) for _ in range(keys)]
    value = bytes(29)
    db = Rdict(str(path), options=opts)
    try:
        for start in range(0, keys, 1000):
            wb = WriteBatch(raw_mode=True)
            for k in present[start : start + 1000]:
                wb.put(k, value)
            db.write(wb)
        db.flush()
        total = 0.0
        for _ in range(rounds):
            query = rng.sample(present, batch // 2) + [rng.randbytes(32) for _ in range(batch - batch // 2)]
            rng.shuffle(query)
            start = time.perf_counter()
            db.get(query)
            total += elapsed(start)
    finally:
        db.close()
        Rdict.destroy(str(path))
    return batch * rounds / total


def _sink_app() -> web.Application:
    """Loopback HTTP sink: discards POST bodies, streams GET bodies from one 1 MiB buffer."""
    block = os.urandom(MiB)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def sink(request: web.Request) -> web.Response:
        n = 0
        async for part in request.content.iter_any():
            n += len(part)
        return web.json_response({"bytes": n})

    async def source(request: web.Request) -> web.StreamResponse:
        mib = int(request.match_info["mib"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = mib * MiB
        await resp.prepare(request)
        for _ in range(mib):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", ready)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source/{mib}", source)
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60, what: str = "server") -> None:
    """Wait until GET url answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the {what} did not answer {url} within {timeout} s")


@dataclass(frozen=True)
class LoopbackRates:
    upload: float
    """MiB/s of POST bodies sent in 1 MiB pieces (`post_in_pieces`) to a discarding aiohttp server."""
    upload_one_write: float
    """MiB/s of the same bodies passed to aiohttp as one bytes object, as `chunkyard.wire.Client` sends them."""
    download: float
    """MiB/s of one streamed GET read with iter_chunked(4 MiB), like `Client.stream_disk`."""


async def post_in_pieces(session: aiohttp.ClientSession, url: str, body: bytes, *, piece: int = MiB) -> bytes:
    """POST a body in 1 MiB pieces with its Content-Length; return the answer, raising on an HTTP error.

    Python 3.11's asyncio transport keeps an unsent write in a bytearray and deletes the sent head after
    every send(), so handing it a 32 MiB body in one write costs O(size²) memmoves (3.5x slower measured).
    """
    view = memoryview(body)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(view), piece):
            yield view[start : start + piece]

    headers = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
    async with session.post(url, data=pieces(), headers=headers) as r:
        answer = await r.read()
        if r.status >= 300:
            raise RuntimeError(f"POST {url}: HTTP {r.status}: {answer[:300]!r}")
        return answer


def loopback_http_rates(size: int = 1024 * MiB, body: int = 32 * MiB, parallel: int = 4) -> LoopbackRates:
    """aiohttp client (this process) against an aiohttp sink in another process, over 127.0.0.1:
    the transport ceiling for uploads and restores on this machine, without any Chunkyard work."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.common", "sink", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, what="loopback sink")
        return asyncio.run(_loopback(url, size, body, parallel))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


async def _loopback(url: str, size: int, body_size: int, parallel: int) -> LoopbackRates:
    body = os.urandom(body_size)
    async with aiohttp.ClientSession() as session:

        async def post_all(total: int, in_pieces: bool) -> float:
            posts = iter(range(max(1, total // body_size)))

            async def poster() -> int:
                sent = 0
                for _ in posts:  # one iterator shared by all posters: a work queue
                    if in_pieces:
                        answer = await post_in_pieces(session, url + "/sink", body)
                    else:
                        async with session.post(url + "/sink", data=body) as r:
                            answer = await r.read()
                    sent += json.loads(answer)["bytes"]
                return sent

            start = time.perf_counter()
            sent = sum(await asyncio.gather(*(poster() for _ in range(parallel))))
            return sent / MiB / elapsed(start)

        upload = max([await post_all(size, True) for _ in range(2)])  # best of 2: the probe is noisy
        upload_one_write = await post_all(size // 4, False)
        start = time.perf_counter()
        got = 0
        async with session.get(f"{url}/source/{size // MiB}") as r:
            async for part in r.content.iter_chunked(4 * MiB):
                got += len(part)
        download = got / MiB / elapsed(start)
    return LoopbackRates(upload, upload_one_write, download)


@dataclass(frozen=True)
class Limits:
    """The machine limits a fleet benchmark stands beside, measured in its own run on the fleet's own data."""

    one: CodecRates
    """zstd-1 and BLAKE3 on one thread."""
    all: CodecRates
    """The same with one thread per core."""
    threads: int
    disk: DiskRates
    net: LoopbackRates
    sample_bytes: int

    def rows(self) -> list[Row]:
        """The limits table."""
        mibs, n = "MiB/s", self.threads
        data = f"{self.sample_bytes / MiB:.0f} MiB of fleet chunks, zstd-1 ratio {self.one.ratio:.2f}"
        return [
            Row("zstd-1 compress, 1 thread", self.one.compress, mibs, note=data),
            Row(f"zstd-1 compress, {n} threads", self.all.compress, mibs),
            Row("zstd-1 decompress, 1 thread", self.one.decompress, mibs),
            Row(f"zstd-1 decompress, {n} threads", self.all.decompress, mibs),
            Row("BLAKE3, 1 thread", self.one.blake3, mibs),
            Row(f"BLAKE3, {n} threads", self.all.blake3, mibs, note="one thread per core, chunk by chunk"),
            Row("verify = zstd-1 decompress + BLAKE3, 1 thread", self.one.verify, mibs,
                note="a server's per-byte restore work"),
            Row("disk write, fdatasync every 32 MiB", self.disk.write, mibs, note="work dir's filesystem"),
            Row("disk read, cold", self.disk.read or 0.0, mibs, note="probe file's pages dropped first"),
            Row("disk read, page cache", self.disk.cached_read or 0.0, mibs),
            Row("loopback HTTP POST, 1 MiB writes, 4 in flight", self.net.upload, mibs, note="aiohttp → aiohttp"),
            Row("loopback HTTP GET stream", self.net.download, mibs),
        ]

    def to_json(self) -> dict:
        return asdict(self)


def measure_limits(chunks: Sequence[bytes], directory: Path, *, disk_bytes: int, loopback_bytes: int) -> Limits:
    """Codec rates on `chunks` with 1 and with all threads, the disk under `directory`, and loopback HTTP."""
    threads = len(os.sched_getaffinity(0))
    return Limits(threaded_codec_rates(chunks, 1), threaded_codec_rates(chunks, threads), threads,
                  disk_rates(directory, disk_bytes), loopback_http_rates(loopback_bytes), sum(map(len, chunks)))


# ------------------------------------------------------------------------------------------ server

class ChunkyardServer:
    """A real `chunkyard serve` process on a free loopback port, over a data directory that `chunkyard init`
    creates when it holds no repository yet (an existing repository and its admin.token are reused)."""

    def __init__(self, data: Path, *, chunk_size: str = "1MiB", log: Path | None = None, config: Path | None = None):
        self.data = data
        self.config = config  # a server TOML file (`--config`), e.g. with [[tier]] tables
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or data.parent / f"{data.name}-server.log"
        self.proc: subprocess.Popen | None = None
        if not (data / "repo.toml").exists():
            subprocess.run([sys.executable, "-m", "chunkyard.cli", "init", "--data", str(data),
                            "--chunk-size", chunk_size], check=True, capture_output=True, cwd=ROOT)
        self.admin_token = (data / "admin.token").read_text().strip()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "chunkyard.cli", "serve", "--data", str(self.data),
               "--listen", f"127.0.0.1:{self.port}"] + (["--config", str(self.config)] if self.config else [])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"{self.url}/api/v1/health", self.proc, what=f"server (log: {self.log})")
        except RuntimeError:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        return process_memory(self.pid)

    def client(self) -> Client:
        return Client(self.url, self.admin_token)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ChunkyardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _own_cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (a `chunkyard restore` it ran, say)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class PhaseMeter:
    """Wall time, CPU seconds of the server, of this process (with the commands it ran and waited for) and of
    everything else on the machine, and server memory, around each phase.

    CPU per phase says whether a slow phase saturated the cores or waited, and whether other work on the
    shared machine took cores from it; VmHWM only rises, so the memory after each phase says which phase
    set the server's peak.
    """

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.phases: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"{name} ...", flush=True)
        server, client, machine = process_cpu_seconds(self.pid), _own_cpu_seconds(), machine_busy_seconds()
        start = time.perf_counter()
        yield
        wall = elapsed(start)
        server = process_cpu_seconds(self.pid) - server
        client = _own_cpu_seconds() - client
        machine = machine_busy_seconds() - machine
        self.phases[name] = {"wall_s": wall, "server_cpu_s": server, "client_cpu_s": client,
                             "other_cpu_s": max(0.0, machine - server - client)} | process_memory(self.pid)

    def cores(self, name: str) -> str:
        """'cores: server 1.6, client 0.3, other 0.0': average busy cores during a phase."""
        p = self.phases[name]
        return ("cores: " + ", ".join(f"{who} {p[f'{who}_cpu_s'] / p['wall_s']:.1f}"
                                      for who in ("server", "client", "other")))

    def server_cpu_per_gib(self, name: str, raw_bytes: int) -> float:
        """Server core-seconds per GiB of raw data handled in a phase: its cost, independent of contention."""
        return self.phases[name]["server_cpu_s"] / (raw_bytes / (1 << 30))

    def contended(self, threshold: float = 0.2) -> list[str]:
        """Phases during which other processes kept more than `threshold` of a core busy on average."""
        return [name for name, p in self.phases.items() if p["other_cpu_s"] / p["wall_s"] > threshold]


# ------------------------------------------------------------------------------------------ results

@dataclass
class Row:
    """One result: a measured value, the machine limit it is bounded by, and its DESIGN §7 target."""

    name: str
    value: float
    unit: str
    limit: float | None = None
    limit_name: str = ""
    target: float | None = None
    higher_is_better: bool = True
    target_text: str = ""
    note: str = ""
    spread: tuple[float, float] | None = None
    """(min, max) of `value` over the runs when this row is their median run (see `aggregate`)."""
    ratio_spread: tuple[float, float] | None = None
    """(min, max) of the ratio over those runs."""

    @property
    def ratio(self) -> float | None:
        return self.value / self.limit if self.limit else None

    @classmethod
    def from_json(cls, doc: dict) -> Row:
        """A row back from `to_json` (its derived ratio and verdict are recomputed)."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items() if k not in ("ratio", "passed")}
        return cls(**fields)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def to_json(self) -> dict:
        return asdict(self) | {"ratio": self.ratio, "passed": self.passed}


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def markdown_table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table, aligned so it also reads well on a terminal."""
    lines = [list(head), *map(list, lines)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def format_table(rows: Sequence[Row], limit_head: str = "machine limit") -> str:
    """Rows as a Markdown table; `limit_head` names what the limit column holds (a peer's number, say)."""
    head = ["what", "measured", limit_head, "ratio", "target (§7)", "pass", "note"]
    lines = []
    for r in rows:
        verdict = {True: "PASS", False: "FAIL", None: "—"}[r.passed]
        limit = f"{_num(r.limit)} {r.unit} ({r.limit_name})" if r.limit else (r.limit_name or "—")
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "—"
        if r.ratio_spread and f"{r.ratio_spread[0]:.2f}" != f"{r.ratio_spread[1]:.2f}":
            ratio += f" ({r.ratio_spread[0]:.2f}–{r.ratio_spread[1]:.2f})"
        measured = f"{_num(r.value)} {r.unit}"
        if r.spread and _num(r.spread[0]) != _num(r.spread[1]):  # equal in every run: nothing to show
            measured += f" ({_num(r.spread[0])}–{_num(r.spread[1])})"
        lines.append([r.name, measured, limit, ratio, r.target_text or "—", verdict, r.note])
    return markdown_table(head, lines)


def aggregate(runs: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per name over several runs: the row of the median run, with the min–max of its value and ratio.

    The median run is the one with the median ratio when the row has a limit (the ratio is what stays comparable
    between runs on a shared machine), else with the median value; with an even count, the lower middle. Value,
    limit, target, verdict and note therefore always come from one real run and agree with each other.
    """
    by_name: dict[str, list[Row]] = {}
    for rows in runs:
        for r in rows:
            by_name.setdefault(r.name, []).append(r)
    out = []
    for rows in by_name.values():
        if len(rows) == 1:
            out.append(rows[0])
            continue
        ratios = [r.ratio for r in rows if r.ratio is not None]
        by_ratio = len(ratios) == len(rows)
        middle = sorted(rows, key=lambda r: r.ratio if by_ratio else r.value)[(len(rows) - 1) // 2]
        values = [r.value for r in rows]
        out.append(replace(middle, spread=(min(values), max(values)),
                           ratio_spread=(min(ratios), max(ratios)) if by_ratio else None))
    return out


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _main() -> None:
    parser = argparse.ArgumentParser(description="helpers of the benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    sink = sub.add_parser("sink", help="run the loopback HTTP sink (used by loopback_http_rates)")
    sink.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(_sink_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    _main()
