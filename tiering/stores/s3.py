"""S3 (and S3-compatible) store on boto3.

Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE,
~/.aws/config and credentials, instance roles). Conditional create is `If-None-Match: *` (412 means
"already there"); objects above the part size go up as multipart uploads, aborted on any failure so no
orphaned parts are billed. Retention is S3 Object Lock per object (the bucket must have Object Lock
enabled); it is read back with HEAD because moto does not implement GetObjectRetention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

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

TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                   "Throttling", "ThrottlingException", "ConditionalRequestConflict", "OperationAborted"}
MIN_PART = 5 << 20  # S3 refuses smaller parts (except the last)


def _code(e: ClientError) -> tuple[str, int]:
    return e.response.get("Error", {}).get("Code", ""), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


class S3Store(CloudStore):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint: str | None = None, region: str | None = None,
                 path_style: bool = False, lock_mode: str = "compliance", part_size: int = 64 << 20):
        super().__init__("s3", bucket, prefix)
        if part_size < MIN_PART:
            raise ValueError(f"the S3 part size must be at least {MIN_PART} bytes")
        self.bucket = bucket
        self.lock_mode = lock_mode.upper()
        self.part_size = part_size
        config = Config(region_name=region, s3={"addressing_style": "path" if path_style else "auto"},
                        retries={"mode": "standard", "max_attempts": 3}, connect_timeout=10, read_timeout=120,
                        max_pool_connections=32)  # uploads, plus the parallel reads of move mode
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)

    # ---------------------------------------------------------------- errors

    def _error(self, e: Exception, key: str) -> StoreError:
        where = f"{self.url}{key}"
        if isinstance(e, ClientError):
            code, status = _code(e)
            message = e.response.get("Error", {}).get("Message", "")
            if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                return NotFoundError(f"{where} does not exist")
            if code == "InvalidRequest" and "ObjectLock" in message:
                return UnsupportedError(f"{self.url}: the bucket has no Object Lock enabled, so immutable_days "
                                        "cannot be honoured (enable Object Lock when creating the bucket)")
            if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return TransientError(f"{where}: {code or status} {message}".strip())
            return StoreError(f"{where}: {code or status} {message}".strip())
        if isinstance(e, ConnectionError | HTTPClientError):
            return TransientError(f"{where}: {e}")
        return StoreError(f"{where}: {e}")

    @contextlib.contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key) from e

    # ---------------------------------------------------------------- interface

    def put(self, key: str, data: Source, *, if_absent: bool = True, retain_until: datetime | None = None) -> bool:
        lock = {"ObjectLockMode": self.lock_mode, "ObjectLockRetainUntilDate": retain_until} if retain_until else {}
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        with self._mapped(key):
            try:
                if source_size(data) <= self.part_size:
                    self._put_single(key, data, lock | condition)
                else:
                    self._put_multipart(key, data, lock, condition)
            except ClientError as e:
                if if_absent and _code(e)[1] == 412:
                    return False
                raise
        return True

    def _put_single(self, key: str, data: Source, extra: dict) -> None:
        args = {"Bucket": self.bucket, "Key": self.full_key(key), **extra}
        if isinstance(data, bytes):
            self.client.put_object(Body=data, **args)
            return
        with open(data, "rb") as f:
            self.client.put_object(Body=f, **args)

    def _put_multipart(self, key: str, data: Source, lock: dict, condition: dict) -> None:
        target = {"Bucket": self.bucket, "Key": self.full_key(key)}
        upload_id = self.client.create_multipart_upload(**target, **lock)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, source_size(data), self.part_size), 1):
                answer = self.client.upload_part(**target, UploadId=upload_id, PartNumber=number,
                                                 Body=read_piece(data, offset, self.part_size))
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
            self.client.complete_multipart_upload(**target, UploadId=upload_id, MultipartUpload={"Parts": parts},
                                                  **condition)
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):  # the original error is the one to report
                self.client.abort_multipart_upload(**target, UploadId=upload_id)
            raise

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        start = start or 0
        if end is not None and end <= start:
            return b""
        extra = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
        with self._mapped(key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key), **extra)["Body"].read()
            except ClientError as e:
                if _code(e)[0] == "InvalidRange":
                    return b""
                raise

    def head(self, key: str) -> ObjectInfo | None:
        with self._mapped(key):
            try:
                answer = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            except ClientError as e:
                if _code(e)[1] == 404:
                    return None
                raise
        return ObjectInfo(key, answer["ContentLength"], answer.get("ETag", "").strip('"'),
                          answer.get("ObjectLockRetainUntilDate"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._mapped(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.full_key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(self.relative_key(item["Key"]), item["Size"], item.get("ETag", "").strip('"'))

    def _delete(self, key: str) -> None:
        """Every version goes (a plain DELETE on a versioned bucket only adds a delete marker and frees
        nothing); S3 refuses a locked version with AccessDenied."""
        full = self.full_key(key)
        with self._mapped(key):
            versions = []
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full):
                versions += [v["VersionId"] for kind in ("Versions", "DeleteMarkers") for v in page.get(kind, [])
                             if v["Key"] == full]
            for version in versions:
                try:
                    self.client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)
                except ClientError as e:
                    if _code(e)[0] == "AccessDenied":
                        raise LockedError(f"{self.url}{key}: a version is under retention (or deleting versions "
                                          "is not permitted to these credentials)") from e
                    raise

    def _set_retention(self, key: str, until: datetime) -> None:
        with self._mapped(key):
            self.client.put_object_retention(Bucket=self.bucket, Key=self.full_key(key),
                                              Retention={"Mode": self.lock_mode, "RetainUntilDate": until})

    def close(self) -> None:
        self.client.close()
