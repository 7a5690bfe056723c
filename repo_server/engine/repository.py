"""A repository on disk: descriptor, index, chunk store, points and sessions, opened together.

    <data>/repo.toml    repository id, format version, chunk size, created
    <data>/index/       RocksDB index (rebuildable from packs and point files)
    <data>/packs/       pack files
    <data>/points/      restore point records
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chunkyard.wire import ZERO, digest

from .barrier import GcBarrier
from .chunk_store import ChunkStore, NewChunk, RecoveryReport
from .codec import compress
from .durable import write_atomic
from .errors import EngineError, Invalid, NotFound
from .index import Index
from .keyring import KeyProblem, Keyring, fingerprint, load_key, new_master, save_key
from .manifest import split_page
from .pack import FLAG_META
from .points import PointStore
from .sessions import SessionStore
from .tenants import Possession, rebuild_possession
from .tokens import TokenStore

Pin = Callable[[list[bytes]], None]
FORMAT_VERSION = 1
PASSPHRASE_ENV = "CHUNKYARD_PASSPHRASE"
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 256 << 10
MAX_CHUNK_SIZE = 8 << 20


class RepositoryError(EngineError):
    code = "repository_error"


@dataclass(frozen=True)
class Descriptor:
    repository_id: str
    format_version: int
    chunk_size: int
    created: float
    encryption: str = "none"  # or "aes-256-gcm"
    key_fingerprint: str = ""

    def to_toml(self) -> str:
        return (
            "# Chunkyard repository descriptor. Do not edit: the chunk size and the key are fixed for life.\n"
            f'repository_id = "{self.repository_id}"\n'
            f"format_version = {self.format_version}\n"
            f"chunk_size = {self.chunk_size}\n"
            f"created = {self.created}\n"
            f'encryption = "{self.encryption}"\n'
            f'key_fingerprint = "{self.key_fingerprint}"\n'
        )


def check_chunk_size(chunk_size: int) -> int:
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0):
        raise Invalid(f"chunk size must be a power of two from 256 KiB to 8 MiB; got {chunk_size}",
                      "bad_chunk_size")
    return chunk_size


def init_repository(data: Path, chunk_size: int = DEFAULT_CHUNK_SIZE, *, encrypt: bool = True,
                    passphrase: str | None = None, master: bytes | None = None) -> Descriptor:
    """Create an empty repository; refuse to touch a directory that already holds one. Encrypted unless
    told otherwise: the key is wrapped by `passphrase`, or else kept in repo.key (see keyring.py).
    `master` imports an existing key (attaching a bucket after losing the site)."""
    check_chunk_size(chunk_size)
    if (data / "repo.toml").exists():
        raise RepositoryError(f"{data} already holds a repository (repo.toml exists)", "already_exists")
    data.mkdir(parents=True, exist_ok=True)
    for sub in ("packs", "points"):
        (data / sub).mkdir(exist_ok=True)
    fp = ""
    if encrypt:
        master = master or new_master()
        save_key(data, master, passphrase)
        fp = fingerprint(master)
    desc = Descriptor(str(uuid.uuid4()), FORMAT_VERSION, chunk_size, round(time.time(), 3),
                      "aes-256-gcm" if encrypt else "none", fp)
    write_atomic(data / "repo.toml", desc.to_toml().encode())
    return desc


def open_keyring(data: Path, desc: Descriptor, passphrase: str | None) -> Keyring:
    if desc.encryption == "none":
        return Keyring.plain()
    if desc.encryption != "aes-256-gcm":
        raise RepositoryError(f"unknown encryption {desc.encryption!r} in repo.toml", "bad_descriptor")
    master = load_key(data, passphrase)
    if fingerprint(master) != desc.key_fingerprint:
        raise KeyProblem(f"this key (fingerprint {fingerprint(master)}) is not the repository's "
                         f"({desc.key_fingerprint})", "wrong_key")
    return Keyring(master)


def read_descriptor(data: Path) -> Descriptor:
    path = data / "repo.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RepositoryError(
            f"{data} is not a Chunkyard repository (no repo.toml); create one with `chunkyard init --data {data}`",
            "no_repository",
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{path} is not valid TOML: {e}", "bad_descriptor") from None
    try:
        desc = Descriptor(str(raw["repository_id"]), int(raw["format_version"]), int(raw["chunk_size"]),
                          float(raw["created"]), str(raw.get("encryption", "none")),
                          str(raw.get("key_fingerprint", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise RepositoryError(f"{path} lacks or mistypes a field: {e}", "bad_descriptor") from None
    if desc.format_version != FORMAT_VERSION:
        raise RepositoryError(f"{path}: format version {desc.format_version} is not supported "
                              f"(this build reads version {FORMAT_VERSION})", "bad_descriptor")
    check_chunk_size(desc.chunk_size)
    return desc


class Repository:
    """Everything the server needs, opened with recovery. One process at a time (a lock file)."""

    def __init__(self, data: Path, *, pack_size: int = 32 << 20, cache_bytes: int = 128 << 20,
                 passphrase: str | None = None):
        self.data = data
        self.descriptor = read_descriptor(data)
        self.chunk_size = self.descriptor.chunk_size
        self.keyring = open_keyring(data, self.descriptor,
                                    passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV))
        self._lock_fd = os.open(data / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RepositoryError(f"{data} is in use by another Chunkyard process (a running server?); "
                                  "stop it or talk to it over HTTP", "locked") from None
        try:
            self.index = Index(data / "index", cache_bytes=cache_bytes)
        except Exception as e:
            os.close(self._lock_fd)
            raise RepositoryError(f"cannot open the index in {data / 'index'}: {e}; "
                                  "`chunkyard repair --rebuild-index` rebuilds it from the packs", "bad_index") from e
        self.barrier = GcBarrier()
        self.gc_lock = threading.Lock()
        self.chunks = ChunkStore(self.index, data / "packs", self.barrier, self.keyring, pack_size=pack_size)
        self.points = PointStore(self.index, data / "points", self.keyring)
        self.possession = Possession(self.index)
        self.sessions = SessionStore(self)
        self.tokens = TokenStore(self.index)
        self.recovery: RecoveryReport = self.chunks.recover()
        added, self.points_dropped = self.points.recover()
        self.sessions.mark_recovered(added)
        self.points_recovered = len(added)

    def close(self) -> None:
        self.chunks.close()
        self.index.close()
        os.close(self._lock_fd)

    # ---------------------------------------------------------------- server-side chunks

    def store_data(self, raw: bytes, flags: int = 0, *, pin: Pin | None = None) -> bytes:
        """Store bytes the server itself produced (pages, blobs, re-cut edges); returns the digest."""
        return self._store([raw], flags, pin)[0]

    def store_pages(self, pages: list[bytes], *, pin: Pin | None = None) -> None:
        """Manifest pages of a commit, stored in one durable batch (one fdatasync, not one per page)."""
        self._store(pages, FLAG_META, pin)

    def store_blob(self, data: bytes, *, pin: Pin | None = None) -> dict:
        """A configuration file cut into chunk-size pieces, each stored (deduplicated) as meta."""
        pieces = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        stored = iter(self._store([p for p in pieces if any(p)], FLAG_META, pin))
        return {"size": len(data), "chunks": [next(stored).hex() if any(p) else ZERO.hex() for p in pieces]}

    def chunk_ids(self, digests: list[bytes]) -> list[bytes]:
        """Plain digests -> the ids the repository stores them under (the same when not encrypted)."""
        return split_page(self.keyring.ids(b"".join(digests)))

    def _store(self, raws: list[bytes], flags: int, pin: Pin | None) -> list[bytes]:
        """Pin (so a GC starting now keeps them), then store durably; returns the digests."""
        digests = self.chunk_ids([digest(raw) for raw in raws])
        if pin is not None:
            pin(digests)
        chunks = []
        for raw, d in zip(raws, digests, strict=True):
            codec, stored = compress(raw)
            chunks.append(NewChunk(d, codec | flags, len(raw), stored))
        if chunks:
            self.chunks.put(chunks)
        return digests

    def read_blob(self, point: dict, name: str) -> bytes:
        ref = point.get("blobs", {}).get(name)
        if ref is None:
            raise NotFound(f"point {point['point_id']} has no blob {name!r:.80}", "blob_not_found")
        out = bytearray()
        with self.chunks.reader() as reader:
            for i, piece in enumerate(ref["chunks"]):
                want = min(self.chunk_size, ref["size"] - i * self.chunk_size)
                out += bytes(want) if piece == ZERO.hex() else reader.read_digest(bytes.fromhex(piece))
        return bytes(out)

    def stats(self, tenant: str = "") -> dict:
        """Repository figures; for a tenant only its own (global unique and stored bytes would tell it
        how much other tenants hold and, over time, whether they store what it uploads)."""
        c, p = self.chunks, self.points
        if tenant:
            return {"repository_id": self.descriptor.repository_id, "chunk_size": self.chunk_size,
                    "format_version": self.descriptor.format_version, "tenant": tenant} | p.tenant_stats(tenant)
        return {
            "repository_id": self.descriptor.repository_id,
            "chunk_size": self.chunk_size,
            "format_version": self.descriptor.format_version,
            "logical_bytes": p.logical_bytes,
            "unique_bytes": c.unique_bytes,
            "stored_bytes": c.stored_bytes,
            "encryption": self.descriptor.encryption,
            "key_fingerprint": self.descriptor.key_fingerprint or None,
            "dedup_ratio": round(p.logical_bytes / c.unique_bytes, 3) if c.unique_bytes else None,
            "compression_ratio": round(c.unique_bytes / c.stored_bytes, 3) if c.stored_bytes else None,
            "chunk_count": c.chunk_count,
            "pack_count": c.pack_count,
            "point_count": p.point_count,
            "vm_count": len(p.vms()),
            "warnings": self.warnings(),
        }

    def warnings(self) -> list[str]:
        """What an admin must know and fix, shown by /repository, `chunkyard stats` and the dashboard."""
        if self.descriptor.encryption == "none":
            return ["the repository is not encrypted: its disks and any cloud tier hold every VM's data in the "
                    "clear. Create an encrypted repository (`chunkyard init`, the default) and back up into it"]
        return []


def rebuild_index(data: Path, passphrase: str | None = None) -> dict:
    """Throw the index away and rebuild it from packs and point files. Tokens are carried over when the
    old index still opens; open sessions are lost (collectors start new ones)."""
    read_descriptor(data)
    index_dir = data / "index"
    tokens: list[tuple[bytes, bytes]] = []
    if index_dir.exists():
        try:
            old = Index(index_dir)
            tokens = list(old.scan("tokens"))
            old.close()
        except Exception:  # an unreadable index is exactly what this repairs
            tokens = []
        shutil.move(index_dir, data / f"index.broken-{int(time.time())}")
    repo = Repository(data, passphrase=passphrase)
    try:
        batch = repo.index.batch()
        for key, value in tokens:
            batch.put("tokens", key, value)
        repo.index.write(batch, sync=True)
        possession = rebuild_possession(repo)  # unsynced: one lost entry costs its tenant one upload
        return {"packs_scanned": repo.recovery.packs_scanned, "chunks": repo.chunks.chunk_count,
                "points": repo.points_recovered, "tokens_kept": len(tokens), "possession": possession}
    finally:
        repo.close()
