"""Reading moved packs back (move mode): ranged GETs of single records, through a bounded disk cache.

The engine asks for exactly the bytes of one record (header + stored payload: `ChunkStore.read_remote`),
and checks them as it checks a local read (CRC, then AES-GCM / BLAKE3 of the chunk), so a wrong answer
from the cloud is refused, never served. A restore stream keeps up to catalog.REMOTE_READ_AHEAD chunks of
moved packs in flight on this tier's read pool (PARALLEL_READS threads): that is its prefetch ahead of
the socket, bounded in memory by read-ahead × chunk size.

The cache is a directory of record files (`<pack>-<offset>-<length>`, written atomically) with an LRU
index in memory (file mtimes are touched on use), bounded by `cache_mib`: a second restore of the same
point, a map or a VHDX layout read after the download, re-read locally. It is only a cache: adopted at
start (least recently used first, trimmed to the bound), and it may be deleted at any time. Transient
store errors are retried with backoff; what still fails becomes `Unavailable` (HTTP 503 before a
download starts; a cut connection after).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_server.engine.errors import Unavailable

from .layout import pack_key
from .retry import Backoff
from .stores import NotFoundError, Store, StoreError

log = logging.getLogger("chunkyard.tiering")
PARALLEL_READS = 16  # ranged GETs in flight for restore streams (catalog.REMOTE_READ_AHEAD per stream)
READ_BACKOFF = Backoff(attempts=4, base=0.2, cap=2.0)  # a restore waits ~1.5 s for a flaky cloud, not minutes


class RecordCache:
    """A size-bounded LRU of byte strings on disk. Thread-safe."""

    def __init__(self, root: Path, limit: int):
        self.root, self.limit = root, limit
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, int] = OrderedDict()  # name -> size, least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        for path in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
            if path.name.startswith("."):  # a write cut short
                path.unlink()
            else:
                self._add(path.name, path.stat().st_size)
        self._evict()

    @property
    def size(self) -> int:
        return self._bytes

    def get(self, name: str) -> bytes | None:
        with self._lock:
            if name not in self._entries:
                self.misses += 1
                return None
            self._entries.move_to_end(name)
            self.hits += 1
        path = self.root / name
        try:
            data = path.read_bytes()
            os.utime(path)  # the order a restart adopts entries in
        except FileNotFoundError:  # evicted by another thread in between
            return None
        return data

    def put(self, name: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        tmp = self.root / f".{name}.{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        with self._lock:
            if name not in self._entries:
                self._add(name, len(data))
            self._evict()

    def _add(self, name: str, size: int) -> None:
        self._entries[name] = size
        self._bytes += size

    def _evict(self) -> None:
        while self._bytes > self.limit and self._entries:
            name, size = self._entries.popitem(last=False)
            self._bytes -= size
            (self.root / name).unlink(missing_ok=True)


class CloudPacks:
    """`RemotePacks` for the chunk store: moved packs of one tier, read by ranged GET through the cache."""

    def __init__(self, store: Store, tier_name: str, cache_dir: Path, cache_bytes: int,
                 backoff: Backoff = READ_BACKOFF):
        self.store, self.tier_name, self.backoff = store, tier_name, backoff
        self.cache = RecordCache(cache_dir, cache_bytes)
        self.pool = ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix=f"tier-read-{tier_name}")
        self.fetched_bytes = 0  # counters for status
        self.fetches = 0
        self.retries = 0
        self._lock = threading.Lock()

    def read(self, pack_id: int, offset: int, length: int, *, cache: bool = True) -> bytes:
        name = f"{pack_id:016x}-{offset:x}-{length:x}"
        data = self.cache.get(name) if cache else None
        if data is not None and len(data) == length:
            return data
        key = pack_key(pack_id)

        def counted(e: StoreError) -> None:
            with self._lock:
                self.retries += 1
            log.info("tier %s: retrying a read of %s: %s", self.tier_name, key, e)

        try:
            data = self.backoff.call(lambda: self.store.get(key, offset, offset + length), on_retry=counted)
        except NotFoundError:
            raise Unavailable(f"{self.store.url}{key} is missing from cloud tier {self.tier_name!r}: its "
                              "chunks cannot be read (`chunkyard verify` lists the points that need them)") from None
        except StoreError as e:
            raise Unavailable(f"cloud tier {self.tier_name!r} cannot be read now ({e}); the data is safe "
                              "there, retry when it is reachable") from None
        with self._lock:
            self.fetches += 1
            self.fetched_bytes += len(data)
        if cache and len(data) == length:
            self.cache.put(name, data)
        return data

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def ping(self) -> None:
        """Unavailable unless the tier answers now: checked before a restore sends its headers, so an
        unreachable cloud is a 503, not a download cut short."""
        try:
            self.backoff.call(lambda: self.store.head("repo.toml"))
        except StoreError as e:
            raise Unavailable(f"cloud tier {self.tier_name!r} is not reachable ({e}); this restore needs data "
                              "moved there. Retry when it is reachable.") from None
