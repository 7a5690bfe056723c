"""A dynamic VHDX laid out from a chunk manifest, generated piece by piece for HTTP Range restores.

The file is never materialised: `pieces(start, stop)` says which bytes of any
range are generated structure, zeros, or slices of stored chunks, at a cost
proportional to the pieces in the range.  All GUIDs come from `seed`, so the
same manifest always gives the same bytes (stable ETags, resumable downloads).

Layout (every region 1 MiB aligned, as MS-VHDX requires):
    0      header section: identifier, 2 headers, 2 region tables
    1 MiB  log (1 MiB, empty: Hyper-V needs room to log when it opens the disk)
    2 MiB  metadata region (1 MiB)
    3 MiB  BAT, rounded up to 1 MiB
    then   one payload block per allocated block, in virtual order
"""

import bisect
import hashlib
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import BinaryIO

from .bat import BatGeometry, BlockState, entries_to_bytes
from .header import HEADER_OFFSETS, Header, MiB, pack_file_identifier
from .metadata import MAX_VIRTUAL_SIZE, Metadata, pack_metadata
from .region_table import BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS, Region, pack_region_table

Piece = tuple[str, bytes] | tuple[str, int] | tuple[str, int, int, int]
"""("bytes", data) | ("zeros", length) | ("chunk", chunk_index, offset_in_chunk, length)"""

LOG_OFFSET = MiB
LOG_LENGTH = MiB
METADATA_OFFSET = 2 * MiB
METADATA_LENGTH = MiB
BAT_OFFSET = 3 * MiB
CREATOR = "chunkyard"
_BAT_PAGE_ENTRIES = 8192  # BAT bytes are generated 64 KiB at a time
_NONZERO_TO_ONE = bytes([0] + [1] * 255)


def _seeded_uuid(seed: bytes, label: bytes) -> uuid.UUID:
    digest = hashlib.blake2b(seed, digest_size=16, person=b"chunkyard.vhdx", salt=label.ljust(16, b"\0")).digest()
    return uuid.UUID(bytes=digest, version=4)


def block_size_for(chunk_size: int) -> int:
    """The chunk size when it is a valid VHDX block size, else 1 MiB (a multiple of it)."""
    return chunk_size if chunk_size >= MiB else MiB


class VhdxLayout:
    """Byte layout of a dynamic VHDX whose present chunks become FULLY_PRESENT blocks.

    Chunk i covers virtual bytes [i*chunk_size, min((i+1)*chunk_size, virtual_size));
    `present[i] != 0` means it holds data.  A block is allocated iff any of its chunks
    is present; the others are written as PAYLOAD_BLOCK_ZERO, which the spec defines
    as reading zeros (NOT_PRESENT is "undefined" for a disk without parent) and which
    qemu-img also writes by default for Hyper-V compatibility.
    """

    def __init__(
        self,
        virtual_size: int,
        chunk_size: int,
        present: bytes | bytearray,
        *,
        seed: bytes,
        logical_sector_size: int = 512,
        physical_sector_size: int = 4096,
    ) -> None:
        if chunk_size < 256 * 1024 or chunk_size > 8 * MiB or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk size {chunk_size} is not a power of two from 256 KiB to 8 MiB")
        if logical_sector_size not in (512, 4096) or physical_sector_size not in (512, 4096):
            raise ValueError("sector sizes must be 512 or 4096")
        if not 0 < virtual_size <= MAX_VIRTUAL_SIZE or virtual_size % logical_sector_size:
            raise ValueError(
                f"virtual size {virtual_size} must be a positive multiple of {logical_sector_size}, at most 64 TiB"
            )
        chunks = -(-virtual_size // chunk_size)
        if len(present) != chunks:
            raise ValueError(f"present has {len(present)} entries, expected {chunks} chunks")
        self.virtual_size = virtual_size
        self.chunk_size = chunk_size
        self.block_size = block_size_for(chunk_size)
        self._chunks_per_block = self.block_size // chunk_size
        self._present = bytes(present).translate(_NONZERO_TO_ONE)
        self._geometry = BatGeometry(virtual_size, self.block_size, logical_sector_size)
        self._allocated = self._allocated_blocks()
        self._bat_end = BAT_OFFSET + -(-self._geometry.total_entries * 8 // MiB) * MiB
        self.data_offset = self._bat_end
        self.total_size = self.data_offset + len(self._allocated) * self.block_size
        self._islands = self._structure(seed, logical_sector_size, physical_sector_size)
        self._island_starts = [start for start, _ in self._islands]

    def _allocated_blocks(self) -> array:
        """Indexes of blocks holding at least one present chunk, ascending (found with C-speed find)."""
        blocks = array("q")
        per_block = self._chunks_per_block
        chunk = self._present.find(1)
        while chunk != -1:
            block = chunk // per_block
            blocks.append(block)
            chunk = self._present.find(1, (block + 1) * per_block)
        return blocks

    def _structure(self, seed: bytes, logical: int, physical: int) -> list[tuple[int, bytes]]:
        """(file offset, bytes) of every non-zero structure before the BAT."""
        header = Header(
            sequence_number=0,
            file_write_guid=_seeded_uuid(seed, b"file-write"),
            data_write_guid=_seeded_uuid(seed, b"data-write"),
            log_guid=uuid.UUID(int=0),
            log_length=LOG_LENGTH,
            log_offset=LOG_OFFSET,
        )
        regions = pack_region_table(
            [
                Region(BAT_GUID, BAT_OFFSET, self._bat_end - BAT_OFFSET, True),
                Region(METADATA_GUID, METADATA_OFFSET, METADATA_LENGTH, True),
            ]
        )
        metadata = Metadata(
            block_size=self.block_size,
            virtual_size=self.virtual_size,
            logical_sector_size=logical,
            physical_sector_size=physical,
            virtual_disk_id=_seeded_uuid(seed, b"virtual-disk-id"),
        )
        islands = [(0, pack_file_identifier(CREATOR))]
        islands += [  # distinct sequence numbers: no reader has to break a tie
            (off, replace(header, sequence_number=seq).pack().rstrip(b"\0"))
            for seq, off in enumerate(HEADER_OFFSETS, 1)
        ]
        islands += [(off, regions.rstrip(b"\0")) for off in REGION_TABLE_OFFSETS]
        islands += [(METADATA_OFFSET + off, data) for off, data in pack_metadata(metadata)]
        return islands

    def pieces(self, start: int, stop: int) -> Iterator[Piece]:
        """Pieces whose concatenation is the file's bytes [start, stop); adjacent zeros are merged."""
        if not 0 <= start <= stop <= self.total_size:
            raise ValueError(f"range [{start}, {stop}) is outside the file (0..{self.total_size})")
        zeros = 0
        for piece in self._raw_pieces(start, stop):
            if piece[0] == "zeros":
                zeros += piece[1]
                continue
            if zeros:
                yield ("zeros", zeros)
                zeros = 0
            yield piece
        if zeros:
            yield ("zeros", zeros)

    def _raw_pieces(self, start: int, stop: int) -> Iterator[Piece]:
        if start < BAT_OFFSET:
            yield from self._structure_pieces(start, min(stop, BAT_OFFSET))
        if start < self._bat_end and stop > BAT_OFFSET:
            yield from self._bat_pieces(max(start, BAT_OFFSET), min(stop, self._bat_end))
        if stop > self.data_offset:
            yield from self._data_pieces(max(start, self.data_offset), stop)

    def _structure_pieces(self, start: int, stop: int) -> Iterator[Piece]:
        pos = start
        index = max(0, bisect.bisect_right(self._island_starts, start) - 1)
        for island_start, data in self._islands[index:]:
            if island_start >= stop or pos >= stop:
                break
            island_end = island_start + len(data)
            if island_end <= pos:
                continue
            if island_start > pos:
                yield ("zeros", island_start - pos)
                pos = island_start
            end = min(island_end, stop)
            yield ("bytes", data[pos - island_start : end - island_start])
            pos = end
        if pos < stop:
            yield ("zeros", stop - pos)

    def _bat_pieces(self, start: int, stop: int) -> Iterator[Piece]:
        total = self._geometry.total_entries
        first_entry = (start - BAT_OFFSET) // 8
        for page in range(first_entry - first_entry % _BAT_PAGE_ENTRIES, total, _BAT_PAGE_ENTRIES):
            page_start = BAT_OFFSET + page * 8
            if page_start >= stop:
                return
            data = self._bat_page(page, min(page + _BAT_PAGE_ENTRIES, total))
            lo, hi = max(start, page_start), min(stop, page_start + len(data))
            yield ("bytes", data[lo - page_start : hi - page_start])
        table_end = BAT_OFFSET + total * 8
        if stop > table_end:
            yield ("zeros", stop - max(start, table_end))

    def _bat_page(self, first: int, end: int) -> bytes:
        """BAT entries [first, end): ZERO for payload blocks unless allocated, 0 for sector bitmaps."""
        geo = self._geometry
        ratio = geo.chunk_ratio
        entries = array("Q", [BlockState.ZERO]) * (end - first)
        for index in range(first + (ratio - first) % (ratio + 1), end, ratio + 1):
            entries[index - first] = 0
        first_block, end_block = first - first // (ratio + 1), end - end // (ratio + 1)
        lo = bisect.bisect_left(self._allocated, first_block)
        hi = bisect.bisect_left(self._allocated, end_block)
        for rank in range(lo, hi):
            block = self._allocated[rank]
            offset = self.data_offset + rank * self.block_size
            entries[geo.payload_index(block) - first] = offset | BlockState.FULLY_PRESENT
        return entries_to_bytes(entries)

    def _data_pieces(self, start: int, stop: int) -> Iterator[Piece]:
        bs, cs, size = self.block_size, self.chunk_size, self.virtual_size
        rank, in_block = divmod(start - self.data_offset, bs)
        pos = start
        while pos < stop:
            first_chunk = self._allocated[rank] * self._chunks_per_block
            while in_block < bs and pos < stop:
                local, in_chunk = divmod(in_block, cs)
                chunk = first_chunk + local
                chunk_length = max(0, min(cs, size - chunk * cs))
                n = min(cs - in_chunk, stop - pos)
                if in_chunk < chunk_length and self._present[chunk]:
                    n = min(n, chunk_length - in_chunk)
                    yield ("chunk", chunk, in_chunk, n)
                else:
                    yield ("zeros", n)
                pos += n
                in_block += n
            rank, in_block = rank + 1, 0


def write_vhdx(out_file: BinaryIO, layout: VhdxLayout, read_chunk: Callable[[int], bytes]) -> None:
    """Write the whole file sequentially; `read_chunk(i)` returns chunk i's full data."""
    zeros = memoryview(bytes(MiB))
    for piece in layout.pieces(0, layout.total_size):
        kind = piece[0]
        if kind == "bytes":
            out_file.write(piece[1])
        elif kind == "zeros":
            remaining = piece[1]
            while remaining:
                n = min(remaining, len(zeros))
                out_file.write(zeros[:n])
                remaining -= n
        else:
            _, chunk, offset, length = piece
            data = read_chunk(chunk)
            expected = min(layout.chunk_size, layout.virtual_size - chunk * layout.chunk_size)
            if len(data) != expected:
                raise ValueError(f"chunk {chunk} has {len(data)} bytes, expected {expected}")
            out_file.write(memoryview(data)[offset : offset + length])
