"""The streaming writer: qemu-img check/convert, libvhdi and dissect must all see the manifest's disk."""

from __future__ import annotations

import hashlib
import io
import random
import time
from pathlib import Path

import pytest

from chunkyard.vdisk import VhdxLayout, open_vhdx, write_vhdx

from .vhdx_helpers import MiB, payload_states

KiB = 1024


def chunk_data(index: int, length: int) -> bytes:
    """Deterministic, non-repeating content, so misplaced chunks or offsets are caught."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=32).digest()
    return (seed * (length // 32 + 1))[:length]


class Manifest:
    def __init__(self, virtual_size: int, chunk_size: int, present: bytes) -> None:
        self.virtual_size, self.chunk_size, self.present = virtual_size, chunk_size, present

    def length(self, index: int) -> int:
        return min(self.chunk_size, self.virtual_size - index * self.chunk_size)

    def read_chunk(self, index: int) -> bytes:
        assert self.present[index], f"chunk {index} is absent and must never be read"
        return chunk_data(index, self.length(index))

    def raw(self) -> bytes:
        return b"".join(
            chunk_data(i, self.length(i)) if p else bytes(self.length(i)) for i, p in enumerate(self.present)
        )


def manifest(virtual_size: int, chunk_size: int, seed: int) -> Manifest:
    rng = random.Random(seed)
    chunks = -(-virtual_size // chunk_size)
    present = bytearray(rng.choice((0, 0, 1, 2, 255)) for _ in range(chunks))
    present[-1] = 1  # the partial last chunk holds data
    present[1] = 0
    return Manifest(virtual_size, chunk_size, bytes(present))


def write(path: Path, layout: VhdxLayout, m: Manifest) -> bytes:
    with path.open("wb") as fh:
        write_vhdx(fh, layout, m.read_chunk)
    data = path.read_bytes()
    assert len(data) == layout.total_size
    return data


CASES = [
    pytest.param(256 * KiB, 13 * MiB + 5 * 512, id="256K-chunks"),  # 4 chunks per 1 MiB block
    pytest.param(MiB, 9 * MiB + 7 * 4096, id="1M-chunks"),
    pytest.param(2 * MiB, 11 * MiB + 512, id="2M-chunks"),
]


@pytest.mark.parametrize(("chunk_size", "virtual_size"), CASES)
def test_written_file_reads_back_everywhere(
    qemu, libvhdi_read, dissect_read, tmp_path: Path, chunk_size: int, virtual_size: int
) -> None:
    m = manifest(virtual_size, chunk_size, chunk_size)
    layout = VhdxLayout(virtual_size, chunk_size, m.present, seed=b"disk-1")
    path = tmp_path / "restore.vhdx"
    write(path, layout, m)
    expected = m.raw()

    assert "No errors were found" in qemu.img("check", path)
    assert qemu.raw(path) == expected
    assert libvhdi_read([path]) == expected
    assert dissect_read(path, layout.block_size) == expected
    with open_vhdx(path) as disk:
        assert disk.disk_type == "dynamic"
        assert disk.block_size == max(chunk_size, MiB)
        assert disk.read(0, virtual_size) == expected
        allocated = disk.allocated_ranges()
    blocks = -(-virtual_size // layout.block_size)
    per_block = layout.block_size // chunk_size
    states = payload_states(path, blocks)
    for block in range(blocks):
        used = any(m.present[block * per_block : (block + 1) * per_block])
        assert states[block] == (6 if used else 2)  # FULLY_PRESENT or ZERO
        start = block * layout.block_size
        inside = any(s <= start < s + n for s, n in allocated)
        assert inside == used


@pytest.mark.parametrize(("chunk_size", "virtual_size"), CASES)
def test_pieces_equal_slices_of_the_file(tmp_path: Path, chunk_size: int, virtual_size: int) -> None:
    m = manifest(virtual_size, chunk_size, 7)
    layout = VhdxLayout(virtual_size, chunk_size, m.present, seed=b"disk-1")
    whole = write(tmp_path / "whole.vhdx", layout, m)
    chunks = {i: chunk_data(i, m.length(i)) for i, p in enumerate(m.present) if p}

    def render(start: int, stop: int) -> bytes:
        out = bytearray()
        for piece in layout.pieces(start, stop):
            if piece[0] == "bytes":
                out += piece[1]
            elif piece[0] == "zeros":
                out += bytes(piece[1])
            else:
                _, index, offset, length = piece
                assert m.present[index] and offset + length <= m.length(index)
                out += chunks[index][offset : offset + length]
        return bytes(out)

    rng = random.Random(chunk_size)
    total = layout.total_size
    edges = [0, 4096, 64 * KiB, 192 * KiB, MiB, 3 * MiB, layout.data_offset, total]
    ranges = [(a, b) for a in edges for b in edges if a <= b]
    ranges += [(s, s + rng.randrange(1, 3 * MiB)) for s in (rng.randrange(total) for _ in range(150))]
    for start, stop in ranges:
        stop = min(stop, total)
        assert render(start, stop) == whole[start:stop], (start, stop)
    assert list(layout.pieces(5, 5)) == []
    with pytest.raises(ValueError):
        list(layout.pieces(0, total + 1))


def test_same_inputs_give_identical_bytes(tmp_path: Path) -> None:
    m = manifest(5 * MiB + 512, 256 * KiB, 3)
    a = write(tmp_path / "a.vhdx", VhdxLayout(m.virtual_size, m.chunk_size, m.present, seed=b"s1"), m)
    b = write(tmp_path / "b.vhdx", VhdxLayout(m.virtual_size, m.chunk_size, bytearray(m.present), seed=b"s1"), m)
    c_path = tmp_path / "c.vhdx"
    c = write(c_path, VhdxLayout(m.virtual_size, m.chunk_size, m.present, seed=b"s2"), m)
    assert a == b
    assert a != c  # other GUIDs ...
    with open_vhdx(tmp_path / "a.vhdx") as da, open_vhdx(c_path) as dc:
        assert da.read(0, m.virtual_size) == dc.read(0, m.virtual_size)  # ... same disk
        assert da.virtual_disk_id != dc.virtual_disk_id


def test_4k_logical_sectors(libvhdi_read, tmp_path: Path) -> None:
    """qemu refuses 4 KiB-sector VHDX, so libvhdi is the oracle here."""
    m = manifest(6 * MiB, MiB, 11)
    layout = VhdxLayout(m.virtual_size, MiB, m.present, seed=b"4k", logical_sector_size=4096, physical_sector_size=4096)
    path = tmp_path / "4k.vhdx"
    write(path, layout, m)
    assert libvhdi_read([path]) == m.raw()
    with open_vhdx(path) as disk:
        assert (disk.logical_sector_size, disk.physical_sector_size) == (4096, 4096)
        assert disk.read(0, m.virtual_size) == m.raw()


def test_empty_manifest(qemu, tmp_path: Path) -> None:
    layout = VhdxLayout(3 * MiB, MiB, bytes(3), seed=b"empty")
    assert layout.total_size == layout.data_offset
    path = tmp_path / "empty.vhdx"
    with path.open("wb") as fh:
        write_vhdx(fh, layout, lambda i: pytest.fail("no chunk may be read"))
    assert "No errors were found" in qemu.img("check", path)
    assert qemu.raw(path) == bytes(3 * MiB)


def test_terabyte_layout_is_cheap() -> None:
    chunks = 1 << 20  # 1 TiB of 1 MiB chunks, 1% present
    present = bytearray(chunks)
    present[::100] = b"\x01" * len(present[::100])
    started = time.perf_counter()
    layout = VhdxLayout(1 << 40, MiB, present, seed=b"big")
    assert time.perf_counter() - started < 1.0
    assert layout.total_size == layout.data_offset + len(present[::100]) * MiB
    started = time.perf_counter()
    tail = list(layout.pieces(layout.total_size - 3 * MiB - 5, layout.total_size))  # 4 chunks, the 1st 5 bytes
    middle_of_bat = list(layout.pieces(layout.data_offset - 4 * MiB, layout.data_offset - 4 * MiB + 100))
    assert time.perf_counter() - started < 0.1
    last = (chunks - 1) // 100 * 100
    assert [p[:2] for p in tail] == [("chunk", last - n) for n in (300, 200, 100, 0)]
    assert tail[0][2:] == (MiB - 5, 5)
    assert sum(len(p[1]) if p[0] == "bytes" else p[1] for p in middle_of_bat) == 100


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="chunk size"):
        VhdxLayout(MiB, 128 * KiB, bytes(8), seed=b"")
    with pytest.raises(ValueError, match="chunk size"):
        VhdxLayout(MiB, 3 * MiB, bytes(1), seed=b"")
    with pytest.raises(ValueError, match="multiple of 512"):
        VhdxLayout(MiB + 1, MiB, bytes(2), seed=b"")
    with pytest.raises(ValueError, match="expected 2 chunks"):
        VhdxLayout(MiB + 512, MiB, bytes(1), seed=b"")
    layout = VhdxLayout(MiB, MiB, b"\x01", seed=b"")
    with pytest.raises(ValueError, match="chunk 0 has 3 bytes, expected 1048576"):
        write_vhdx(io.BytesIO(), layout, lambda i: b"abc")
