"""Positional reads over a VHDX file, as seen after an optional in-memory log replay.

Only `seek`, `read` and `tell` are used, so the file may be a local file, an SMB
handle or any other seekable binary stream; no mmap, no fileno.  A lock keeps
seek+read pairs atomic so one disk can serve reads from several threads.
"""

import threading
from typing import BinaryIO, Protocol

from .errors import FormatError


class Overlay(Protocol):
    """Bytes that replace the file's own bytes (a replayed log)."""

    @property
    def end_offset(self) -> int: ...

    def apply(self, offset: int, buf: bytearray) -> None: ...


class Source:
    """The file's bytes: the raw file, extended and patched by an optional overlay."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._lock = threading.Lock()
        fh.seek(0, 2)
        self.file_size = fh.tell()
        self._overlay: Overlay | None = None

    @property
    def size(self) -> int:
        """Size of the file once the overlay (if any) has been applied."""
        if self._overlay is None:
            return self.file_size
        return max(self.file_size, self._overlay.end_offset)

    def set_overlay(self, overlay: Overlay) -> None:
        self._overlay = overlay

    def read_at(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes at `offset` or raise FormatError (truncated file)."""
        if offset < 0 or offset + length > self.size:
            raise FormatError(
                f"file is truncated: {length} bytes needed at offset {offset}, but the file has {self.size} bytes"
            )
        buf = bytearray(self._read_raw(offset, min(length, max(0, self.file_size - offset))))
        if len(buf) < length:  # beyond the real end, inside what the log extended
            buf.extend(bytes(length - len(buf)))
        if self._overlay is not None:
            self._overlay.apply(offset, buf)
        return bytes(buf)

    def _read_raw(self, offset: int, length: int) -> bytes:
        parts = []
        with self._lock:
            self._fh.seek(offset)
            remaining = length
            while remaining:
                part = self._fh.read(remaining)
                if not part:
                    raise FormatError(
                        f"file is truncated: expected {length} bytes at offset {offset}, got {length - remaining}"
                    )
                parts.append(part)
                remaining -= len(part)
        return b"".join(parts)
