"""File type identifier and the two VHDX headers (MS-VHDX 2.2).

The header section is the first 1 MiB: identifier at 0, headers at 64 and 128 KiB,
region tables at 192 and 256 KiB.  Two headers exist so one can be rewritten while
the other stays valid; the current one is the valid header with the higher
sequence number.
"""

import struct
import uuid
from dataclasses import dataclass

from .checksum import vhdx_checksum, with_checksum
from .errors import FormatError

MiB = 1 << 20
HEADER_SECTION_SIZE = MiB
FILE_ID_OFFSET = 0
HEADER_OFFSETS = (64 * 1024, 128 * 1024)
HEADER_SIZE = 4096

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
_CREATOR_SIZE = 512
_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


@dataclass(frozen=True)
class Header:
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int
    version: int = 1
    log_version: int = 0

    def pack(self) -> bytes:
        """The 4 KiB header structure with a valid checksum."""
        raw = _HEADER.pack(
            HEADER_SIGNATURE,
            0,
            self.sequence_number,
            self.file_write_guid.bytes_le,
            self.data_write_guid.bytes_le,
            self.log_guid.bytes_le,
            self.log_version,
            self.version,
            self.log_length,
            self.log_offset,
        )
        return with_checksum(raw.ljust(HEADER_SIZE, b"\0"))


def check_file_identifier(raw: bytes) -> None:
    if raw[:8] != FILE_SIGNATURE:
        raise FormatError("not a VHDX file (no 'vhdxfile' signature at offset 0)")


def pack_file_identifier(creator: str) -> bytes:
    """Signature plus the informational creator string (UTF-16LE, 512 bytes)."""
    name = creator.encode("utf-16-le")[: _CREATOR_SIZE - 2]
    return FILE_SIGNATURE + name.ljust(_CREATOR_SIZE, b"\0")


def parse_header(raw: bytes) -> Header:
    """Parse one 4 KiB header; raise FormatError with a short reason if it is invalid."""
    if raw[:4] != HEADER_SIGNATURE:
        raise FormatError("bad signature")
    if vhdx_checksum(raw[:HEADER_SIZE]) != int.from_bytes(raw[4:8], "little"):
        raise FormatError("bad CRC-32C")
    (_, _, seq, fwg, dwg, lg, log_version, version, log_length, log_offset) = _HEADER.unpack_from(raw)
    return Header(
        sequence_number=seq,
        file_write_guid=uuid.UUID(bytes_le=fwg),
        data_write_guid=uuid.UUID(bytes_le=dwg),
        log_guid=uuid.UUID(bytes_le=lg),
        log_length=log_length,
        log_offset=log_offset,
        version=version,
        log_version=log_version,
    )


def select_header(raw1: bytes, raw2: bytes) -> Header:
    """Return the current header: the valid one with the higher sequence number."""
    valid: list[Header] = []
    reasons: list[str] = []
    for index, raw in enumerate((raw1, raw2), 1):
        try:
            valid.append(parse_header(raw))
        except FormatError as exc:
            reasons.append(f"header {index}: {exc}")
    if not valid:
        if reasons[0].endswith("bad CRC-32C") and reasons[1].endswith("bad CRC-32C"):
            raise FormatError("both headers are corrupt (bad CRC-32C)")
        raise FormatError(f"both headers are corrupt ({'; '.join(reasons)})")
    header = max(valid, key=lambda h: h.sequence_number)  # max keeps header 1 on a tie
    if header.version != 1:
        raise FormatError(f"unsupported VHDX version {header.version} (only version 1 exists)")
    if header.log_version != 0:
        raise FormatError(f"unsupported log version {header.log_version}")
    if header.log_length % MiB or header.log_offset % MiB:
        raise FormatError(f"log at offset {header.log_offset} with length {header.log_length} is not 1 MiB aligned")
    if header.log_length and header.log_offset < HEADER_SECTION_SIZE:
        raise FormatError(f"log offset {header.log_offset} lies inside the header section")
    return header
