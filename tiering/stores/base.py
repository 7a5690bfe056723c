"""The object store interface every tier speaks (in the spirit of restic's backend interface).

Keys are relative to the store's prefix and use `/` as separator. Errors are mapped to a few classes
so the uploader can decide what to do without knowing the cloud: retry (`TransientError`), give up on
a key (`LockedError`, `NotFoundError`), or stop the tier and tell the operator (`UnsupportedError`,
any other `StoreError`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

Source = bytes | Path


class StoreError(Exception):
    """A failure retrying will not fix (bad credentials, missing bucket, refused request)."""


class NotFoundError(StoreError):
    pass


class LockedError(StoreError):
    """The object is under retention (S3 Object Lock, Azure immutability) and cannot be deleted yet."""


class TransientError(StoreError):
    """Worth retrying: timeouts, connection resets, throttling, 5xx answers."""


class UnsupportedError(StoreError):
    """The endpoint or bucket lacks a feature the configuration asks for (e.g. immutability)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object. `retain_until` is None when unlocked or unknown (listings)."""

    key: str
    size: int
    etag: str = ""
    retain_until: datetime | None = None


def source_size(data: Source) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def read_piece(data: Source, offset: int, length: int) -> bytes:
    """A slice of the source, reading only that slice of a file (large uploads go in parts)."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return data[offset : offset + length]


class Store(abc.ABC):
    """One bucket (S3) or container (Azure) under a key prefix."""

    url: str  # where keys live, ending in "/": s3://bucket/prefix/ (messages and status)

    @abc.abstractmethod
    def put(self, key: str, data: Source, *, if_absent: bool = True, retain_until: datetime | None = None) -> bool:
        """Store an object. With `if_absent` (content-addressed, immutable keys) an existing object is
        left alone and False is returned: "already there" is not an error. True when this call created
        or replaced it. `retain_until` locks the new object (UnsupportedError where the store cannot)."""

    @abc.abstractmethod
    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of an object, clipped to its size (empty past its end)."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, etag and retention of an object, or None when it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with prefix (keys relative to the store prefix), with their sizes:
        sizes let a restarted uploader adopt complete objects without one HEAD each."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object and its older versions; a missing object is fine (deletes are retried).
        LockedError while it is under retention."""

    @abc.abstractmethod
    def extend_retention(self, key: str, until: datetime) -> None:
        """Lock an object until at least `until`; never shortens a lock already set."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""


class CloudStore(Store):
    """What the real stores share: retention is checked on our side before a delete, because some
    emulators (Azurite) do not enforce it, and a retention date only ever moves forward."""

    def __init__(self, scheme: str, bucket: str, prefix: str = ""):
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"{scheme}://{bucket}/{self.prefix}"

    def full_key(self, key: str) -> str:
        return self.prefix + key

    def relative_key(self, full: str) -> str:
        return full[len(self.prefix) :]

    def delete(self, key: str) -> None:
        info = self.head(key)
        if info is None:
            return
        if info.retain_until is not None and info.retain_until > datetime.now(UTC):
            raise LockedError(f"{self.url}{key} is locked until {info.retain_until.isoformat()}; "
                              "it can be deleted once its retention expires")
        self._delete(key)

    def extend_retention(self, key: str, until: datetime) -> None:
        info = self.head(key)
        if info is None:
            raise NotFoundError(f"{self.url}{key} does not exist")
        if info.retain_until is None or info.retain_until < until:
            self._set_retention(key, until)

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        """Remove every version of an existing, unlocked object."""

    @abc.abstractmethod
    def _set_retention(self, key: str, until: datetime) -> None:
        """Set the object's retention date (the caller made sure it moves forward)."""
