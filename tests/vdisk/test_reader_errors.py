"""Damaged and inconsistent files: each gives one clear VhdxError naming the file and the problem."""

from __future__ import annotations

import os
import re
import struct
import uuid
from pathlib import Path

import pytest

from chunkyard.vdisk import VhdxError, open_vhdx

from .vhdx_helpers import MiB, fix_crc, make_child, patch, read_at, region_offsets

HEADERS = (64 * 1024, 128 * 1024)
REGION_TABLES = (192 * 1024, 256 * 1024)


@pytest.fixture
def disk_file(qemu, tmp_path: Path) -> Path:
    """A 16 MiB dynamic disk, 1 MiB blocks, data in blocks 0, 3 and 10 (the last one allocated)."""
    path = qemu.create(tmp_path / "disk.vhdx", 16 * MiB, block_size=MiB)
    qemu.write(path, "write -P 0xa1 0 1M", "write -P 0xa3 3M 4K", "write -P 0xaa 10M 1M")
    return path


def sequence_numbers(path: Path) -> list[int]:
    return [struct.unpack_from("<Q", read_at(path, off, 16), 8)[0] for off in HEADERS]


def data_write_guid(path: Path, header_offset: int) -> uuid.UUID:
    return uuid.UUID(bytes_le=read_at(path, header_offset + 32, 16))


def expect_error(path: Path, pattern: str) -> VhdxError:
    with pytest.raises(VhdxError) as caught:
        open_vhdx(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), message
    return caught.value


def test_not_a_vhdx(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(2 * MiB))
    expect_error(path, r"not a VHDX file")


def test_truncated_inside_header_section(disk_file: Path) -> None:
    os.truncate(disk_file, 500_000)
    expect_error(disk_file, r"file is truncated \(500000 bytes; the VHDX header section alone is 1 MiB\)")


def test_truncated_inside_regions(disk_file: Path) -> None:
    bat_offset, _ = region_offsets(disk_file)["bat"]
    os.truncate(disk_file, bat_offset + 4096)
    expect_error(disk_file, r"region table entry for the (BAT|metadata) region .* points outside the file")


def test_truncated_data_block(disk_file: Path) -> None:
    os.truncate(disk_file, os.path.getsize(disk_file) - 512 * 1024)
    expect_error(disk_file, r"BAT entry 10 \(block 10\) points to offset \d+, beyond the end of the file")


@pytest.mark.parametrize("bad", [0, 1])
def test_one_corrupt_header_uses_the_other(disk_file: Path, bad: int) -> None:
    expected = open_vhdx(disk_file).read(0, 16 * MiB)
    good = 1 - bad
    assert sequence_numbers(disk_file)[1] > sequence_numbers(disk_file)[0]  # header 2 is current
    patch(disk_file, HEADERS[bad] + 1000, b"\xff")  # reserved byte: only the CRC notices
    with open_vhdx(disk_file) as disk:
        assert disk.data_write_guid == data_write_guid(disk_file, HEADERS[good])
        assert disk.read(0, 16 * MiB) == expected


def test_both_headers_corrupt(disk_file: Path) -> None:
    for offset in HEADERS:
        patch(disk_file, offset + 1000, b"\xff")
    expect_error(disk_file, r"both headers are corrupt \(bad CRC-32C\)")


def test_first_region_table_corrupt_uses_the_copy(disk_file: Path) -> None:
    expected = open_vhdx(disk_file).read(0, 16 * MiB)
    patch(disk_file, REGION_TABLES[0] + 16 + 16, b"\x00\x00\x50")  # BAT offset, CRC not updated
    with open_vhdx(disk_file) as disk:
        assert disk.read(0, 16 * MiB) == expected
    patch(disk_file, REGION_TABLES[1] + 500, b"\x01")
    expect_error(disk_file, r"both region tables are corrupt \(copy 1: bad CRC-32C; copy 2: bad CRC-32C\)")


def test_region_outside_the_file(disk_file: Path) -> None:
    for table in REGION_TABLES:
        patch(disk_file, table + 16 + 16, struct.pack("<Q", 1 << 30))  # first entry's file offset
        fix_crc(disk_file, table, 64 * 1024)
    expect_error(disk_file, r"region table entry for the \w+ region \(offset 1073741824, .*points outside the file")


def test_unknown_required_region(disk_file: Path) -> None:
    guid = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
    for table in REGION_TABLES:
        count = struct.unpack_from("<I", read_at(disk_file, table + 8, 4))[0]
        patch(disk_file, table + 8, struct.pack("<I", count + 1))
        patch(disk_file, table + 16 + 32 * count, struct.pack("<16sQII", guid.bytes_le, 64 * MiB, MiB, 1))
        fix_crc(disk_file, table, 64 * 1024)
    expect_error(disk_file, r"unknown required region \{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\}")


def test_bat_entry_beyond_the_end(disk_file: Path) -> None:
    bat_offset, _ = region_offsets(disk_file)["bat"]
    beyond = (os.path.getsize(disk_file) // MiB + 5) * MiB
    patch(disk_file, bat_offset + 5 * 8, struct.pack("<Q", beyond | 6))
    expect_error(disk_file, rf"BAT entry 5 \(block 5\) points to offset {beyond}, beyond the end of the file")


def test_invalid_block_state(disk_file: Path) -> None:
    bat_offset, _ = region_offsets(disk_file)["bat"]
    patch(disk_file, bat_offset + 2 * 8, struct.pack("<Q", 4))
    expect_error(disk_file, r"BAT entry 2 \(block 2\) has invalid state 4")


def _add_metadata_item(path: Path, guid: uuid.UUID, flags: int) -> None:
    meta_offset, _ = region_offsets(path)["metadata"]
    count = struct.unpack_from("<H", read_at(path, meta_offset + 10, 2))[0]
    patch(path, meta_offset + 10, struct.pack("<H", count + 1))
    patch(path, meta_offset + 32 + 32 * count, struct.pack("<16sIII4x", guid.bytes_le, 0, 0, flags))


def test_unknown_metadata_items(disk_file: Path) -> None:
    _add_metadata_item(disk_file, uuid.UUID(int=1), 0)  # unknown but optional: ignored
    assert open_vhdx(disk_file).read(0, 4) == b"\xa1" * 4
    _add_metadata_item(disk_file, uuid.UUID(int=2), 4)  # IsRequired
    expect_error(disk_file, r"unknown required metadata item \{00000000-0000-0000-0000-000000000002\}")


@pytest.fixture
def chain(qemu, vhdxutils, tmp_path: Path) -> tuple[Path, Path]:
    parent = qemu.create(tmp_path / "parent.vhdx", 8 * MiB, block_size=2 * MiB)
    qemu.write(parent, "write -P 0x10 0 1M")
    child = make_child(vhdxutils, tmp_path, "child.vhdx", "parent.vhdx", ((512, b"\x20" * 512),))
    return parent, child


def test_parent_missing(chain: tuple[Path, Path]) -> None:
    parent, child = chain
    parent.unlink()
    expect_error(child, r"parent disk not found \(relative_path '\.\\\\parent\.vhdx'\)")


def test_wrong_parent_linkage(qemu, chain: tuple[Path, Path]) -> None:
    parent, child = chain
    qemu.write(parent, "write -P 0x11 4M 4K")  # a write to the parent gives it a new DataWriteGuid
    expect_error(child, r"wrong parent linkage: parent .*parent\.vhdx has DataWriteGuid \{[0-9a-f-]+\} but the child")


def test_corrupt_parent_is_named(chain: tuple[Path, Path]) -> None:
    parent, child = chain
    for offset in HEADERS:
        patch(parent, offset + 1000, b"\xff")
    with pytest.raises(VhdxError, match=rf"^{parent}: both headers are corrupt"):
        open_vhdx(child)
