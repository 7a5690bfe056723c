"""Pack files: append-only containers of chunk records (DESIGN §3).

    file header  b"CYPACK\\0\\1" | pack_id u64
    record       magic b"CYCK" | flags u8 | raw_len u32 | stored_len u32 | digest[32] | crc32c u32 | stored
    trailer      b"CYTR" | count u32 | count × (digest[32] offset u64 stored_len u32 raw_len u32 flags u8)
    footer       trailer_offset u64 | crc32c(trailer) u32 | b"CYSE"

Flags: bits 0-1 codec (0 raw, 1 zstd), bit 2 meta (a manifest page or blob piece), bit 3 sealed
(AES-256-GCM: nonce | ciphertext | tag, the header bound as associated data). In an encrypted
repository the digest field holds the keyed chunk id, never the plain digest.
A sealed pack ends with trailer and footer, so the index can be rebuilt from packs alone;
an open pack is recovered by scanning records until the first torn or invalid one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import crc32c

FILE_MAGIC = b"CYPACK\x00\x01"
FILE_HEADER = struct.Struct("<8sQ")
RECORD_HEADER = struct.Struct("<4sBII32sI")
RECORD_MAGIC = b"CYCK"
TRAILER_HEAD = struct.Struct("<4sI")
TRAILER_ENTRY = struct.Struct("<32sQIIB")
FOOTER = struct.Struct("<QI4s")
FLAG_META = 0x04
FLAG_SEALED = 0x08  # payload is AES-256-GCM sealed (encrypted repositories)
CODEC_MASK = 0x03
MAX_STORED_LEN = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Record:
    """Where one chunk lies in a pack and how it is stored."""

    digest: bytes
    offset: int
    stored_len: int
    raw_len: int
    flags: int

    @property
    def codec(self) -> int:
        return self.flags & CODEC_MASK


class PackFormatError(Exception):
    pass


def pack_path(root: Path, pack_id: int) -> Path:
    return root / f"{pack_id & 0xFF:02x}" / f"{pack_id:016x}.pack"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackWriter:
    """Appends records to the one open pack. Not thread-safe: the chunk store serialises writers."""

    def __init__(self, path: Path, pack_id: int, records: list[Record], size: int):
        self.path = path
        self.pack_id = pack_id
        self.records = records
        self.size = size
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    @classmethod
    def create(cls, root: Path, pack_id: int) -> PackWriter:
        path = pack_path(root, pack_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cls(path, pack_id, [], 0)
        os.ftruncate(writer._fd, 0)
        writer._write(FILE_HEADER.pack(FILE_MAGIC, pack_id))
        os.fsync(writer._fd)
        fsync_dir(path.parent)
        return writer

    @classmethod
    def resume(cls, path: Path, pack_id: int, protected_end: int = 0) -> tuple[PackWriter, list[int]]:
        """Reopen an unsealed pack after a restart, cutting any torn tail; also return damaged offsets."""
        records, valid_end, damaged = scan_records(path, protected_end)
        writer = cls(path, pack_id, records, valid_end)
        if os.fstat(writer._fd).st_size != valid_end:
            os.ftruncate(writer._fd, valid_end)
            os.fsync(writer._fd)
        return writer, damaged

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self.size)
            self.size += n
            view = view[n:]

    def append(self, digest: bytes, flags: int, raw_len: int, stored: bytes | memoryview) -> Record:
        header = RECORD_HEADER.pack(RECORD_MAGIC, flags, raw_len, len(stored), digest, crc32c.crc32c(stored))
        record = Record(digest, self.size, len(stored), raw_len, flags)
        try:
            self._write(header + bytes(stored))
        except OSError:  # e.g. disk full: cut the partial record so the pack stays well-formed
            os.ftruncate(self._fd, record.offset)
            self.size = record.offset
            raise
        self.records.append(record)
        return record

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def seal(self) -> None:
        """Write the trailer and footer and make them durable; the pack is then immutable."""
        body = TRAILER_HEAD.pack(b"CYTR", len(self.records)) + b"".join(
            TRAILER_ENTRY.pack(r.digest, r.offset, r.stored_len, r.raw_len, r.flags) for r in self.records
        )
        trailer_offset = self.size
        self._write(body + FOOTER.pack(trailer_offset, crc32c.crc32c(body), b"CYSE"))
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_trailer(path: Path) -> list[Record] | None:
    """The records of a sealed pack, or None when the pack has no valid trailer."""
    with open(path, "rb") as f:
        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return trailer_records(read, f.seek(0, os.SEEK_END))


def trailer_records(read: Callable[[int, int], bytes], end: int) -> list[Record] | None:
    """The records listed by a sealed pack's trailer, reading the pack through `read(offset, length)`
    (a file, or the bytes of a pack held in a cloud tier); None without a valid trailer."""
    if end < FILE_HEADER.size + FOOTER.size:
        return None
    trailer_offset, crc, magic = FOOTER.unpack(read(end - FOOTER.size, FOOTER.size))
    if magic != b"CYSE" or not FILE_HEADER.size <= trailer_offset < end - FOOTER.size:
        return None
    body = read(trailer_offset, end - FOOTER.size - trailer_offset)
    if crc32c.crc32c(body) != crc:
        return None
    tag, count = TRAILER_HEAD.unpack_from(body)
    if tag != b"CYTR" or len(body) != TRAILER_HEAD.size + count * TRAILER_ENTRY.size:
        return None
    return [
        Record(*TRAILER_ENTRY.unpack_from(body, TRAILER_HEAD.size + i * TRAILER_ENTRY.size))
        for i in range(count)
    ]


def scan_records(path: Path, protected_end: int = 0) -> tuple[list[Record], int, list[int]]:
    """Walk an unsealed pack: its intact records, where appending may resume, and damaged offsets.

    A record that fails its checks is skipped by searching for the next intact one, so damage in the
    middle of a pack never costs the records after it. Only bytes after the last intact record are a
    torn tail to cut, and never below `protected_end`, the size the index saw after a durable flush.
    """
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or data[:8] != FILE_MAGIC:
        raise PackFormatError(f"{path}: not a Chunkyard pack (bad file header)")
    view = memoryview(data)
    records: list[Record] = []
    damaged: list[int] = []
    pos = end = FILE_HEADER.size
    while pos + RECORD_HEADER.size <= len(data):
        magic, flags, raw_len, stored_len, dig, crc = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        if (
            magic == RECORD_MAGIC
            and stored_len <= MAX_STORED_LEN
            and start + stored_len <= len(data)
            and crc32c.crc32c(view[start : start + stored_len]) == crc
        ):
            records.append(Record(dig, pos, stored_len, raw_len, flags))
            pos = end = start + stored_len
            continue
        damaged.append(pos)
        pos = data.find(RECORD_MAGIC, pos + 1)
        if pos < 0:
            break
    damaged = [d for d in damaged if d < end]  # what lies past the last intact record is the torn tail
    return records, min(max(end, protected_end), len(data)), damaged


def sealing_aad(flags: int, raw_len: int, chunk_id: bytes) -> bytes:
    """What a sealed payload is bound to: moving it under another header fails authentication."""
    return RECORD_MAGIC + bytes([flags]) + raw_len.to_bytes(4, "little") + chunk_id


def parse_record(buf: bytes, record: Record) -> bytes:
    """Check a record read from disk against what the index says, and return its stored bytes."""
    magic, _flags, _raw_len, stored_len, dig, crc = RECORD_HEADER.unpack_from(buf)
    stored = buf[RECORD_HEADER.size :]
    if (
        magic != RECORD_MAGIC
        or dig != record.digest
        or stored_len != record.stored_len
        or len(stored) != stored_len
        or crc32c.crc32c(stored) != crc
    ):
        raise PackFormatError(f"record at offset {record.offset} does not match the index or fails its CRC")
    return stored
