"""Backup sessions: what a collector sends between `POST /sessions` and `commit`.

Keys in CF `sessions`:   s:<sid> header (JSON), r:<sid>/<disk_id> base manifest of a disk,
                         n:<sid> counters, b:<sid>/<name> uploaded configuration blobs.
Keys in CF `staging`:    <sid 16 bytes><disk ordinal u16 BE><chunk index u64 BE> -> digest.
The base point's manifest roots are copied into the session at creation, so a commit never
depends on the base point still existing.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from chunkyard.wire import CODECS, DIGEST_LEN, MAP_RECORD, MAX_MISSING_QUERY, ZERO, Frame, digest

from . import manifest
from .chunk_store import ChunkReader, NewChunk, PutResult
from .codec import CodecError, decode
from .errors import Conflict, Forbidden, Invalid, NotFound
from .faults import crash_point
from .names import check_hex_id, check_name
from .points import new_point_id
from .tokens import TokenInfo

if TYPE_CHECKING:
    from .repository import Repository

CONSISTENCY_LEVELS = ("application", "crash", "saved-state")
MAX_DISK_SIZE = 64 << 40  # the VHDX maximum
MAX_DISKS = 256
STAGING_KEY = struct.Struct(">16sHQ")
MAP_SLICE = 16384
RAW_LEN = struct.Struct("<I")
RAW_LEN_OFFSET = 20  # in a chunks-CF value: pack_id u64 | offset u64 | stored_len u32 | raw_len u32 | flags
PIN_DISK = 0xFFFF  # the disk ordinal of pin keys in staging (real disks are 0..MAX_DISKS-1)
INDEX_BATCH = 1000


def verify_frames(frames: Sequence[Frame], chunk_size: int, first: int = 0) -> list[NewChunk]:
    """Decompress and BLAKE3 every frame; any bad one rejects them all (never trust a client's digest)."""
    out = []
    for n, f in enumerate(frames, first):
        if f.codec not in CODECS:
            raise Invalid(f"frame {n}: unknown codec {f.codec}", "bad_codec")
        if not 0 < f.raw_len <= chunk_size:
            raise Invalid(f"frame {n}: raw_len {f.raw_len} is outside 1..{chunk_size} (the chunk size)",
                          "bad_length")
        try:
            raw = decode(f.codec, f.raw_len, f.payload)
        except CodecError as e:
            raise Invalid(f"frame {n}: {e}", "bad_payload") from None
        if digest(raw) != f.digest:
            raise Invalid(f"frame {n}: digest {f.digest.hex()} does not match the payload", "digest_mismatch")
        out.append(NewChunk(f.digest, f.codec, f.raw_len, f.payload))
    return out


def _json_field(body: dict, name: str, kind: type | tuple, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise Invalid(f"field {name!r} must be {names}", "bad_field")
    return value


class SessionStore:
    def __init__(self, repo: Repository):
        self.repo = repo
        self.index = repo.index
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # sessions being committed or aborted
        self._touched: dict[str, float] = {}
        self._pin_seq = itertools.count(time.time_ns())  # unique across restarts too

    # ---------------------------------------------------------------- lifecycle

    def create(self, body: object, token: TokenInfo) -> dict:
        if not isinstance(body, dict):
            raise Invalid("the body must be a JSON object", "bad_body")
        host = _json_field(body, "host", str)
        vm = _json_field(body, "vm", dict)
        vm_id = check_name(vm.get("id"), "vm.id")
        vm_name = _json_field(vm, "name", str, required=False) or vm_id
        consistency = body.get("consistency", "crash")
        if consistency not in CONSISTENCY_LEVELS:
            raise Invalid(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}", "bad_field")
        rct = _json_field(body, "rct", dict, required=False) or {}
        disks_in = _json_field(body, "disks", list)
        if not 0 < len(disks_in) <= MAX_DISKS:
            raise Invalid(f"a session needs 1..{MAX_DISKS} disks", "bad_field")
        disks = []
        for d in disks_in:
            if not isinstance(d, dict):
                raise Invalid("each disk must be an object {disk_id, name, size}", "bad_field")
            disk_id = check_name(d.get("disk_id"), "disk_id")
            size = _json_field(d, "size", int)
            if not 0 < size <= MAX_DISK_SIZE:
                raise Invalid(f"disk {disk_id}: size must be 1..{MAX_DISK_SIZE} bytes", "bad_field")
            name = _json_field(d, "name", str, required=False) or disk_id
            rct_id = rct.get(disk_id)
            if rct_id is not None and not isinstance(rct_id, str):
                raise Invalid(f"rct id of disk {disk_id} must be a string", "bad_field")
            disks.append({"disk_id": disk_id, "name": name, "size": size, "rct": rct_id})
        if len({d["disk_id"] for d in disks}) != len(disks):
            raise Invalid("disk ids must be unique within a session", "bad_field")
        base = self._base_point(vm_id, body.get("base", "latest"), token)
        owner = self.repo.points.claim(vm_id, token.tenant)
        if token.tenant and owner != token.tenant:
            raise Forbidden(f"VM id {vm_id} is used by another tenant; give this VM another id", "vm_not_yours")
        sid = secrets.token_hex(16)
        now = time.time()
        # tenant: whose point this becomes (the VM's owner); scoped: the caller is held to possession.
        header = {"session_id": sid, "state": "open", "host": host, "vm": {"id": vm_id, "name": vm_name},
                  "disks": disks, "consistency": consistency, "base_point": base and base["point_id"],
                  "created": now, "token_id": token.id, "tenant": owner, "scoped": bool(token.tenant)}
        batch = self.index.batch()
        batch.put("sessions", f"s:{sid}".encode(), json.dumps(header).encode())
        base_disks = {d["disk_id"]: d for d in base["disks"]} if base else {}
        self.repo.barrier.touch_pages((bytes.fromhex(p) for d in base_disks.values() for p in d["pages"]), owner)
        for d in disks:
            b = base_disks.get(d["disk_id"])
            if b:
                batch.put("sessions", f"r:{sid}/{d['disk_id']}".encode(), json.dumps(
                    {"size": b["size"], "pages": b["pages"], "allocated_chunks": b["allocated_chunks"]}
                ).encode())
        self._put_stats(batch, sid, {"uploaded_chunks": 0, "duplicate_chunks": 0, "new_bytes": 0,
                                     "stored_bytes": 0, "mapped_chunks": 0, "touched": now})
        self.index.write(batch, sync=True)
        self._touched[sid] = now
        return {"session_id": sid, "base_point": header["base_point"], "chunk_size": self.repo.chunk_size,
                "base_disks": [{"disk_id": d["disk_id"], "size": d["size"], "rct": d.get("rct")}
                               for d in (base["disks"] if base else [])]}

    def _base_point(self, vm_id: str, base: object, token: TokenInfo) -> dict | None:
        """The point a session builds on. A collector builds only on points it created itself: a base
        copies its manifest, whose map the collector may then read."""
        own = token.role != "collector"
        if base is None:
            return None
        if base == "latest":
            if self.repo.points.vm(vm_id, token.tenant) is None:
                return None
            if own:
                return self.repo.points.latest(vm_id)
            mine = [p for p in self.repo.points.of_vm(vm_id) if p["token_id"] == token.id]
            return mine[-1] if mine else None
        if not isinstance(base, str):
            raise Invalid("base must be \"latest\", a point id or null", "bad_field")
        point = self.repo.points.get(base, token.tenant)
        if point["vm"]["id"] != vm_id:
            raise Invalid(f"base point {base} belongs to another VM ({point['vm']['id']})", "bad_base")
        if not own and point["token_id"] != token.id:
            raise Forbidden(f"base point {base} was created by another token", "forbidden")
        return point

    def header(self, sid: str) -> dict:
        check_hex_id(sid, "session id")
        value = self.index.get("sessions", f"s:{sid}".encode())
        if value is None:
            raise NotFound(f"no backup session {sid} (it expired or never existed)", "session_not_found")
        return json.loads(value)

    def open_header(self, sid: str) -> dict:
        h = self.header(sid)
        if h["state"] != "open" or sid in self._busy:
            state = "being committed" if sid in self._busy else h["state"]
            detail = f" as point {h['point_id']}" if h.get("point_id") else ""
            raise Conflict(f"session {sid} is {state}{detail}; start a new session", f"session_{h['state']}")
        self._touched[sid] = time.time()
        return h

    def stats(self, sid: str) -> dict:
        value = self.index.get("sessions", f"n:{sid}".encode())
        return json.loads(value) if value else {}

    def _put_stats(self, batch: Any, sid: str, stats: dict) -> None:
        batch.put("sessions", f"n:{sid}".encode(), json.dumps(stats).encode())

    def _add_stats(self, sid: str, **delta: int) -> None:
        with self._lock:
            stats = self.stats(sid)
            for k, v in delta.items():
                stats[k] = stats.get(k, 0) + v
            stats["touched"] = time.time()
            batch = self.index.batch()
            self._put_stats(batch, sid, stats)
            self.index.write(batch)

    # ---------------------------------------------------------------- data

    def missing(self, sid: str, body: bytes) -> bytes:
        """Bit i set = upload chunk i. For a scoped session "present" also needs the tenant's possession
        (tenants.py), so the answer never says whether another tenant stores a chunk."""
        header = self.open_header(sid)
        if len(body) % DIGEST_LEN or not 0 < len(body) // DIGEST_LEN <= MAX_MISSING_QUERY:
            raise Invalid(f"the body must be 1..{MAX_MISSING_QUERY} digests of 32 bytes; got {len(body)} bytes",
                          "bad_body")
        digests = manifest.split_page(self.repo.keyring.ids(body))  # chunk ids, as stored
        barrier = self.repo.barrier
        bitmap = bytearray((len(digests) + 7) // 8)
        # The answer "present" is a promise the chunk stays until the session ends: record it (pins,
        # and the GC barrier) in the same critical section as the lookup, so a sweep cannot slip between.
        with barrier.lock:
            found = self.index.multi_get("chunks", digests)
            if header.get("scoped"):
                found = [v if own else None
                         for v, own in zip(found, self.repo.possession.has(header["tenant"], digests), strict=True)]
            present = [d for d, v in zip(digests, found, strict=True) if v is not None]
            self.pin(sid, present)
            barrier.touch(present)
        for i, (d, v) in enumerate(zip(digests, found, strict=True)):
            if v is None and d != ZERO:
                bitmap[i >> 3] |= 1 << (i & 7)
        return bytes(bitmap)

    def pin(self, sid: str, digests: Iterable[bytes]) -> None:
        """Promise that these chunks outlive the session: a GC that starts later marks them. One staging
        key per call (sid | ffff | sequence u64) holding the digests back to back: a 32k-digest `missing`
        answer costs one put, not 32k. Written before a chunk becomes visible, so no GC can miss it."""
        value = b"".join(digests)
        if value:
            batch = self.index.batch()
            batch.put("staging", STAGING_KEY.pack(bytes.fromhex(sid), PIN_DISK, next(self._pin_seq)), value)
            self.index.write(batch)

    def store_chunks(self, sid: str, chunks: list[NewChunk]) -> PutResult:
        """Store verified chunks. A scoped session's upload proves possession; its answer counts from the
        tenant's view (stored = new to the tenant), or "duplicate" would tell it another tenant has them."""
        header = self.open_header(sid)
        ids = self.repo.chunk_ids([c.digest for c in chunks])
        chunks = [NewChunk(i, c.flags, c.raw_len, c.stored) for i, c in zip(ids, chunks, strict=True)]
        self.pin(sid, ids)
        scoped = header.get("scoped")
        held = self.repo.possession.has(header["tenant"], ids) if scoped else []
        result = self.repo.chunks.put(chunks)
        if scoped:  # answer from the tenant's view: "new" = new to this tenant (a global count would leak)
            self.repo.possession.record(header["tenant"], ids)
            fresh = [c for c, had in zip(chunks, held, strict=True) if not had]
            result = PutResult(len(fresh), len(chunks) - len(fresh), sum(len(c.stored) for c in fresh),
                               sum(c.raw_len for c in fresh))
        self._add_stats(sid, uploaded_chunks=result.stored, duplicate_chunks=result.duplicate,
                        new_bytes=result.raw_bytes, stored_bytes=result.bytes)
        return result

    def map(self, sid: str, disk_id: str, body: bytes) -> int:
        """Stage `chunk_index -> digest` records. Everything is validated before anything is staged;
        slices of MAP_SLICE records keep memory and lock holds small for million-record maps."""
        header = self.open_header(sid)
        ordinal, disk = self._disk(header, disk_id)
        if len(body) % MAP_RECORD.size or not body:
            raise Invalid(f"the body must be one or more records of {MAP_RECORD.size} bytes "
                          f"(chunk_index u64, digest[32]); got {len(body)} bytes", "bad_body")
        count = len(body) // MAP_RECORD.size
        slices = [(start, min(count, start + MAP_SLICE)) for start in range(0, count, MAP_SLICE)]
        for first, stop in slices:
            self._check_slice(header, disk, self._records(body, first, stop))
        sid_bytes = bytes.fromhex(sid)
        barrier = self.repo.barrier
        for first, stop in slices:
            records = self._records(body, first, stop)
            with barrier.lock:  # staged (or barriered) before any sweep can look at these chunks
                if barrier.active:  # a sweep may have run since the check: check again under the lock
                    self._check_slice(header, disk, records)
                batch = self.index.batch()
                for index, d in records:
                    batch.put("staging", STAGING_KEY.pack(sid_bytes, ordinal, index), d)
                self.index.write(batch, sync=stop == count)
                barrier.touch(d for _, d in records if d != ZERO)
        self._add_stats(sid, mapped_chunks=count)
        return count

    def _records(self, body: bytes, first: int, stop: int) -> list[tuple[int, bytes]]:
        """Map records [first, stop) with their digests turned into chunk ids."""
        records = [MAP_RECORD.unpack_from(body, i * MAP_RECORD.size) for i in range(first, stop)]
        ids = self.repo.chunk_ids([d for _, d in records])
        return [(index, i) for (index, _), i in zip(records, ids, strict=True)]

    def _check_slice(self, header: dict, disk: dict, records: list[tuple[int, bytes]]) -> None:
        """Each index inside the disk; each digest ZERO or present with exactly its index's length. In a
        scoped session present also means possessed by the tenant: mapping a guessed digest of another
        tenant's chunk and then restoring the point would otherwise read that tenant's data."""
        disk_id, size, chunk_size = disk["disk_id"], disk["size"], self.repo.chunk_size
        chunks = manifest.chunk_count(size, chunk_size)
        distinct = list({d for _, d in records if d != ZERO})
        found = self.index.multi_get("chunks", distinct)
        if header.get("scoped"):
            found = [v if own else None
                     for v, own in zip(found, self.repo.possession.has(header["tenant"], distinct), strict=True)]
        raw_len = {d: None if v is None else RAW_LEN.unpack_from(v, RAW_LEN_OFFSET)[0]
                   for d, v in zip(distinct, found, strict=True)}
        for index, d in records:
            if index >= chunks:
                raise Invalid(f"chunk index {index} is beyond the end of disk {disk_id} "
                              f"({chunks} chunks of {chunk_size} bytes)", "index_out_of_range")
            if d == ZERO:
                continue
            have = raw_len[d]
            if have is None:
                raise Invalid(f"the chunk mapped at index {index} is not in the repository: upload it first",
                              "unknown_chunk")
            expected = manifest.chunk_length(index, size, chunk_size)
            if have != expected:
                raise Invalid(f"the chunk mapped at index {index} holds {have} bytes but that index of disk "
                              f"{disk_id} covers {expected}", "bad_length")

    def _disk(self, header: dict, disk_id: str) -> tuple[int, dict]:
        for ordinal, disk in enumerate(header["disks"]):
            if disk["disk_id"] == disk_id:
                return ordinal, disk
        raise NotFound(f"session {header['session_id']} has no disk {disk_id!r:.80}", "disk_not_found")

    def put_blob(self, sid: str, name: str, data: bytes) -> dict:
        self.open_header(sid)
        check_name(name, "blob name")
        ref = self.repo.store_blob(data, pin=functools.partial(self.pin, sid))
        batch = self.index.batch()
        batch.put("sessions", f"b:{sid}/{name}".encode(), json.dumps(ref).encode())
        self.index.write(batch, sync=True)
        return {"name": name, "size": ref["size"]}

    # ---------------------------------------------------------------- commit

    def commit(self, sid: str, reported: dict | None = None) -> dict:
        """Assemble and record the point. `reported` may carry the collector's read_bytes and the
        change-tracking ids it obtained after reading (Hyper-V knows them only then)."""
        reported = reported or {}
        rct = reported.get("rct") or {}
        if not isinstance(rct, dict) or not all(isinstance(v, str) for v in rct.values()):
            raise Invalid("rct must map disk ids to change-tracking id strings", "bad_field")
        read_bytes = reported.get("read_bytes")
        if read_bytes is not None and (not isinstance(read_bytes, int) or isinstance(read_bytes, bool)
                                       or read_bytes < 0):
            raise Invalid("read_bytes must be a non-negative integer", "bad_field")
        with self._lock:
            header = self.open_header(sid)
            self._busy.add(sid)
        try:
            unknown = set(rct) - {d["disk_id"] for d in header["disks"]}
            if unknown:
                raise Invalid(f"rct names disks not in the session: {sorted(unknown)}", "bad_field")
            return self._commit(header, read_bytes, rct)
        finally:
            self._busy.discard(sid)

    def _commit(self, header: dict, read_bytes: int | None, rct: dict[str, str]) -> dict:
        sid = header["session_id"]
        repo, chunk_size = self.repo, self.repo.chunk_size
        disks = []
        with repo.chunks.reader() as reader:
            load = reader.read_digest
            for ordinal, disk in enumerate(header["disks"]):
                base = self.index.get("sessions", f"r:{sid}/{disk['disk_id']}".encode())
                base = json.loads(base) if base else {"size": 0, "pages": [], "allocated_chunks": 0}
                base_root = [bytes.fromhex(p) for p in base["pages"]]
                changes: Iterable[tuple[int, bytes]] = self._staged(sid, ordinal)
                fixes: dict[int, bytes] = {}
                if base["size"] != disk["size"]:
                    fixes = self._fit_edges(sid, ordinal, base, base_root, disk["size"], reader)
                    changes = heapq.merge(changes, sorted(fixes.items()))
                if header.get("tenant"):  # the point's tenant references these chunks from now on
                    self._possess(header, ordinal, fixes.values())
                result = manifest.assemble(
                    base_root=base_root, base_size=base["size"], base_allocated=base["allocated_chunks"],
                    size=disk["size"], chunk_size=chunk_size, changes=changes, load=load,
                    page_id=lambda data: repo.chunk_ids([digest(data)])[0],
                )
                repo.store_pages(result.new_pages, pin=functools.partial(self.pin, sid))
                disks.append(disk | {"rct": rct.get(disk["disk_id"], disk["rct"]),
                                     "pages": [p.hex() for p in result.root],
                                     "allocated_chunks": result.allocated_chunks,
                                     "changed_chunks": result.changed_chunks,
                                     "changed_bytes": result.changed_bytes})
        self.repo.barrier.touch_pages((bytes.fromhex(p) for d in disks for p in d["pages"]), header.get("tenant", ""))
        crash_point("after_pages")
        blobs = {k.decode().split("/", 1)[1]: json.loads(v)
                 for k, v in self.index.scan("sessions", f"b:{sid}/".encode())}
        stats = self.stats(sid)
        record = {
            "point_id": new_point_id(), "session_id": sid, "vm": header["vm"], "host": header["host"],
            "created": time.time(), "consistency": header["consistency"], "base_point": header["base_point"],
            "chunk_size": chunk_size, "token_id": header["token_id"], "tenant": header.get("tenant", ""),
            "disks": disks, "blobs": blobs,
            "stats": {
                "read_bytes": read_bytes,
                "changed_bytes": sum(d["changed_bytes"] for d in disks),
                "new_bytes": stats.get("new_bytes", 0), "stored_bytes": stats.get("stored_bytes", 0),
                "uploaded_chunks": stats.get("uploaded_chunks", 0),
                "duplicate_chunks": stats.get("duplicate_chunks", 0),
                "mapped_chunks": stats.get("mapped_chunks", 0),
                "duration": time.time() - header["created"],
            },
        }
        batch = self.index.batch()
        self.close_session(batch, header, "committed", record["point_id"])
        repo.points.save(record, batch)
        crash_point("after_commit")
        return record

    def _possess(self, header: dict, ordinal: int, made: Iterable[bytes]) -> None:
        """Record the tenant's possession of what its point will reference: chunks the server cut for it,
        and (when an operator token filled a tenant's VM) every mapped chunk. A scoped session's mapped
        chunks were already checked to be possessed."""
        tenant = header["tenant"]
        self.repo.possession.record(tenant, made)
        if not header.get("scoped"):
            staged = (d for _, d in self._staged(header["session_id"], ordinal))
            while part := list(itertools.islice(staged, INDEX_BATCH)):
                self.repo.possession.record(tenant, part)

    def _staged(self, sid: str, ordinal: int) -> Iterator[tuple[int, bytes]]:
        """Staged entries of one disk in index order (keys are big-endian), streamed from the index."""
        prefix = bytes.fromhex(sid) + ordinal.to_bytes(2, "big")
        for key, value in self.index.scan("staging", prefix):
            yield int.from_bytes(key[18:], "big"), value

    def _fit_edges(self, sid: str, ordinal: int, base: dict, base_root: list[bytes], size: int,
                   reader: ChunkReader) -> dict[int, bytes]:
        """A resized disk: re-cut the chunks whose length changed (old or new short tail) unless re-sent."""
        chunk_size = self.repo.chunk_size
        base_chunks = manifest.chunk_count(base["size"], chunk_size)
        chunks = manifest.chunk_count(size, chunk_size)
        fixes: dict[int, bytes] = {}
        for index in {base_chunks - 1, chunks - 1}:
            if index < 0 or index >= min(chunks, base_chunks):
                continue
            if self.index.get("staging", STAGING_KEY.pack(bytes.fromhex(sid), ordinal, index)) is not None:
                continue
            page = index // manifest.PAGE_ENTRIES
            entries = manifest.load_page(reader.read_digest, base_root[page],
                                         manifest.page_entries(page, base_chunks))
            slot = (index - page * manifest.PAGE_ENTRIES) * DIGEST_LEN
            old = entries[slot : slot + DIGEST_LEN]
            want = manifest.chunk_length(index, size, chunk_size)
            if old == ZERO:
                continue
            raw = reader.read_digest(old)
            if len(raw) != want:
                fitted = raw[:want].ljust(want, b"\0")
                fixes[index] = ZERO if not any(fitted) else self.repo.store_data(
                    fitted, pin=functools.partial(self.pin, sid))
        return fixes

    def close_session(self, batch: Any, header: dict, state: str, point_id: str | None = None) -> None:
        """Add to batch: the header's new state, and the removal of staging and base copies."""
        sid = header["session_id"]
        batch.put("sessions", f"s:{sid}".encode(),
                  json.dumps(header | {"state": state, "point_id": point_id, "closed": time.time()}).encode())
        batch.delete_prefix("staging", bytes.fromhex(sid))
        for prefix in ("r", "b"):
            batch.delete_prefix("sessions", f"{prefix}:{sid}/".encode())

    def abort(self, sid: str) -> None:
        with self._lock:
            header = self.open_header(sid)
            batch = self.index.batch()
            self.close_session(batch, header, "aborted")
            self.index.write(batch, sync=True)
        self._touched.pop(sid, None)

    def expire(self, idle_seconds: float, keep_closed_seconds: float) -> int:
        """Abort sessions idle too long; forget closed ones after a while. Returns sessions touched."""
        now = time.time()
        count = 0
        for key, value in list(self.index.scan("sessions", b"s:")):
            header = json.loads(value)
            sid = header["session_id"]
            if header["state"] == "open":
                last = max(self._touched.get(sid, 0), self.stats(sid).get("touched", header["created"]))
                if now - last > idle_seconds and sid not in self._busy:
                    with self._lock:
                        batch = self.index.batch()
                        self.close_session(batch, header, "expired")
                        self.index.write(batch, sync=True)
                    count += 1
            elif now - header.get("closed", now) > keep_closed_seconds:
                batch = self.index.batch()
                batch.delete("sessions", key)
                batch.delete("sessions", f"n:{sid}".encode())
                self.index.write(batch)
                self._touched.pop(sid, None)
                count += 1
        return count

    def mark_recovered(self, records: list[dict]) -> None:
        """Point files found at startup without an index entry: their sessions did commit."""
        for record in records:
            value = self.index.get("sessions", f"s:{record['session_id']}".encode())
            if value and json.loads(value)["state"] == "open":
                batch = self.index.batch()
                self.close_session(batch, json.loads(value), "committed", record["point_id"])
                self.index.write(batch, sync=True)

