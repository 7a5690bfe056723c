"""Restore point records: one JSON file per point (the source of truth) mirrored in the index.

Files live at points/<vm_id>/<point_id>.json; a point file never changes. A protected point also has
points/<vm_id>/<point_id>.protect (JSON {note, since}): that marker is the only copy of the protection,
so an index rebuild keeps it. In an encrypted repository both are sealed (keyring.seal_file); a plain
marker written before markers were sealed is still read, and sealed when the repository opens.
Index keys (CF `points`):
    p:<point_id>            the record
    v:<vm_id>\\0<point_id>   membership, sorted by time (point ids are time-ordered)
    m:<vm_id>               the VM's summary (name, host, latest point, count, tenant)
    o:<vm_id>               the VM's owner: the tenant whose token first opened a session for it

Every `tenant` argument below scopes the call: "" (an operator token) sees everything, a tenant sees
only its own VMs and points, and another tenant's object answers exactly like one that does not exist.
Records written before tenants existed carry no `tenant` and belong to "".
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from .durable import write_atomic
from .errors import Conflict, NotFound
from .faults import crash_point
from .index import U64, Batch, Index
from .keyring import SEALED_MAGIC, Keyring
from .names import check_hex_id, check_name
from .pack import fsync_dir


def new_point_id() -> str:
    """20 hex chars: milliseconds since the epoch, then randomness; sorts by creation time."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def public(record: dict) -> dict:
    """A record as the API shows it: manifest roots replaced by their page count."""
    out = dict(record)
    out["disks"] = [
        {k: v for k, v in d.items() if k != "pages"} | {"pages": len(d["pages"])} for d in record["disks"]
    ]
    out["blobs"] = {name: {"size": b["size"]} for name, b in record.get("blobs", {}).items()}
    out["protected"] = "protection" in record
    return out


def visible(tenant: str, owner: str) -> bool:
    return not tenant or tenant == owner


def logical_bytes(record: dict) -> int:
    """Bytes of data a plain full backup of this point would hold (allocated chunks)."""
    return sum(d["allocated_chunks"] for d in record["disks"]) * record["chunk_size"]


# Per-VM sums kept in its summary: what the fleet overview shows without reading every point.
TOTALS = ("logical_bytes", "new_bytes", "stored_bytes")


def _add_totals(summary: dict, record: dict, sign: int) -> None:
    stats = record.get("stats", {})
    summary["logical_bytes"] = summary.get("logical_bytes", 0) + sign * logical_bytes(record)
    summary["new_bytes"] = summary.get("new_bytes", 0) + sign * stats.get("new_bytes", 0)
    summary["stored_bytes"] = summary.get("stored_bytes", 0) + sign * stats.get("stored_bytes", 0)


def _latest_fields(record: dict) -> dict:
    """The summary fields that describe a VM's newest point."""
    return {"name": record["vm"]["name"], "host": record["host"], "latest_point": record["point_id"],
            "latest_time": record["created"], "latest_consistency": record.get("consistency"),
            "latest_size": sum(d["size"] for d in record["disks"]), "latest_logical_bytes": logical_bytes(record)}


def vm_view(summary: dict) -> dict:
    """A VM summary as the API shows it, with its dedup ratio: the logical bytes of all its points over the
    bytes its backups added to the repository (None before any were added)."""
    added = summary.get("new_bytes", 0)
    return summary | {"dedup_ratio": round(summary.get("logical_bytes", 0) / added, 3) if added > 0 else None}
def open_marker(keyring: Keyring, data: bytes, name: str) -> bytes:
    """A protection marker's JSON. Plain ones are accepted even when encrypted: older versions wrote them so."""
    return keyring.open_file(data, name) if data.startswith(SEALED_MAGIC) else data


class PointStore:
    def __init__(self, index: Index, root: Path, keyring: Keyring):
        self.index = index
        self.root = root
        self.keyring = keyring  # point files are sealed in an encrypted repository
        self._lock = threading.Lock()
        self.logical_bytes = index.counter("logical_bytes")
        self.point_count = index.counter("point_count")

    def path(self, vm_id: str, point_id: str) -> Path:
        return self.root / vm_id / f"{point_id}.json"

    def protection_path(self, vm_id: str, point_id: str) -> Path:
        return self.root / vm_id / f"{point_id}.protect"

    def _with_protection(self, record: dict) -> dict:
        """The record plus its `protection` {note, since} when protected, read from the marker file."""
        with contextlib.suppress(FileNotFoundError):
            path = self.protection_path(record["vm"]["id"], record["point_id"])
            record["protection"] = json.loads(open_marker(self.keyring, path.read_bytes(), str(path)))
        return record

    def set_protection(self, point_id: str, protected: bool, note: str = "", tenant: str = "") -> dict:
        """Protect a point from prune and DELETE, or release it. Under the lock that delete takes, so a
        point is never deleted between its check and a protection being set."""
        with self._lock:
            record = self.get(point_id, tenant)
            marker = self.protection_path(record["vm"]["id"], point_id)
            if protected:
                write_atomic(marker, self.keyring.seal_file(json.dumps({"note": note, "since": time.time()}).encode()))
            elif marker.exists():
                marker.unlink()
                fsync_dir(marker.parent)
        return self.get(point_id)

    def save(self, record: dict, batch: Batch) -> None:
        """Make a point durable: the file first, then the index (with the caller's batch) synced."""
        vm_id, point_id = record["vm"]["id"], record["point_id"]
        write_atomic(self.path(vm_id, point_id), self.keyring.seal_file(json.dumps(record).encode()))
        crash_point("after_point_file")
        with self._lock:
            self._index_point(record, batch)
            self.index.write(batch, sync=True)

    def _index_point(self, record: dict, batch: Batch) -> None:
        vm_id, point_id = record["vm"]["id"], record["point_id"]
        batch.put("points", b"p:" + point_id.encode(), json.dumps(record).encode())
        batch.put("points", f"v:{vm_id}\0{point_id}".encode(), b"")
        tenant = record.get("tenant", "")
        summary = self.vm(vm_id) or {"id": vm_id, "points": 0, "tenant": tenant}
        summary["points"] += 1
        _add_totals(summary, record, +1)
        if self.index.get("points", b"o:" + vm_id.encode()) is None:  # a rebuilt index learns owners here
            batch.put("points", b"o:" + vm_id.encode(), tenant.encode())
        if point_id >= summary.get("latest_point", ""):
            summary |= _latest_fields(record)
        batch.put("points", b"m:" + vm_id.encode(), json.dumps(summary).encode())
        self.logical_bytes += logical_bytes(record)
        self.point_count += 1
        self._put_counters(batch)

    def _put_counters(self, batch: Batch) -> None:
        batch.put("meta", b"logical_bytes", U64.pack(self.logical_bytes))
        batch.put("meta", b"point_count", U64.pack(self.point_count))

    def get(self, point_id: str, tenant: str = "") -> dict:
        check_hex_id(point_id, "point id")
        value = self.index.get("points", b"p:" + point_id.encode())
        record = json.loads(value) if value is not None else None
        if record is None or not visible(tenant, record.get("tenant", "")):
            raise NotFound(f"no restore point {point_id}", "point_not_found")
        return self._with_protection(record)

    def vm(self, vm_id: str, tenant: str = "") -> dict | None:
        value = self.index.get("points", b"m:" + vm_id.encode())
        summary = json.loads(value) if value else None
        return summary if summary and visible(tenant, summary.get("tenant", "")) else None

    def vms(self, tenant: str = "") -> list[dict]:
        all_vms = (json.loads(v) for _, v in self.index.scan("points", b"m:"))
        return [v | {"tenant": v.get("tenant", "")} for v in all_vms if visible(tenant, v.get("tenant", ""))]

    def owner(self, vm_id: str) -> str | None:
        """The tenant a VM id belongs to; None while no session was ever opened for it."""
        value = self.index.get("points", b"o:" + vm_id.encode())
        if value is not None:
            return value.decode()
        return "" if self.index.get("points", b"m:" + vm_id.encode()) is not None else None

    def claim(self, vm_id: str, tenant: str) -> str:
        """The VM's owner, making `tenant` the owner of a VM id nobody has used yet."""
        with self._lock:
            owner = self.owner(vm_id)
            if owner is None:
                batch = self.index.batch()
                batch.put("points", b"o:" + vm_id.encode(), tenant.encode())
                self.index.write(batch, sync=True)
                owner = tenant
            return owner

    def tenant_stats(self, tenant: str) -> dict:
        """A tenant's share of the repository: its VMs, points and their logical bytes."""
        vms = self.vms(tenant)
        points = [p for v in vms for p in self.of_vm(v["id"], tenant)] if vms else []
        return {"vm_count": len(vms), "point_count": len(points),
                "logical_bytes": sum(logical_bytes(p) for p in points)}

    def ids_of_vm(self, vm_id: str) -> list[str]:
        check_name(vm_id, "VM id")
        prefix = f"v:{vm_id}\0".encode()
        return [k[len(prefix) :].decode() for k, _ in self.index.scan("points", prefix)]

    def of_vm(self, vm_id: str, tenant: str = "") -> list[dict]:
        if self.vm(check_name(vm_id, "VM id"), tenant) is None:
            raise NotFound(f"no VM {vm_id} has restore points", "vm_not_found")
        ids = self.ids_of_vm(vm_id)
        values = self.index.multi_get("points", [b"p:" + i.encode() for i in ids])
        return [self._with_protection(json.loads(v)) for v in values if v is not None]

    def latest(self, vm_id: str) -> dict | None:
        summary = self.vm(vm_id)
        return self.get(summary["latest_point"]) if summary else None

    def delete(self, point_id: str, tenant: str = "") -> dict:
        """Remove a point: the file first, so a crash can never resurrect it. A protected point refuses.
        All under the lock, so two deletes of one point cannot both count it off."""
        with self._lock:
            record = self.get(point_id, tenant)
            if "protection" in record:
                note = record["protection"]["note"]
                raise Conflict(f"point {point_id} is protected{f' ({note})' if note else ''}; release it first "
                               f"with `chunkyard protect {point_id} --off` (PUT /points/{point_id}/protection "
                               '{"protected": false})', "point_protected")
            path = self.path(record["vm"]["id"], point_id)
            if path.exists():
                path.unlink()
                fsync_dir(path.parent)
            batch = self.index.batch()
            self._unindex_point(record, batch)
            self.index.write(batch, sync=True)
        return record

    def _unindex_point(self, record: dict, batch: Batch) -> None:
        vm_id, point_id = record["vm"]["id"], record["point_id"]
        batch.delete("points", b"p:" + point_id.encode())
        batch.delete("points", f"v:{vm_id}\0{point_id}".encode())
        remaining = [i for i in self.ids_of_vm(vm_id) if i != point_id]
        if remaining:
            summary = {k: v for k, v in (self.vm(vm_id) or {}).items() if k in TOTALS}
            _add_totals(summary, record, -1)
            summary |= {"id": vm_id, "points": len(remaining), "tenant": record.get("tenant", "")} \
                | _latest_fields(self.get(remaining[-1]))
            batch.put("points", b"m:" + vm_id.encode(), json.dumps(summary).encode())
        else:
            batch.delete("points", b"m:" + vm_id.encode())
        self.logical_bytes -= logical_bytes(record)
        self.point_count -= 1
        self._put_counters(batch)

    def _seal_plain_marker(self, path: Path) -> None:
        """Seal a marker an older version left in plain JSON, so its note is not readable at rest."""
        data = path.read_bytes()
        if not data.startswith(SEALED_MAGIC):
            write_atomic(path, self.keyring.seal_file(data))

    def recover(self) -> tuple[list[dict], int]:
        """Index point files the index lacks; drop index entries whose file is gone.

        Returns the records added (their sessions are then marked committed) and the count removed.
        """
        on_disk: dict[str, Path] = {}
        if self.root.exists():
            for vm_dir in os.scandir(self.root):
                if vm_dir.is_dir():
                    for entry in os.scandir(vm_dir.path):
                        if entry.name.endswith(".json") and not entry.name.startswith("."):
                            on_disk[entry.name[:-5]] = Path(entry.path)
                        elif entry.name.endswith(".protect") and self.keyring.encrypted:
                            self._seal_plain_marker(Path(entry.path))
        indexed = {k[2:].decode() for k, _ in self.index.scan("points", b"p:")}
        added = []
        with self._lock:
            for point_id in sorted(on_disk.keys() - indexed):
                path = on_disk[point_id]
                record: dict[str, Any] = json.loads(self.keyring.open_file(path.read_bytes(), str(path)))
                batch = self.index.batch()
                self._index_point(record, batch)
                self.index.write(batch, sync=True)
                added.append(record)
            removed = indexed - on_disk.keys()
            for point_id in sorted(removed):
                batch = self.index.batch()
                self._unindex_point(self.get(point_id), batch)
                self.index.write(batch, sync=True)
            for summary in self.vms():
                if "latest_consistency" not in summary:  # written by a version without the per-VM totals
                    self._resummarize(summary["id"])
        return added, len(removed)

    def _resummarize(self, vm_id: str) -> None:
        """Rebuild a VM's summary from its points (once, for an index written by an older version)."""
        summary: dict[str, Any] = {"id": vm_id, "points": 0}
        for record in self.of_vm(vm_id):
            summary["points"] += 1
            _add_totals(summary, record, +1)
            summary |= _latest_fields(record) | {"tenant": record.get("tenant", "")}  # oldest first: last wins
        batch = self.index.batch()
        batch.put("points", b"m:" + vm_id.encode(), json.dumps(summary).encode())
        self.index.write(batch, sync=True)
