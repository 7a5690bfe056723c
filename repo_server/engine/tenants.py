"""Tenants: who owns a VM, and which chunks a tenant has proven it holds (possession).

Dedup is global, but a tenant must learn nothing of another tenant's data. `missing` would leak it
("present" = somebody stores this content), so for a scoped tenant a chunk counts as present only when
it is stored AND the tenant itself has uploaded it (the upload path BLAKE3-verifies every frame, which
proves the tenant holds the bytes) or referenced it in one of its own points. A chunk held only by
another tenant must be uploaded once more; it is then recorded for this tenant and stored once.

Keys in CF `possession`: tenant_key(tenant) (8 bytes) | chunk id (32 bytes) -> b"".
Keys in CF `meta`:       b"tenant:" + name -> tenant_key (the tenants that possess anything; GC uses it
                         to drop the possession of chunks it deletes).
VM ownership lives with the points (CF `points`, key o:<vm_id> -> tenant): see PointStore.
GC (gc.py) drops possession that none of the tenant's points or open sessions reference any more.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from chunkyard.wire import ZERO

from .index import Batch, Index
from .manifest import split_page

if TYPE_CHECKING:
    from .repository import Repository

BATCH = 1000
TENANT_META = b"tenant:"


def tenant_key(tenant: str) -> bytes:
    """A fixed-length key prefix per tenant, so possession keys are 40 bytes whatever the name."""
    return hashlib.sha256(b"chunkyard-tenant\0" + tenant.encode()).digest()[:8]


class Possession:
    def __init__(self, index: Index):
        self.index = index
        self._lock = threading.Lock()
        self._known: dict[str, bytes] = {k[len(TENANT_META):].decode(): v
                                         for k, v in index.scan("meta", TENANT_META)}

    def tenant_keys(self) -> list[bytes]:
        with self._lock:
            return list(self._known.values())

    def has(self, tenant: str, ids: list[bytes]) -> list[bool]:
        """For each chunk id: has this tenant uploaded or referenced it? One multi-get."""
        prefix = tenant_key(tenant)
        return [v is not None for v in self.index.multi_get("possession", [prefix + i for i in ids])]

    def record(self, tenant: str, ids: Iterable[bytes], batch: Batch | None = None) -> None:
        """Remember that the tenant holds these chunks. Not synced on its own: a later synced write (map,
        commit) makes it durable, and a lost record only costs the tenant one more upload."""
        prefix = tenant_key(tenant)
        own = batch is None
        batch = batch or self.index.batch()
        with self._lock:
            if tenant not in self._known:
                self._known[tenant] = prefix
                batch.put("meta", TENANT_META + tenant.encode(), prefix)
        for i in ids:
            if i != ZERO:
                batch.put("possession", prefix + i, b"")
                if own and len(batch) >= BATCH:
                    self.index.write(batch)
                    batch = self.index.batch()
        if own:
            self.index.write(batch)

    def forget(self, ids: list[bytes], batch: Batch) -> None:
        """Add to batch: drop every tenant's possession of chunks that leave the repository (GC)."""
        keys = [t + i for t in self.tenant_keys() for i in ids]
        for start in range(0, len(keys), BATCH):
            part = keys[start : start + BATCH]
            for key, value in zip(part, self.index.multi_get("possession", part), strict=True):
                if value is not None:
                    batch.delete("possession", key)


def rebuild_possession(repo: Repository) -> int:
    """Record possession from the point files (each knows its tenant): for `repair --rebuild-index`.
    Returns the number of (tenant, chunk) entries written."""
    count = 0
    with repo.chunks.reader() as reader:
        for _, value in repo.index.scan("points", b"p:"):
            record = json.loads(value)
            tenant = record.get("tenant", "")
            if not tenant:
                continue
            for disk in record["disks"]:
                for page in disk["pages"]:
                    if bytes.fromhex(page) == ZERO:
                        continue
                    ids = [d for d in split_page(reader.read_digest(bytes.fromhex(page))) if d != ZERO]
                    repo.possession.record(tenant, ids)
                    count += len(ids)
    return count
