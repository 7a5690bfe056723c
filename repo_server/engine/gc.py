"""Garbage collection that never stops backups: mark, sweep, compact.

1. The barrier goes up (barrier.py): from now on every chunk a client touches is kept.
2. Mark, into the `marks` column family (memory stays bounded whatever the repository size):
   every point's manifest pages and their entries (each distinct page walked once) and blob pieces;
   every open session's copied base roots, staged entries, `missing` pins and blobs; finally the pages
   of roots created or copied while GC ran (the barrier's page set).
3. Sweep: every indexed chunk neither marked nor barriered leaves the index (under the barrier lock,
   so it cannot be reported present at the same moment), and so does every tenant's possession of it.
   Then possession its tenant no longer needs is dropped (else a tenant could upload a guessed chunk,
   abort, and after a GC learn from `missing` whether another tenant keeps it stored): the mark also
   marks `tenant_key | id` for what each tenant's points and open sessions reference, roots created or
   copied during GC are walked for their tenant, and chunks touched during GC keep every possession.
4. Compact: packs with no live bytes are deleted; sealed packs whose live fraction is under the
   threshold are rewritten into the open pack and deleted. Space comes back in the same run.
   Packs moved to a cloud tier are never rewritten (that would download them); a dead one leaves the
   index and the tier deletes its cloud copy, unless a retention lock holds it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chunkyard.wire import ZERO

from .chunk_store import MOVED, PACK_KEY
from .errors import Conflict
from .faults import crash_point
from .index import Location
from .manifest import split_page
from .pack import RECORD_HEADER
from .tenants import tenant_key

if TYPE_CHECKING:
    from .repository import Repository

BATCH = 1000
Progress = Callable[[str, int, int | None], None]  # (phase, done, total)


@dataclass
class GcStats:
    pages_walked: int = 0
    marked: int = 0
    swept_chunks: int = 0
    swept_bytes: int = 0
    packs_deleted: int = 0
    packs_compacted: int = 0
    possession_dropped: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)


class GarbageCollector:
    def __init__(self, repo: Repository, progress: Progress | None = None, *, compact_below: float = 0.5):
        self.repo = repo
        self.index = repo.index
        self.progress = progress or (lambda phase, done, total: None)
        self.compact_below = compact_below
        self.stats = GcStats()
        self.walked: set[bytes] = set()  # barrier pages whose entries are marked

    def run(self) -> GcStats:
        if not self.repo.gc_lock.acquire(blocking=False):
            raise Conflict("a garbage collection is already running", "gc_running")
        started = time.monotonic()
        try:
            self._clear_marks()
            self.repo.barrier.start()
            try:
                self._timed("mark", self._mark)
                crash_point("gc_after_mark")
                live = self._timed("sweep", self._sweep)
                crash_point("gc_after_sweep")
                self._timed("possession", self._sweep_possession)
            finally:
                self.repo.barrier.stop()
            self._timed("compact", lambda: self._compact(live))
            self._clear_marks()
        finally:
            self.repo.gc_lock.release()
        self.stats.seconds = time.monotonic() - started
        return self.stats

    def _timed(self, phase: str, fn: Callable):
        t = time.monotonic()
        result = fn()
        self.stats.phases[phase] = round(time.monotonic() - t, 3)
        return result

    def _clear_marks(self) -> None:
        batch = self.index.batch()
        batch.clear("marks")
        self.index.write(batch)

    # ---------------------------------------------------------------- mark

    def _mark_digests(self, digests: Iterable[bytes], prefix: bytes = b"") -> None:
        """Mark chunk ids, or with a tenant key prefix a tenant's reference to them."""
        batch = self.index.batch()
        for d in digests:
            if d != ZERO:
                batch.put("marks", prefix + d, b"")
                self.stats.marked += 1
                if len(batch) >= BATCH:
                    self.index.write(batch)
                    batch = self.index.batch()
        self.index.write(batch)

    def _mark_pages(self, pages: Iterable[bytes], reader, tenant: bytes = b"") -> None:
        """Mark pages and their entries, reading each page not marked yet (shared pages are walked once);
        with a tenant key, mark the tenant's references too (once per tenant and page)."""
        todo = [p for p in dict.fromkeys(pages) if p != ZERO]
        for start in range(0, len(todo), BATCH):
            part = todo[start : start + BATCH]
            known = self.index.multi_get("marks", part)
            owned = self.index.multi_get("marks", [tenant + p for p in part]) if tenant else known
            for page, seen, seen_by_tenant in zip(part, known, owned, strict=True):
                if seen is not None and seen_by_tenant is not None:
                    continue
                entries = split_page(reader.read_digest(page))
                if seen is None:
                    self._mark_digests(entries)
                    self._mark_digests([page])
                    self.stats.pages_walked += 1
                if tenant and seen_by_tenant is None:
                    self._mark_digests([*entries, page], tenant)

    def _mark(self) -> None:
        repo = self.repo
        with repo.chunks.reader() as reader:
            for points, (_, value) in enumerate(self.index.scan("points", b"p:"), 1):
                record = json.loads(value)
                tenant = tenant_key(record["tenant"]) if record.get("tenant") else b""
                self._mark_pages((bytes.fromhex(p) for d in record["disks"] for p in d["pages"]), reader, tenant)
                self._mark_blobs(record.get("blobs", {}).values())
                self.progress("mark points", points, repo.points.point_count)
            owners = self._session_tenants()
            for key, value in self.index.scan("sessions"):
                if key.startswith(b"r:"):
                    sid = key[2:].split(b"/", 1)[0].decode()
                    self._mark_pages((bytes.fromhex(p) for p in json.loads(value)["pages"]), reader,
                                     owners.get(bytes.fromhex(sid), b""))
                elif key.startswith(b"b:"):
                    self._mark_blobs([json.loads(value)])
            self._mark_digests(self._staged_digests(owners))
            with repo.barrier.lock:
                self._walk_barrier_pages(reader)

    def _walk_barrier_pages(self, reader) -> None:
        """Mark the entries of roots created or copied since the last walk (call with the barrier lock):
        a session opened during the sweep copies a base root whose chunks must survive it."""
        new = [p for p in self.repo.barrier.pages if p not in self.walked]
        self._mark_pages(new, reader)
        self.walked.update(new)

    def _session_tenants(self) -> dict[bytes, bytes]:
        """Session id (16 bytes) -> tenant key, for the open sessions of tenants' VMs."""
        headers = (json.loads(v) for _, v in self.index.scan("sessions", b"s:"))
        return {bytes.fromhex(h["session_id"]): tenant_key(h["tenant"]) for h in headers
                if h["state"] == "open" and h.get("tenant")}

    def _staged_digests(self, owners: dict[bytes, bytes]) -> Iterable[bytes]:
        """Map entries (one digest each) and pins (digests back to back) of every open session, each also
        as its tenant's reference (marks keys: tenant_key | id)."""
        for key, value in self.index.scan("staging"):
            tenant = owners.get(key[:16])
            for d in split_page(value):
                yield d
                if tenant and d != ZERO:
                    yield tenant + d

    def _mark_blobs(self, refs: Iterable[dict]) -> None:
        self._mark_digests(bytes.fromhex(c) for ref in refs for c in ref["chunks"])

    # ---------------------------------------------------------------- sweep

    def _sweep(self) -> dict[int, int]:
        """Drop unmarked chunks; return live stored bytes per pack."""
        live: dict[int, int] = defaultdict(int)
        barrier = self.repo.barrier
        scanned = 0
        batch: list[tuple[bytes, bytes]] = []

        def flush() -> None:
            marks = self.index.multi_get("marks", [d for d, _ in batch])
            candidates = [d for (d, _), m in zip(batch, marks, strict=True) if m is None]
            dead = []
            with barrier.lock:  # nobody can be told "present" for these while we decide
                if candidates:
                    self._walk_barrier_pages(reader)
                    marks = self.index.multi_get("marks", candidates)
                    candidates = [d for d, m in zip(candidates, marks, strict=True) if m is None]
                for loc in self.index.locate_many(candidates):
                    if loc is not None and loc.record.digest not in barrier.chunks:
                        dead.append(loc)
                if dead:
                    self.repo.chunks.forget(dead)
                    # Same lock: no upload can record possession of these between the two steps.
                    gone = self.index.batch()
                    self.repo.possession.forget([loc.record.digest for loc in dead], gone)
                    self.index.write(gone)
            dead_set = {loc.record.digest for loc in dead}
            for d, v in batch:
                if d not in dead_set:
                    loc = Location.decode(d, v)
                    live[loc.pack_id] += loc.record.stored_len + RECORD_HEADER.size
            self.stats.swept_chunks += len(dead)
            self.stats.swept_bytes += sum(loc.record.stored_len + RECORD_HEADER.size for loc in dead)

        total = self.repo.chunks.chunk_count
        # Packs from here on get records the scan below never sees: compaction must leave them alone.
        self.first_unscanned_pack = self.repo.chunks.first_unfinished_pack()
        with self.repo.chunks.reader() as reader:
            for item in self.index.scan("chunks"):
                batch.append(item)
                if len(batch) >= BATCH:
                    flush()
                    scanned += len(batch)
                    batch = []
                    self.progress("sweep", scanned, total)
            if batch:
                flush()
        return live

    def _sweep_possession(self) -> None:
        """Drop each tenant's possession that neither its points nor its open sessions reference."""
        barrier = self.repo.barrier
        walked: set[tuple[str, bytes]] = set()
        keys: list[bytes] = []

        def flush() -> None:
            marks = self.index.multi_get("marks", keys)
            candidates = [k for k, m in zip(keys, marks, strict=True) if m is None]
            if not candidates:
                return
            with barrier.lock:  # no root can be created or chunk promised while we decide
                new = barrier.tenant_pages - walked
                for tenant, page in new:  # roots created or copied during GC, for their tenant
                    self._mark_pages([page], reader, tenant_key(tenant))
                walked.update(new)
                if new:
                    marks = self.index.multi_get("marks", candidates)
                    candidates = [k for k, m in zip(candidates, marks, strict=True) if m is None]
                gone = self.index.batch()
                for key in candidates:
                    if key[8:] not in barrier.chunks:
                        gone.delete("possession", key)
                self.stats.possession_dropped += len(gone)
                self.index.write(gone)

        with self.repo.chunks.reader() as reader:
            for key, _ in self.index.scan("possession"):
                keys.append(key)
                if len(keys) >= BATCH:
                    flush()
                    keys = []
            if keys:
                flush()

    # ---------------------------------------------------------------- compact

    def _compact(self, live: dict[int, int]) -> None:
        chunks = self.repo.chunks
        packs = [(PACK_KEY.unpack(k)[0], json.loads(v)) for k, v in self.index.scan("packs")]
        open_pack = chunks.open_pack_id()
        for done, (pack_id, state) in enumerate(packs, 1):
            self.progress("compact", done, len(packs))
            moved = state["state"] == MOVED  # in a cloud tier: dropped when dead, never rewritten
            if pack_id == open_pack or state["state"] not in ("sealed", MOVED) or pack_id >= self.first_unscanned_pack:
                continue
            used = live.get(pack_id, 0)
            if used == 0:
                self.stats.bytes_freed += chunks.delete_pack(pack_id)
                self.stats.packs_deleted += 1
            elif used < self.compact_below * state["size"] and not moved:
                self.stats.bytes_freed += chunks.relocate(pack_id) - used
                self.stats.packs_compacted += 1
