"""Tier settings: the `[[tier]]` tables of the server's TOML file, and `s3://` / `azure://` URLs.

    [[tier]]
    name = "offsite"             # a label for status and metrics (default: the kind)
    kind = "s3"                  # "s3" or "azure"
    bucket = "chunkyard-dr"      # S3 bucket (for azure: container = "...")
    prefix = "site-a"            # optional key prefix; several repositories may share a bucket
    endpoint = "https://..."     # optional: S3-compatible endpoint, or the Azure account URL
    region = "eu-west-1"         # S3 only, optional
    path_style = false           # S3 only: path-style addressing (most S3-compatible servers)
    mode = "copy"                # copy: every sealed pack and point also goes to the cloud;
                                 # move: the same, and old packs then leave local disk (capacity tier)
    move_after_days = 30         # move mode: packs only points older than this need leave local disk
    cache_mib = 256              # move mode: local disk cache of records read back from the cloud
    mass_delete_fraction = 0.2   # a sync pass that would delete more than this share of the cloud's
    mass_delete_min = 10         # points or packs (and more than this many) waits for the admin
    immutable_days = 0           # > 0: lock each point and the packs it needs for this many days
    lock_mode = "compliance"     # compliance (nobody can shorten) or governance
    lock_generation_days = 10    # pack locks are extended in steps of this many days (see docs/tiering.md)
    interval_seconds = 60        # how often the uploader looks for new packs and points
    concurrency = 4              # parallel pack uploads
    part_size_mib = 64           # objects above this go up in parts (S3 multipart, Azure blocks)

Credentials never go in this file: the stores read the standard AWS and Azure environment variables
and configuration files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from chunkyard.config import ConfigError

KINDS = ("s3", "azure")
MODES = ("copy", "move")
LOCK_MODES = ("compliance", "governance")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str
    bucket: str  # the S3 bucket or the Azure container
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = False
    mode: str = "copy"
    immutable_days: int = 0
    lock_mode: str = "compliance"
    lock_generation_days: int = 10
    interval_seconds: float = 60.0
    concurrency: int = 4
    part_size_mib: int = 64
    move_after_days: int = 30
    cache_mib: int = 256
    mass_delete_fraction: float = 0.2
    mass_delete_min: int = 10

    @property
    def url(self) -> str:
        return f"{self.kind}://{self.bucket}/{self.prefix.strip('/')}"


def _check(tier: TierConfig, where: str) -> TierConfig:
    if tier.mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}; got {tier.mode!r}")
    if tier.lock_mode not in LOCK_MODES:
        raise ConfigError(f"{where}: lock_mode must be one of {', '.join(LOCK_MODES)}; got {tier.lock_mode!r}")
    if not _NAME.fullmatch(tier.name):
        raise ConfigError(f"{where}: name must be 1-32 lowercase letters, digits, '_' or '-'; got {tier.name!r}")
    if not tier.bucket:
        raise ConfigError(f"{where}: {'container' if tier.kind == 'azure' else 'bucket'} is required")
    if tier.immutable_days < 0 or tier.lock_generation_days < 1:
        raise ConfigError(f"{where}: immutable_days must be ≥ 0 and lock_generation_days ≥ 1")
    if tier.interval_seconds <= 0 or tier.concurrency < 1 or tier.part_size_mib < 5:
        raise ConfigError(f"{where}: interval_seconds must be > 0, concurrency ≥ 1 and part_size_mib ≥ 5 "
                          "(S3's smallest part)")
    if not 0 <= tier.move_after_days <= 36500 or not 0 <= tier.cache_mib <= 1 << 20:
        raise ConfigError(f"{where}: move_after_days must be 0-36500 and cache_mib 0-{1 << 20} (0 = no cache)")
    if not 0 < tier.mass_delete_fraction <= 1 or tier.mass_delete_min < 0:
        raise ConfigError(f"{where}: mass_delete_fraction must be in (0, 1] and mass_delete_min ≥ 0")
    return tier


def _type_ok(default: object, value: object) -> bool:
    if default is None or isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return type(value) is type(default)


def parse_tier(table: dict[str, Any], where: str = "[[tier]]") -> TierConfig:
    """One `[[tier]]` table; unknown keys are an error, like everywhere else in the configuration."""
    kind = table.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}; got {kind!r}")
    container_key = "container" if kind == "azure" else "bucket"
    known = [f.name for f in fields(TierConfig) if f.name != "bucket"] + [container_key]
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if not isinstance(table.get(container_key), str):
        raise ConfigError(f"{where}: {container_key} is required (a string)")
    defaults = TierConfig(name=kind, kind=kind, bucket="")
    values = {("bucket" if key == container_key else key): value for key, value in table.items()}
    for key, value in values.items():
        default = getattr(defaults, key)
        if not _type_ok(default, value):
            raise ConfigError(f"{where}: {key} must be {'string' if default is None else type(default).__name__}; "
                              f"got {value!r}")
    return _check(replace(defaults, **values), where)


def parse_tiers(tables: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[TierConfig]:
    tiers = [parse_tier(t, f"[[tier]] #{n}") for n, t in enumerate(tables, 1)]
    if sum(t.mode == "move" for t in tiers) > 1:
        raise ConfigError("only one [[tier]] may use mode = \"move\": a moved pack lives in exactly one tier")
    names = [t.name for t in tiers]
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"two tiers are named {name!r}: give each [[tier]] its own name")
    return tiers


def tier_from_url(url: str, *, endpoint: str | None = None, region: str | None = None,
                  path_style: bool = False) -> TierConfig:
    """`s3://bucket/prefix` or `azure://container/prefix`, as `chunkyard tier attach` takes them."""
    scheme, sep, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not sep or scheme not in KINDS or not bucket:
        raise ConfigError(f"expected s3://BUCKET[/PREFIX] or azure://CONTAINER[/PREFIX]; got {url!r}")
    return _check(TierConfig(name=scheme, kind=scheme, bucket=bucket, prefix=prefix, endpoint=endpoint,
                             region=region, path_style=path_style), url)
