"""The audit log: one JSON line per administrative action in <data>/audit.log, append-only.

Each record is written with O_APPEND and fsynced before the action's answer, so an acknowledged action
is on record after a crash. A torn last line (a crash mid-write) is skipped when reading. Record fields:
time (unix), who {token_id, name, tenant}, action, target, tenant (whose object it concerns),
outcome ("ok", "started", "failed", "denied"), and action-specific details.
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


def local_who() -> dict:
    """Who acts in an offline command (no token): the local user."""
    user = os.environ.get("USER") or str(os.getuid())
    return {"token_id": None, "name": f"local user {user}", "tenant": ""}
