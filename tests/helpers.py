"""Test helpers: synthetic disk images and a minimal backup driver built on the wire client.

The real collector pipeline is its own issue; this driver is the smallest honest client of the
protocol (missing -> upload -> map -> commit) so that server tests exercise real HTTP.
"""

from __future__ import annotations

import io
import os
import random

import zstandard

from chunkyard.progress import Progress
from chunkyard.wire import ZERO, Client, bitmap_get, is_zero, make_frame

MiB = 1 << 20


def make_disk(kinds: str, chunk_size: int = MiB, *, seed: int = 1, tail: int = 0) -> bytes:
    """A disk image from a pattern: 'r' random chunk, 'z' zero chunk, 'c' compressible chunk,
    a digit repeats the random chunk with that number; `tail` adds a short last chunk of random bytes."""
    rng = random.Random(seed)
    repeated: dict[str, bytes] = {}
    out = bytearray()
    for k in kinds:
        if k == "r":
            out += rng.randbytes(chunk_size)
        elif k == "z":
            out += bytes(chunk_size)
        elif k == "c":
            line = rng.randbytes(64).hex().encode()
            out += (line * (chunk_size // len(line) + 1))[:chunk_size]
        elif k.isdigit():
            out += repeated.setdefault(k, rng.randbytes(chunk_size))
        else:
            raise ValueError(k)
    return bytes(out + os.urandom(tail) if tail else out)


def chunks_of(disk: bytes, chunk_size: int) -> list[bytes]:
    return [disk[i : i + chunk_size] for i in range(0, len(disk), chunk_size)]


async def backup(
    client: Client, vm_id: str, disks: dict[str, bytes], *, base: str | None = "latest",
    only: dict[str, set[int]] | None = None, host: str = "host1", commit: bool = True,
) -> dict:
    """Back up disks (disk_id -> image). `only` limits each disk to the given changed chunk indices
    (an RCT-style incremental); otherwise every chunk is mapped. Returns counters and the point id."""
    session = await client.create_session(
        host=host, vm={"id": vm_id, "name": vm_id.upper()}, base=base,
        disks=[{"disk_id": d, "name": f"{d}.vhdx", "size": len(img)} for d, img in disks.items()],
    )
    sid, cs = session["session_id"], session["chunk_size"]
    cctx = zstandard.ZstdCompressor(level=1)
    uploaded = 0
    for disk_id, image in disks.items():
        pieces = chunks_of(image, cs)
        indices = sorted(only[disk_id]) if only and disk_id in only else range(len(pieces))
        entries, frames = [], {}
        for i in indices:
            piece = pieces[i]
            if is_zero(piece):
                entries.append((i, ZERO))
                continue
            frame = make_frame(piece, cctx)
            entries.append((i, frame.digest))
            frames.setdefault(frame.digest, frame)
        wanted = list(frames.values())
        if wanted:
            bitmap = await client.missing(sid, [f.digest for f in wanted])
            todo = [f for n, f in enumerate(wanted) if bitmap_get(bitmap, n)]
            for start in range(0, len(todo), 16):
                result = await client.upload(sid, todo[start : start + 16])
                uploaded += result["stored"]
        if entries:
            await client.map(sid, disk_id, entries)
    result = {"session_id": sid, "uploaded": uploaded}
    if commit:
        result |= await client.commit(sid)
    return result


async def restore(client: Client, point_id: str, disk_id: str) -> bytes:
    out = bytearray()
    async for data in client.stream_disk(point_id, disk_id):
        out += data
    return bytes(out)


class Interrupt(Exception):
    """What KillAt raises: a collector dying mid-backup."""


class KillAt(Progress):
    """Raises once `limit` bytes were read: the collector dies mid-backup."""

    def __init__(self, limit: int):
        super().__init__(None, "kill", io.StringIO())
        self.limit = limit

    def update(self, n: int) -> None:
        super().update(n)
        if self.done >= self.limit:
            raise Interrupt
