"""Positional reads over a VHDX file, as seen after an optional in-memory log replay.

A local file is read with `os.preadv` straight into the caller's buffer: positional, so reads from
several threads need no lock, and each byte is copied once (kernel to buffer). Any other seekable
binary stream (an SMB handle, a test's BytesIO) is read with seek + read under a lock that keeps each
pair atomic; only `seek`, `read` and `tell` are used there, no mmap.
"""

import io
import os
import threading
from typing import BinaryIO, Protocol

from .errors import FormatError


class Overlay(Protocol):
    """Bytes that replace the file's own bytes (a replayed log)."""

    @property
    def end_offset(self) -> int: ...

    def apply(self, offset: int, buf: bytearray | memoryview) -> None: ...


def _local_fd(fh: BinaryIO) -> int | None:
    """The descriptor of a plain local file, whose bytes are exactly the descriptor's; None for anything else
    (a wrapper may have a fileno() that is not its own byte stream)."""
    raw = fh.raw if isinstance(fh, (io.BufferedReader, io.BufferedRandom)) else fh
    return raw.fileno() if isinstance(raw, io.FileIO) and hasattr(os, "preadv") else None


class Source:
    """The file's bytes: the raw file, extended and patched by an optional overlay."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._fd = _local_fd(fh)
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
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the bytes at `offset` or raise FormatError (truncated file)."""
        length = len(out)
        if offset < 0 or offset + length > self.size:
            raise FormatError(
                f"file is truncated: {length} bytes needed at offset {offset}, but the file has {self.size} bytes"
            )
        in_file = min(length, max(0, self.file_size - offset))
        self._read_raw(offset, out[:in_file])
        if in_file < length:  # beyond the real end, inside what the log extended
            out[in_file:] = bytes(length - in_file)
        if self._overlay is not None:
            self._overlay.apply(offset, out)

    def _read_raw(self, offset: int, out: memoryview) -> None:
        done = 0
        if self._fd is not None:
            while done < len(out):
                n = os.preadv(self._fd, [out[done:]], offset + done)
                if not n:
                    break
                done += n
        else:
            with self._lock:
                self._fh.seek(offset)
                while done < len(out):
                    part = self._fh.read(len(out) - done)
                    if not part:
                        break
                    out[done : done + len(part)] = part
                    done += len(part)
        if done < len(out):
            raise FormatError(f"file is truncated: expected {len(out)} bytes at offset {offset}, got {done}")
