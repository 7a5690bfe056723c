"""Dirty logs are replayed in memory; the oracle is qemu replaying a copy (`qemu-img check -r all`)."""

from __future__ import annotations

import hashlib
import shutil
import struct
import uuid
from pathlib import Path

import crc32c
import pytest

from chunkyard.vdisk import VhdxError, open_vhdx

from .vhdx_helpers import MiB, fix_crc, patch, read_at, region_offsets

HEADERS = (64 * 1024, 128 * 1024)
LOG_OFFSET = MiB  # qemu's default log: 1 MiB at 1 MiB
LOG_LENGTH = MiB
SIZE = 8 * MiB


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replayed_by_qemu(qemu, path: Path) -> bytes:
    copy = path.with_name("replayed-" + path.name)
    shutil.copyfile(path, copy)
    qemu.img("check", "-q", "-r", "all", copy)
    return qemu.raw(copy)


def assert_qemu_sees_dirty_log(qemu, path: Path) -> None:
    done = qemu.io(path, "read 0 512", read_only=True)  # read-write would replay it in place
    assert "log that needs to be replayed" in done.stdout + done.stderr


def test_log_left_by_an_interrupted_qemu_write(qemu, tmp_path: Path) -> None:
    path = qemu.create(tmp_path / "dirty.vhdx", SIZE, block_size=MiB)
    qemu.write(path, "write -P 0x11 0 1M")
    bat_offset, _ = region_offsets(path)["bat"]
    # fail qemu's BAT update after it has written the new block and logged the BAT change
    conf = tmp_path / "blkdebug.conf"
    rule = {"event": "pwritev", "sector": bat_offset // 512, "iotype": "write", "errno": 5, "once": "on"}
    conf.write_text("[inject-error]\n" + "".join(f'{key} = "{value}"\n' for key, value in rule.items()))
    done = qemu.io(f"blkdebug:{conf}:{path}", "write -P 0x5a 1M 64k", "write -P 0x5b 3M 4k", fmt=None)
    assert "Input/output error" in done.stdout + done.stderr
    assert_qemu_sees_dirty_log(qemu, path)
    before = sha256(path)

    with open_vhdx(path) as disk:
        ours = disk.read(0, SIZE)
        assert disk.allocated_ranges() == [(0, 2 * MiB)]
    assert sha256(path) == before, "the reader must never write to the file"
    assert ours[MiB : MiB + 65536] == b"\x5a" * 65536  # only visible through the replayed BAT
    assert ours == replayed_by_qemu(qemu, path)


def _entry(seq: int, tail: int, log_guid: uuid.UUID, writes: list[tuple[int, bytes | int]], file_size: int) -> bytes:
    """A log entry per MS-VHDX 2.3.1: writes are (file offset, 4 KiB sector) or (file offset, zero length)."""
    descriptors, sectors = [], []
    for offset, payload in writes:
        if isinstance(payload, int):
            descriptors.append(struct.pack("<4sIQQQ", b"zero", 0, payload, offset, seq))
        else:
            leading, trailing = int.from_bytes(payload[:8], "little"), int.from_bytes(payload[-4:], "little")
            descriptors.append(struct.pack("<4sIQQQ", b"desc", trailing, leading, offset, seq))
            sectors.append(b"data" + struct.pack("<I", seq >> 32) + payload[8:-4] + struct.pack("<I", seq & 0xFFFFFFFF))
    area = -(-(64 + 32 * len(descriptors)) // 4096) * 4096
    length = area + 4096 * len(sectors)
    header = struct.pack(
        "<4sIIIQII16sQQ", b"loge", 0, length, tail, seq, len(descriptors), 0, log_guid.bytes_le, file_size, file_size
    )
    entry = bytearray((header + b"".join(descriptors)).ljust(area, b"\0") + b"".join(sectors))
    entry[4:8] = struct.pack("<I", crc32c.crc32c(bytes(entry)))
    return bytes(entry)


def _put_in_log(path: Path, position: int, entry: bytes) -> None:
    first = entry[: LOG_LENGTH - position]
    patch(path, LOG_OFFSET + position, first)
    if len(first) < len(entry):  # wraps around the circular log
        patch(path, LOG_OFFSET, entry[len(first) :])


def _mark_dirty(path: Path, log_guid: uuid.UUID) -> None:
    for offset in HEADERS:
        patch(path, offset + 48, log_guid.bytes_le)
        fix_crc(path, offset, 4096)


@pytest.fixture
def base(qemu, tmp_path: Path) -> tuple[Path, int, list[int]]:
    """A clean disk with blocks 0 and 1 allocated; returns (path, BAT offset, [block 0/1 file offsets])."""
    path = qemu.create(tmp_path / "crafted.vhdx", SIZE, block_size=MiB)
    qemu.write(path, "write -P 0x11 0 1M", "write -P 0x22 1M 1M")
    bat_offset, _ = region_offsets(path)["bat"]
    entries = struct.unpack("<8Q", read_at(path, bat_offset, 64))
    assert [e & 7 for e in entries[:2]] == [6, 6]
    return path, bat_offset, [e & ~(MiB - 1) for e in entries[:2]]


def _bat_sector(path: Path, bat_offset: int, changes: dict[int, int]) -> bytes:
    sector = bytearray(read_at(path, bat_offset, 4096))
    for block, entry in changes.items():
        sector[8 * block : 8 * block + 8] = struct.pack("<Q", entry)
    return bytes(sector)


def test_crafted_log_sequence_with_stale_entry(qemu, base) -> None:
    path, bat, (block0, block1) = base
    guid = uuid.UUID("11111111-2222-3333-4444-555555555555")
    size = path.stat().st_size
    # seq 10: move block 1's data to block 3 and drop block 1
    first = _entry(10, 8192, guid, [(bat, _bat_sector(path, bat, {1: 2, 3: block1 | 6}))], size)
    # seq 11: rewrite one sector of block 0, zero the next two
    second = _entry(11, 8192, guid, [(block0 + 4096, b"\x99" * 4096), (block0 + 8192, 8192)], size)
    # an older, unrelated entry that must not be replayed
    stale = _entry(3, 512 * 1024, guid, [(bat, _bat_sector(path, bat, {0: 2}))], size)
    _put_in_log(path, 8192, first)
    _put_in_log(path, 8192 + len(first), second)
    _put_in_log(path, 512 * 1024, stale)
    _mark_dirty(path, guid)
    assert_qemu_sees_dirty_log(qemu, path)

    with open_vhdx(path) as disk:
        ours = disk.read(0, SIZE)
        assert disk.allocated_ranges() == [(0, MiB), (3 * MiB, MiB)]
    expected = bytearray(b"\x11" * MiB + bytes(2 * MiB) + b"\x22" * MiB + bytes(4 * MiB))
    expected[4096:16384] = b"\x99" * 4096 + bytes(8192)
    assert ours == expected
    assert ours == replayed_by_qemu(qemu, path)


def test_crafted_entry_wrapping_around_the_log(qemu, base) -> None:
    path, bat, (_, block1) = base
    guid = uuid.uuid4()
    position = LOG_LENGTH - 4096  # descriptor sector at the end, data sector at the start
    entry = _entry(7, position, guid, [(bat, _bat_sector(path, bat, {5: block1 | 6}))], path.stat().st_size)
    _put_in_log(path, position, entry)
    _mark_dirty(path, guid)
    with open_vhdx(path) as disk:
        ours = disk.read(0, SIZE)
    assert ours[5 * MiB : 6 * MiB] == b"\x22" * MiB
    assert ours == replayed_by_qemu(qemu, path)


def test_log_guid_without_entries_needs_no_replay(qemu, base) -> None:
    path, _, _ = base
    expected = qemu.raw(path)
    _mark_dirty(path, uuid.uuid4())  # a writer sets LogGuid before its first entry
    with open_vhdx(path) as disk:
        assert disk.read(0, SIZE) == expected


def test_log_of_a_truncated_copy(base) -> None:
    path, bat, (_, block1) = base
    guid = uuid.uuid4()
    entry = _entry(1, 0, guid, [(bat, _bat_sector(path, bat, {5: block1 | 6}))], path.stat().st_size + 8 * MiB)
    _put_in_log(path, 0, entry)
    _mark_dirty(path, guid)
    with pytest.raises(VhdxError, match=rf"^{path}: log replay needs the file to be at least \d+ bytes"):
        open_vhdx(path)
