"""One contract for every store, run against S3 on moto and Azure Blob on Azurite.

What the emulators cannot prove is said where it matters: moto enforces Object Lock on version deletes
but not the rules of changing a retention (COMPLIANCE can be shortened there; on AWS it cannot), and
Azurite implements no immutability at all, so on Azure the lock itself rests on the real cloud and the
tests here check that we report it as unsupported instead of pretending.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.tiering.conftest import PART, Emulators
from tiering.stores import LockedError, NotFoundError, TransientError, UnsupportedError
from tiering.stores.azure import AzureStore
from tiering.stores.base import CloudStore
from tiering.stores.s3 import S3Store


def test_put_get_head_list(store: CloudStore, tmp_path: Path) -> None:
    assert store.put("packs/a.pack", b"hello") is True
    source = tmp_path / "f"
    source.write_bytes(os.urandom(70_000))
    assert store.put("points/vm1/p.json", source) is True
    assert store.get("packs/a.pack") == b"hello"
    assert store.get("points/vm1/p.json") == source.read_bytes()
    info = store.head("points/vm1/p.json")
    assert info is not None and info.key == "points/vm1/p.json" and info.size == 70_000 and info.etag
    assert info.retain_until is None
    assert store.head("packs/nothing") is None
    listed = {i.key: i.size for i in store.list("points/")}
    assert listed == {"points/vm1/p.json": 70_000}
    assert {i.key for i in store.list()} == {"packs/a.pack", "points/vm1/p.json"}


def test_prefix_keeps_repositories_apart(emulators: Emulators, kind: str) -> None:
    bucket = emulators.new_bucket(kind)
    one, two = emulators.store(kind, bucket=bucket, prefix="site-a"), emulators.store(kind, bucket=bucket,
                                                                                     prefix="/site-b/")
    one.put("repo.toml", b"a")
    two.put("repo.toml", b"b")
    assert one.get("repo.toml") == b"a" and two.get("repo.toml") == b"b"
    assert [i.key for i in one.list()] == ["repo.toml"]
    assert one.url.endswith("/site-a/") and two.url.endswith("/site-b/")


def test_conditional_create_and_overwrite(store: CloudStore) -> None:
    assert store.put("k", b"first") is True
    assert store.put("k", b"second!") is False  # already there: not an error, and left alone
    assert store.get("k") == b"first"
    assert store.put("k", b"third", if_absent=False) is True
    assert store.get("k") == b"third"


def test_ranges(store: CloudStore) -> None:
    data = bytes(range(256)) * 40
    store.put("r", data)
    assert store.get("r", 10, 20) == data[10:20]
    assert store.get("r", 10_000) == data[10_000:]
    assert store.get("r", None, 5) == data[:5]
    assert store.get("r", 10_000, 99_999) == data[10_000:]  # clipped to the object
    assert store.get("r", 20, 20) == b""
    assert store.get("r", len(data) + 5) == b""  # past the end
    with pytest.raises(NotFoundError):
        store.get("missing", 0, 10)


def test_delete_is_idempotent(store: CloudStore) -> None:
    store.put("d", b"x")
    store.delete("d")
    assert store.head("d") is None
    with pytest.raises(NotFoundError):
        store.get("d")
    store.delete("d")  # deletes are retried: a missing object is fine


def test_large_object_goes_in_parts(store: CloudStore, tmp_path: Path) -> None:
    source = tmp_path / "big"
    data = os.urandom(2 * PART + 12345)  # three parts (S3 multipart) or three blocks (Azure)
    source.write_bytes(data)
    assert store.put("packs/big.pack", source) is True
    assert store.head("packs/big.pack").size == len(data)
    assert store.get("packs/big.pack", PART - 10, PART + 10) == data[PART - 10 : PART + 10]
    assert store.get("packs/big.pack") == data
    assert store.put("packs/big.pack", source) is False  # the condition holds for part uploads too


def test_failed_part_upload_leaves_no_object(store: CloudStore, kind: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_second(original):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise ConnectionResetError("cut")
            return original(*args, **kwargs)
        return wrapper

    if isinstance(store, S3Store):
        monkeypatch.setattr(store.client, "upload_part", fail_second(store.client.upload_part))
    else:
        from azure.storage.blob import BlobClient

        monkeypatch.setattr(BlobClient, "stage_block", fail_second(BlobClient.stage_block))
    source = tmp_path / "big"
    source.write_bytes(os.urandom(2 * PART + 1))
    with pytest.raises(ConnectionResetError):
        store.put("packs/cut.pack", source)
    assert store.head("packs/cut.pack") is None  # never a partial object
    if isinstance(store, S3Store):  # and no billed leftover parts (Azure drops uncommitted blocks itself)
        assert "Uploads" not in store.client.list_multipart_uploads(Bucket=store.bucket)


def test_unreachable_endpoint_is_transient(kind: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        if kind == "s3":
            store: CloudStore = S3Store("bucket", endpoint=f"http://127.0.0.1:{port}", path_style=True)
        else:
            from azure.storage.blob import BlobServiceClient

            service = BlobServiceClient(f"http://127.0.0.1:{port}/devstoreaccount1", retry_total=0)
            store = AzureStore(service, "container")
        with pytest.raises(TransientError):
            store.head("k")
        with pytest.raises(TransientError):
            store.put("k", b"x")


def test_retention_on_s3_object_lock(emulators: Emulators) -> None:
    """moto enforces what a backup needs: a locked version cannot be deleted. It does not enforce that
    COMPLIANCE retention is never shortened (AWS does; `extend_retention` never asks for it anyway)."""
    store = emulators.store("s3", locked=True)
    until = datetime.now(UTC) + timedelta(days=3)
    assert store.put("packs/l.pack", b"locked", retain_until=until)
    held = store.head("packs/l.pack").retain_until
    assert held is not None and abs((held - until).total_seconds()) < 1
    with pytest.raises(LockedError):
        store.delete("packs/l.pack")
    versions = store.client.list_object_versions(Bucket=store.bucket)["Versions"]
    with pytest.raises(LockedError):  # the store's own answer, not only our HEAD check
        store._delete("packs/l.pack")
    assert len(store.client.list_object_versions(Bucket=store.bucket)["Versions"]) == len(versions)
    store.extend_retention("packs/l.pack", until + timedelta(days=10))
    later = store.head("packs/l.pack").retain_until
    assert abs((later - until - timedelta(days=10)).total_seconds()) < 1
    store.extend_retention("packs/l.pack", until)  # never shortens
    assert store.head("packs/l.pack").retain_until == later
    store.put("free", b"x")  # unlocked objects in a lock-enabled (versioned) bucket delete fully
    store.delete("free")
    assert not [v for v in store.client.list_object_versions(Bucket=store.bucket).get("Versions", [])
                if v["Key"] == "free"]


def test_retention_needs_object_lock_on_the_bucket(emulators: Emulators) -> None:
    store = emulators.store("s3")
    with pytest.raises(UnsupportedError, match="Object Lock"):
        store.put("k", b"x", retain_until=datetime.now(UTC) + timedelta(days=1))


def test_azure_immutability_is_reported_unsupported_on_azurite(emulators: Emulators) -> None:
    """Azurite answers 501 to immutability policies (and silently ignores the upload headers): the store
    must say so rather than pretend the blob is locked. Real enforcement rests on Azure itself."""
    store = emulators.store("azure")
    with pytest.raises(UnsupportedError, match="immutability is not supported by this endpoint"):
        store.put("k", b"x", retain_until=datetime.now(UTC) + timedelta(days=1))
    store.put("j", b"y")
    with pytest.raises(UnsupportedError):
        store.extend_retention("j", datetime.now(UTC) + timedelta(days=1))
