"""The storage engine without HTTP: pack format and recovery, index rebuild, corruption handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from chunkyard.wire import digest
from repo_server.engine import Repository, init_repository
from repo_server.engine.chunk_store import NewChunk
from repo_server.engine.pack import PackWriter, read_trailer, scan_records
from tests.conftest import ROOT, ServerProcess
from tests.helpers import backup, make_disk, restore


def chunk(repo: Repository, data: bytes) -> NewChunk:
    """A chunk as the engine stores it: under its id (the keyed digest in an encrypted repository)."""
    return NewChunk(repo.chunk_ids([digest(data)])[0], 0, len(data), data)


def test_pack_records_trailer_and_torn_tail(tmp_path: Path) -> None:
    writer = PackWriter.create(tmp_path, 7)
    payloads = [os.urandom(n) for n in (10, 5000, 1)]
    for p in payloads:
        writer.append(digest(p), 0, len(p), p)
    writer.sync()
    path = writer.path
    assert read_trailer(path) is None  # unsealed
    records, end, damaged = scan_records(path)
    assert damaged == []
    assert [r.digest for r in records] == [digest(p) for p in payloads] and end == path.stat().st_size
    with open(path, "ab") as f:  # a torn append: header and half a payload
        f.write(b"CYCK\x00" + (100).to_bytes(4, "little") * 2 + os.urandom(40))
    resumed, damaged = PackWriter.resume(path, 7)
    assert damaged == []
    assert resumed.size == end and len(resumed.records) == 3
    resumed.seal()
    resumed.close()
    assert [r.digest for r in read_trailer(path)] == [digest(p) for p in payloads]


def test_group_commit_dedups_and_rolls_packs(tmp_path: Path) -> None:
    init_repository(tmp_path / "r")
    repo = Repository(tmp_path / "r", pack_size=64 * 1024)
    try:
        data = [os.urandom(30_000) for _ in range(10)]
        first = repo.chunks.put([chunk(repo, d) for d in data] + [chunk(repo, data[0])])
        assert (first.stored, first.duplicate) == (10, 1)
        assert repo.chunks.put([chunk(repo, d) for d in data[:3]]).duplicate == 3
        assert repo.chunks.pack_count >= 4  # 64 KiB packs hold two 30 KB chunks each
        with repo.chunks.reader() as reader:
            assert all(reader.read_digest(repo.chunk_ids([digest(d)])[0]) == d for d in data)
    finally:
        repo.close()
    # Sealed packs carry their trailer, the open one is scanned: reopening loses nothing.
    repo = Repository(tmp_path / "r", pack_size=64 * 1024)
    try:
        assert repo.recovery.records_reindexed == 0 and repo.chunks.chunk_count == 10
    finally:
        repo.close()


def test_second_process_is_refused(tmp_path: Path) -> None:
    init_repository(tmp_path / "r")
    repo = Repository(tmp_path / "r")
    try:
        with pytest.raises(Exception, match="in use by another Chunkyard process"):
            Repository(tmp_path / "r")
    finally:
        repo.close()


async def test_rebuild_index_from_packs_and_points(tmp_path: Path) -> None:
    """Delete the index entirely: `chunkyard repair --rebuild-index` restores every point."""
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    disk = make_disk("rrczr1", seed=3)
    try:
        async with srv.client() as admin:
            token = (await admin.create_token("collector", "c"))["token"]
        async with srv.client(token) as c:
            p1 = await backup(c, "vm1", {"d0": disk})
            changed = disk[:-5] + b"12345"
            p2 = await backup(c, "vm1", {"d0": changed}, only={"d0": {5}})
        srv.stop()
        shutil.rmtree(srv.data / "index")
        out = subprocess.run([sys.executable, "-m", "chunkyard.cli", "repair", "--rebuild-index", "--data",
                              str(srv.data)], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert "2 points" in out.stdout and "0 tokens kept" in out.stdout
        subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--role", "admin", "--data",
                        str(srv.data), "--json"], check=True, capture_output=True, cwd=ROOT)
        out = subprocess.run([sys.executable, "-m", "chunkyard.cli", "token", "create", "--role", "reader",
                              "--data", str(srv.data), "--json"], check=True, capture_output=True, cwd=ROOT)
        reader = json.loads(out.stdout)["token"]
        srv.start()
        async with srv.client(reader) as r:
            assert await restore(r, p1["point_id"], "d0") == disk
            assert await restore(r, p2["point_id"], "d0") == changed
            assert (await r.repository())["point_count"] == 2
    finally:
        srv.stop()


async def test_corrupt_chunk_cuts_the_stream(tmp_path: Path) -> None:
    """A flipped bit in a pack: the restore stops short instead of serving wrong bytes."""
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    try:
        disk = make_disk("rrrr", seed=9)
        async with srv.client() as admin:
            point = await backup(admin, "vm1", {"d0": disk})
            srv.stop()
            pack = sorted((srv.data / "packs").glob("*/*.pack"))[0]
            with open(pack, "r+b") as f:
                f.seek(3 * 1024 * 1024)
                byte = f.read(1)
                f.seek(3 * 1024 * 1024)
                f.write(bytes([byte[0] ^ 1]))
            srv.start()
            with pytest.raises(aiohttp.ClientPayloadError):
                await restore(admin, point["point_id"], "d0")
            first = b"".join([part async for part in admin.stream_disk(point["point_id"], "d0", stop=1 << 20)])
            assert first == disk[: 1 << 20]  # the intact chunks still restore
    finally:
        srv.stop()
    repo = Repository(srv.data)
    try:
        bad = [k for k, _ in repo.index.scan("meta", b"bad/")]
        assert bad == [b"bad/" + repo.chunk_ids([digest(disk[2 << 20 : 3 << 20])])[0]]  # for verify and repair
    finally:
        repo.close()
