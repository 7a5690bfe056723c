"""The reader against qemu-made fixed and dynamic VHDX files, with qemu-img convert as the oracle."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import pytest

from chunkyard.vdisk import VhdxError, open_vhdx

from .vhdx_helpers import MiB, covered, nonzero_spans, overlaps

# 100 MiB + 3.5 KiB: not a multiple of any block size, so the last block is partial
SIZE = 100 * MiB + 3584
WRITES = (
    "write -P 0xab 0 1M",
    "write -P 0xcd 10M 2M",
    "write -z 20M 1M",  # zeroing an untouched block allocates nothing
    "write -P 0x33 24M 1M",
    "write -z 24M 512K",  # zeroing allocated data in place
    "write -P 0x11 33554944 512",  # a single sector just past 32 MiB
    f"write -P 0x44 {SIZE - 4096} 4096",  # the last sector(s), in the partial last block
)
UNTOUCHED = (64 * MiB, 32 * MiB)  # never written, a whole block for every block size used


class SeekReadOnly(io.RawIOBase):
    """A file object offering only seek/read/tell, like an SMB handle (no fileno, no mmap)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.reads = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return self._data.read(min(size, 100_000) if size >= 0 else size)  # short reads, like a socket

    def fileno(self) -> int:
        raise AssertionError("the reader must not use fileno()")


def check_ranges(ranges: list[tuple[int, int]], raw: bytes, untouched: tuple[int, int] | None) -> None:
    assert ranges == sorted(ranges)
    for (s1, n1), (s2, _) in itertools.pairwise(ranges):
        assert s1 + n1 < s2, "ranges must be merged"
    for start, length in nonzero_spans(raw):
        assert covered(ranges, start, length), f"non-zero data at {start} outside allocated_ranges"
    if untouched:
        assert not overlaps(ranges, *untouched)


@pytest.mark.parametrize("block_size", [None, MiB, 32 * MiB], ids=["default-8M", "1M", "32M"])
def test_dynamic_matches_qemu(qemu, tmp_path: Path, block_size: int | None) -> None:
    path = qemu.create(tmp_path / "dyn.vhdx", SIZE, **({"block_size": block_size} if block_size else {}))
    qemu.write(path, *WRITES)
    raw = qemu.raw(path)
    with open_vhdx(path) as disk:
        assert disk.disk_type == "dynamic"
        assert disk.virtual_size == SIZE == len(raw)
        assert disk.block_size == (block_size or 8 * MiB)
        assert (disk.logical_sector_size, disk.physical_sector_size) == (512, 512)
        assert disk.read(0, SIZE) == raw
        rng = random.Random(block_size)
        for _ in range(200):
            start = rng.randrange(SIZE)
            length = rng.randrange(min(3 * MiB, SIZE - start) + 1)
            assert disk.read(start, length) == raw[start : start + length]
        check_ranges(disk.allocated_ranges(), raw, UNTOUCHED)


def test_dynamic_properties_match_dissect(qemu, dissect_vhdx, tmp_path: Path) -> None:
    path = qemu.create(tmp_path / "dyn.vhdx", 12 * MiB, block_size=2 * MiB)
    oracle = dissect_vhdx.VHDX(path)
    oracle.fh.close()
    with open_vhdx(path) as disk:
        assert disk.virtual_disk_id == oracle.id
        assert (disk.virtual_size, disk.block_size, disk.logical_sector_size) == (
            oracle.size,
            oracle.block_size,
            oracle.sector_size,
        )
        assert disk.allocated_ranges() == []
        assert disk.read(0, 12 * MiB) == bytes(12 * MiB)


@pytest.mark.parametrize("zero_state", ["on", "off"])
def test_fixed_matches_qemu(qemu, tmp_path: Path, zero_state: str) -> None:
    size = 24 * MiB + 512
    path = qemu.create(tmp_path / "fixed.vhdx", size, subformat="fixed", block_state_zero=zero_state)
    qemu.write(path, "write -P 0x5a 3M 1M", f"write -P 0x6b {size - 512} 512", "write -z 3M 4096")
    raw = qemu.raw(path)
    with open_vhdx(path) as disk:
        assert disk.disk_type == "fixed"
        assert disk.read(0, size) == raw
        ranges = disk.allocated_ranges()
        check_ranges(ranges, raw, None)
        if zero_state == "off":  # every block is FULLY_PRESENT
            assert ranges == [(0, size)]


def test_reads_from_a_seek_read_only_stream(qemu, tmp_path: Path) -> None:
    path = qemu.create(tmp_path / "dyn.vhdx", 20 * MiB, block_size=MiB)
    qemu.write(path, "write -P 0x77 5M 3M", "write -P 0x78 19M 1M")
    raw = qemu.raw(path)
    stream = SeekReadOnly(path.read_bytes())
    with open_vhdx(stream, name="smb://host/share/dyn.vhdx") as disk:
        assert disk.read(0, disk.virtual_size) == raw
        assert disk.allocated_ranges() == [(5 * MiB, 3 * MiB), (19 * MiB, MiB)]
    assert stream.reads and not stream.closed  # a caller's stream stays open


def test_read_bounds(qemu, tmp_path: Path) -> None:
    path = qemu.create(tmp_path / "dyn.vhdx", 4 * MiB)
    with open_vhdx(path) as disk:
        assert disk.read(4 * MiB, 0) == b""
        assert disk.read(4 * MiB - 1, 1) == b"\0"
        with pytest.raises(VhdxError, match=r"dyn\.vhdx: read of 2 bytes at offset 4194303 is outside"):
            disk.read(4 * MiB - 1, 2)
        with pytest.raises(VhdxError, match="outside the virtual disk"):
            disk.read(-1, 1)
