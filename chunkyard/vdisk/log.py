"""Metadata log (MS-VHDX 2.3), replayed in memory.

A VHDX that was open for writing (the running VM's AVHDX, or a file whose
writer crashed) may carry log entries that are not yet applied to the BAT,
metadata or sector bitmaps; the header's LogGuid is then non-zero.  Reading
such a file without replay can return stale data, and replaying on disk would
mean writing to a Hyper-V file.  So the active log sequence is found and
applied to an in-memory overlay that sits between the file and every parser.

Log layout: a circular buffer of 4 KiB sectors.  An entry is a header plus
descriptors ('desc' = one 4 KiB sector write whose data follows in a 'data'
sector, 'zero' = a zeroed range), all stamped with the entry's sequence number
and covered by one CRC-32C.  The active sequence is the run of consecutive,
valid entries with the highest sequence number whose tail lies inside it.
"""

import bisect
import struct
import uuid
from dataclasses import dataclass

from .checksum import vhdx_checksum
from .errors import FormatError

SECTOR = 4096
LOGGABLE_OFFSET = 192 * 1024  # the two headers are never logged
_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4sIQQQ")
_DATA_PAYLOAD = slice(8, SECTOR - 4)


@dataclass(frozen=True)
class _Entry:
    position: int
    length: int
    tail: int
    sequence_number: int
    flushed_file_offset: int
    last_file_offset: int
    writes: tuple[tuple[int, int, bytes | None], ...]  # (file offset, length, sector data or None = zeros)


class LogOverlay:
    """File bytes written by the replayed log: 4 KiB data sectors and zeroed ranges."""

    def __init__(self, end_offset: int) -> None:
        self.end_offset = end_offset
        self._sectors: dict[int, bytes] = {}
        self._zeros: list[tuple[int, int]] = []
        self._keys: list[int] = []

    def write(self, offset: int, length: int, data: bytes | None) -> None:
        self.end_offset = max(self.end_offset, offset + length)  # log writes may extend the file
        if data is not None:
            self._sectors[offset] = data
            return
        # a later zero range hides earlier sector writes; earlier zeros stay underneath later data
        for key in [k for k in self._sectors if offset <= k < offset + length]:
            del self._sectors[key]
        self._zeros.append((offset, offset + length))

    def freeze(self) -> None:
        self._keys = sorted(self._sectors)

    def apply(self, offset: int, buf: bytearray) -> None:
        end = offset + len(buf)
        for start, stop in self._zeros:
            lo, hi = max(start, offset), min(stop, end)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        first = bisect.bisect_left(self._keys, offset - SECTOR + 1)
        for key in self._keys[first:]:
            if key >= end:
                break
            data = self._sectors[key]
            lo, hi = max(key, offset), min(key + SECTOR, end)
            buf[lo - offset : hi - offset] = data[lo - key : hi - key]


class _CircularLog:
    def __init__(self, raw: bytes, file_offset: int) -> None:
        self.raw = raw
        self.length = len(raw)
        self.file_offset = file_offset

    def read(self, position: int, length: int) -> bytes:
        position %= self.length
        if position + length <= self.length:
            return self.raw[position : position + length]
        return self.raw[position:] + self.raw[: position + length - self.length]


def _parse_entry(log: _CircularLog, position: int, log_guid: uuid.UUID) -> _Entry | None:
    """The valid entry at `position`, or None (torn write, stale entry, garbage)."""
    (signature, checksum, length, tail, seq, count, _, guid, flushed, last) = _ENTRY_HEADER.unpack_from(
        log.read(position, _ENTRY_HEADER.size)
    )
    if signature != b"loge" or uuid.UUID(bytes_le=guid) != log_guid or seq == 0:
        return None
    if length < SECTOR or length % SECTOR or length > log.length or tail % SECTOR or tail >= log.length:
        return None
    descriptor_area = -(-(_ENTRY_HEADER.size + count * _DESCRIPTOR.size) // SECTOR) * SECTOR
    if descriptor_area > length:
        return None
    raw = log.read(position, length)
    if vhdx_checksum(raw) != checksum:
        return None
    writes = []
    data_position = descriptor_area
    for index in range(count):
        kind, trailing, leading_or_len, file_offset, desc_seq = _DESCRIPTOR.unpack_from(
            raw, _ENTRY_HEADER.size + index * _DESCRIPTOR.size
        )
        if desc_seq != seq or file_offset % SECTOR or file_offset < LOGGABLE_OFFSET:
            return None
        if kind == b"zero":
            if leading_or_len % SECTOR:
                return None
            writes.append((file_offset, leading_or_len, None))
        elif kind == b"desc":
            if data_position + SECTOR > length:
                return None
            sector = raw[data_position : data_position + SECTOR]
            data_position += SECTOR
            high, low = int.from_bytes(sector[4:8], "little"), int.from_bytes(sector[-4:], "little")
            if sector[:4] != b"data" or (high << 32 | low) != seq:
                return None
            data = leading_or_len.to_bytes(8, "little") + sector[_DATA_PAYLOAD] + trailing.to_bytes(4, "little")
            writes.append((file_offset, SECTOR, data))
        else:
            return None
        end = file_offset + writes[-1][1]
        if file_offset < log.file_offset + log.length and end > log.file_offset:
            return None  # the log never describes writes to itself
    return _Entry(position, length, tail, seq, flushed, last, tuple(writes))


def _sequence_from(log: _CircularLog, start: int, log_guid: uuid.UUID) -> list[_Entry]:
    """Consecutive valid entries from `start`, cut to begin at the newest entry's tail.

    Empty when no entry starts at `start` or the tail does not point at one of them.
    """
    entries: list[_Entry] = []
    head = start
    used = 0
    while True:
        entry = _parse_entry(log, head, log_guid)
        if entry is None or used + entry.length > log.length:
            break
        if entries and entry.sequence_number != entries[-1].sequence_number + 1:
            break
        used += entry.length
        entries.append(entry)
        head = (head + entry.length) % log.length
    while entries:  # entries that end on a bad tail may be a stale tail of an older run
        tail = entries[-1].tail
        for index, entry in enumerate(entries):
            if entry.position == tail:
                return entries[index:]
        entries.pop()
    return entries


def _find_active_sequence(log: _CircularLog, log_guid: uuid.UUID) -> list[_Entry]:
    """Scan the whole log and keep the run whose newest entry has the highest sequence number."""
    best: list[_Entry] = []
    position = 0
    while position < log.length:
        run = _sequence_from(log, position, log_guid)
        if not run:
            position += SECTOR
            continue
        if not best or run[-1].sequence_number > best[-1].sequence_number:
            best = run
        end = run[-1].position + run[-1].length
        if end >= log.length or end <= position:
            break  # the run wrapped around; everything after it was scanned
        position = end
    return best


def replay_log(log_raw: bytes, log_offset: int, log_guid: uuid.UUID, file_size: int) -> LogOverlay | None:
    """Overlay for the active sequence of the log, or None when no valid entry exists.

    No valid entry is normal: a writer sets LogGuid before writing its first entry.
    """
    log = _CircularLog(log_raw, log_offset)
    entries = _find_active_sequence(log, log_guid)
    if not entries:
        return None
    head = entries[-1]
    if head.flushed_file_offset > file_size:
        raise FormatError(
            f"log replay needs the file to be at least {head.flushed_file_offset} bytes, "
            f"but it has {file_size} (truncated copy?)"
        )
    overlay = LogOverlay(max(file_size, head.last_file_offset))
    for file_offset, length, data in (w for entry in entries for w in entry.writes):
        overlay.write(file_offset, length, data)
    overlay.freeze()
    return overlay
