"""Region table (MS-VHDX 2.2.3): where the BAT and metadata regions live in the file.

Two identical 64 KiB copies sit at 192 and 256 KiB.  An unknown region marked
required means the file uses a feature we do not understand, so we refuse it
rather than misread the disk.
"""

import itertools
import struct
import uuid
from dataclasses import dataclass

from .checksum import vhdx_checksum, with_checksum
from .errors import FormatError
from .header import HEADER_SECTION_SIZE, MiB

REGION_TABLE_OFFSETS = (192 * 1024, 256 * 1024)
REGION_TABLE_SIZE = 64 * 1024
SIGNATURE = b"regi"
MAX_ENTRIES = 2047

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
REGION_NAMES = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}

_TABLE_HEADER = struct.Struct("<4sIII")
_ENTRY = struct.Struct("<16sQII")


@dataclass(frozen=True)
class Region:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def label(self) -> str:
        return REGION_NAMES.get(self.guid, f"region {{{self.guid}}}")


def parse_region_table(raw: bytes) -> dict[uuid.UUID, Region]:
    """Parse one 64 KiB copy; raise FormatError with a short reason if it is unusable."""
    signature, checksum, count, _ = _TABLE_HEADER.unpack_from(raw)
    if signature != SIGNATURE:
        raise FormatError("bad signature")
    if vhdx_checksum(raw[:REGION_TABLE_SIZE]) != checksum:
        raise FormatError("bad CRC-32C")
    if count > MAX_ENTRIES:
        raise FormatError(f"{count} entries (at most {MAX_ENTRIES} allowed)")
    regions: dict[uuid.UUID, Region] = {}
    for index in range(count):
        guid_le, offset, length, flags = _ENTRY.unpack_from(raw, _TABLE_HEADER.size + index * _ENTRY.size)
        region = Region(uuid.UUID(bytes_le=guid_le), offset, length, bool(flags & 1))
        if region.guid in regions:
            raise FormatError(f"{region.label} listed twice")
        if region.guid not in REGION_NAMES and region.required:
            raise FormatError(f"unknown required region {{{region.guid}}}")
        if offset < HEADER_SECTION_SIZE or offset % MiB or length % MiB or length == 0:
            raise FormatError(
                f"{region.label} at offset {offset} with length {length} is not 1 MiB aligned "
                "outside the header section"
            )
        regions[region.guid] = region
    for guid, name in REGION_NAMES.items():
        if guid not in regions:
            raise FormatError(f"no {name} region")
    return regions


def select_region_table(raw1: bytes, raw2: bytes, file_size: int) -> dict[uuid.UUID, Region]:
    """Use the first valid copy; check that its regions lie inside the file and do not overlap."""
    reasons = []
    for index, raw in enumerate((raw1, raw2), 1):
        try:
            regions = parse_region_table(raw)
            break
        except FormatError as exc:
            reasons.append(f"copy {index}: {exc}")
    else:
        raise FormatError(f"both region tables are corrupt ({'; '.join(reasons)})")
    spans = sorted(regions.values(), key=lambda r: r.file_offset)
    for region in spans:
        if region.file_offset + region.length > file_size:
            raise FormatError(
                f"region table entry for the {region.label} region (offset {region.file_offset}, "
                f"length {region.length}) points outside the file ({file_size} bytes; truncated?)"
            )
    for before, after in itertools.pairwise(spans):
        if before.file_offset + before.length > after.file_offset:
            raise FormatError(f"the {before.label} and {after.label} regions overlap")
    return regions


def pack_region_table(regions: list[Region]) -> bytes:
    """The full 64 KiB table with a valid checksum."""
    raw = bytearray(REGION_TABLE_SIZE)
    _TABLE_HEADER.pack_into(raw, 0, SIGNATURE, 0, len(regions), 0)
    for index, r in enumerate(regions):
        _ENTRY.pack_into(
            raw, _TABLE_HEADER.size + index * _ENTRY.size, r.guid.bytes_le, r.file_offset, r.length, int(r.required)
        )
    return with_checksum(raw)
