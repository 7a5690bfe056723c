"""The collector pipeline end to end on the real server: file sources (raw and VHDX), compare-mode
incrementals, trimmed regions, resume of an interrupted run."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

from chunkyard.progress import Progress
from chunkyard.wire import CODEC_RAW, Client, Frame, decode_frames
from collectors.pipeline import RAW_PER_BODY, Options, chunk_spans, run_backup
from collectors.sources.file import FileSource
from tests.conftest import ServerProcess, require_tool
from tests.helpers import Interrupt, KillAt, MiB, make_disk, restore


def write_sparse(path: Path, image: bytes) -> None:
    """Write an image leaving its all-zero MiBs as holes, like a thin disk."""
    with open(path, "wb") as f:
        f.truncate(len(image))
        for off in range(0, len(image), MiB):
            piece = image[off : off + MiB]
            if any(piece):
                f.seek(off)
                f.write(piece)


def quiet() -> Progress:
    return Progress(None, "test", io.StringIO())


async def backup_file(client: Client, path: Path, vm: str, **options) -> object:
    source = FileSource(path, vm)
    with source.begin(vm) as b:
        return await run_backup(client, b, options=Options(**options), progress=quiet())


def test_chunk_spans_align_and_merge() -> None:
    cs = 100
    spans = chunk_spans([(250, 10), (0, 1), (99, 2), (260, 200), (1000, 5)], 1000, cs)
    assert spans == [(0, 5)]  # adjacent spans merge; the range past the end is dropped
    assert chunk_spans([(950, 500)], 990, cs) == [(9, 10)]


async def test_raw_file_full_then_compare_incremental(tmp_path: Path, collector: Client, admin: Client) -> None:
    image = bytearray(make_disk("rcz1rzzrc1", seed=51, tail=4096))
    path = tmp_path / "disk.img"
    write_sparse(path, bytes(image))
    first = await backup_file(collector, path, "vm-f")
    assert first.disks[0].plan == "full"
    assert first.read_bytes < len(image)  # holes are never read
    assert first.uploaded_chunks == 7  # r c 1 r r c + tail: the repeated "1" goes once, zeros never
    assert await restore(admin, first.point_id, "disk.img") == bytes(image)

    image[3 * MiB : 3 * MiB + 100] = os.urandom(100)  # change one chunk
    with open(path, "r+b") as f:
        f.seek(3 * MiB)
        f.write(image[3 * MiB : 3 * MiB + 100])
        os.posix_fallocate(f.fileno(), 0, 1)
    # Trim chunk 4 (it held data): a hole now, so the point must read zeros there.
    image[4 * MiB : 5 * MiB] = bytes(MiB)
    with open(path, "r+b") as f:
        f.seek(4 * MiB)
        f.write(bytes(MiB))
    second = await backup_file(collector, path, "vm-f")
    disk = second.disks[0]
    assert disk.plan == "compare"
    assert disk.mapped_chunks == 2 and second.uploaded_chunks == 1  # only what changed
    assert await restore(admin, second.point_id, "disk.img") == bytes(image)
    assert await restore(admin, first.point_id, "disk.img") != bytes(image)

    third = await backup_file(collector, path, "vm-f")
    assert third.disks[0].mapped_chunks == 0 and third.uploaded_chunks == 0


async def test_vhdx_file_source(tmp_path: Path, collector: Client, admin: Client) -> None:
    qemu_img = require_tool("qemu-img")
    image = make_disk("rrzzc1zr1", seed=52)
    raw = tmp_path / "src.raw"
    write_sparse(raw, image)
    vhdx = tmp_path / "sys.vhdx"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic,block_size=1048576",
                    str(raw), str(vhdx)], check=True)
    result = await backup_file(collector, vhdx, "vm-x")
    assert result.disks[0].disk_id == "sys.vhdx"
    assert await restore(admin, result.point_id, "sys.vhdx") == image
    assert result.read_bytes <= 6 * MiB  # zero blocks are not allocated in the VHDX, so not read




class BodyRecorder(Client):
    """The real client, noting the frames of each upload body it sends."""

    bodies: list[list[Frame]]

    async def upload(self, sid: str, frames: Iterable[Frame] | bytes | bytearray) -> dict:
        self.bodies.append(decode_frames(bytes(frames)) if isinstance(frames, (bytes, bytearray)) else list(frames))
        return await super().upload(sid, frames)


async def test_upload_bodies_are_bounded_by_stored_and_raw_bytes(tmp_path: Path, server: ServerProcess,
                                                                 collector: Client,
                                                                 admin: Client) -> None:
    """Compressible chunks shrink to a few KiB each: a body closes at RAW_PER_BODY x upload_body raw bytes
    long before the stored bytes reach upload_body; incompressible chunks close it at upload_body."""
    image = make_disk("c" * 13 + "rrr", seed=54)
    path = tmp_path / "mixed.img"
    path.write_bytes(image)
    token = collector.token
    async with BodyRecorder(server.url, token) as recorder:
        recorder.bodies = []
        result = await backup_file(recorder, path, "vm-b", upload_body=MiB, missing_batch=32)
    bodies = recorder.bodies
    assert result.uploaded_chunks == 16 and sum(len(b) for b in bodies) == 16
    for body in bodies:
        raw = sum(f.raw_len for f in body)
        stored = sum(len(f.payload) for f in body)
        # a body closes at the frame that reaches a bound, so it exceeds it by less than one frame
        assert raw - body[-1].raw_len < RAW_PER_BODY * MiB and stored - len(body[-1].payload) < MiB
    assert [f.codec for b in bodies for f in b].count(CODEC_RAW) == 3  # random chunks travel uncompressed
    assert len(bodies) >= 5  # 13 compressible MiB close 3 bodies by raw bytes, 3 random MiB one each
    assert await restore(admin, result.point_id, "mixed.img") == image


class SlowMissing(Client):
    """The real client with a slow `missing` answer, noting how many bytes the collector had read when each
    question went out and when its answer came back."""

    events: list[tuple[str, int]]
    progress: Progress

    async def missing(self, sid: str, digests: list[bytes]) -> bytes:
        self.events.append(("ask", self.progress.done))
        await asyncio.sleep(0.2)
        answer = await super().missing(sid, digests)
        self.events.append(("answer", self.progress.done))
        return answer


async def test_reading_goes_on_while_one_batch_is_sent(tmp_path: Path, server: ServerProcess,
                                                       collector: Client, admin: Client) -> None:
    """While a batch waits for `missing` (and its compression), the next batch is read and hashed; but only
    one batch (half of `missing_batch`) is sent at a time, so no more than one further half is read meanwhile
    (memory holds at most `missing_batch` raw chunks) and batches reach the upload bodies in read order."""
    image = make_disk("r" * 24, seed=55)
    path = tmp_path / "overlap.img"
    path.write_bytes(image)
    batch = 4  # sent as halves of 2 chunks
    async with SlowMissing(server.url, collector.token) as client:
        client.events, client.progress = [], quiet()
        source = FileSource(path, "vm-o")
        with source.begin("vm-o") as b:
            result = await run_backup(client, b, options=Options(missing_batch=batch, read_size=2 * MiB),
                                      progress=client.progress)
    events = client.events
    assert [kind for kind, _ in events] == ["ask", "answer"] * 12  # never two halves in flight
    half = batch // 2 * MiB
    answers = [done for kind, done in events if kind == "answer"]
    ahead = [done - n * half for n, done in enumerate(answers, 1)]  # read beyond the halves asked about so far
    assert max(ahead) > 0  # the loop kept reading while a half was out
    assert max(ahead) <= half  # ...but at most the next half
    assert result.uploaded_chunks == 24 and result.disks[0].missing_chunks == 24
    assert await restore(admin, result.point_id, "overlap.img") == image


async def test_interrupted_backup_resumes_without_resending(tmp_path: Path, collector: Client,
                                                            admin: Client) -> None:
    image = make_disk("r" * 40, seed=53)
    path = tmp_path / "big.img"
    path.write_bytes(image)
    options = {"state_dir": tmp_path / "state", "upload_body": 2 * MiB, "missing_batch": 4}
    source = FileSource(path, "vm-k")
    with source.begin("vm-k") as b, pytest.raises(Interrupt):
        await run_backup(collector, b, options=Options(**options), progress=KillAt(30 * MiB))
    await asyncio.sleep(0.5)  # let the server finish requests whose bodies it already had
    stored_before = (await admin.repository())["chunk_count"]
    assert stored_before >= 16  # a good part reached the server before the "kill"
    assert list((tmp_path / "state").iterdir())  # the session id was kept
    result = await backup_file(collector, path, "vm-k", **options)
    assert result.resumed_session
    assert result.uploaded_chunks == 40 - stored_before  # nothing sent twice
    assert await restore(admin, result.point_id, "big.img") == image
    assert not list((tmp_path / "state").iterdir())
