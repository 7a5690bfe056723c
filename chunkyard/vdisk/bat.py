"""Block Allocation Table (MS-VHDX 2.5): where each payload block lives, and its state.

Each 64-bit entry holds a state (bits 0-2) and a file offset in MiB (bits 20-63).
After every `chunk_ratio` payload entries comes one sector-bitmap entry; only
differencing disks use those (one bit per sector: here or in the parent).
"""

import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum

from .errors import FormatError
from .header import HEADER_SECTION_SIZE, MiB

SECTORS_PER_CHUNK = 1 << 23  # bits in a 1 MiB sector bitmap block
SECTOR_BITMAP_SIZE = MiB
_OFFSET_MASK = ~(MiB - 1) & 0xFFFF_FFFF_FFFF_FFFF


class BlockState(IntEnum):
    NOT_PRESENT = 0  # differencing: read the parent; otherwise zeros
    UNDEFINED = 1  # contents undefined: zeros
    ZERO = 2  # zeros, parent not consulted
    UNMAPPED = 3  # trimmed: zeros, parent not consulted
    FULLY_PRESENT = 6  # data in this file
    PARTIALLY_PRESENT = 7  # differencing: per-sector choice through the sector bitmap


SB_PRESENT = 6
_DATA_STATES = (BlockState.FULLY_PRESENT, BlockState.PARTIALLY_PRESENT)
_VALID_STATES = frozenset(int(s) for s in BlockState)


@dataclass(frozen=True)
class BatGeometry:
    """Entry counts and index arithmetic, shared by the reader and the writer."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool = False

    @property
    def chunk_ratio(self) -> int:
        return SECTORS_PER_CHUNK * self.logical_sector_size // self.block_size

    @property
    def data_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def total_entries(self) -> int:
        if self.has_parent:
            return -(-self.data_blocks // self.chunk_ratio) * (self.chunk_ratio + 1)
        return self.data_blocks + (self.data_blocks - 1) // self.chunk_ratio

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        chunk = block // self.chunk_ratio
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio


def entries_to_bytes(entries: array) -> bytes:
    if sys.byteorder == "big":
        entries = array("Q", entries)
        entries.byteswap()
    return entries.tobytes()


class Bat:
    """A parsed BAT, validated against the file size so reads never leave the file."""

    def __init__(self, raw: bytes, geometry: BatGeometry) -> None:
        self.geometry = geometry
        self._entries = array("Q")
        self._entries.frombytes(raw[: geometry.total_entries * 8])
        if sys.byteorder == "big":
            self._entries.byteswap()

    def payload(self, block: int) -> tuple[int, int]:
        """(state, file offset) of payload block `block`."""
        entry = self._entries[self.geometry.payload_index(block)]
        return entry & 7, entry & _OFFSET_MASK

    def bitmap_offset(self, block: int) -> int:
        """File offset of the sector bitmap covering `block` (validated to be present)."""
        return self._entries[self.geometry.bitmap_index(block)] & _OFFSET_MASK

    def validate(self, file_size: int) -> None:
        geo = self.geometry
        bitmaps_checked: set[int] = set()
        for block in range(geo.data_blocks):
            index = geo.payload_index(block)
            entry = self._entries[index]
            state, offset = entry & 7, entry & _OFFSET_MASK
            if state not in _VALID_STATES:
                raise FormatError(f"BAT entry {index} (block {block}) has invalid state {state}")
            if state not in _DATA_STATES:
                continue
            if state == BlockState.PARTIALLY_PRESENT:
                if not geo.has_parent:
                    raise FormatError(f"BAT entry {index}: partially present block in a disk without parent")
                bitmap_index = geo.bitmap_index(block)
                if bitmap_index not in bitmaps_checked:
                    self._check_bitmap(bitmap_index, block, file_size)
                    bitmaps_checked.add(bitmap_index)
            needed = min(geo.block_size, geo.virtual_size - block * geo.block_size)
            if offset < HEADER_SECTION_SIZE:
                raise FormatError(f"BAT entry {index} (block {block}) points into the header section")
            if offset + needed > file_size:
                raise FormatError(
                    f"BAT entry {index} (block {block}) points to offset {offset}, "
                    f"beyond the end of the file ({file_size} bytes; truncated?)"
                )

    def _check_bitmap(self, index: int, block: int, file_size: int) -> None:
        entry = self._entries[index]
        offset = entry & _OFFSET_MASK
        if entry & 7 != SB_PRESENT:
            raise FormatError(f"block {block} is partially present but its sector bitmap (BAT entry {index}) is not")
        if offset < HEADER_SECTION_SIZE or offset + SECTOR_BITMAP_SIZE > file_size:
            raise FormatError(
                f"sector bitmap BAT entry {index} points to offset {offset}, "
                f"beyond the end of the file ({file_size} bytes)"
            )

    def block_states(self) -> list[int]:
        """State of every payload block, in block order."""
        geo = self.geometry
        ratio = geo.chunk_ratio
        states = []
        for start in range(0, len(self._entries), ratio + 1):
            states.extend(e & 7 for e in self._entries[start : start + ratio])
        return states[: geo.data_blocks]
