"""Encryption at rest: a stolen data directory reveals neither plaintext nor chunk digests; the passphrase
and the paper key work and fail clearly; unencrypted repositories keep working; mixed records are refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chunkyard.wire import ApiError, digest
from repo_server.engine import Repository, init_repository
from repo_server.engine.chunk_store import NewChunk
from repo_server.engine.codec import CodecError
from repo_server.engine.keyring import KeyProblem, Keyring, from_paper, paper_key
from tests.conftest import ROOT, ServerProcess
from tests.helpers import MiB, backup, chunks_of, make_disk, restore

SECRET = b"PAYROLL-2026-CONFIDENTIAL-Alice-Bob-"
NOTE = "legal hold: CASE-4711-Alice-v-Bob"
PASS = {"CHUNKYARD_PASSPHRASE": "correct horse battery staple"}


def cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | (env or {}), input=stdin)


def secret_disk() -> bytes:
    text = (SECRET * (MiB // len(SECRET) + 1))[:MiB]
    return text + make_disk("r", seed=4) + text[::-1] + bytes(MiB)


def tree_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


@pytest.fixture
def sealed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHUNKYARD_PASSPHRASE", PASS["CHUNKYARD_PASSPHRASE"])  # init and serve both see it
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    yield srv
    srv.stop()


async def test_stolen_data_directory_reveals_nothing(sealed_server: ServerProcess) -> None:
    disk = secret_disk()
    async with sealed_server.client() as admin:
        point = await backup(admin, "vm-payroll", {"d0": disk})
        await admin.put_blob((await admin.create_session(host="h", vm={"id": "vm-x"}, disks=[
            {"disk_id": "d0", "size": 10}]))["session_id"], "vm.vmcx", SECRET * 10)
        await admin.protect(point["point_id"], note=NOTE)
        stats = await admin.repository()
        assert (stats["encryption"], stats["warnings"]) == ("aes-256-gcm", [])
        shown = cli("stats", "--server", sealed_server.url, "--token", sealed_server.admin_token)
        assert shown.returncode == 0 and "WARNING" not in shown.stdout
    sealed_server.stop()
    assert not (sealed_server.data / "repo.key").exists()  # the key exists only wrapped by the passphrase
    needles = [SECRET, SECRET[::-1], NOTE.encode(), b'"since"']
    for piece in chunks_of(disk, MiB):
        if any(piece):
            needles += [digest(piece), digest(piece).hex().encode()]
    for path, data in tree_bytes(sealed_server.data):
        for needle in needles:
            assert needle not in data, f"{path} holds {needle[:16]!r}"
    sealed_server.start()
    async with sealed_server.client() as admin:
        assert await restore(admin, point["point_id"], "d0") == disk
        assert (await admin.point(point["point_id"]))["protection"]["note"] == NOTE


async def test_plain_protection_markers_of_older_versions(sealed_server: ServerProcess) -> None:
    """A marker written in plain JSON (before markers were sealed) still protects, and is sealed at startup."""
    async with sealed_server.client() as admin:
        point = await backup(admin, "vm1", {"d0": make_disk("r", seed=5)})
    sealed_server.stop()
    marker = sealed_server.data / "points" / "vm1" / f"{point['point_id']}.protect"
    marker.write_text(json.dumps({"note": NOTE, "since": 1700000000.0}))
    sealed_server.start()
    async with sealed_server.client() as admin:
        assert (await admin.point(point["point_id"]))["protection"] == {"note": NOTE, "since": 1700000000.0}
        with pytest.raises(ApiError, match="protected"):
            await admin.delete_point(point["point_id"])
    assert NOTE.encode() not in marker.read_bytes()


def test_wrong_or_missing_passphrase_is_clear_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli("init", "--data", str(data), env=PASS).returncode == 0
    before = tree_bytes(data)
    wrong = cli("token", "list", "--data", str(data), env={"CHUNKYARD_PASSPHRASE": "nope"})
    assert wrong.returncode == 2 and "wrong passphrase" in wrong.stderr
    missing = subprocess.run([sys.executable, "-m", "chunkyard.cli", "serve", "--data", str(data)], cwd=ROOT,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={k: v for k, v in os.environ.items() if k != "CHUNKYARD_PASSPHRASE"})
    assert missing.returncode == 2 and "CHUNKYARD_PASSPHRASE" in missing.stderr
    assert tree_bytes(data) == before


async def test_paper_key_brings_a_copied_repository_back(tmp_path: Path) -> None:
    """Key-file mode (no passphrase, like `make run`): export the paper key, lose the key file, import the
    paper key on a "fresh machine" holding only the data, and every point restores."""
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    disk = secret_disk()
    async with srv.client() as admin:
        point = await backup(admin, "vm1", {"d0": disk})
    srv.stop()
    exported = cli("key", "export", "--paper", "--data", str(srv.data))
    assert exported.returncode == 0
    paper = exported.stdout.strip().splitlines()[-1]
    assert paper.startswith("CY1-")
    moved = tmp_path / "fresh" / "data"
    shutil.copytree(srv.data, moved)
    (moved / "repo.key").unlink()
    refused = cli("token", "list", "--data", str(moved))
    assert refused.returncode == 2 and "chunkyard key import" in refused.stderr
    typo = paper[:10] + ("A" if paper[10] != "A" else "B") + paper[11:]  # a mistyped character
    assert "typos" in cli("key", "import", "-", "--data", str(moved), stdin=typo).stderr
    assert cli("key", "import", "-", "--data", str(moved), stdin=paper).returncode == 0
    fresh = ServerProcess(moved)
    fresh.start()
    try:
        async with fresh.client() as admin:
            assert await restore(admin, point["point_id"], "d0") == disk
    finally:
        fresh.stop()


def test_change_passphrase(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli("init", "--data", str(data))
    assert (data / "repo.key").exists()
    changed = cli("key", "change-passphrase", "--data", str(data), env={"CHUNKYARD_NEW_PASSPHRASE": "s3cret-phrase"})
    assert changed.returncode == 0 and not (data / "repo.key").exists()
    assert cli("token", "list", "--data", str(data), env={"CHUNKYARD_PASSPHRASE": "s3cret-phrase"}).returncode == 0
    fp = cli("key", "show-fingerprint", "--data", str(data)).stdout.strip()
    assert fp in (data / "repo.toml").read_text()


async def test_unencrypted_repository_still_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = cli("init", "--data", str(data), "--no-encrypt")
    assert out.returncode == 0 and "NOT encrypted" in out.stdout
    srv = ServerProcess(data)
    srv.start()
    try:
        disk = secret_disk()
        async with srv.client() as admin:
            point = await backup(admin, "vm1", {"d0": disk})
            stats = await admin.repository()
            assert stats["encryption"] == "none"
            assert [w.split(":")[0] for w in stats["warnings"]] == ["the repository is not encrypted"]
            assert await restore(admin, point["point_id"], "d0") == disk
            await admin.protect(point["point_id"], note=NOTE)
        shown = cli("stats", "--server", srv.url, "--token", srv.admin_token)
        assert shown.returncode == 0 and shown.stdout.startswith("WARNING: the repository is not encrypted: ")
        assert "warnings" not in shown.stdout  # shown once, on top, not as a row of the table
    finally:
        srv.stop()
    assert any(SECRET in data for _, data in tree_bytes(data / "packs"))  # the warning was not idle
    marker = data / "points" / "vm1" / f"{point['point_id']}.protect"
    assert json.loads(marker.read_bytes())["note"] == NOTE  # unencrypted repositories keep plain JSON


def test_mixed_records_and_files_are_refused(tmp_path: Path) -> None:
    init_repository(tmp_path / "plain", encrypt=False)
    repo = Repository(tmp_path / "plain")
    try:
        raw = b"x" * 100
        repo.chunks.put([NewChunk(digest(raw), 0, len(raw), raw)])
        loc = repo.index.locate(digest(raw))
        with repo.chunks.reader() as reader:
            stored = reader.read_stored(loc)
        sealed_rec = type(loc.record)(loc.record.digest, loc.record.offset, loc.record.stored_len,
                                      loc.record.raw_len, loc.record.flags | 0x08)
        with pytest.raises(CodecError, match="not encrypted"):
            repo.chunks.decode(sealed_rec, stored)
    finally:
        repo.close()
    keyring = Keyring(os.urandom(32))
    with pytest.raises(KeyProblem, match="mixed"):
        keyring.open_file(b'{"point_id": 1}', "p.json")
    with pytest.raises(KeyProblem, match="no key"):
        Keyring.plain().open_file(keyring.seal_file(b"{}"), "p.json")
    master = os.urandom(32)
    assert from_paper(paper_key(master)) == master
    assert hashlib.sha256(master).digest() != hashlib.sha256(keyring.master or b"").digest()


def test_chunk_ids_per_thread_contexts() -> None:
    """Chunk ids reuse one AES context per thread: every thread converts correctly, and an input that is not
    whole digests is refused before it could leave a partial block behind in the context."""
    keyring = Keyring(os.urandom(32))
    digests = b"".join(digest(bytes([i])) for i in range(64))
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: keyring.ids(digests), range(64)))
        back = list(pool.map(keyring.digests, ids))
    assert len(set(ids)) == 1 and ids[0] != digests and all(b == digests for b in back)
    with pytest.raises(ValueError, match="whole 32-byte digests"):
        keyring.ids(digests[:40])
    assert keyring.ids(digests) == ids[0]  # the refused call left nothing behind
