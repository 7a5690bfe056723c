"""Object stores behind one interface (base.py): S3, Azure Blob, and a fault-injecting wrapper for tests."""

from __future__ import annotations

from tiering.config import TierConfig

from .base import (
    LockedError,
    NotFoundError,
    ObjectInfo,
    Store,
    StoreError,
    TransientError,
    UnsupportedError,
)


def open_store(tier: TierConfig) -> Store:
    """The store a tier's settings describe (no request is made yet)."""
    part_size = tier.part_size_mib << 20
    if tier.kind == "s3":
        from .s3 import S3Store

        return S3Store(tier.bucket, tier.prefix, endpoint=tier.endpoint, region=tier.region,
                       path_style=tier.path_style, lock_mode=tier.lock_mode, part_size=part_size)
    from .azure import AzureStore, credentials_from_env

    return AzureStore(credentials_from_env(tier.endpoint), tier.bucket, tier.prefix, lock_mode=tier.lock_mode,
                      block_size=part_size)


__all__ = ["LockedError", "NotFoundError", "ObjectInfo", "Store", "StoreError", "TransientError", "UnsupportedError",
           "open_store"]
