"""The audit log: one JSON line per administrative action in <data>/audit.log, append-only.

Each record is written with O_APPEND and fsynced before the action's answer, so an acknowledged action
is on record after a crash. A torn last line (a crash mid-write) is skipped when reading. Record fields:
time (unix), who {token_id, name, tenant}, action, target, tenant (whose object it concerns),
outcome ("ok", "started", "failed", "denied", "refused"), and action-specific details.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.log"
READ_BLOCK = 64 << 10
MAX_LIMIT = 10000
MANY = ("(many sources)",)  # the key of refusals beyond RefusalThrottle.max_keys distinct ones


class AuditLog:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, who: dict, action: str, target: str | None, *, tenant: str = "", outcome: str = "ok",
               **details: Any) -> dict:
        record = {"time": time.time(), "who": who, "action": action, "target": target, "tenant": tenant,
                  "outcome": outcome} | ({"details": details} if details else {})
        line = json.dumps(record, default=str).encode() + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash stays alone
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return record

    def tail(self, limit: int, tenant: str = "") -> list[dict]:
        """The newest `limit` records, newest first; with `tenant` only those by or about that tenant."""
        out: list[dict] = []
        for line in self._lines_backwards():
            try:
                record = json.loads(line)
            except ValueError:  # a torn line from a crash mid-append
                continue
            if not isinstance(record, dict):
                continue
            if tenant and tenant not in (record.get("tenant"), (record.get("who") or {}).get("tenant")):
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    def _lines_backwards(self) -> Iterator[bytes]:
        """The file's lines from the last to the first, reading blocks from the end (bounded memory)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed in the finally below, generator-safe)
        except FileNotFoundError:
            return
        try:
            pos = f.seek(0, os.SEEK_END)
            rest = b""
            while pos > 0:
                step = min(READ_BLOCK, pos)
                pos -= step
                f.seek(pos)
                lines = (f.read(step) + rest).split(b"\n")
                rest = lines.pop(0)
                yield from (line for line in reversed(lines) if line.strip())
            if rest.strip():
                yield rest
        finally:
            f.close()


class RefusalThrottle:
    """Collapses repeated identical refusals (e.g. one source's failed logins) so a flood cannot fill the
    disk: per key, at most one record per window. The first refusal of a quiet key is recorded at once; the
    rest are counted, and their summary (the last one's details, `count`, `since`) is recorded when the window
    has passed, by the key's next refusal or by `due()`. Memory is bounded: beyond max_keys keys, refusals
    share one key (MANY). Not thread-safe: one owner (the server's event loop) calls it."""

    def __init__(self, window: float = 60.0, max_keys: int = 1000):
        self.window, self.max_keys = window, max_keys
        self._keys: dict[tuple, dict] = {}  # key -> {"start": window start, "count", "since", "last"}

    def add(self, key: tuple, details: dict, now: float) -> dict | None:
        """Details (with count and since) to record now, or None when this refusal is only counted."""
        if key not in self._keys and len(self._keys) >= self.max_keys:
            key, details = MANY, details | {"source": MANY[0]}
        entry = self._keys.get(key)
        if entry is not None and now - entry["start"] < self.window:
            entry["since"] = entry["since"] if entry["count"] else now
            entry["count"] += 1
            entry["last"] = details
            return None
        held = entry["count"] if entry else 0
        self._keys[key] = {"start": now, "count": 0, "since": now, "last": details}
        return details | {"count": held + 1, "since": entry["since"] if held else now}

    def due(self, now: float) -> list[dict]:
        """Summaries of the counted refusals whose window has passed; keys quiet for a window are forgotten."""
        out = []
        for key, entry in list(self._keys.items()):
            if now - entry["start"] < self.window:
                continue
            if entry["count"]:
                out.append(entry["last"] | {"count": entry["count"], "since": entry["since"]})
                self._keys[key] = {"start": now, "count": 0, "since": now, "last": entry["last"]}
            else:
                del self._keys[key]
        return out


def local_who() -> dict:
    """Who acts in an offline command (no token): the local user."""
    user = os.environ.get("USER") or str(os.getuid())
    return {"token_id": None, "name": f"local user {user}", "tenant": ""}
