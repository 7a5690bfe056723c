"""`chunkyard restore` as a user runs it: the CLI in a subprocess against a real server process.

Covers raw and VHDX restores checked against the source image, resuming a real partial download
(Range + If-Range), a stale part from another point starting over, the final digest-map check,
a chunk that rots in its pack, and the refusals (existing FILE, unknown or ambiguous disk).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from chunkyard.cli import build_parser
from chunkyard.restore import part_paths
from chunkyard.vdisk import open_vhdx
from chunkyard.wire import API_PREFIX, Client, digest
from repo_server.engine.pack import RECORD_HEADER, RECORD_MAGIC
from repo_server.engine.repository import open_keyring, read_descriptor
from tests.conftest import ROOT, ServerProcess, require_tool
from tests.helpers import MiB, backup, make_disk

DIGEST_AT = RECORD_HEADER.size - 32 - 4  # a record header is magic flags raw_len stored_len digest crc


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkyard.cli", "restore", *args, "--server", server.url,
         "--token", server.admin_token],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def restore_ok(server: ServerProcess, *args: str) -> dict:
    """Run a restore that must succeed; its --json summary."""
    result = cli(server, *args, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["verified"] is True
    return summary


def restore_fails(server: ServerProcess, *args: str) -> str:
    """Run a restore that must fail the way user errors do (exit 2, no traceback); its message."""
    result = cli(server, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


async def partial_download(server: ServerProcess, path: str, length: int) -> tuple[bytes, str]:
    """The first `length` bytes of a download and its ETag: what an interrupted restore leaves behind."""
    headers = {"Authorization": f"Bearer {server.admin_token}", "Range": f"bytes=0-{length - 1}"}
    async with aiohttp.ClientSession() as http, http.get(server.url + API_PREFIX + path, headers=headers) as r:
        assert r.status == 206
        return await r.read(), r.headers["ETag"]


def leave_part(out: Path, data: bytes, etag: str) -> None:
    part, tag = part_paths(out)
    part.write_bytes(data)
    tag.write_text(etag)


def flip_stored_byte(data_dir: Path, chunk: bytes) -> None:
    """Flip a byte in the middle of a chunk's payload in its pack (bit rot); calling it again repairs it."""
    want = open_keyring(data_dir, read_descriptor(data_dir), None).id(digest(chunk))  # the id at rest
    for pack in data_dir.glob("packs/*/*.pack"):
        blob = bytearray(pack.read_bytes())
        at = blob.find(want)
        while at >= 0:
            record = at - DIGEST_AT
            if blob[record : record + len(RECORD_MAGIC)] == RECORD_MAGIC:
                stored_len = RECORD_HEADER.unpack_from(blob, record)[3]
                blob[record + RECORD_HEADER.size + stored_len // 2] ^= 0xFF
                pack.write_bytes(blob)
                return
            at = blob.find(want, at + 1)
    raise AssertionError("chunk not found in any pack")


async def test_restore_raw_and_vhdx(collector: Client, server: ServerProcess, tmp_path: Path) -> None:
    disk = make_disk("rzr1zzc1", tail=70_001, seed=41)  # zero runs, a repeat, an odd-sized tail
    point = (await backup(collector, "vm-a", {"d0": disk}))["point_id"]

    result = cli(server, point, "--disk", "d0", "--format", "raw", "-o", str(tmp_path / "d0.raw"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d0.raw").read_bytes() == disk
    assert "verified" in result.stdout
    assert f"download d0.raw: {len(disk) / MiB:.1f} MiB in" in result.stderr  # the final progress line
    assert not part_paths(tmp_path / "d0.raw")[1].exists()

    vhdx = tmp_path / "d0.vhdx"
    summary = restore_ok(server, point, "-o", str(vhdx))  # one disk: --disk may be left out; vhdx by default
    assert summary["disk_id"] == "d0" and summary["format"] == "vhdx"
    assert summary["bytes"] == vhdx.stat().st_size and summary["resumed_from"] == 0
    padded = disk + bytes(-len(disk) % 512)  # VHDX sizes are whole sectors
    with open_vhdx(vhdx) as image:
        assert image.read(0, image.virtual_size) == padded
    qemu_img = require_tool("qemu-img")
    subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(vhdx), str(tmp_path / "q.raw")], check=True)
    assert (tmp_path / "q.raw").read_bytes() == padded


async def test_resume_stale_part_and_final_check(collector: Client, admin: Client, server: ServerProcess,
                                                 tmp_path: Path) -> None:
    old = make_disk("rrcr", seed=42, tail=999)
    new = make_disk("rrrc", seed=43, tail=999)
    p1 = (await backup(collector, "vm-r", {"d0": old}))["point_id"]
    p2 = (await backup(collector, "vm-r", {"d0": new}))["point_id"]

    # A real partial raw download: resumed with a ranged request, bytes exact.
    out = tmp_path / "old.raw"
    leave_part(out, *await partial_download(server, f"/points/{p1}/disks/d0/raw", 2 * MiB + 4321))
    summary = restore_ok(server, p1, "--format", "raw", "-o", str(out))
    assert summary["resumed_from"] == 2 * MiB + 4321
    assert summary["downloaded"] == len(old) - summary["resumed_from"]
    assert out.read_bytes() == old
    assert not any(p.exists() for p in part_paths(out))

    # The same for a VHDX: the generated layout is deterministic, so the pieces join up.
    out = tmp_path / "new.vhdx"
    leave_part(out, *await partial_download(server, f"/points/{p2}/disks/d0/vhdx", 3 * MiB + 17))
    assert restore_ok(server, p2, "-o", str(out))["resumed_from"] == 3 * MiB + 17
    whole = b"".join([b async for b in admin.stream_disk(p2, "d0", fmt="vhdx")])
    assert out.read_bytes() == whole

    # A part left by another point's download: its ETag no longer matches, the server sends it all.
    out = tmp_path / "stale.raw"
    leave_part(out, *await partial_download(server, f"/points/{p1}/disks/d0/raw", 3 * MiB))
    summary = restore_ok(server, p2, "--format", "raw", "-o", str(out))
    assert summary["resumed_from"] == 0
    assert out.read_bytes() == new

    # A complete part whose bytes went bad on the local disk: the server has nothing left to send (416),
    # the final check against the digest map catches it, FILE is not created, and a rerun starts afresh.
    out = tmp_path / "bad.raw"
    damaged = bytearray(old)
    damaged[MiB + 5] ^= 1
    _, etag = await partial_download(server, f"/points/{p1}/disks/d0/raw", 1)
    leave_part(out, bytes(damaged), etag)
    message = restore_fails(server, p1, "--format", "raw", "-o", str(out))
    assert "verification failed: chunk 1 (bytes 1048576-2097151) does not match the point's digest map" in message
    assert f"kept as {part_paths(out)[0]}" in message
    assert not out.exists() and part_paths(out)[0].read_bytes() == damaged
    assert restore_ok(server, p1, "--format", "raw", "-o", str(out))["resumed_from"] == 0
    assert out.read_bytes() == old


async def test_chunk_rotting_in_its_pack(collector: Client, server: ServerProcess, tmp_path: Path) -> None:
    """The server cuts the stream at a chunk that fails its check; the CLI retries, gives up with a clear
    message, leaves no FILE, and once the pack is repaired the next run resumes at that chunk."""
    disk = make_disk("rrrrrr", seed=44)
    point = (await backup(collector, "vm-c", {"d0": disk}))["point_id"]
    bad = disk[3 * MiB : 4 * MiB]
    server.stop()
    flip_stored_byte(server.data, bad)
    server.start()

    out = tmp_path / "d0.raw"
    message = restore_fails(server, point, "--format", "raw", "-o", str(out), "--attempts", "2")
    assert "retrying in 1 s" in message
    assert "failed 2 times in a row at byte 3145728" in message
    assert "the server ended the stream early, as it does when a stored chunk fails its check" in message
    assert not out.exists()
    assert part_paths(out)[0].read_bytes() == disk[: 3 * MiB]  # everything before the bad chunk is kept

    server.stop()
    flip_stored_byte(server.data, bad)
    server.start()
    summary = restore_ok(server, point, "--format", "raw", "-o", str(out))
    assert summary["resumed_from"] == 3 * MiB
    assert out.read_bytes() == disk


async def test_refusals(collector: Client, server: ServerProcess, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    disks = {"sys": make_disk("rc", seed=45), "data": make_disk("zr", seed=46)}
    point = (await backup(collector, "vm-t", disks))["point_id"]
    out = tmp_path / "disk.vhdx"
    out.write_bytes(b"precious")

    assert "exists: pass --force" in restore_fails(server, point, "--disk", "sys", "-o", str(out))
    assert out.read_bytes() == b"precious"
    x = str(tmp_path / "x")
    assert f"point {point} has no disk 'nope'; its disks: sys, data" in restore_fails(server, point, "--disk", "nope",
                                                                                      "-o", x)
    assert "has 2 disks (sys, data): choose one with --disk" in restore_fails(server, point, "-o", x)
    assert "no restore point 00000000000000000000" in restore_fails(server, "00000000000000000000", "-o", x)
    assert not any(tmp_path.glob("x*"))

    restore_ok(server, point, "--disk", "data", "--format", "raw", "-o", str(out), "--force")
    assert out.read_bytes() == disks["data"]

    with pytest.raises(SystemExit):
        build_parser().parse_args(["restore", "--help"])
    assert "resumes where it stopped" in capsys.readouterr().out
