"""The chunk store: deduplicated chunk records in packs, located through the index.

Writers are group-committed: concurrent `put` calls queue their chunks; one of them (the
leader) appends everything queued to the open pack, issues one fdatasync, then indexes the
records. A `put` returns only after its chunks are durable (DESIGN §3 durability rule).
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag

from chunkyard.wire import digest

from .barrier import GcBarrier
from .codec import CodecError, decode
from .durable import write_atomic
from .errors import Corrupt, NotFound, Unavailable
from .faults import crash_point
from .index import U64, Index, Location
from .keyring import Keyring
from .pack import (
    FLAG_SEALED,
    RECORD_HEADER,
    PackFormatError,
    PackWriter,
    Record,
    fsync_dir,
    pack_path,
    parse_record,
    read_trailer,
    sealing_aad,
)

PACK_KEY = U64  # packs CF key: pack id, little-endian u64
MOVED = "moved"  # packs CF state of a pack that lives only in a cloud tier (move mode, tiering/move.py)
STUB = ".moved"  # beside where a moved pack was: its tier, size and records, so the index stays rebuildable


class RemotePacks(Protocol):
    """Where moved packs are read from: the move-mode tier (tiering/remote.py). Raises Unavailable.
    `pool` runs reads of moved records for restore streams, many in flight (they wait on the network)."""

    pool: Executor

    def read(self, pack_id: int, offset: int, length: int, *, cache: bool = True) -> bytes: ...

    def ping(self) -> None: ...


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A verified chunk ready to be stored (flags = codec | meta bit)."""

    digest: bytes
    flags: int
    raw_len: int
    stored: bytes | memoryview


@dataclass
class PutResult:
    stored: int = 0
    duplicate: int = 0
    bytes: int = 0  # written to packs for the new chunks (compressed, sealed)
    raw_bytes: int = 0  # uncompressed bytes of the new chunks


@dataclass
class RecoveryReport:
    packs_scanned: int = 0
    records_reindexed: int = 0
    bytes_truncated: int = 0
    damaged: list[str] = field(default_factory=list)


class _Waiter:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: PutResult | None = None
        self.error: BaseException | None = None


class ChunkStore:
    def __init__(self, index: Index, root: Path, barrier: GcBarrier, keyring: Keyring, *,
                 pack_size: int = 32 << 20):
        self.index = index
        self.keyring = keyring
        self.root = root
        self.barrier = barrier
        self.pack_size = pack_size
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # the open pack, the chunk index and the counters: one writer
        self._queue: list[tuple[list[NewChunk], _Waiter]] = []
        self._flushing = False
        self._writer: PackWriter | None = None
        self.chunk_count = index.counter("chunk_count")
        self.unique_bytes = index.counter("unique_bytes")
        self.stored_bytes = index.counter("stored_bytes")
        self.pack_count = index.counter("pack_count")
        self.moved: dict[int, str] = {}  # pack id -> the tier it lives in, for packs no longer on local disk
        self.remote: RemotePacks | None = None  # set while the move-mode tier runs

    # ---------------------------------------------------------------- recovery

    def recover(self) -> RecoveryReport:
        """Bring the index up to date with the packs on disk, and reopen the open pack.

        Sealed packs the index knows are skipped; every other pack is read (trailer, or a record
        scan that cuts a torn tail) and its records the index lacks are indexed again.
        """
        report = RecoveryReport()
        self._finish_moves(report)
        pack_files = sorted(self.root.glob("*/*.pack"))
        newest_open: tuple[int, Path] | None = None
        for path in pack_files:
            pack_id = int(path.stem, 16)
            raw_state = self.index.get("packs", PACK_KEY.pack(pack_id))
            state = json.loads(raw_state) if raw_state else {"state": "unknown", "size": 0}
            if state["state"] == "sealed":
                continue
            report.packs_scanned += 1
            records = read_trailer(path)
            if records is not None:
                self._index_recovered(pack_id, records, path.stat().st_size, sealed=True, report=report)
                continue
            if newest_open is not None:
                self._seal_stray(*newest_open, report)
            newest_open = (pack_id, path, state["size"])
        if newest_open is not None:
            self._writer = self._resume(*newest_open, report)
            self._index_recovered(newest_open[0], self._writer.records, self._writer.size, sealed=False,
                                  report=report)
        next_id = max((int(p.stem, 16) for p in [*pack_files, *self.root.glob(f"*/*{STUB}")]), default=0) + 1
        if self.index.counter("next_pack_id") < next_id:
            batch = self.index.batch()
            batch.put("meta", b"next_pack_id", U64.pack(next_id))
            self.index.write(batch, sync=True)
        return report

    def _finish_moves(self, report: RecoveryReport) -> None:
        """Load which packs live in a cloud tier. A move writes the pack's stub, then the index entry, then
        deletes the pack file: a pack file whose index entry says moved is deleted (the move was cut just
        before), a stub whose pack file is still there and not moved is dropped (cut before the index
        write), and a stub the index does not know (a rebuilt index) is indexed again."""
        for key, value in self.index.scan("packs"):
            state = json.loads(value)
            if state["state"] == MOVED:
                pack_id = PACK_KEY.unpack(key)[0]
                self.moved[pack_id] = state["tier"]
                path = pack_path(self.root, pack_id)
                if path.exists():
                    path.unlink()
                    fsync_dir(path.parent)
        for stub in sorted(self.root.glob(f"*/*{STUB}")):
            pack_id = int(stub.stem, 16)
            if pack_id in self.moved:
                continue
            if stub.with_suffix(".pack").exists():
                stub.unlink()
                continue
            info = json.loads(stub.read_bytes())
            records = [Record(bytes.fromhex(d), *rest) for d, *rest in info["records"]]
            report.packs_scanned += 1
            self._index_recovered(pack_id, records, info["size"], sealed=True, report=report)
            batch = self.index.batch()
            batch.put("packs", PACK_KEY.pack(pack_id), json.dumps(
                {"state": MOVED, "size": info["size"], "records": len(records), "tier": info["tier"]}).encode())
            self.index.write(batch, sync=True)
            self.moved[pack_id] = info["tier"]

    def _resume(self, pack_id: int, path: Path, protected_end: int, report: RecoveryReport) -> PackWriter:
        size_before = path.stat().st_size
        writer, damaged = PackWriter.resume(path, pack_id, protected_end)
        report.bytes_truncated += size_before - writer.size
        report.damaged += [f"pack {pack_id:016x} offset {offset}" for offset in damaged]
        return writer

    def _seal_stray(self, pack_id: int, path: Path, protected_end: int, report: RecoveryReport) -> None:
        """An older unsealed pack (crash between roll-over steps): cut its tail and seal it."""
        writer = self._resume(pack_id, path, protected_end, report)
        writer.seal()
        writer.close()
        self._index_recovered(pack_id, writer.records, writer.size, sealed=True, report=report)

    def _index_recovered(
        self, pack_id: int, records: list[Record], size: int, *, sealed: bool, report: RecoveryReport
    ) -> None:
        for start in range(0, len(records), 1000):
            part = records[start : start + 1000]
            known = self.index.multi_get("chunks", [r.digest for r in part])
            batch = self.index.batch()
            for record, value in zip(part, known, strict=True):
                if value is None:
                    batch.put("chunks", record.digest, Location(pack_id, record).encode())
                    self._count_new(record)
                    report.records_reindexed += 1
            self._put_counters(batch)
            self.index.write(batch)
        batch = self.index.batch()
        self._put_pack_state(batch, pack_id, "sealed" if sealed else "open", size, len(records))
        self.index.write(batch, sync=True)

    # ---------------------------------------------------------------- writing

    def put(self, chunks: list[NewChunk]) -> PutResult:
        """Store chunks not already present; return after they are durable. Thread-safe."""
        waiter = _Waiter()
        with self._lock:
            self._queue.append((chunks, waiter))
            lead = not self._flushing
            self._flushing = True
        while lead:
            with self._lock:
                work, self._queue = self._queue, []
                if not work:
                    self._flushing = False
                    break
            try:
                present = self._present(work)  # barrier lock first, never inside the write lock
                with self._write_lock:
                    self._flush(work, present)
            except BaseException as e:
                for _, w in work:
                    w.error = e
                    w.event.set()
        waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.result is not None
        return waiter.result

    def _present(self, work: list[tuple[list[NewChunk], _Waiter]]) -> set[bytes]:
        all_digests = list({c.digest for chunks, _ in work for c in chunks})
        with self.barrier.lock:  # a duplicate must not be swept after we said it is stored
            found = self.index.multi_get("chunks", all_digests)
            self.barrier.touch(all_digests)
        return {d for d, v in zip(all_digests, found, strict=True) if v is not None}

    def _flush(self, work: list[tuple[list[NewChunk], _Waiter]], present: set[bytes]) -> None:
        written: dict[bytes, tuple[int, Record]] = {}
        results = []
        touched_packs: dict[int, PackWriter] = {}
        for chunks, _ in work:
            result = PutResult()
            for chunk in chunks:
                if chunk.digest in present or chunk.digest in written:
                    result.duplicate += 1
                    continue
                writer = self._open_writer()
                flags, stored = chunk.flags, chunk.stored
                if self.keyring.encrypted:
                    flags |= FLAG_SEALED
                    stored = self.keyring.seal(stored, sealing_aad(flags, chunk.raw_len, chunk.digest))
                record = writer.append(chunk.digest, flags, chunk.raw_len, stored)
                written[chunk.digest] = (writer.pack_id, record)
                touched_packs[writer.pack_id] = writer
                result.stored += 1
                result.bytes += len(stored)
                result.raw_bytes += chunk.raw_len
                if writer.size >= self.pack_size:
                    writer.seal()
                    writer.close()
                    self._writer = None
            results.append(result)
        if self._writer is not None and self._writer.pack_id in touched_packs:
            self._writer.sync()
        crash_point("after_pack_sync")
        batch = self.index.batch()
        for d, (pack_id, record) in written.items():
            batch.put("chunks", d, Location(pack_id, record).encode())
            self._count_new(record)
        for pack_id, writer in touched_packs.items():
            sealed = writer is not self._writer
            self._put_pack_state(batch, pack_id, "sealed" if sealed else "open", writer.size,
                                 len(writer.records))
        self._put_counters(batch)
        self.index.write(batch)
        for (_, waiter), result in zip(work, results, strict=True):
            waiter.result = result
            waiter.event.set()

    def _open_writer(self) -> PackWriter:
        if self._writer is None:
            pack_id = self.index.counter("next_pack_id") or 1
            batch = self.index.batch()
            batch.put("meta", b"next_pack_id", U64.pack(pack_id + 1))
            self.pack_count += 1
            self._put_counters(batch)
            self.index.write(batch, sync=True)
            self._writer = PackWriter.create(self.root, pack_id)
        return self._writer

    def _count_new(self, record: Record) -> None:
        self.chunk_count += 1
        self.unique_bytes += record.raw_len
        self.stored_bytes += record.stored_len + RECORD_HEADER.size

    def _count_gone(self, record: Record) -> None:
        self.chunk_count -= 1
        self.unique_bytes -= record.raw_len
        self.stored_bytes -= record.stored_len + RECORD_HEADER.size

    def _put_counters(self, batch) -> None:
        for name in ("chunk_count", "unique_bytes", "stored_bytes", "pack_count"):
            batch.put("meta", name.encode(), U64.pack(getattr(self, name)))

    def _put_pack_state(self, batch, pack_id: int, state: str, size: int, records: int) -> None:
        batch.put("packs", PACK_KEY.pack(pack_id),
                  json.dumps({"state": state, "size": size, "records": records}).encode())

    # ---------------------------------------------------------------- maintenance (gc.py)

    def forget(self, dead: list[Location]) -> None:
        """Drop swept chunks from the index (their bytes stay in packs until compaction)."""
        with self._write_lock:
            batch = self.index.batch()
            for loc in dead:
                batch.delete("chunks", loc.record.digest)
                self._count_gone(loc.record)
            self._put_counters(batch)
            self.index.write(batch, sync=True)

    def relocate(self, pack_id: int) -> int:
        """Copy a sealed pack's live records into the open pack, point the index at the copies, then
        delete the old pack. Crash-safe: copies are durable before the index moves, and the old file
        goes only after. Returns the bytes freed."""
        if pack_id in self.moved:
            return 0  # its bytes are in the cloud: rewriting it would download it (GC skips these)
        path = pack_path(self.root, pack_id)
        records = read_trailer(path)
        if records is None:
            raise Corrupt(f"pack {pack_id:016x} has no valid trailer; run `chunkyard repair --check`")
        with self._write_lock, ChunkReader(self) as reader:
            if pack_id in self.moved:  # moved while the trailer was read
                return 0
            current = self.index.locate_many([r.digest for r in records])
            moved: list[tuple[bytes, int, Record]] = []
            lost: list[Location] = []
            for record, loc in zip(records, current, strict=True):
                if loc is None or loc.pack_id != pack_id or loc.record.offset != record.offset:
                    continue  # dead, or a newer copy elsewhere
                try:
                    stored = reader.read_stored(loc)
                except Corrupt:
                    lost.append(loc)  # quarantined: the next backup's `missing` asks for it again
                    continue
                writer = self._open_writer()
                moved.append((record.digest, writer.pack_id, writer.append(record.digest, record.flags,
                                                                           record.raw_len, stored)))
                if writer.size >= self.pack_size:
                    writer.seal()
                    writer.close()
                    self._writer = None
                    self._put_state_now(writer)
            if self._writer is not None:
                self._writer.sync()
            crash_point("after_relocate_copy")
            batch = self.index.batch()
            for d, new_pack, record in moved:
                batch.put("chunks", d, Location(new_pack, record).encode())
            for loc in lost:
                batch.delete("chunks", loc.record.digest)
                self._count_gone(loc.record)
            if self._writer is not None:
                self._put_pack_state(batch, self._writer.pack_id, "open", self._writer.size,
                                     len(self._writer.records))
            self.index.write(batch, sync=True)
            crash_point("after_relocate_index")
            return self.delete_pack(pack_id)

    def open_pack_id(self) -> int | None:
        writer = self._writer
        return writer.pack_id if writer is not None else None

    def first_unfinished_pack(self) -> int:
        """The lowest pack id that can still get records: the open pack, else the next one to open. Under the
        write lock: a flush seals a full pack half-way and indexes its records only at the end, so read
        without it, a sealed pack could be named finished while its last records are not indexed yet."""
        with self._write_lock:
            return self.open_pack_id() or self.index.counter("next_pack_id")

    def seal_open_pack(self) -> int | None:
        """Seal the open pack now if it holds records, so that every chunk stored so far lies in an
        immutable pack (the cloud tier uploads only sealed packs, and a point only after the packs it
        needs). Returns the sealed pack's id, or None when there was nothing to seal. Under the write
        lock, so no flush or relocation is half-way through the pack."""
        with self._write_lock:
            writer = self._writer
            if writer is None or not writer.records:
                return None
            writer.seal()
            writer.close()
            self._writer = None
            self._put_state_now(writer)
            return writer.pack_id

    def delete_pack(self, pack_id: int) -> int:
        """Remove a pack no index entry points to."""
        path = pack_path(self.root, pack_id)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        path.with_suffix(STUB).unlink(missing_ok=True)
        fsync_dir(path.parent)
        batch = self.index.batch()
        batch.delete("packs", PACK_KEY.pack(pack_id))
        self.pack_count -= 1
        self._put_counters(batch)
        self.index.write(batch, sync=True)
        self.moved.pop(pack_id, None)  # a dead moved pack: the tier deletes its cloud copy (tiering/sync.py)
        return size

    def mark_moved(self, pack_id: int, tier: str) -> bool:
        """Record that a sealed pack lives in `tier` from now on, then delete its local file. The caller has
        verified the cloud copy. A stub (tier, size, the trailer's records) is written first, so a rebuilt
        index still knows the pack; the index entry is durable before the unlink, and recovery finishes a
        move cut short (`_finish_moves`). False when the pack is no longer a sealed local pack (GC
        deleted or compacted it meanwhile)."""
        key = PACK_KEY.pack(pack_id)
        path = pack_path(self.root, pack_id)
        with self._write_lock:
            raw = self.index.get("packs", key)
            state = json.loads(raw) if raw else None
            records = read_trailer(path) if state is not None and state["state"] == "sealed" else None
            if records is None:
                return False
            write_atomic(path.with_suffix(STUB), json.dumps({
                "tier": tier, "size": state["size"],
                "records": [[r.digest.hex(), r.offset, r.stored_len, r.raw_len, r.flags] for r in records]}).encode())
            batch = self.index.batch()
            batch.put("packs", key, json.dumps(state | {"state": MOVED, "tier": tier}).encode())
            self.index.write(batch, sync=True)
            self.moved[pack_id] = tier
        crash_point("tier_move_marked")
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return True

    def check_remote(self) -> None:
        """Unavailable when packs were moved to a cloud tier that cannot be reached now."""
        pack_id = next(iter(self.moved.copy()), None)  # the mover may add one meanwhile
        if pack_id is not None:
            self._remote(pack_id).ping()

    def read_remote(self, pack_id: int, offset: int, length: int, *, cache: bool = True) -> bytes:
        """Bytes of a moved pack from its cloud tier."""
        return self._remote(pack_id).read(pack_id, offset, length, cache=cache)

    def _remote(self, pack_id: int) -> RemotePacks:
        remote = self.remote
        if remote is None:
            raise Unavailable(f"pack {pack_id:016x} lives in cloud tier {self.moved.get(pack_id)!r}, which is not "
                              "configured or not running: add its [[tier]] table back to the server configuration")
        return remote

    def _put_state_now(self, writer: PackWriter) -> None:
        batch = self.index.batch()
        self._put_pack_state(batch, writer.pack_id, "sealed", writer.size, len(writer.records))
        self.index.write(batch)

    def decode(self, record: Record, stored: bytes) -> bytes:
        """Stored bytes -> raw bytes, refusing anything that is not exactly what the record's id names:
        the seal (AES-GCM over payload and header), the codec, the length and the digest. Raises CodecError."""
        sealed = bool(record.flags & FLAG_SEALED)
        if sealed != self.keyring.encrypted:
            raise CodecError("the record is sealed but the repository is not encrypted" if sealed else
                             "the record is not sealed but the repository is encrypted (mixed records are refused)")
        if sealed:
            try:
                stored = self.keyring.open(stored, sealing_aad(record.flags, record.raw_len, record.digest))
            except InvalidTag:
                raise CodecError("AES-GCM authentication failed (damaged record)") from None
        raw = decode(record.codec, record.raw_len, stored)
        if self.keyring.id(digest(raw)) != record.digest:
            raise CodecError("BLAKE3 of the payload does not match its chunk id")
        return raw

    def mark_bad(self, digest: bytes, reason: str) -> None:
        """Remember a chunk that failed verification, for verify jobs and operators."""
        batch = self.index.batch()
        batch.put("meta", b"bad/" + digest, reason.encode())
        self.index.write(batch, sync=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.sync()
            self._writer.close()
            self._writer = None

    # ---------------------------------------------------------------- reading

    def reader(self) -> ChunkReader:
        return ChunkReader(self)


class ChunkReader:
    """Reads and verifies chunks; owns its file descriptors, so use one per stream or task."""

    def __init__(self, store: ChunkStore):
        self._store = store
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, pack_id: int) -> int:
        fd = self._fds.get(pack_id)
        if fd is None:
            with self._lock:  # several worker threads read for one stream
                fd = self._fds.get(pack_id)
                if fd is None:
                    try:
                        fd = os.open(pack_path(self._store.root, pack_id), os.O_RDONLY)
                    except FileNotFoundError:
                        raise Corrupt(f"pack {pack_id:016x} is missing from the data directory") from None
                    self._fds[pack_id] = fd
        return fd

    def read_stored(self, loc: Location) -> bytes:
        """The stored (possibly compressed) bytes of a record, CRC-checked; from the cloud tier when its pack
        was moved there (the same checks apply, so a bad cloud copy is refused like a bad disk)."""
        rec = loc.record
        length = RECORD_HEADER.size + rec.stored_len
        if loc.pack_id in self._store.moved:
            buf = self._store.read_remote(loc.pack_id, rec.offset, length)
        else:
            try:
                buf = os.pread(self._fd(loc.pack_id), length, rec.offset)
            except Corrupt:
                if loc.pack_id in self._store.moved:  # moved to the cloud since the check above
                    return self.read_stored(loc)
                moved = self._store.index.locate(loc.record.digest)  # compaction moved it since the lookup
                if moved is None or moved.pack_id == loc.pack_id:
                    raise
                return self.read_stored(moved)
        try:
            return parse_record(buf, rec)
        except PackFormatError as e:
            self._store.mark_bad(rec.digest, str(e))
            raise Corrupt(f"chunk {rec.digest.hex()}: {e}") from None

    def read(self, loc: Location) -> bytes:
        """The raw bytes of a chunk: opened, decompressed and checked against its id."""
        stored = self.read_stored(loc)
        try:
            return self._store.decode(loc.record, stored)
        except CodecError as e:
            self._store.mark_bad(loc.record.digest, str(e))
            raise Corrupt(f"chunk {loc.record.digest.hex()}: {e}") from None

    def read_digest(self, digest: bytes) -> bytes:
        loc = self._store.index.locate(digest)
        if loc is None:
            raise NotFound(f"chunk {digest.hex()} is not in the repository", "chunk_not_found")
        return self.read(loc)
