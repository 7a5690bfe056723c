"""Metadata region (MS-VHDX 2.6): block size, disk geometry, identity and parent locator.

The region starts with a 64 KiB table of (item id, offset, length, flags); item
payloads follow.  An unknown item flagged IsRequired changes how the disk must
be read, so it is refused.
"""

import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .errors import FormatError
from .header import MiB

TABLE_SIZE = 64 * 1024
SIGNATURE = b"metadata"
MAX_ENTRIES = 2047
MAX_ITEM_LENGTH = MiB
MAX_VIRTUAL_SIZE = 64 << 40

FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
_ITEM_NAMES = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    VIRTUAL_DISK_ID: "virtual disk id",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
    PARENT_LOCATOR: "parent locator",
}

IS_USER = 1
IS_VIRTUAL_DISK = 2
IS_REQUIRED = 4
LEAVE_BLOCKS_ALLOCATED = 1
HAS_PARENT = 2

_TABLE_HEADER = struct.Struct("<8sHH20x")
_ENTRY = struct.Struct("<16sIII4x")
_LOCATOR_HEADER = struct.Struct("<16sHH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


@dataclass(frozen=True)
class Metadata:
    block_size: int
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    virtual_disk_id: uuid.UUID
    leave_blocks_allocated: bool = False
    has_parent: bool = False
    parent_locator: dict[str, str] | None = None


def parse_metadata(table: bytes, region_length: int, read_item: Callable[[int, int], bytes]) -> Metadata:
    """Parse the table, then fetch and validate the items through `read_item(offset, length)`."""
    signature, _, count = _TABLE_HEADER.unpack_from(table)
    if signature != SIGNATURE:
        raise FormatError("metadata table has a bad signature")
    if count > MAX_ENTRIES:
        raise FormatError(f"metadata table has {count} entries (at most {MAX_ENTRIES} allowed)")
    items: dict[uuid.UUID, bytes] = {}
    for index in range(count):
        guid_le, offset, length, flags = _ENTRY.unpack_from(table, _TABLE_HEADER.size + index * _ENTRY.size)
        guid = uuid.UUID(bytes_le=guid_le)
        known = guid in _ITEM_NAMES and not flags & IS_USER
        if not known:
            if flags & IS_REQUIRED:
                raise FormatError(f"unknown required metadata item {{{guid}}}")
            continue
        if guid in items:
            raise FormatError(f"metadata item {_ITEM_NAMES[guid]} listed twice")
        if length > MAX_ITEM_LENGTH or (length and offset < TABLE_SIZE) or offset + length > region_length:
            raise FormatError(
                f"metadata item {_ITEM_NAMES[guid]} (offset {offset}, length {length}) lies outside the metadata region"
            )
        items[guid] = read_item(offset, length)

    def item(guid: uuid.UUID, size: int) -> bytes:
        raw = items.get(guid)
        if raw is None:
            raise FormatError(f"required metadata item {_ITEM_NAMES[guid]} is missing")
        if len(raw) < size:
            raise FormatError(f"metadata item {_ITEM_NAMES[guid]} is too short ({len(raw)} bytes)")
        return raw

    block_size, flags = struct.unpack_from("<II", item(FILE_PARAMETERS, 8))
    virtual_size = int.from_bytes(item(VIRTUAL_DISK_SIZE, 8)[:8], "little")
    virtual_disk_id = uuid.UUID(bytes_le=item(VIRTUAL_DISK_ID, 16)[:16])
    logical = int.from_bytes(item(LOGICAL_SECTOR_SIZE, 4)[:4], "little")
    physical = int.from_bytes(item(PHYSICAL_SECTOR_SIZE, 4)[:4], "little")
    if block_size < MiB or block_size > 256 * MiB or block_size & (block_size - 1):
        raise FormatError(f"invalid block size {block_size} (must be a power of two from 1 MiB to 256 MiB)")
    if logical not in (512, 4096):
        raise FormatError(f"invalid logical sector size {logical}")
    if physical not in (512, 4096):
        raise FormatError(f"invalid physical sector size {physical}")
    if not 0 < virtual_size <= MAX_VIRTUAL_SIZE or virtual_size % logical:
        raise FormatError(
            f"invalid virtual disk size {virtual_size} (must be a multiple of the {logical}-byte "
            "sector size, at most 64 TiB)"
        )
    has_parent = bool(flags & HAS_PARENT)
    locator = parse_parent_locator(item(PARENT_LOCATOR, _LOCATOR_HEADER.size)) if has_parent else None
    return Metadata(
        block_size=block_size,
        virtual_size=virtual_size,
        logical_sector_size=logical,
        physical_sector_size=physical,
        virtual_disk_id=virtual_disk_id,
        leave_blocks_allocated=bool(flags & LEAVE_BLOCKS_ALLOCATED),
        has_parent=has_parent,
        parent_locator=locator,
    )


def parse_parent_locator(raw: bytes) -> dict[str, str]:
    """Key/value pairs of a VHDX parent locator (UTF-16LE strings, offsets relative to the item)."""
    locator_type, _, count = _LOCATOR_HEADER.unpack_from(raw)
    if uuid.UUID(bytes_le=locator_type) != VHDX_LOCATOR_TYPE:
        raise FormatError(f"unsupported parent locator type {{{uuid.UUID(bytes_le=locator_type)}}}")
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(raw):
        raise FormatError(f"parent locator with {count} entries does not fit in its item")
    entries: dict[str, str] = {}
    for index in range(count):
        key_off, value_off, key_len, value_len = _LOCATOR_ENTRY.unpack_from(
            raw, _LOCATOR_HEADER.size + index * _LOCATOR_ENTRY.size
        )
        if key_off + key_len > len(raw) or value_off + value_len > len(raw):
            raise FormatError(f"parent locator entry {index} points outside the locator")
        try:
            key = raw[key_off : key_off + key_len].decode("utf-16-le")
            value = raw[value_off : value_off + value_len].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise FormatError(f"parent locator entry {index} is not valid UTF-16") from exc
        entries[key] = value
    if "parent_linkage" not in entries:
        raise FormatError("parent locator has no parent_linkage")
    return entries


def pack_metadata(md: Metadata) -> list[tuple[int, bytes]]:
    """(offset in region, bytes) pieces of a metadata region for a disk without parent."""
    flags = LEAVE_BLOCKS_ALLOCATED if md.leave_blocks_allocated else 0
    items = [
        (FILE_PARAMETERS, IS_REQUIRED, struct.pack("<II", md.block_size, flags)),
        (VIRTUAL_DISK_SIZE, IS_VIRTUAL_DISK | IS_REQUIRED, struct.pack("<Q", md.virtual_size)),
        (VIRTUAL_DISK_ID, IS_VIRTUAL_DISK | IS_REQUIRED, md.virtual_disk_id.bytes_le),
        (LOGICAL_SECTOR_SIZE, IS_VIRTUAL_DISK | IS_REQUIRED, struct.pack("<I", md.logical_sector_size)),
        (PHYSICAL_SECTOR_SIZE, IS_VIRTUAL_DISK | IS_REQUIRED, struct.pack("<I", md.physical_sector_size)),
    ]
    table = bytearray(_TABLE_HEADER.pack(SIGNATURE, 0, len(items)))
    payload = bytearray()
    for guid, flags_, data in items:
        table += _ENTRY.pack(guid.bytes_le, TABLE_SIZE + len(payload), len(data), flags_)
        payload += data
    return [(0, bytes(table)), (TABLE_SIZE, bytes(payload))]
