"""Plain helpers for the VHDX tests: range checks and byte-level patching of test files."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import ModuleType

import crc32c

MiB = 1 << 20


def nonzero_spans(data: bytes, granularity: int = 512) -> list[tuple[int, int]]:
    """(offset, length) of every non-zero `granularity`-sized piece of `data`, merged."""
    zero = bytes(granularity)
    spans: list[tuple[int, int]] = []
    for offset in range(0, len(data), granularity):
        if data[offset : offset + granularity] != zero[: min(granularity, len(data) - offset)]:
            if spans and spans[-1][0] + spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], spans[-1][1] + granularity)
            else:
                spans.append((offset, granularity))
    return spans


def covered(ranges: list[tuple[int, int]], start: int, length: int) -> bool:
    """Whether [start, start+length) lies inside one of the merged ranges."""
    return any(s <= start and start + length <= s + n for s, n in ranges)


def overlaps(ranges: list[tuple[int, int]], start: int, length: int) -> bool:
    return any(s < start + length and start < s + n for s, n in ranges)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(length)


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def fix_crc(path: Path, offset: int, size: int) -> None:
    """Recompute the CRC-32C (field at +4) of the structure of `size` bytes at `offset`."""
    raw = bytearray(read_at(path, offset, size))
    raw[4:8] = bytes(4)
    patch(path, offset + 4, struct.pack("<I", crc32c.crc32c(bytes(raw))))


def region_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """{"bat"|"metadata": (file offset, length)} from region table 1 (entry index order)."""
    raw = read_at(path, 192 * 1024, 4096)
    count = struct.unpack_from("<I", raw, 8)[0]
    names = {
        bytes.fromhex("6677c22d23f600429d64115e9bfd4a08"): "bat",
        bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e"): "metadata",
    }
    out = {}
    for index in range(count):
        guid, offset, length, _ = struct.unpack_from("<16sQII", raw, 16 + 32 * index)
        out[names.get(guid, guid.hex())] = (offset, length)
    return out


def payload_states(path: Path, count: int) -> list[int]:
    """States of the first `count` BAT entries (all payload entries while count <= chunk ratio)."""
    offset, _ = region_offsets(path)["bat"]
    return [entry & 7 for entry in struct.unpack(f"<{count}Q", read_at(path, offset, 8 * count))]


def make_child(
    vhdxutils: ModuleType, directory: Path, child: str, parent: str, writes: tuple[tuple[int, bytes], ...]
) -> Path:
    """Create `child` as a FATtools differencing disk of `parent` and write into it."""
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        vhdxutils.mk_diff(child, parent)
        link = Path(f".\\{parent}")
        if not link.exists():
            link.symlink_to(parent)
        image = vhdxutils.Image(child, "r+b")
        for offset, data in writes:
            image.seek(offset)
            image.write(data)
        image.close()
    finally:
        os.chdir(cwd)
    return directory / child


def apply(model: bytearray, writes: tuple[tuple[int, bytes], ...]) -> None:
    for offset, data in writes:
        model[offset : offset + len(data)] = data
