"""CRC-32C as MS-VHDX uses it: over a whole structure with its own checksum field zeroed."""

import crc32c

CHECKSUM_OFFSET = 4  # headers, region tables and log entries all keep it at byte 4


def vhdx_checksum(data: bytes | bytearray | memoryview) -> int:
    """Return the checksum of `data` as if its checksum field were zero."""
    crc = crc32c.crc32c(data[:CHECKSUM_OFFSET])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return crc32c.crc32c(data[CHECKSUM_OFFSET + 4 :], crc)


def with_checksum(data: bytes | bytearray) -> bytes:
    """Return `data` with its checksum field filled in (for writing structures)."""
    buf = bytearray(data)
    buf[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4] = vhdx_checksum(buf).to_bytes(4, "little")
    return bytes(buf)
