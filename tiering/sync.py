"""Copy mode: every sealed pack and every point of the repository also goes to each configured tier.

One worker thread per tier (never the event loop), waking every `interval_seconds` or on demand. A cycle:

a. Snapshot what exists locally: point files and markers, retention.json, packs (the `packs` column
   family), and which packs this tier holds that GC has deleted locally since.
b. If a point waits for upload or a cloud pack waits for deletion, seal the open pack
   (`ChunkStore.seal_open_pack`): every chunk stored before this moment is then in a sealed pack.
   Not right after a failed cycle, though: a tier that is down would otherwise seal a small pack every
   interval. Such a cycle uploads packs only and, if that works, the next one starts at once and seals.
c. Upload every sealed pack not yet in the tier (conditional create, size checked after the put,
   retried with backoff). If one could not go up, or vanished under us (GC), stop here.
d. Upload retention.json, the wrapped key (keys/master.json, never repo.key) and protection markers
   when their content changed, then the point files of the snapshot.
e. Deletions: markers and points gone locally, then packs gone locally, but packs only when no deleted
   point is still in the cloud (locked): a point in the cloud may need them.
f. With immutability, extend the lock of packs still present locally (in "generations", Veeam-style).

Why a point never references a missing pack: its chunks were durable (indexed) before its file was
written, so before (a); after (b) they all lie in sealed packs, all of which are up after (c). GC may
relocate chunks meanwhile, but the old pack's cloud copy is deleted only in a cycle whose own (a) saw it
gone locally, hence after the copies, written before that (a), were sealed in (b) and uploaded in (c).

Tier state lives in the index's `meta` column family, `tier/<name>/<object key>` → JSON
{size, until, sha256}: what this server put there. It is a cache like the rest of the index: after a
rebuild it is empty, and the first cycle adopts matching objects from a bucket listing instead of
uploading them again. Deletions come only from that state (objects we uploaded and GC removed locally),
never from a bucket/local difference, so a damaged local disk cannot wipe its cloud copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from repo_server.engine.chunk_store import MOVED, PACK_KEY
from repo_server.engine.pack import pack_path

from .config import TierConfig
from .layout import DESCRIPTOR, PACKS, POINTS, is_point, mirrored_files, pack_id_of, pack_key
from .move import MOVE_EVERY, Mover
from .remote import READ_BACKOFF, CloudPacks
from .retry import Backoff
from .stores import LockedError, NotFoundError, Store, StoreError, TransientError, open_store
from .stores.base import Source, source_size

if TYPE_CHECKING:
    from repo_server.engine import Repository

log = logging.getLogger("chunkyard.tiering")
T = TypeVar("T")
BATCH = 1000  # index keys per write: rocksdict holds the GIL while it writes


class SyncError(Exception):
    """A local problem that stops a cycle (a pack the index lists is missing from disk)."""


@dataclass
class TierStatus:
    name: str
    kind: str
    url: str
    mode: str
    immutable_days: int
    state: str = "starting"  # starting, syncing, idle, error, stopped
    error: str | None = None  # why the last cycle failed; None after a good one
    pending_packs: int = 0
    pending_bytes: int = 0
    pending_points: int = 0
    pending_files: int = 0  # markers, retention.json, the wrapped key
    pending_deletes: int = 0
    locked_deletes: int = 0  # cloud deletions waiting for a retention date
    uploaded_objects: int = 0  # counters since the server started
    uploaded_bytes: int = 0
    deleted_objects: int = 0
    retention_extended: int = 0
    retries: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    last_cycle: float | None = None  # when the last cycle ended
    synced_at: float | None = None  # start of the last cycle that left nothing local out of the cloud
    oldest_pending: float | None = None  # creation time of the oldest pack or point that cycle found pending
    deletions_paused: str | None = None  # why the mass-deletion guard holds this pass's cloud deletions
    local_bytes: int = 0  # packs on local disk
    cloud_bytes: int = 0  # packs this tier holds
    move_after_days: int | None = None  # move mode only, like the fields below
    moved_packs: int = 0  # packs living only in this tier
    moved_bytes: int = 0
    moved_since_start: int = 0
    move_error: str | None = None  # why the last pass left a pack local (a cloud copy that did not verify)
    cloud_reads: int = 0  # ranged GETs of moved records since the server started
    cloud_read_bytes: int = 0
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class TierWorker:
    """The uploader of one tier; `run_cycle` is also called directly by tests."""

    def __init__(self, repo: Repository, tier: TierConfig, store: Store, *, backoff: Backoff | None = None,
                 peers: Iterable[str] = (), clock: Callable[[], float] = time.time,
                 read_backoff: Backoff | None = None):
        """`peers`: the other tiers' names (a pack moves only once they all hold it); `clock`: "now" for
        the age of points (tests age them without sleeping). A move-mode tier serves reads of moved packs
        from construction on (`repo.chunks.remote`) until `stop`."""
        self.repo, self.tier, self.store = repo, tier, store
        self.backoff = backoff or Backoff()
        self.peers, self.clock = list(peers), clock
        self.status = TierStatus(tier.name, tier.kind, store.url, tier.mode, tier.immutable_days)
        self.remote: CloudPacks | None = None
        if tier.mode == "move":
            self.status.move_after_days = tier.move_after_days
            self.remote = CloudPacks(store, tier.name, repo.data / "tier-cache" / tier.name, tier.cache_mib << 20,
                                     read_backoff or READ_BACKOFF)
            repo.chunks.remote = self.remote
        self._next_move = 0.0  # time.monotonic() of the next move pass
        self._allow_mass_delete = False  # the admin confirmed the deletions the guard holds (one pass)
        self._state_prefix = f"tier/{tier.name}/".encode()
        self._uploaded: dict[str, dict[str, Any]] | None = None  # object key -> state; loaded on first cycle
        self._lock = threading.Lock()  # _uploaded and the status counters, shared with the upload pool
        self._pool = ThreadPoolExecutor(tier.concurrency, thread_name_prefix=f"tier-{tier.name}")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False  # the last cycle failed: do not seal again before one succeeds

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tier-{self.tier.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the calls in flight (bounded by the stores' timeouts): they write the index, which
        must still be open. A cycle cut short resumes at the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.remote is not None:
            if self.repo.chunks.remote is self.remote:
                self.repo.chunks.remote = None
            self.remote.close()
        self.status.state = "stopped"

    def wake(self, *, allow_mass_delete: bool = False) -> None:
        """Run a cycle (and a move pass) now; `allow_mass_delete` lets its deletions past the guard."""
        if allow_mass_delete:
            self._allow_mass_delete = True
        self._next_move = 0.0
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_cycle()
            self._wake.wait(self.tier.interval_seconds)
            self._wake.clear()

    def run_cycle(self) -> bool:
        """One pass; True when everything that existed locally at its start is now in the tier.
        Never raises: a failure is the tier's status, and the next cycle tries again."""
        started = time.time()
        self.status.state = "syncing"
        try:
            done = self._cycle()
        except Exception as e:  # an uploader reports and carries on; it must never die silently
            self._failed = True
            if self._stop.is_set():
                return False
            if not isinstance(e, StoreError | SyncError):
                log.exception("tier %s: cycle failed", self.tier.name)
            message = str(e) or type(e).__name__
            with self._lock:
                self.status.errors += 1
                self.status.state, self.status.error = "error", message
                self.status.last_error, self.status.last_error_time = message, time.time()
            log.warning("tier %s: %s", self.tier.name, message)
            return False
        finally:
            self.status.last_cycle = time.time()
        self._failed = False
        self.status.state, self.status.error = "idle", None
        if done:
            self.status.synced_at = started
            self.status.oldest_pending = None
        return done

    def status_dict(self) -> dict:
        """The status with the read-back counters of move mode filled in."""
        if self.remote is not None:
            cache = self.remote.cache
            with self._lock:
                self.status.cloud_reads, self.status.cloud_read_bytes = self.remote.fetches, self.remote.fetched_bytes
                self.status.cache_bytes, self.status.cache_hits, self.status.cache_misses = (cache.size, cache.hits,
                                                                                             cache.misses)
        return asdict(self.status)

    # ---------------------------------------------------------------- one cycle

    def _cycle(self) -> bool:
        if self._uploaded is None:
            self._check_descriptor()
            self._uploaded = self._load_state()
            self._adopt()
        uploaded = self._uploaded
        files = mirrored_files(self.repo.data)
        packs = self._local_packs()
        points_todo = sorted(k for k in files if is_point(k) and k not in uploaded)
        packs_gone = [k for k in uploaded if (pid := pack_id_of(k)) is not None and pid not in packs]
        waiting = bool(points_todo or packs_gone)
        sealing = waiting and not self._failed
        if sealing:
            self.repo.chunks.seal_open_pack()
            packs = self._local_packs()
        sealed = {pid: s["size"] for pid, s in packs.items() if s["state"] == "sealed"}
        self._count_bytes(packs)
        packs_todo = [pid for pid in sorted(sealed) if pack_key(pid) not in uploaded]
        files_todo = {}  # markers, retention.json and the wrapped key, when their content is not the tier's
        for key, path in files.items():
            data = None if is_point(key) else _read(path)
            if data is not None and _sha256(data) != uploaded.get(key, {}).get("sha256"):
                files_todo[key] = data
        files_gone = [k for k in uploaded if pack_id_of(k) is None and k not in files]
        with self._lock:
            self.status.pending_packs = len(packs_todo)
            self.status.pending_bytes = sum(sealed[pid] for pid in packs_todo)
            self.status.pending_points = len(points_todo)
            self.status.pending_files = len(files_todo)
            self.status.pending_deletes = len(packs_gone) + len(files_gone)
            self.status.oldest_pending = self._oldest(packs_todo, points_todo)

        if not self._upload_packs(packs_todo) or (waiting and not sealing):
            self._wake.set()  # GC removed a pack before it went up, or no seal yet: go again at once
            return False
        for key, data in files_todo.items():  # first, so a bucket with points always has the wrapped key
            self._put_mutable(key, data)
        point_until = self._until(self.tier.immutable_days)
        for key in points_todo:
            with contextlib.suppress(FileNotFoundError):  # pruned since the snapshot: nothing to copy
                self._upload(key, files[key], point_until, "pending_points")
        if self._guard(files_gone, packs_gone):
            self._delete_gone(files_gone, packs_gone)
        self._extend_retention(packs)
        if self.tier.mode == "move" and time.monotonic() >= self._next_move:
            self._move_pass()
            self._count_bytes(self._local_packs())
        return True

    def _oldest(self, packs_todo: list[int], points_todo: list[str]) -> float | None:
        """When the oldest pending object came to be: a point's id starts with its creation time in ms;
        pack ids grow, so the first pending pack is the oldest (its file's mtime is when it was sealed)."""
        times = []
        for key in points_todo:
            with contextlib.suppress(ValueError):  # a file not named by us
                times.append(int(key.rsplit("/", 1)[-1][:12], 16) / 1000)
        if packs_todo:
            with contextlib.suppress(FileNotFoundError):  # GC removed it since the snapshot
                times.append(pack_path(self.repo.chunks.root, packs_todo[0]).stat().st_mtime)
        return min(times, default=None)
    # ---------------------------------------------------------------- move mode

    def _move_pass(self) -> None:
        """Let packs only old points need leave local disk (move.py); errors of one pack leave it local."""
        self._next_move = time.monotonic() + MOVE_EVERY
        uploaded = self._uploaded

        def held(key: str) -> bool:
            return key in uploaded and all(self.repo.index.get("meta", f"tier/{peer}/{key}".encode()) is not None
                                           for peer in self.peers)

        mover = Mover(self.repo, self.store, self.tier.name, held=held, retry=self._retry)
        problems = []
        for pack_id, size in mover.candidates(self.clock(), self.tier.move_after_days):
            if self._stop.is_set():
                break
            problem = mover.move(pack_id, size)
            if problem is not None:
                problems.append(problem)
                log.error("tier %s: %s", self.tier.name, problem)
        with self._lock:
            self.status.moved_since_start += mover.moved
        self.status.move_error = problems[0] if problems else None
        for key in mover.bad:
            self._replace_bad_copy(key)

    def _replace_bad_copy(self, key: str) -> None:
        """A cloud copy that failed the move's verification: delete it and forget it, so the next cycle
        uploads the pack again (a lock keeps it: then it stays, and the pack stays local)."""
        with contextlib.suppress(LockedError):
            self._retry(lambda: self.store.delete(key))
        batch = self.repo.index.batch()
        batch.delete("meta", self._state_prefix + key.encode())
        self.repo.index.write(batch, sync=True)
        with self._lock:
            self._uploaded.pop(key, None)
        self._wake.set()

    def _count_bytes(self, packs: dict[int, dict]) -> None:
        moved = [s["size"] for s in packs.values() if s["state"] == MOVED]
        with self._lock:
            self.status.moved_packs, self.status.moved_bytes = len(moved), sum(moved)
            self.status.local_bytes = sum(s["size"] for s in packs.values() if s["state"] != MOVED)
            self.status.cloud_bytes = sum(state["size"] for key, state in self._uploaded.items()
                                          if pack_id_of(key) is not None)

    # ---------------------------------------------------------------- the mass-deletion guard

    def _guard(self, files_gone: list[str], packs_gone: list[str]) -> bool:
        """Whether this pass may delete in the cloud. A pass that would delete more than
        mass_delete_fraction of the tier's points or packs (and more than mass_delete_min of them) is
        what a lost or emptied points/ directory looks like, not a prune: it waits for the admin
        (`chunkyard tier sync --allow-mass-delete`). Uploads go on meanwhile."""
        allowed, self._allow_mass_delete = self._allow_mass_delete, False  # one pass only, used or not
        points_gone = [k for k in files_gone if is_point(k)]
        held_points = sum(1 for k in self._uploaded if is_point(k))
        held_packs = sum(1 for k in self._uploaded if pack_id_of(k) is not None)
        too_many = [f"{len(gone)} of the {held} {what}" for gone, held, what in
                    ((points_gone, held_points, "points"), (packs_gone, held_packs, "packs"))
                    if len(gone) > max(self.tier.mass_delete_min, self.tier.mass_delete_fraction * held)]
        if not too_many:
            self.status.deletions_paused = None
            return True
        if allowed:
            log.warning("tier %s: deleting %s in the cloud, as the admin confirmed", self.tier.name,
                        " and ".join(too_many))
            self.status.deletions_paused = None
            return True
        reason = (f"cloud deletions paused: this pass would delete {' and '.join(too_many)} in the tier (more than "
                  f"{self.tier.mass_delete_fraction:.0%}), which looks like lost local data rather than a prune. "
                  "Check the data directory; if the deletions are intended, run "
                  "`chunkyard tier sync --allow-mass-delete`")
        if reason != self.status.deletions_paused:
            log.error("tier %s: %s", self.tier.name, reason)
        self.status.deletions_paused = reason
        return False

    def _local_packs(self) -> dict[int, dict]:
        return {PACK_KEY.unpack(k)[0]: json.loads(v) for k, v in self.repo.index.scan("packs")}

    @staticmethod
    def _until(days: int) -> datetime | None:
        return datetime.now(UTC) + timedelta(days=days) if days else None

    # ---------------------------------------------------------------- start-up

    def _check_descriptor(self) -> None:
        """The bucket prefix must hold this repository or nothing: two repositories in one prefix would
        overwrite each other's pack ids. A descriptor that is a cut-short copy of ours (an interrupted
        first upload) is replaced."""
        local = (self.repo.data / DESCRIPTOR).read_bytes()
        try:
            remote = self._retry(lambda: self.store.get(DESCRIPTOR))
        except NotFoundError:
            remote = b""
        if remote == local:
            return
        if local.startswith(remote):
            self._put_checked(DESCRIPTOR, local, None)
            return
        ours = self.repo.descriptor.repository_id
        try:
            theirs = tomllib.loads(remote.decode())["repository_id"]
        except (ValueError, KeyError, UnicodeDecodeError):
            theirs = "(unreadable repo.toml)"
        if theirs != ours:
            raise StoreError(f"{self.store.url} holds repository {theirs}, not this one ({ours}): give this tier "
                             "a prefix of its own")

    def _load_state(self) -> dict[str, dict[str, Any]]:
        n = len(self._state_prefix)
        return {k[n:].decode(): json.loads(v) for k, v in self.repo.index.scan("meta", self._state_prefix)}

    def _adopt(self) -> None:
        """Record objects already in the bucket, complete (same size as the local file), that the state
        lacks: after an index rebuild or an attach, nothing is uploaded twice."""
        packs = self._local_packs()
        local_points = mirrored_files(self.repo.data)
        adopted = {}
        for info in self._retry(lambda: list(self.store.list(PACKS)) + list(self.store.list(POINTS))):
            pid = pack_id_of(info.key)
            if pid is not None:
                state = packs.get(pid)
                local_size = state["size"] if state is not None and state["state"] in ("sealed", MOVED) else None
            else:
                local_size = _size(local_points[info.key]) if is_point(info.key) and info.key in local_points else None
            if info.key not in self._uploaded and local_size == info.size:
                adopted[info.key] = {"size": info.size, "until": None}
        self._record(adopted)

    # ---------------------------------------------------------------- uploads

    def _retry(self, fn: Callable[[], T]) -> T:
        def count(e: TransientError) -> None:
            with self._lock:
                self.status.retries += 1
            log.info("tier %s: retrying after: %s", self.tier.name, e)

        return self.backoff.call(fn, stop=self._stop, on_retry=count)

    def _upload_packs(self, pack_ids: list[int]) -> bool:
        """Upload packs in parallel; False when one vanished locally (GC deleted it meanwhile)."""
        root = self.repo.chunks.root
        until = self._until(self.tier.immutable_days + self.tier.lock_generation_days
                            if self.tier.immutable_days else 0)
        futures = {self._pool.submit(self._upload, pack_key(pid), pack_path(root, pid), until,
                                     "pending_packs"): pid for pid in pack_ids}
        vanished, failure = [], None
        for future in as_completed(futures):
            try:
                future.result()
            except FileNotFoundError:
                vanished.append(futures[future])
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure
        still_listed = [pid for pid in vanished if pid in self._local_packs()]
        if still_listed:
            raise SyncError(f"pack {still_listed[0]:016x} is in the index but its file is missing; run "
                            "`chunkyard repair --check` (points wait until this is resolved)")
        return not vanished

    def _put_checked(self, key: str, source: Source, until: datetime | None) -> tuple[bool, datetime | None]:
        """Conditional create, then HEAD: only an object of the right size counts. An object of another
        size under the key is what an interrupted upload left: it is replaced. Returns whether this call
        created the object, and the retention it holds."""
        size = source_size(source)  # FileNotFoundError for a file removed meanwhile: the caller decides

        def attempt() -> tuple[bool, datetime | None]:
            created = self.store.put(key, source, if_absent=True, retain_until=until)
            info = self.store.head(key)
            if info is None:
                raise TransientError(f"{self.store.url}{key} is not visible after its upload")
            if info.size != size:
                self.store.delete(key)  # LockedError if a lock holds the bad copy: reported, nothing uses it
                raise TransientError(f"{self.store.url}{key} held {info.size} bytes instead of {size} (an "
                                     "interrupted upload); replacing it")
            return created, until if created else info.retain_until

        return self._retry(attempt)

    def _upload(self, key: str, source: Path, until: datetime | None, pending: str) -> None:
        """Upload an immutable file (pack or point), record it in the tier state, count it."""
        size = source_size(source)
        created, held = self._put_checked(key, source, until)
        self._record({key: {"size": size, "until": held.timestamp() if held else None}})
        with self._lock:
            if created:
                self.status.uploaded_objects += 1
                self.status.uploaded_bytes += size
            setattr(self.status, pending, max(0, getattr(self.status, pending) - 1))
            if pending == "pending_packs":
                self.status.pending_bytes = max(0, self.status.pending_bytes - size)

    def _put_mutable(self, key: str, data: bytes) -> None:
        """Markers, retention.json and the wrapped key change in place: overwrite, never locked."""
        def attempt() -> None:
            self.store.put(key, data, if_absent=False)
            info = self.store.head(key)
            if info is None or info.size != len(data):
                raise TransientError(f"{self.store.url}{key} does not hold what was just written")

        self._retry(attempt)
        self._record({key: {"size": len(data), "sha256": _sha256(data)}})
        with self._lock:
            self.status.uploaded_objects += 1
            self.status.uploaded_bytes += len(data)
            self.status.pending_files = max(0, self.status.pending_files - 1)

    # ---------------------------------------------------------------- deletions and retention

    def _delete_gone(self, files_gone: list[str], packs_gone: list[str]) -> None:
        locked = 0
        point_kept = False
        for key in sorted(files_gone, key=is_point):  # markers before the points they protect
            if not self._delete(key):
                locked += 1
                point_kept = point_kept or is_point(key)
        for key in [] if point_kept else packs_gone:
            locked += not self._delete(key)
        self.status.locked_deletes = locked + (len(packs_gone) if point_kept else 0)

    def _delete(self, key: str) -> bool:
        """Delete an object this tier uploaded; False while its retention holds it."""
        try:
            self._retry(lambda: self.store.delete(key))
        except LockedError:
            return False
        batch = self.repo.index.batch()
        batch.delete("meta", self._state_prefix + key.encode())
        self.repo.index.write(batch, sync=True)
        with self._lock:
            del self._uploaded[key]
            self.status.deleted_objects += 1
            self.status.pending_deletes = max(0, self.status.pending_deletes - 1)
        return True

    def _extend_retention(self, packs: dict[int, dict]) -> None:
        """Keep every pack still present locally locked for at least immutable_days from now, so a point
        (locked for immutable_days from its upload) never outlives the packs it needs. Locks move in steps
        of lock_generation_days, so each pack is touched once per generation, not once per backup."""
        if not self.tier.immutable_days:
            return
        horizon = (datetime.now(UTC) + timedelta(days=self.tier.immutable_days)).timestamp()
        due = [key for key, state in list(self._uploaded.items())
               if pack_id_of(key) in packs and (state.get("until") or 0) < horizon]
        until = self._until(self.tier.immutable_days + self.tier.lock_generation_days)
        for future in as_completed([self._pool.submit(self._extend, key, until) for key in due]):
            future.result()

    def _extend(self, key: str, until: datetime) -> None:
        self._retry(lambda: self.store.extend_retention(key, until))
        self._record({key: self._uploaded[key] | {"until": until.timestamp()}})
        with self._lock:
            self.status.retention_extended += 1

    # ---------------------------------------------------------------- state

    def _record(self, states: dict[str, dict[str, Any]]) -> None:
        """Remember objects as the tier's, durably, in index batches of at most BATCH keys."""
        items = list(states.items())
        for start in range(0, len(items), BATCH):
            batch = self.repo.index.batch()
            for key, state in items[start : start + BATCH]:
                batch.put("meta", self._state_prefix + key.encode(), json.dumps(state).encode())
            self.repo.index.write(batch, sync=True)
        with self._lock:
            self._uploaded.update(states)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # released or rewritten between the listing and now
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TierSync:
    """Every configured tier's worker, started and stopped with the server (repo_server/api/app.py)."""

    def __init__(self, tiers: Iterable[TierConfig], *, stores: Iterable[Store] | None = None):
        self.tiers = list(tiers)
        self.stores = list(stores) if stores is not None else [open_store(t) for t in self.tiers]
        self.workers: list[TierWorker] = []

    def start(self, repo: Repository) -> None:
        names = [t.name for t in self.tiers]
        self.workers = [TierWorker(repo, t, s, peers=[n for n in names if n != t.name])
                        for t, s in zip(self.tiers, self.stores, strict=True)]
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for store in self.stores:
            store.close()

    def wake(self, *, allow_mass_delete: bool = False) -> None:
        for worker in self.workers:
            worker.wake(allow_mass_delete=allow_mass_delete)

    def wake_tier(self, name: str) -> None:
        """Start a cycle of one tier now: a backup job's tier policy sends its points off site at once."""
        for worker in self.workers:
            if worker.tier.name == name:
                worker.wake()

    def status(self) -> list[dict]:
        return [w.status_dict() for w in self.workers]

    def metric_families(self) -> Iterable[Metric]:
        """Per tier, at scrape time: the lag (what is not in the cloud yet, and how old the oldest of it is)
        and the counters since the server started."""
        fields = {
            "pending_packs": ("gauge", "Sealed packs not yet in the tier."),
            "pending_bytes": ("gauge", "Bytes of sealed packs not yet in the tier."),
            "pending_points": ("gauge", "Restore points not yet in the tier."),
            "locked_deletes": ("gauge", "Cloud deletions waiting for a retention date to pass."),
            "uploaded_bytes": ("counter", "Bytes uploaded to the tier since the server started."),
            "errors": ("counter", "Failed sync cycles since the server started."),
            "synced_at": ("gauge", "Unix time: everything local at this moment is in the tier."),
            "local_bytes": ("gauge", "Bytes of packs on local disk."),
            "cloud_bytes": ("gauge", "Bytes of packs the tier holds."),
            "moved_bytes": ("gauge", "Bytes of packs living only in the tier (move mode)."),
        }
        for name, (kind, help_text) in fields.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                f"chunkyard_tier_{name}", help_text, labels=["tier"])
            for worker in self.workers:
                family.add_metric([worker.tier.name], getattr(worker.status, name) or 0)
            yield family
        age = GaugeMetricFamily("chunkyard_tier_oldest_pending_age_seconds",
                                "Age of the oldest pack or point the last cycle found not yet in the tier "
                                "(0 when it found none).", labels=["tier"])
        now = time.time()
        for worker in self.workers:
            oldest = worker.status.oldest_pending
            age.add_metric([worker.tier.name], max(0.0, now - oldest) if oldest else 0.0)
        yield age
