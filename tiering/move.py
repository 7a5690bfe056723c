"""Move mode (capacity tier): packs that only old points need leave local disk once their cloud copy is verified.

A pass, run by the tier's worker after a copy cycle that left nothing behind (at most every MOVE_EVERY
seconds, or at once on `POST /tiers/sync`):

1. If no point is older than `move_after_days`, stop: nothing can qualify.
2. Keep set: every pack holding a chunk that a young point (created within `move_after_days` of now),
   an open backup session (its base roots, staged entries, pins, blobs) or the open pack needs: manifest
   pages, their entries and blob pieces, each distinct page walked once (like GC's mark phase).
3. Candidates: sealed local packs outside the keep set that every configured tier holds. A candidate no
   point needs at all is garbage for the next GC; moving it costs nothing and GC then drops it (and the
   tier its cloud copy).
4. Per candidate: verify the cloud copy (below); then `ChunkStore.mark_moved` writes the pack's stub
   (tier, size, records: the index stays rebuildable), records the pack as `moved` in the index (synced)
   and deletes the local file. A crash between the index write and the unlink leaves a moved pack with a
   stray local file, which recovery deletes at the next start; a crash before the index write leaves a
   normal local pack (recovery drops its stub) that the next pass moves again.

Verification, decided for cost: HEAD must show the local size, and three ranged GETs must equal the local
bytes: the pack's tail (footer and trailer, i.e. every record's id, offset and length) and two 64 KiB
windows at random offsets. Together with the conditional create and the size check at upload, a
truncated, foreign or stale object is caught without downloading whole packs; a bit flip elsewhere
would still be caught on read (every record carries a CRC and its chunk id), so it can never be served.

Reads of moved packs: tiering/remote.py. Young points referencing an old pack later (a new backup
deduplicating against it) read it from the cloud; packs do not come back to local disk.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from chunkyard.wire import ZERO
from repo_server.engine.faults import crash_point
from repo_server.engine.manifest import split_page
from repo_server.engine.pack import pack_path

from .layout import pack_key
from .stores import Store

if TYPE_CHECKING:
    from repo_server.engine import Repository

log = logging.getLogger("chunkyard.tiering")
DAY = 86400
MOVE_EVERY = 3600  # seconds between move passes: each walks the young points' manifests, like GC's mark
WINDOW = 64 << 10  # bytes per read-back window
BATCH = 1000


def young_packs(repo: Repository, cutoff: float) -> set[int]:
    """Packs that points created at or after `cutoff`, open sessions and the open pack need."""
    index = repo.index
    keep: set[int] = set()
    walked: set[bytes] = set()

    def add(digests: Iterable[bytes]) -> None:
        todo = [d for d in dict.fromkeys(digests) if d != ZERO]
        for start in range(0, len(todo), BATCH):
            keep.update(loc.pack_id for loc in index.locate_many(todo[start : start + BATCH]) if loc is not None)

    def add_pages(pages: Iterable[bytes], reader) -> None:
        for page in pages:
            if page == ZERO or page in walked:
                continue
            walked.add(page)
            add([page])
            if index.locate(page) is not None:
                add(split_page(reader.read_digest(page)))

    with repo.chunks.reader() as reader:
        for _, value in index.scan("points", b"p:"):
            record = json.loads(value)
            if record["created"] >= cutoff:
                add_pages((bytes.fromhex(p) for d in record["disks"] for p in d["pages"]), reader)
                add(bytes.fromhex(c) for ref in record.get("blobs", {}).values() for c in ref["chunks"])
        for key, value in index.scan("sessions"):
            if key.startswith(b"r:"):
                add_pages((bytes.fromhex(p) for p in json.loads(value)["pages"]), reader)
            elif key.startswith(b"b:"):
                add(bytes.fromhex(c) for c in json.loads(value)["chunks"])
        for _, value in index.scan("staging"):
            add(split_page(value))
    open_pack = repo.chunks.open_pack_id()
    if open_pack is not None:
        keep.add(open_pack)
    return keep


def has_old_point(repo: Repository, cutoff: float) -> bool:
    return any(json.loads(value)["created"] < cutoff for _, value in repo.index.scan("points", b"p:"))


class Mover:
    """One move pass for one tier. `held(key)` says whether every configured tier holds an object;
    `retry` runs a store call with the worker's backoff."""

    def __init__(self, repo: Repository, store: Store, tier_name: str, *, held: Callable[[str], bool],
                 retry: Callable[[Callable], object]):
        self.repo, self.store, self.tier_name = repo, store, tier_name
        self.held, self.retry = held, retry
        self.rng = random.Random()
        self.moved = 0  # packs this pass moved
        self.bad: list[str] = []  # keys of cloud copies that did not verify: to be uploaded again

    def candidates(self, now: float, after_days: int) -> list[tuple[int, int]]:
        """(pack id, size) of every pack ready to move now."""
        cutoff = now - after_days * DAY
        if not has_old_point(self.repo, cutoff):
            return []
        keep = young_packs(self.repo, cutoff)
        found = []
        for key, value in self.repo.index.scan("packs"):
            pack_id, state = int.from_bytes(key, "little"), json.loads(value)
            if state["state"] == "sealed" and pack_id not in keep and self.held(pack_key(pack_id)):
                found.append((pack_id, state["size"]))
        return found

    def move(self, pack_id: int, size: int) -> str | None:
        """Verify the cloud copy and let the local file go; None when moved (or gone meanwhile), else why not."""
        key = pack_key(pack_id)
        info = self.retry(lambda: self.store.head(key))
        if info is None or info.size != size:
            self.bad.append(key)
            return (f"{self.store.url}{key} holds {'nothing' if info is None else f'{info.size} bytes'} instead "
                    f"of {size} bytes: pack {pack_id:016x} stays local")
        path = pack_path(self.repo.chunks.root, pack_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # GC removed or compacted it since the listing: nothing to move
        try:
            for start in self._windows(size):
                end = min(size, start + WINDOW)
                cloud = self.retry(lambda s=start, e=end: self.store.get(key, s, e))
                if cloud != os.pread(fd, end - start, start):
                    self.bad.append(key)
                    return (f"{self.store.url}{key} differs from the local pack at bytes {start}-{end}: pack "
                            f"{pack_id:016x} stays local and is uploaded again")
        finally:
            os.close(fd)
        crash_point("tier_move_verified")
        self.moved += self.repo.chunks.mark_moved(pack_id, self.tier_name)
        return None

    def _windows(self, size: int) -> list[int]:
        """Start offsets: the tail (trailer and footer) and two random windows."""
        tail = max(0, size - WINDOW)
        return [tail] + [self.rng.randrange(0, max(1, size - WINDOW)) for _ in range(2)]

