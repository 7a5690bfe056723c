"""Read-only access to a VHDX disk and its differencing chain, as a flat virtual disk.

`open_vhdx` validates every structure before the first read, so a backup never
ships data from a file we only half understood: headers, region table,
metadata, log (replayed in memory), BAT (every allocated block inside the file)
and the parent chain (linkage GUID, size, sector size).
"""

import functools
import os
import uuid
from collections.abc import Callable
from typing import BinaryIO, Self

from .bat import SECTORS_PER_CHUNK, Bat, BatGeometry, BlockState
from .errors import FormatError, VhdxError
from .header import (
    FILE_ID_OFFSET,
    HEADER_OFFSETS,
    HEADER_SECTION_SIZE,
    HEADER_SIZE,
    check_file_identifier,
    select_header,
)
from .log import replay_log
from .metadata import TABLE_SIZE, Metadata, parse_metadata
from .region_table import (
    BAT_GUID,
    METADATA_GUID,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    select_region_table,
)
from .source import Source

Opened = BinaryIO | str | os.PathLike[str]
ParentOpener = Callable[[dict[str, str], str], Opened | None]
"""`parent_opener(locator, child_name)` returns the parent as a path or file object, or None if missing."""

MAX_CHAIN_DEPTH = 256
_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")
_STREAM_NAME = "<vhdx stream>"


def _windows_basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def default_parent_opener(locator: dict[str, str], child_path: str) -> str | None:
    """Find the parent next to the child, the way a copied or SMB-mounted chain is laid out.

    Tries `relative_path` (Windows separators, relative to the child's directory),
    then the file name of `volume_path` and `absolute_win32_path` in the child's directory.
    """
    directory = os.path.dirname(os.path.abspath(child_path))
    candidates = []
    if relative := locator.get("relative_path"):
        candidates.append(os.path.normpath(os.path.join(directory, relative.replace("\\", "/"))))
    for key in ("volume_path", "absolute_win32_path"):
        if value := locator.get(key):
            candidates.append(os.path.join(directory, _windows_basename(value)))
    return next((c for c in candidates if os.path.isfile(c)), None)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge (offset, length) ranges that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            prev_start, prev_length = merged[-1]
            merged[-1] = (prev_start, max(prev_length, start + length - prev_start))
        elif length:
            merged.append((start, length))
    return merged


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted, merged range lists."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


@functools.lru_cache(maxsize=4)
def _zeros(n: int) -> bytes:
    return bytes(n)


def _bit_runs(bitmap: bytes, first_bit: int, count: int) -> list[list[int]]:
    """[bit, run length] runs of `count` LSB-first bits starting at `first_bit`."""
    runs: list[list[int]] = []
    pos, end = first_bit, first_bit + count
    while pos < end:
        byte = bitmap[pos >> 3]
        if not pos & 7 and end - pos >= 8 and byte in (0, 0xFF):
            bit, n = byte & 1, 8
        else:
            bit, n = (byte >> (pos & 7)) & 1, 1
        if runs and runs[-1][0] == bit:
            runs[-1][1] += n
        else:
            runs.append([bit, n])
        pos += n
    return runs


class VhdxDisk:
    """A VHDX file (and its parents) read as one flat disk of `virtual_size` bytes."""

    def __init__(
        self, name: str, source: Source, fh: BinaryIO | None, metadata: Metadata, bat: Bat, data_write_guid: uuid.UUID
    ) -> None:
        self.name = name
        self._source = source
        self._owned_fh = fh
        self._metadata = metadata
        self._bat = bat
        self.data_write_guid = data_write_guid
        self.parent: VhdxDisk | None = None
        self._ranges: list[tuple[int, int]] | None = None

    @property
    def virtual_size(self) -> int:
        return self._metadata.virtual_size

    @property
    def block_size(self) -> int:
        return self._metadata.block_size

    @property
    def logical_sector_size(self) -> int:
        return self._metadata.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self._metadata.physical_sector_size

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        """The Page 83 identity Hyper-V shows the guest (shared by a disk and its checkpoints)."""
        return self._metadata.virtual_disk_id

    @property
    def parent_locator(self) -> dict[str, str] | None:
        return self._metadata.parent_locator

    @property
    def disk_type(self) -> str:
        if self._metadata.has_parent:
            return "differencing"
        return "fixed" if self._metadata.leave_blocks_allocated else "dynamic"

    def allocated_ranges(self) -> list[tuple[int, int]]:
        """Sorted, merged (offset, length) ranges that may hold data, across the whole chain.

        Blocks in ZERO, UNMAPPED, UNDEFINED state (and NOT_PRESENT without a parent)
        are left out, so a backup never reads the sparse parts of a disk.
        """
        if self._ranges is None:
            own, deferred = [], []
            size, bs = self.virtual_size, self.block_size
            for block, state in enumerate(self._bat.block_states()):
                span = (block * bs, min(bs, size - block * bs))
                if state in (BlockState.FULLY_PRESENT, BlockState.PARTIALLY_PRESENT):
                    own.append(span)
                elif state == BlockState.NOT_PRESENT and self.parent is not None:
                    deferred.append(span)
            if deferred:
                own += _intersect(self.parent.allocated_ranges(), _merge(deferred))
            self._ranges = _merge(own)
        return list(self._ranges)

    def read(self, offset: int, length: int) -> bytearray:
        """Bytes [offset, offset+length) of the virtual disk; sparse parts read as zeros. A bytearray, not a
        bytes copy of it: the caller gets the buffer the file was read into."""
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return out

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the virtual disk's bytes from `offset`: each byte is copied once, from the file
        straight into `out`, and sparse parts are zero-filled."""
        if offset < 0 or offset + len(out) > self.virtual_size:
            raise VhdxError(
                f"{self.name}: read of {len(out)} bytes at offset {offset} is outside the "
                f"virtual disk ({self.virtual_size} bytes)"
            )
        try:
            self._read_into(offset, out)
        except FormatError as exc:
            raise VhdxError(f"{self.name}: {exc}") from None

    def _read_into(self, offset: int, out: memoryview) -> None:
        """Fill `out` with virtual bytes starting at `offset`."""
        bs = self.block_size
        pos = 0
        while pos < len(out):
            voff = offset + pos
            block, in_block = divmod(voff, bs)
            n = min(bs - in_block, len(out) - pos)
            state, file_offset = self._bat.payload(block)
            if state == BlockState.FULLY_PRESENT:
                self._source.read_into(file_offset + in_block, out[pos : pos + n])
            elif state == BlockState.PARTIALLY_PRESENT:
                self._read_partial(block, file_offset, voff, out[pos : pos + n])
            elif state == BlockState.NOT_PRESENT and self.parent is not None:
                self.parent._read_into(voff, out[pos : pos + n])
            else:
                out[pos : pos + n] = _zeros(n)
            pos += n

    def _read_partial(self, block: int, file_offset: int, offset: int, out: memoryview) -> None:
        """Sectors whose bitmap bit is set come from this file, the others from the parent (or are zeros)."""
        lss = self.logical_sector_size
        first_sector = offset // lss
        end_sector = -(-(offset + len(out)) // lss)
        chunk_first_sector = block // self._bat.geometry.chunk_ratio * SECTORS_PER_CHUNK
        bit0, bit1 = first_sector - chunk_first_sector, end_sector - chunk_first_sector
        bitmap = self._source.read_at(self._bat.bitmap_offset(block) + bit0 // 8, (bit1 + 7) // 8 - bit0 // 8)
        block_start = block * self.block_size
        pos, sector = offset, first_sector
        for bit, count in _bit_runs(bitmap, bit0 % 8, bit1 - bit0):
            sector += count
            run_end = min(sector * lss, offset + len(out))
            dest = out[pos - offset : run_end - offset]
            if bit:
                self._source.read_into(file_offset + pos - block_start, dest)
            elif self.parent is not None:
                self.parent._read_into(pos, dest)
            else:
                dest[:] = _zeros(len(dest))
            pos = run_end

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
        if self._owned_fh is not None:
            self._owned_fh.close()
            self._owned_fh = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VhdxDisk {self.name!r} {self.disk_type} {self.virtual_size} bytes>"


def _display_name(source: Opened) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else _STREAM_NAME


def _parse(name: str, fh: BinaryIO, owned: bool) -> VhdxDisk:
    source = Source(fh)
    if source.file_size < HEADER_SECTION_SIZE:
        check_file_identifier(source.read_at(FILE_ID_OFFSET, min(8, source.file_size)))
        raise FormatError(f"file is truncated ({source.file_size} bytes; the VHDX header section alone is 1 MiB)")
    check_file_identifier(source.read_at(FILE_ID_OFFSET, 8))
    header = select_header(*(source.read_at(off, HEADER_SIZE) for off in HEADER_OFFSETS))
    if header.log_guid.int:
        if header.log_offset + header.log_length > source.file_size:
            raise FormatError(f"the log (offset {header.log_offset}) lies outside the file ({source.file_size} bytes)")
        overlay = replay_log(
            source.read_at(header.log_offset, header.log_length), header.log_offset, header.log_guid, source.file_size
        )
        if overlay is not None:
            source.set_overlay(overlay)
    regions = select_region_table(
        *(source.read_at(off, REGION_TABLE_SIZE) for off in REGION_TABLE_OFFSETS), source.size
    )
    meta_region, bat_region = regions[METADATA_GUID], regions[BAT_GUID]
    metadata = parse_metadata(
        source.read_at(meta_region.file_offset, TABLE_SIZE),
        meta_region.length,
        lambda offset, length: source.read_at(meta_region.file_offset + offset, length),
    )
    geometry = BatGeometry(
        metadata.virtual_size, metadata.block_size, metadata.logical_sector_size, metadata.has_parent
    )
    if geometry.total_entries * 8 > bat_region.length:
        raise FormatError(f"BAT region ({bat_region.length} bytes) is too small for {geometry.total_entries} entries")
    bat = Bat(source.read_at(bat_region.file_offset, geometry.total_entries * 8), geometry)
    bat.validate(source.size)
    return VhdxDisk(name, source, fh if owned else None, metadata, bat, header.data_write_guid)


def _linkage(locator: dict[str, str], key: str) -> uuid.UUID | None:
    value = locator.get(key)
    if not value:
        return None
    try:
        return uuid.UUID(value.strip().strip("{}"))
    except ValueError:
        raise FormatError(f"parent locator {key} {value!r} is not a GUID") from None


def _describe_locator(locator: dict[str, str]) -> str:
    return ", ".join(f"{k} {locator[k]!r}" for k in _PATH_KEYS if locator.get(k)) or "no path in the locator"


def _attach_parent(child: VhdxDisk, child_path: str | None, opener: ParentOpener | None, depth: int) -> None:
    locator = child.parent_locator or {}
    expected = _linkage(locator, "parent_linkage")
    expected2 = _linkage(locator, "parent_linkage2")
    if depth >= MAX_CHAIN_DEPTH:
        raise VhdxError(f"{child.name}: differencing chain is deeper than {MAX_CHAIN_DEPTH} disks (a loop?)")
    if opener is None:
        if child_path is None:
            raise VhdxError(f"{child.name}: opened from a stream without a path; pass parent_opener to find its parent")
        found: Opened | None = default_parent_opener(locator, child_path)
    else:
        try:
            found = opener(locator, child.name)
        except FileNotFoundError:
            found = None
    if found is None:
        raise VhdxError(f"{child.name}: parent disk not found ({_describe_locator(locator)})")
    parent_name = _display_name(found)
    if parent_name == _STREAM_NAME:
        parent_name = next((locator[k] for k in _PATH_KEYS if locator.get(k)), "<parent stream>")
    parent = _open(found, parent_name, opener, depth + 1, owned_stream=True)
    child.parent = parent
    if parent.data_write_guid not in (expected, expected2 if expected2 and expected2.int else None):
        raise VhdxError(
            f"{child.name}: wrong parent linkage: parent {parent.name} has DataWriteGuid "
            f"{{{parent.data_write_guid}}} but the child expects parent_linkage {{{expected}}} "
            "(the parent was modified or replaced after the child was created)"
        )
    if parent.virtual_size != child.virtual_size or parent.logical_sector_size != child.logical_sector_size:
        raise VhdxError(
            f"{child.name}: parent {parent.name} has a different geometry "
            f"({parent.virtual_size} bytes / {parent.logical_sector_size}-byte sectors, child "
            f"{child.virtual_size} bytes / {child.logical_sector_size}-byte sectors)"
        )


def _open(source: Opened, name: str, opener: ParentOpener | None, depth: int, *, owned_stream: bool) -> VhdxDisk:
    if isinstance(source, (str, os.PathLike)):
        path: str | None = os.fspath(source)
        fh: BinaryIO = open(source, "rb")  # noqa: SIM115 - the disk owns and closes it
        owned = True
    else:
        fh, owned = source, owned_stream
        path = fh.name if isinstance(getattr(fh, "name", None), str) and os.path.isfile(fh.name) else None
    try:
        disk = _parse(name, fh, owned)
    except BaseException as exc:
        if owned:
            fh.close()
        if isinstance(exc, FormatError):
            raise VhdxError(f"{name}: {exc}") from None
        raise
    if disk._metadata.has_parent:
        try:
            _attach_parent(disk, path, opener, depth)
        except BaseException:
            disk.close()
            raise
    return disk


def open_vhdx(source: Opened, *, name: str | None = None, parent_opener: ParentOpener | None = None) -> VhdxDisk:
    """Open a VHDX (fixed, dynamic or differencing with its parents) for reading.

    `source` is a path or a seekable binary file object (only seek/read/tell are
    used; a file object passed here is not closed by `close()`).  `name` is used in
    error messages (default: the path or the file object's name).  For differencing
    disks `parent_opener(locator, child_name)` returns the parent as a path or a
    file object (which the disk then owns), or None; by default the parent is
    looked up next to the child (see `default_parent_opener`).
    """
    return _open(source, name or _display_name(source), parent_opener, 0, owned_stream=False)
