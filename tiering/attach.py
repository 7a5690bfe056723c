"""Attach (cloud DR): turn an empty directory into the repository a bucket holds, after losing the site.

Downloads the descriptor, point files and markers, packs, retention policies (and the wrapped key), then
rebuilds the index from them and mints a new admin token: tokens are never in the bucket, by design,
so whoever can read the bucket cannot use the API. Encrypted repositories need their key: the paper key
(`--paper-key`), or $CHUNKYARD_PASSPHRASE when the bucket holds the passphrase-wrapped key.

Points are listed before packs: the uploader puts a point only after every pack it needs, so each point
of the listing has its packs in the (later) pack listing even while a server is still copying into it.
An object that does not parse (a pack without its trailer, a point that does not open) is what an upload
cut short by a non-atomic store left behind; the uploader replaces it at its next cycle, and no point
depends on it, so it is skipped and reported. Downloads are resumable (files already complete are kept)
and repo.toml is written last, so running the same command again after an interruption carries on.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from repo_server.engine import Repository, rebuild_index
from repo_server.engine.durable import write_atomic
from repo_server.engine.keyring import KeyProblem, Keyring, fingerprint, from_paper, save_key, unwrap
from repo_server.engine.pack import fsync_dir, read_trailer
from repo_server.engine.points import open_marker

from .layout import DESCRIPTOR, PACKS, POINTS, RETENTION, WRAPPED_KEY, is_point, local_path, pack_id_of
from .retry import Backoff
from .stores import NotFoundError, ObjectInfo, Store

PIECE = 8 << 20  # ranged GETs of this size: bounded memory whatever the pack size
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class AttachError(Exception):
    """Attach cannot proceed; the message says what to do."""


def attach(store: Store, data: Path, *, paper_key: str | None = None, passphrase: str | None = None,
           concurrency: int = 4, backoff: Backoff | None = None, progress: Progress | None = None) -> dict:
    """Make `data` a working copy of the repository in `store`; returns what was done and the new token."""
    backoff = backoff or Backoff()
    descriptor = _fetch(store, DESCRIPTOR, backoff)
    if descriptor is None:
        raise AttachError(f"{store.url} holds no Chunkyard repository (no {DESCRIPTOR})")
    _check_target(data, descriptor)
    try:
        desc = tomllib.loads(descriptor.decode())
        repository_id, encryption = desc["repository_id"], desc.get("encryption", "none")
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise AttachError(f"{store.url}{DESCRIPTOR} is not a valid descriptor: {e}") from None
    wrapped = _fetch(store, WRAPPED_KEY, backoff) if encryption != "none" else None
    master = _master_key(desc, wrapped, paper_key, passphrase) if encryption != "none" else None
    keyring = Keyring(master)

    objects = [o for o in backoff.call(lambda: list(store.list(POINTS)) + list(store.list(PACKS)))
               if local_path(data, o.key) is not None]
    retention = backoff.call(lambda: store.head(RETENTION))
    objects += [retention] if retention is not None else []
    total = sum(o.size for o in objects)
    done = 0
    skipped = []

    def fetch(info: ObjectInfo) -> int:
        path = local_path(data, info.key)
        assert path is not None
        try:
            _download(store, info, path, backoff)
        except NotFoundError:  # deleted since the listing (a prune reaching the cloud): not in the copy
            skipped.append(info.key)
            return info.size
        if not usable(info.key, path, keyring):
            path.unlink()
            skipped.append(info.key)
        return info.size

    data.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="attach") as pool:
        for size in pool.map(fetch, objects):
            done += size
            if progress is not None:
                progress(done, total)

    if wrapped is not None and passphrase and paper_key is None:
        write_atomic(data / WRAPPED_KEY, wrapped, 0o600)  # the bucket's copy, as it was
    elif master is not None:
        save_key(data, master, passphrase)
    write_atomic(data / DESCRIPTOR, descriptor)
    rebuilt = rebuild_index(data, passphrase)
    repo = Repository(data, passphrase=passphrase)
    try:
        token, _ = repo.tokens.create("admin", f"attached from {store.url}")
    finally:
        repo.close()
    token_path = data / "admin.token"
    write_atomic(token_path, token.encode() + b"\n", 0o600)
    return {"repository_id": repository_id, "source": store.url, "objects": len(objects), "bytes": total,
            "packs": rebuilt["packs_scanned"], "chunks": rebuilt["chunks"], "points": rebuilt["points"],
            "encryption": encryption, "skipped": sorted(skipped), "token": token, "token_file": str(token_path)}


def usable(key: str, path: Path, keyring: Keyring) -> bool:
    """A pack with a valid trailer, or a small file that opens and parses (TOML for the descriptor, JSON
    for the rest). Anything else is what an interrupted upload left behind."""
    try:
        if pack_id_of(key) is not None:
            return read_trailer(path) is not None
        if key == DESCRIPTOR:
            return "repository_id" in tomllib.loads(path.read_text())
        raw = path.read_bytes()
        json.loads(keyring.open_file(raw, str(path)) if is_point(key) else
                   open_marker(keyring, raw, str(path)) if key.endswith(".protect") else raw)
        return True
    except (KeyProblem, ValueError):
        return False


def _fetch(store: Store, key: str, backoff: Backoff) -> bytes | None:
    try:
        return backoff.call(lambda: store.get(key))
    except NotFoundError:
        return None


def _check_target(data: Path, descriptor: bytes) -> None:
    """An empty (or missing) directory, or one this same attach left unfinished (its repo.toml is the
    bucket's and no index was built yet)."""
    existing = data / DESCRIPTOR
    if existing.exists() and (existing.read_bytes() != descriptor or (data / "index").exists()):
        raise AttachError(f"{data} already holds a repository: attach into a new, empty directory")
    if not existing.exists() and data.exists() and any(p.name not in ("packs", "points", "keys", RETENTION)
                                                       for p in data.iterdir()):
        raise AttachError(f"{data} is not empty: attach into a new, empty directory")


def _master_key(desc: dict, wrapped: bytes | None, paper_key: str | None, passphrase: str | None) -> bytes:
    """The repository key, checked against the descriptor's fingerprint before anything is downloaded."""
    try:
        if paper_key is not None:
            master = from_paper(paper_key)
        elif wrapped is not None and passphrase:
            master = unwrap(json.loads(wrapped), passphrase)
        else:
            where = ("the bucket holds the passphrase-wrapped key: set CHUNKYARD_PASSPHRASE, or give "
                     if wrapped is not None else
                     "the bucket holds no wrapped key (the repository kept its key in repo.key, never uploaded): "
                     "give ")
            raise AttachError(f"the repository is encrypted and its key is needed: {where}the paper key "
                              "with --paper-key FILE (from `chunkyard key export --paper`)")
    except (KeyProblem, ValueError) as e:
        raise AttachError(f"cannot use the key: {e}") from None
    if fingerprint(master) != desc.get("key_fingerprint"):
        raise AttachError(f"this key (fingerprint {fingerprint(master)}) is not the repository's "
                          f"({desc.get('key_fingerprint')})")
    return master


def _download(store: Store, info: ObjectInfo, path: Path, backoff: Backoff) -> None:
    """One object to its file, in ranged pieces; a file already complete is kept (resuming)."""
    if path.exists() and path.stat().st_size == info.size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    with open(part, "wb") as f:
        for offset in range(0, info.size, PIECE):
            piece = backoff.call(lambda o=offset: store.get(info.key, o, min(o + PIECE, info.size)))
            if len(piece) != min(PIECE, info.size - offset):
                raise AttachError(f"{store.url}{info.key} changed while it was downloaded")
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)
