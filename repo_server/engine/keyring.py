"""Encryption at rest: the repository's master key, its wrapping, and what it keys.

- The master key (256 bits, random) is kept either wrapped by a passphrase (scrypt -> AES-256-GCM,
  `keys/master.json`) or, where no passphrase can be asked (`make run`, CI, a service's first start),
  in a key file `repo.key` (mode 0600) that the admin must back up as a paper key.
- Two subkeys are derived with BLAKE3's key derivation: one seals pack record payloads and point files
  (AES-256-GCM, a random 96-bit nonce per object, the record header as associated data), one turns chunk
  digests into the **chunk ids** that are written at rest.
- A chunk id is AES-256 of each 16-byte half of the digest (a keyed pseudorandom permutation): without the
  key a stolen disk cannot confirm that a known file is stored; with it, ids turn back into digests (the
  digest map a collector downloads). One AES call converts a whole batch, so `missing` stays fast.
  ZERO stays ZERO: it is a sentinel, not a digest.
An unencrypted repository uses the identity for ids and stores payloads as they are.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from chunkyard.wire import DIGEST_LEN, ZERO

from .errors import EngineError

KEY_FILE = "repo.key"
WRAPPED_FILE = Path("keys") / "master.json"
SCRYPT = {"n": 1 << 15, "r": 8, "p": 1}
SEALED_MAGIC = b"CYENC1"
NONCE = 12
TAG = 16


class KeyProblem(EngineError):
    code = "key_error"


def fingerprint(master: bytes) -> str:
    """A short public name of the key (BLAKE3-derived, reveals nothing of it)."""
    return blake3.blake3(master, derive_key_context="chunkyard 2026 key fingerprint").hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """What the master key keys. `Keyring.plain()` is the unencrypted repository's."""

    master: bytes | None

    @classmethod
    def plain(cls) -> Keyring:
        return cls(None)

    @property
    def encrypted(self) -> bool:
        return self.master is not None

    def _subkey(self, purpose: str) -> bytes:
        assert self.master is not None
        return blake3.blake3(self.master, derive_key_context=f"chunkyard 2026 {purpose}").digest()

    def __post_init__(self) -> None:
        if self.master is not None:
            object.__setattr__(self, "_aead", AESGCM(self._subkey("record sealing")))
            object.__setattr__(self, "_ids", Cipher(algorithms.AES(self._subkey("chunk ids")), modes.ECB()))
            object.__setattr__(self, "_contexts", threading.local())

    def _context(self, kind: str, data: bytes) -> Any:
        """This thread's ECB encryptor or decryptor. ECB keeps no state between whole blocks, so one context
        serves every call; creating one per chunk read cost half as much CPU as its AES-GCM (RESULTS.md)."""
        if len(data) % DIGEST_LEN:  # a partial block would stay in the context and shift every later answer
            raise ValueError(f"chunk ids convert whole {DIGEST_LEN}-byte digests; got {len(data)} bytes")
        local = self._contexts  # type: ignore[attr-defined]
        ctx = getattr(local, kind, None)
        if ctx is None:
            ids = self._ids  # type: ignore[attr-defined]
            ctx = ids.encryptor() if kind == "enc" else ids.decryptor()
            setattr(local, kind, ctx)
        return ctx

    # ------------------------------------------------------------------ chunk ids

    def ids(self, digests: bytes) -> bytes:
        """Digests back to back -> ids back to back (ZERO entries stay ZERO)."""
        if self.master is None or not digests:
            return digests
        return self._keep_zero(digests, self._context("enc", digests).update(digests))

    def digests(self, ids: bytes) -> bytes:
        """The inverse of `ids`."""
        if self.master is None or not ids:
            return ids
        return self._keep_zero(ids, self._context("dec", ids).update(ids))

    @staticmethod
    def _keep_zero(before: bytes, after: bytes) -> bytes:
        if ZERO not in before:
            return after
        out = bytearray(after)
        for i in range(0, len(before), DIGEST_LEN):
            if before[i : i + DIGEST_LEN] == ZERO:
                out[i : i + DIGEST_LEN] = ZERO
        return bytes(out)

    def id(self, digest: bytes) -> bytes:
        return self.ids(digest)

    # ------------------------------------------------------------------ sealing

    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, data, aad)  # type: ignore[attr-defined]

    def open(self, sealed: bytes | memoryview, aad: bytes) -> bytes:
        """Raises InvalidTag when the bytes or their header were changed (handled like bit rot).
        Sliced through a memoryview: copying the body first cost more than the decryption (a fresh
        half-MiB buffer per chunk is page-faulted in; see benchmarks/RESULTS.md, encryption cost)."""
        view = memoryview(sealed)
        return self._aead.decrypt(view[:NONCE], view[NONCE:], aad)  # type: ignore[attr-defined]

    def seal_file(self, data: bytes) -> bytes:
        """Whole small files (point records): magic, then a sealed body."""
        return data if self.master is None else SEALED_MAGIC + self.seal(data, SEALED_MAGIC)

    def open_file(self, data: bytes, name: str) -> bytes:
        if not data.startswith(SEALED_MAGIC):
            if self.master is not None:
                raise KeyProblem(f"{name} is not encrypted but the repository is: refusing a mixed repository")
            return data
        if self.master is None:
            raise KeyProblem(f"{name} is encrypted but the repository has no key")
        try:
            return self.open(data[len(SEALED_MAGIC) :], SEALED_MAGIC)
        except InvalidTag:
            raise KeyProblem(f"{name} fails authentication (damaged, or another repository's key)") from None


# ---------------------------------------------------------------------- storing the master key

def _kdf(passphrase: str, salt: bytes, params: dict) -> bytes:
    return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(passphrase.encode())


def wrap(master: bytes, passphrase: str) -> dict:
    salt, nonce = os.urandom(16), os.urandom(NONCE)
    wrapped = AESGCM(_kdf(passphrase, salt, SCRYPT)).encrypt(nonce, master, b"chunkyard master key")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"kdf": "scrypt", **SCRYPT, "salt": b64(salt), "nonce": b64(nonce), "wrapped": b64(wrapped),
            "fingerprint": fingerprint(master)}


def unwrap(doc: dict, passphrase: str) -> bytes:
    try:
        salt, nonce, wrapped = (base64.b64decode(doc[k]) for k in ("salt", "nonce", "wrapped"))
        key = _kdf(passphrase, salt, {k: int(doc[k]) for k in ("n", "r", "p")})
        return AESGCM(key).decrypt(nonce, wrapped, b"chunkyard master key")
    except InvalidTag:
        raise KeyProblem("wrong passphrase for this repository's key", "wrong_passphrase") from None
    except (KeyError, ValueError, TypeError) as e:
        raise KeyProblem(f"the wrapped key file is malformed: {e}", "bad_key_file") from None


def new_master() -> bytes:
    return secrets.token_bytes(32)


def save_key(data: Path, master: bytes, passphrase: str | None) -> str:
    """Store the master key: wrapped by the passphrase, or (no passphrase) in repo.key, mode 0600.
    Returns where it went."""
    from .durable import write_atomic

    if passphrase:
        write_atomic(data / WRAPPED_FILE, json.dumps(wrap(master, passphrase), indent=2).encode(), 0o600)
        (data / KEY_FILE).unlink(missing_ok=True)
        return str(data / WRAPPED_FILE)
    write_atomic(data / KEY_FILE, paper_key(master).encode() + b"\n", 0o600)
    return str(data / KEY_FILE)


def load_key(data: Path, passphrase: str | None) -> bytes:
    """The master key from repo.key, or unwrapped with the passphrase; clear errors otherwise."""
    key_file, wrapped = data / KEY_FILE, data / WRAPPED_FILE
    if key_file.exists():
        return from_paper(key_file.read_text())
    if not wrapped.exists():
        raise KeyProblem(f"{data} is encrypted but holds neither {KEY_FILE} nor {WRAPPED_FILE}: import the paper "
                        "key with `chunkyard key import`", "no_key")
    if not passphrase:
        raise KeyProblem("the repository key is protected by a passphrase: set CHUNKYARD_PASSPHRASE (or run "
                        "on a terminal to be asked)", "passphrase_needed")
    try:
        doc = json.loads(wrapped.read_text())
    except ValueError as e:
        raise KeyProblem(f"{wrapped} is not valid JSON: {e}", "bad_key_file") from None
    return unwrap(doc, passphrase)


# ---------------------------------------------------------------------- the paper key

def paper_key(master: bytes) -> str:
    """A printable form an admin can type back: base32 in groups of 4, with a 4-character checksum."""
    text = base64.b32encode(master).decode().rstrip("=")
    check = base64.b32encode(blake3.blake3(master).digest()[:5]).decode()[:4]
    groups = [text[i : i + 4] for i in range(0, len(text), 4)]
    return "CY1-" + "-".join(groups) + "-" + check


def from_paper(text: str) -> bytes:
    cleaned = "".join(text.split()).upper()
    if not cleaned.startswith("CY1-"):
        raise KeyProblem("not a Chunkyard paper key (it starts with CY1-)", "bad_paper_key")
    parts = cleaned[4:].split("-")
    body, check = "".join(parts[:-1]), parts[-1]
    try:
        master = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise KeyProblem("the paper key has characters outside A-Z2-7: check for typos", "bad_paper_key") from None
    if len(master) != 32 or base64.b32encode(blake3.blake3(master).digest()[:5]).decode()[:4] != check:
        raise KeyProblem("the paper key's checksum does not match: check for typos", "bad_paper_key")
    return master
