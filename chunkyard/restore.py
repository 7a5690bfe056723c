"""Restoring one disk of a restore point to a local file: resumable, retried, verified.

The download goes to FILE.part, with the server's ETag beside it in FILE.part.etag, so an
interrupted run resumes with `Range` + `If-Range` and never appends another point's bytes. FILE
appears (by rename) only after every chunk of what was written matches the point's BLAKE3
digest map: a FILE that exists is a verified restore.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from chunkyard.progress import Progress
from chunkyard.units import format_size
from chunkyard.vdisk import VhdxError, open_vhdx
from chunkyard.wire import DIGEST_LEN, ZERO, ApiError, Client, digest, is_zero

FORMATS = ("vhdx", "raw")
WRITE_BLOCK = 8 << 20  # large sequential writes; also the most unwritten data a crash can lose
BACKOFF = 1.0  # seconds before the first retry without progress, doubling up to MAX_BACKOFF
MAX_BACKOFF = 30.0
SECTOR = 512
CUT_HINT = (", as it does when a stored chunk fails its check (the server log names the chunk; an admin can "
            "run a verify job)")

ProgressFactory = Callable[[int | None, str], Progress]
"""Makes the reporter of one phase (download, verify) from its total bytes and a label."""


class RestoreError(Exception):
    """A restore that cannot finish; the message says why and what was kept."""


def part_paths(out: Path) -> tuple[Path, Path]:
    """Where an unfinished download of `out` and the ETag of its bytes are kept."""
    return out.with_name(out.name + ".part"), out.with_name(out.name + ".part.etag")


def pick_disk(point: dict, disk_id: str | None) -> dict:
    """The disk to restore; None picks a point's only disk. Errors list the disk ids to choose from."""
    disks = point["disks"]
    ids = ", ".join(d["disk_id"] for d in disks)
    if disk_id is None:
        if len(disks) == 1:
            return disks[0]
        raise RestoreError(f"point {point['point_id']} has {len(disks)} disks ({ids}): choose one with --disk")
    for disk in disks:
        if disk["disk_id"] == disk_id:
            return disk
    raise RestoreError(f"point {point['point_id']} has no disk {disk_id!r}; its disks: {ids}")


async def restore_disk(
    client: Client, point_id: str, disk_id: str | None, out: Path, fmt: str = "vhdx",
    progress: ProgressFactory = Progress, *, attempts: int = 5,
) -> dict:
    """Download a disk as `fmt` to `out`, resuming a previous run's `out.part`, and verify it.

    `attempts`: consecutive failed attempts without progress before giving up (the server cuts a
    stream short when a chunk fails its check, so retrying forever would never end).
    Returns a summary: bytes, downloaded, resumed_from, seconds, rate (bytes/s), verified.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown restore format {fmt!r} (one of {', '.join(FORMATS)})")
    started = time.monotonic()
    point = await client.point(point_id)
    disk = pick_disk(point, disk_id)
    disk_id = disk["disk_id"]
    part, tag = part_paths(out)
    url = f"/points/{point_id}/disks/{disk_id}/{fmt}"
    try:
        with progress(None, f"download {out.name}") as bar:
            resumed_from = await _download(client, url, part, tag, bar, attempts)
        digests = await client.disk_map(point_id, disk_id)
        with progress(disk["size"], f"verify {out.name}") as bar:
            problem = await asyncio.to_thread(_verify, fmt, part, disk["size"], point["chunk_size"], digests, bar)
        if problem:
            tag.unlink(missing_ok=True)  # the next run downloads afresh instead of resuming these bytes
            raise RestoreError(f"{out}: verification failed: {problem}. The download is kept as {part} for "
                               "inspection; running the command again downloads it afresh.")
        part.replace(out)
        tag.unlink()
        size = out.stat().st_size
    except OSError as e:
        if isinstance(e, (aiohttp.ClientError, TimeoutError)):  # the server, not the local file system
            raise
        raise RestoreError(f"cannot write the restored disk: {e}") from e
    seconds = time.monotonic() - started
    return {"point_id": point_id, "disk_id": disk_id, "format": fmt, "file": str(out), "bytes": size,
            "downloaded": size - resumed_from, "resumed_from": resumed_from, "seconds": round(seconds, 3),
            "rate": round((size - resumed_from) / seconds) if seconds > 0 else 0, "verified": True}


async def _download(client: Client, url: str, part: Path, tag: Path, bar: Progress, attempts: int) -> int:
    """Fill `part` with the whole body of `url`, resuming what it already holds and retrying
    interrupted streams; return the offset this run started from."""
    failures = 0
    resumed_from: int | None = None
    while True:
        have = part.stat().st_size if part.exists() and tag.exists() else 0
        try:
            resp = await _open(client, url, have, tag)
            if resp is None:  # 416: the part already holds the whole body (e.g. a crash before the rename)
                if resumed_from is None:
                    resumed_from = bar.total = have
                    bar.skip(have)
                return resumed_from
            async with resp:
                start = have if resp.status == 206 else 0
                if resumed_from is None:
                    resumed_from = start
                    bar.total = start + (resp.content_length or 0)
                    bar.skip(start)
                elif start != bar.done:
                    raise RestoreError(f"the server restarted {url} from byte 0 during a retry (ETag now "
                                       f"{resp.headers.get('ETag')}); run the command again to start over")
                if start == 0:
                    part.write_bytes(b"")  # truncate before the new ETag is saved: never old bytes, new tag
                    tag.write_text(resp.headers["ETag"])
                await _append_body(resp, part, bar)
            return resumed_from
        except (TimeoutError, aiohttp.ClientError) as e:
            now = part.stat().st_size if part.exists() else 0
            failures = 0 if now > have else failures + 1
            if failures >= attempts:
                hint = CUT_HINT if isinstance(e, aiohttp.ClientPayloadError) else ""
                raise RestoreError(
                    f"download of {url} failed {failures} times in a row at byte {now}: {_describe(e)}{hint}. "
                    f"What arrived is kept in {part}; running the command again resumes from there.") from None
            delay = min(BACKOFF * 2 ** (failures - 1), MAX_BACKOFF) if failures else 0.0
            bar.note(f"{bar.label}: interrupted at {format_size(now)}: {_describe(e)}; "
                     + (f"retrying in {delay:.0f} s" if delay else "resuming"))
            await asyncio.sleep(delay)


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the server ended the stream early"
    return str(e) or type(e).__name__  # a timeout has no message


async def _open(client: Client, url: str, have: int, tag: Path) -> aiohttp.ClientResponse | None:
    """GET the body from byte `have`, only if the server's ETag still is the saved one (If-Range);
    otherwise the server answers 200 with the whole body. None when nothing is left to fetch."""
    headers = {"Range": f"bytes={have}-", "If-Range": tag.read_text().strip()} if have else {}
    try:
        # Client.stream_disk hides the status and ETag that resuming depends on.
        resp = await client._request("GET", url, headers=headers)
    except ApiError as e:
        if e.status == 416 and have:
            return None
        raise
    if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
        resp.release()
        raise RestoreError(f"the server answered {url} with range {resp.headers.get('Content-Range')!r}, "
                           f"not the one asked for (from byte {have})")
    return resp


async def _append_body(resp: aiohttp.ClientResponse, part: Path, bar: Progress) -> None:
    """Append the body to `part` in large writes; whatever arrived before a failure is kept.

    A writer thread writes one block while the next one fills (two buffers, reused), so receiving and
    writing overlap instead of taking turns on the event loop. At most one block is in flight, and it
    always lands before the next, so the file stays a prefix of the body whatever happens."""
    blocks = (bytearray(WRITE_BLOCK), bytearray(WRITE_BLOCK))
    block, fill = memoryview(blocks[0]), 0
    writing: concurrent.futures.Future | None = None
    with open(part, "ab") as f, concurrent.futures.ThreadPoolExecutor(1, "restore-write") as writer:
        try:
            async for data in resp.content.iter_any():
                bar.update(len(data))
                rest = memoryview(data)
                while rest:
                    n = min(len(rest), WRITE_BLOCK - fill)
                    block[fill : fill + n] = rest[:n]
                    fill, rest = fill + n, rest[n:]
                    if fill == WRITE_BLOCK:
                        if writing is not None:  # shielded: a cancelled restore still lets the write land
                            await asyncio.shield(asyncio.wrap_future(writing))
                        writing = writer.submit(f.write, block)
                        block, fill = memoryview(blocks[1] if block.obj is blocks[0] else blocks[0]), 0
        finally:
            if writing is not None:
                writing.result()  # the block in flight lands before the rest
            f.write(block[:fill])
        f.flush()
        os.fsync(f.fileno())


def _verify(fmt: str, part: Path, size: int, chunk_size: int, digests: bytes, bar: Progress) -> str | None:
    """Check the written file against the digest map, chunk by chunk; the problem found, or None."""
    if len(digests) != -(-size // chunk_size) * DIGEST_LEN:
        return f"the server's digest map has {len(digests) // DIGEST_LEN} entries for a {size}-byte disk"
    if fmt == "raw":
        if part.stat().st_size != size:
            return f"the file is {part.stat().st_size} bytes, the disk {size}"
        with open(part, "rb") as f:
            return _check_chunks(lambda offset, n: os.pread(f.fileno(), n, offset), size, chunk_size, digests, bar)
    virtual_size = -(-size // SECTOR) * SECTOR  # VHDX sizes are whole sectors; the server pads with zeros
    try:
        with open_vhdx(part) as vhdx:
            if vhdx.virtual_size != virtual_size:
                return f"the VHDX's virtual size is {vhdx.virtual_size} bytes, expected {virtual_size}"
            problem = _check_chunks(vhdx.read, size, chunk_size, digests, bar)
            if problem is None and not is_zero(vhdx.read(size, virtual_size - size)):
                problem = f"the sector padding after byte {size} is not zeros"
            return problem
    except VhdxError as e:
        return f"not a valid VHDX: {e}"


def _check_chunks(read: Callable[[int, int], bytes], size: int, chunk_size: int, digests: bytes,
                  bar: Progress) -> str | None:
    """Compare each chunk read back with its map digest (ZERO: the chunk must be all zeros)."""
    for offset in range(0, size, chunk_size):
        n = min(chunk_size, size - offset)
        data = read(offset, n)
        i = offset // chunk_size
        want = digests[i * DIGEST_LEN : (i + 1) * DIGEST_LEN]
        if not (is_zero(data) if want == ZERO else digest(data) == want):
            return f"chunk {i} (bytes {offset}-{offset + n - 1}) does not match the point's digest map"
        bar.update(n)
    return None
