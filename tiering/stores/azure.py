"""Azure Blob store on azure-storage-blob.

Credentials, in this order: AZURE_STORAGE_CONNECTION_STRING; an account URL (the tier's `endpoint`, or
https://$AZURE_STORAGE_ACCOUNT.blob.core.windows.net) with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN.
Conditional create is `If-None-Match: *` (409 BlobAlreadyExists means "already there"); blobs above the
block size are staged block by block and committed with the same condition, so a cut upload leaves only
uncommitted blocks (Azure discards them after a week) and never a partial blob. Every request carries
an MD5 of its body (`validate_content`). Retention is version-level immutability (the container must
have it enabled); Azurite answers 501 to it, which is reported as "not supported", never ignored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime
from urllib.parse import urlparse

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobClient, BlobServiceClient, ImmutabilityPolicy

from chunkyard.config import ConfigError

from .base import (
    CloudStore,
    LockedError,
    NotFoundError,
    ObjectInfo,
    Source,
    StoreError,
    TransientError,
    UnsupportedError,
    read_piece,
    source_size,
)

CLIENT_OPTIONS = {"retry_total": 2, "connection_timeout": 10, "read_timeout": 120}
POLICY_MODES = {"compliance": "Locked", "governance": "Unlocked"}  # Locked: can only be extended


def credentials_from_env(endpoint: str | None) -> BlobServiceClient:
    """A service client from the standard Azure Storage environment variables."""
    connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        return BlobServiceClient.from_connection_string(connection_string, **CLIENT_OPTIONS)
    account = os.environ.get("AZURE_STORAGE_ACCOUNT")
    if endpoint is None and account:
        endpoint = f"https://{account}.blob.core.windows.net"
    key, sas = os.environ.get("AZURE_STORAGE_KEY"), os.environ.get("AZURE_STORAGE_SAS_TOKEN")
    if endpoint is None or not (key or sas):
        raise ConfigError("no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY (or "
                         "AZURE_STORAGE_SAS_TOKEN) with AZURE_STORAGE_ACCOUNT or the tier's endpoint")
    credential = {"account_name": account or urlparse(endpoint).hostname.split(".")[0],
                  "account_key": key} if key else sas
    return BlobServiceClient(endpoint, credential=credential, **CLIENT_OPTIONS)


class AzureStore(CloudStore):
    def __init__(self, service: BlobServiceClient, container: str, prefix: str = "", *,
                 lock_mode: str = "compliance", block_size: int = 64 << 20):
        super().__init__("azure", container, prefix)
        self.service = service
        self.container = service.get_container_client(container)
        self.policy_mode = POLICY_MODES[lock_mode]
        self.block_size = block_size

    def _error(self, e: AzureError, key: str) -> StoreError:
        where = f"{self.url}{key}"
        if isinstance(e, ResourceNotFoundError) and getattr(e, "error_code", "") != "ContainerNotFound":
            return NotFoundError(f"{where} does not exist")
        if isinstance(e, ServiceRequestError | ServiceResponseError):
            return TransientError(f"{where}: {e.message}")
        status = getattr(e, "status_code", None) or 0
        code = getattr(e, "error_code", None) or ""
        if status == 501:
            return UnsupportedError(f"{self.url}: immutability is not supported by this endpoint "
                                    f"({code or 'HTTP 501 not implemented'}; Azurite does not implement it)")
        if code == "BlobImmutableDueToPolicy":
            return LockedError(f"{where} is under an immutability policy")
        if status >= 500 or status in (408, 429):
            return TransientError(f"{where}: {code or status} {e.message}".strip())
        return StoreError(f"{where}: {code or status} {e.message}".strip())

    @contextlib.contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        try:
            yield
        except AzureError as e:
            raise self._error(e, key) from e

    def put(self, key: str, data: Source, *, if_absent: bool = True, retain_until: datetime | None = None) -> bool:
        blob = self.container.get_blob_client(self.full_key(key))
        size = source_size(data)
        with self._mapped(key):
            try:
                if size <= self.block_size:
                    self._put_single(blob, data, size, overwrite=not if_absent)
                else:
                    self._put_blocks(blob, data, size, if_absent=if_absent)
            except ResourceExistsError:
                if if_absent:
                    return False
                raise
        if retain_until is not None:
            self._set_retention(key, retain_until)
        return True

    @staticmethod
    def _put_single(blob: BlobClient, data: Source, size: int, *, overwrite: bool) -> None:
        if isinstance(data, bytes):
            blob.upload_blob(data, length=size, overwrite=overwrite, validate_content=True)
            return
        with open(data, "rb") as f:
            blob.upload_blob(f, length=size, overwrite=overwrite, validate_content=True, max_concurrency=1)

    def _put_blocks(self, blob: BlobClient, data: Source, size: int, *, if_absent: bool) -> None:
        blocks = []
        for n, offset in enumerate(range(0, size, self.block_size)):
            block_id = f"{n:08d}"  # ids of one blob must all have the same length
            blob.stage_block(block_id, read_piece(data, offset, self.block_size), validate_content=True)
            blocks.append(BlobBlock(block_id=block_id))
        condition = {"match_condition": MatchConditions.IfMissing} if if_absent else {}
        blob.commit_block_list(blocks, **condition)

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        start = start or 0
        if end is not None and end <= start:
            return b""
        blob = self.container.get_blob_client(self.full_key(key))
        with self._mapped(key):
            try:
                return blob.download_blob(offset=start, length=None if end is None else end - start).readall()
            except HttpResponseError as e:
                if e.status_code == 416:
                    return b""
                raise

    def head(self, key: str) -> ObjectInfo | None:
        with self._mapped(key):
            try:
                props = self.container.get_blob_client(self.full_key(key)).get_blob_properties()
            except ResourceNotFoundError as e:
                if getattr(e, "error_code", "") == "ContainerNotFound":
                    raise
                return None
        return ObjectInfo(key, props.size, props.etag.strip('"'), props.immutability_policy.expiry_time)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._mapped(prefix):
            for item in self.container.list_blobs(name_starts_with=self.full_key(prefix)):
                yield ObjectInfo(self.relative_key(item.name), item.size, item.etag.strip('"'))

    def _delete(self, key: str) -> None:
        """The blob, its snapshots and, where blob versioning is on, its older versions."""
        full = self.full_key(key)
        with self._mapped(key):
            versions = [b.version_id for b in self.container.list_blobs(name_starts_with=full, include=["versions"])
                        if b.name == full and b.version_id and not b.is_current_version]
            with contextlib.suppress(ResourceNotFoundError):
                self.container.delete_blob(full, delete_snapshots="include")
            for version in versions:
                self.container.get_blob_client(full, version_id=version).delete_blob()

    def _set_retention(self, key: str, until: datetime) -> None:
        with self._mapped(key):
            try:
                self.container.get_blob_client(self.full_key(key)).set_immutability_policy(
                    ImmutabilityPolicy(expiry_time=until, policy_mode=self.policy_mode))
            except HttpResponseError as e:
                if e.status_code in (400, 409):  # the container was created without version-level immutability
                    code = getattr(e, "error_code", None) or e.status_code
                    raise UnsupportedError(f"{self.url}: the container refuses immutability policies ({code}); "
                                           "enable version-level immutability on it") from e
                raise

    def close(self) -> None:
        self.service.close()
