"""The backup pipeline: read -> zero check -> BLAKE3 -> skip unchanged -> `missing` -> zstd -> upload
-> map -> commit, with memory bounded whatever the disk size.

Per disk, one of three plans:
- tracked: the base point has this disk with a change-tracking id the source still knows; only the
  changed ranges, widened to chunk boundaries, are read, and every chunk read is mapped.
- compare: a base exists but tracking cannot say what changed (no id, reset, resized, --full); every
  allocated range is read, and only chunks whose digest differs from the base map are mapped (chunks
  the base had but the disk no longer allocates are mapped to ZERO).
- full: no base; every allocated range is read, every data chunk mapped (unmapped means zero).
Chunks are compressed only after `missing` says the server lacks them, so dedup hits cost no zstd.
A batch of half `missing_batch` chunks is asked about, compressed and queued by a background task while
the loop reads and hashes the next half (one batch at a time), so the worker threads stay busy and memory
holds no more raw chunks than one unpipelined `missing_batch` did.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import zstandard

from chunkyard.progress import Progress
from chunkyard.units import format_size
from chunkyard.wire import (
    CODEC_RAW,
    CODEC_ZSTD,
    DIGEST_LEN,
    FRAME_HEADER,
    ZERO,
    ApiError,
    Client,
    bitmap_get,
    digest,
)

from .sources import Backup, DiskInfo, DiskReader, Range

MiB = 1 << 20
MAP_FLUSH = 65536  # map records buffered before a barrier flush (2.5 MiB)
RAW_PER_BODY = 4  # an upload body also closes at this many times Options.upload_body in uncompressed bytes


class Limiter(Protocol):
    """Paces uploads (the pull collector's bandwidth limit): acquire(n) returns when n bytes may be sent."""

    async def acquire(self, n: int) -> None: ...


@dataclass
class Options:
    full: bool = False  # ignore change tracking: read everything allocated (still deduplicated)
    read_size: int = 8 * MiB  # one sequential read request
    reads_in_flight: int = 3
    missing_batch: int = 32  # chunks held while asking the server which it lacks
    upload_body: int = 16 * MiB  # frames per upload request, by stored bytes
    uploads_in_flight: int = 3
    zstd_level: int = 1
    workers: int = 2  # hashing and compression threads (BLAKE3 and zstd release the GIL)
    state_dir: Path | None = None  # where an interrupted run's session id is kept, to resume it
    limiter: Limiter | None = None  # awaited before each upload body with its payload bytes


@dataclass
class DiskResult:
    disk_id: str
    plan: str
    read_bytes: int = 0
    chunks_read: int = 0
    zero_chunks: int = 0
    unchanged_chunks: int = 0
    mapped_chunks: int = 0
    missing_chunks: int = 0


@dataclass
class Result:
    point_id: str
    vm: str
    seconds: float
    read_bytes: int
    sent_bytes: int  # stored (compressed) bytes uploaded
    uploaded_chunks: int
    disks: list[DiskResult] = field(default_factory=list)
    server_stats: dict = field(default_factory=dict)
    resumed_session: bool = False
    source_report: dict = field(default_factory=dict)


def chunk_spans(ranges: Iterable[Range], size: int, chunk_size: int) -> list[tuple[int, int]]:
    """Changed byte ranges widened to whole chunks and merged: sorted [first, stop) chunk index spans."""
    spans: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if length <= 0 or offset >= size:
            continue
        first, stop = offset // chunk_size, -(-min(offset + length, size) // chunk_size)
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], stop))
        else:
            spans.append((first, stop))
    return spans


class _Local(threading.local):
    cctx: zstandard.ZstdCompressor | None = None


class DiskPipeline:
    """Backs up one disk into an open session."""

    def __init__(self, client: Client, sid: str, disk: DiskInfo, reader: DiskReader, chunk_size: int,
                 options: Options, pool: ThreadPoolExecutor, progress: Progress, totals: dict):
        self.client, self.sid, self.disk, self.reader = client, sid, disk, reader
        self.cs, self.options, self.pool, self.progress, self.totals = chunk_size, options, pool, progress, totals
        self.local = _Local()
        self.base_map: BaseMap | None = None
        self.map_all = True
        self.seen: set[bytes] = set()  # digests already sent or known present in this run
        self.map_buffer: list[tuple[int, bytes]] = []
        self.uploads: set[asyncio.Task] = set()
        self.sending: asyncio.Task | None = None  # the one batch being asked about, compressed and queued
        self.upload_slots = asyncio.Semaphore(options.uploads_in_flight)
        self.body = bytearray()  # encoded frames of the next upload request
        self.read_buffers: list[bytearray] = []  # free read buffers, reused: no allocation or zero-fill per read
        self.body_raw = 0  # their uncompressed bytes

    # ------------------------------------------------------------------ worker-thread work

    def _read_and_hash(self, first: int, stop: int) -> tuple[bytearray, list[tuple[int, bytes, memoryview]]]:
        """Read chunks [first, stop) in one request into a free read buffer; return the buffer (give it back
        with `read_buffers.append` once the chunks are handled) and (index, digest or ZERO, a view of the
        chunk's bytes in it). Nothing is copied here: the event loop copies only the chunks it sends."""
        start = first * self.cs
        length = min(stop * self.cs, self.disk.size) - start
        try:
            buffer = self.read_buffers.pop()
        except IndexError:
            buffer = bytearray(max(1, self.options.read_size // self.cs) * self.cs)
        view = memoryview(buffer)[:length]
        self.reader.read_into(start, view)
        out = []
        for i, off in enumerate(range(0, length, self.cs), first):
            piece = view[off : off + self.cs]
            d = digest(piece)  # an all-zero chunk is told by its digest: no second pass over the bytes
            out.append((i, ZERO if d == _zero_digest(len(piece)) else d, piece))
        return buffer, out

    def _compress(self, chunks: list[tuple[bytes, bytes]]) -> list[tuple[int, bytes]]:
        """(raw length, encoded frame) per chunk, taking the chunks out of `chunks` so each raw chunk is freed
        once compressed (the next batch is read meanwhile). Each frame is a new right-sized bytes:
        python-zstandard's result keeps a compress-bound allocation (about the chunk size) however small the
        output, and holding those until an upload body fills pinned up to the body size times the ratio."""
        if self.local.cctx is None:
            self.local.cctx = zstandard.ZstdCompressor(level=self.options.zstd_level)
        frames = []
        chunks.reverse()
        while chunks:
            d, raw = chunks.pop()
            packed = self.local.cctx.compress(raw)
            codec, payload = (CODEC_ZSTD, packed) if len(packed) < len(raw) else (CODEC_RAW, raw)
            frames.append((len(raw), FRAME_HEADER.pack(d, codec, len(raw), len(payload)) + payload))
        return frames

    # ------------------------------------------------------------------ event-loop work

    async def run(self, spans: list[tuple[int, int]], result: DiskResult) -> None:
        try:
            await self._run(spans, result)
        except BaseException:
            running = [*self.uploads, *([self.sending] if self.sending else [])]
            for task in running:  # a failed run leaves nothing running behind it
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise

    async def _run(self, spans: list[tuple[int, int]], result: DiskResult) -> None:
        loop = asyncio.get_running_loop()
        step = max(1, self.options.read_size // self.cs)
        batch = max(1, self.options.missing_batch // 2)  # one half is sent while the other fills
        reads = [(a, min(a + step, stop)) for first, stop in spans for a in range(first, stop, step)]
        pending: list[tuple[bytes, bytes]] = []  # (digest, raw) waiting for a `missing` answer
        in_flight: list[asyncio.Future] = []
        next_read = 0
        while next_read < len(reads) or in_flight:
            while next_read < len(reads) and len(in_flight) < self.options.reads_in_flight:
                in_flight.append(loop.run_in_executor(self.pool, self._read_and_hash, *reads[next_read]))
                next_read += 1
            buffer, chunks = await in_flight.pop(0)
            for index, d, raw in chunks:
                length = min(self.cs, self.disk.size - index * self.cs)
                result.chunks_read += 1
                result.read_bytes += length
                self.progress.update(length)
                if self.base_map is not None:
                    if await self.base_map.digest(index) == d:
                        result.unchanged_chunks += 1
                        continue
                elif d == ZERO and not self.map_all:
                    result.zero_chunks += 1
                    continue
                if d == ZERO:
                    result.zero_chunks += 1
                self.map_buffer.append((index, d))
                result.mapped_chunks += 1
                if d != ZERO and d not in self.seen:
                    self.seen.add(d)
                    pending.append((d, bytes(raw)))  # a copy: the read buffer is reused for a later read
                    if len(pending) >= batch:
                        await self._queue_send(pending, result)
                        pending = []
            self.read_buffers.append(buffer)  # every chunk it held is handled or copied into `pending`
            if len(self.map_buffer) >= MAP_FLUSH:
                await self._flush_map()
        if pending:
            await self._queue_send(pending, result)
        await self._flush_map()

    async def _queue_send(self, chunks: list[tuple[bytes, bytes]], result: DiskResult) -> None:
        """Send a full batch in the background once the previous one is queued for upload: the loop goes on
        reading and hashing the next batch meanwhile, and batches reach upload bodies in read order."""
        await self._sent()
        self.sending = asyncio.create_task(self._send(chunks, result))

    async def _sent(self) -> None:
        """Wait for the batch being sent (raises its error)."""
        if self.sending is not None:
            task = self.sending
            await task
            self.sending = None

    async def _send(self, chunks: list[tuple[bytes, bytes]], result: DiskResult) -> None:
        """Ask which chunks the server lacks, compress those, and queue them for upload; empties `chunks`."""
        bitmap = await self.client.missing(self.sid, [d for d, _ in chunks])
        todo = [c for n, c in enumerate(chunks) if bitmap_get(bitmap, n)]
        chunks.clear()  # present chunks' bytes are dropped now, the missing ones held by `todo`
        if not todo:
            return
        loop = asyncio.get_running_loop()
        half = -(-len(todo) // self.options.workers)
        shares = [todo[i : i + half] for i in range(0, len(todo), half)]
        result.missing_chunks += len(todo)
        todo.clear()  # from here on each raw chunk is held only by its share, until it is compressed
        parts = await asyncio.gather(*(loop.run_in_executor(self.pool, self._compress, share) for share in shares))
        for part in parts:
            while part:
                raw_len, frame = part.pop(0)
                self.body += frame
                self.body_raw += raw_len
                if (len(self.body) >= self.options.upload_body
                        or self.body_raw >= RAW_PER_BODY * self.options.upload_body):
                    await self._upload_body()

    async def _upload_body(self) -> None:
        """Start uploading the body filled so far; waits while `uploads_in_flight` bodies are in flight, so
        memory holds at most that many bodies plus the one being filled."""
        if not self.body:
            return
        body, self.body, self.body_raw = self.body, bytearray(), 0
        await self.upload_slots.acquire()
        task = asyncio.create_task(self._upload(body))
        self.uploads.add(task)
        task.add_done_callback(self.uploads.discard)

    async def _upload(self, body: bytearray) -> None:
        try:
            if self.options.limiter is not None:
                await self.options.limiter.acquire(len(body))  # the bytes this request puts on the wire
            answer = await self.client.upload(self.sid, body)
            self.totals["sent_bytes"] += answer["bytes"]
            self.totals["uploaded_chunks"] += answer["stored"]
        finally:
            self.upload_slots.release()

    async def _flush_map(self) -> None:
        """Map only after every upload in flight has landed: the server checks each digest is present."""
        await self._sent()
        await self._upload_body()
        if self.uploads:
            await asyncio.gather(*self.uploads)  # raises the first upload error
        if self.map_buffer:
            entries, self.map_buffer = self.map_buffer, []
            await self.client.map(self.sid, self.disk.disk_id, entries)


def _state_path(options: Options, vm_id: str) -> Path | None:
    return options.state_dir / f"{vm_id}.session.json" if options.state_dir else None


async def _open_session(client: Client, backup: Backup, host: str, options: Options) -> tuple[dict, bool]:
    """Resume the session an interrupted run left (if still open and for the same disks), or start one."""
    state = _state_path(options, backup.vm.id)
    disks = [{"disk_id": d.disk_id, "name": d.name, "size": d.size} for d in backup.disks]
    if state and state.exists():
        try:
            saved = json.loads(state.read_text())
            live = await client.session(saved["session"]["session_id"])
            same = [(d["disk_id"], d["size"]) for d in live["disks"]] == [(d["disk_id"], d["size"]) for d in disks]
            if live["state"] == "open" and same:
                return saved["session"], True
            if live["state"] == "open":
                await client.abort(saved["session"]["session_id"])
        except (ApiError, ValueError, KeyError):
            pass  # gone, expired or unreadable: start afresh
    session = await client.create_session(host=host, vm={"id": backup.vm.id, "name": backup.vm.name},
                                          disks=disks, base="latest", consistency=backup.consistency)
    if state:
        state.parent.mkdir(parents=True, exist_ok=True)
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"session": session, "started": time.time()}))
        os.replace(tmp, state)
    return session, False


async def run_backup(client: Client, backup: Backup, *, options: Options | None = None,
                     progress: Progress | None = None) -> Result:
    """Back up every disk of an open source backup into a new restore point and commit it."""
    options = options or Options()
    started = time.monotonic()
    session, resumed = await _open_session(client, backup, backup.vm.host, options)
    sid, cs = session["session_id"], session["chunk_size"]
    base_disks = {d["disk_id"]: d for d in session.get("base_disks", [])}
    totals = {"sent_bytes": 0, "uploaded_chunks": 0}
    results: list[DiskResult] = []
    plans = []
    for disk in backup.disks:
        base = base_disks.get(disk.disk_id)
        reader = backup.open_disk(disk.disk_id)
        changed = None
        if base and base.get("rct") and base["size"] == disk.size and not options.full:
            changed = backup.changed_ranges(disk.disk_id, base["rct"])
        if changed is not None:
            plan, ranges = "tracked", changed
        else:
            plan, ranges = ("compare" if base else "full"), reader.allocated_ranges()
        plans.append((disk, reader, plan, chunk_spans(ranges, disk.size, cs)))
    total = sum(min(stop * cs, d.size) - first * cs for d, _, _, spans in plans for first, stop in spans)
    progress = progress or Progress(total, f"{backup.vm.name}: read")
    progress.total = total
    with ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="collector") as pool:
        try:
            for disk, reader, plan, spans in plans:
                result = DiskResult(disk.disk_id, plan)
                pipe = DiskPipeline(client, sid, disk, reader, cs, options, pool, progress, totals)
                if plan == "compare":
                    base_chunks = -(-base_disks[disk.disk_id]["size"] // cs)
                    pipe.base_map = BaseMap(client, session["base_point"], disk.disk_id, base_chunks)
                    await _unmap_dropped(pipe, spans)
                pipe.map_all = plan != "full"
                await pipe.run(spans, result)
                results.append(result)
        finally:
            for _, reader, *_ in plans:
                reader.close()
        for name, data in backup.config_files().items():
            await client.put_blob(sid, name, data)
        tracking = backup.tracking_ids()
        read_bytes = sum(r.read_bytes for r in results)
        committed = await client.commit(sid, read_bytes=read_bytes, rct=tracking or None)
    state = _state_path(options, backup.vm.id)
    if state and state.exists():
        state.unlink()
    backup.end(committed=True)
    progress.label = f"{backup.vm.name}: read (sent {format_size(totals['sent_bytes'])})"
    progress.close()
    return Result(committed["point_id"], backup.vm.name, time.monotonic() - started, read_bytes,
                  totals["sent_bytes"], totals["uploaded_chunks"], results, committed["stats"], resumed,
                  backup.report())


@functools.lru_cache(maxsize=4)
def _zero_digest(length: int) -> bytes:
    return digest(bytes(length))


class BaseMap:
    """The base point's digest map, fetched in windows by Range as the disk is read in index order:
    memory stays at one window (2 MiB) whatever the disk size."""

    WINDOW = 65536

    def __init__(self, client: Client, point_id: str, disk_id: str, chunks: int):
        self.client, self.point_id, self.disk_id, self.chunks = client, point_id, disk_id, chunks
        self.first, self.data = 0, b""

    async def digest(self, index: int) -> bytes | None:
        """The base's digest at `index`; None beyond the base disk's end (it grew)."""
        if index >= self.chunks:
            return None
        if not self.first <= index < self.first + len(self.data) // DIGEST_LEN:
            self.first = index - index % self.WINDOW
            stop = min(self.chunks, self.first + self.WINDOW)
            self.data = await self.client.disk_map(self.point_id, self.disk_id, self.first, stop)
        offset = (index - self.first) * DIGEST_LEN
        return self.data[offset : offset + DIGEST_LEN]


async def _unmap_dropped(pipe: DiskPipeline, spans: list[tuple[int, int]]) -> None:
    """Compare plan: chunks the base holds but the disk no longer allocates (trimmed) become ZERO."""
    base = pipe.base_map
    assert base is not None
    chunks = min(base.chunks, -(-pipe.disk.size // pipe.cs))
    covered = bytearray(chunks)  # one byte per chunk: 64 MiB for a 64 TiB disk
    for first, stop in spans:
        covered[first:stop] = b"\x01" * (max(0, min(stop, chunks) - first))
    for index in range(chunks):
        if not covered[index] and await base.digest(index) != ZERO:
            pipe.map_buffer.append((index, ZERO))
