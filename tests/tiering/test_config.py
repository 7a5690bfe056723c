"""`[[tier]]` tables in the server's TOML file and the URLs `tier attach` takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunkyard.config import ConfigError, load_config
from tiering.config import parse_tiers, tier_from_url


def test_tiers_in_the_server_configuration(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[server]\nworkers = 2\n\n[[tier]]\nkind = "s3"\nbucket = "dr"\nprefix = "site-a"\n'
                    'immutable_days = 30\n\n[[tier]]\nname = "blob"\nkind = "azure"\ncontainer = "dr"\n'
                    "interval_seconds = 5\n")
    config = load_config(path)
    s3, azure = parse_tiers(config.tiers)
    assert (s3.name, s3.bucket, s3.prefix, s3.immutable_days, s3.mode) == ("s3", "dr", "site-a", 30, "copy")
    assert (azure.name, azure.bucket, azure.interval_seconds) == ("blob", "dr", 5)
    assert s3.url == "s3://dr/site-a"


@pytest.mark.parametrize(("table", "message"), [
    ({"kind": "gcs", "bucket": "b"}, "kind must be one of"),
    ({"kind": "s3"}, "bucket is required"),
    ({"kind": "azure", "bucket": "b"}, "unknown setting bucket"),  # Azure calls it a container
    ({"kind": "s3", "bucket": "b", "imutable_days": 3}, "unknown setting imutable_days"),
    ({"kind": "s3", "bucket": "b", "mode": "archive"}, "mode must be one of copy, move"),
    ({"kind": "s3", "bucket": "b", "mode": "move", "move_after_days": -1}, "move_after_days must be 0-36500"),
    ({"kind": "s3", "bucket": "b", "move_after_days": 10**9}, "move_after_days must be 0-36500"),
    ({"kind": "s3", "bucket": "b", "move_after_days": 1.5}, "move_after_days must be int"),
    ({"kind": "s3", "bucket": "b", "move_after_days": "7"}, "move_after_days must be int"),
    ({"kind": "s3", "bucket": "b", "cache_mib": -5}, "cache_mib"),
    ({"kind": "s3", "bucket": "b", "cache_mib": 10**12}, "cache_mib"),
    ({"kind": "s3", "bucket": "b", "cache_mib": True}, "cache_mib must be int"),
    ({"kind": "s3", "bucket": "b", "mass_delete_fraction": 0}, "mass_delete_fraction must be in"),
    ({"kind": "s3", "bucket": "b", "mass_delete_fraction": 1.5}, "mass_delete_fraction must be in"),
    ({"kind": "s3", "bucket": "b", "mass_delete_fraction": "all"}, "mass_delete_fraction must be float"),
    ({"kind": "s3", "bucket": "b", "mass_delete_min": -1}, "mass_delete_min"),
    ({"kind": "s3", "bucket": "b", "immutable_days": "30"}, "immutable_days must be int"),
    ({"kind": "s3", "bucket": "b", "path_style": 1}, "path_style must be bool"),
    ({"kind": "s3", "bucket": "b", "lock_mode": "strict"}, "lock_mode must be one of"),
    ({"kind": "s3", "bucket": "b", "part_size_mib": 1}, "part_size_mib"),
    ({"kind": "s3", "bucket": "b", "name": "Off Site"}, "name must be"),
])
def test_bad_tier_tables_are_refused(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tiers([table])


def test_move_mode_settings(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[[tier]]\nkind = "s3"\nbucket = "cold"\nmode = "move"\nmove_after_days = 14\ncache_mib = 64\n'
                    "mass_delete_fraction = 0.5\nmass_delete_min = 3\n")
    (tier,) = parse_tiers(load_config(path).tiers)
    assert (tier.mode, tier.move_after_days, tier.cache_mib) == ("move", 14, 64)
    assert (tier.mass_delete_fraction, tier.mass_delete_min) == (0.5, 3)
    default = parse_tiers([{"kind": "azure", "container": "c", "mode": "move"}])[0]
    assert (default.move_after_days, default.cache_mib, default.mass_delete_fraction) == (30, 256, 0.2)


def test_one_move_tier_at_most() -> None:
    with pytest.raises(ConfigError, match="only one"):
        parse_tiers([{"kind": "s3", "bucket": "a", "mode": "move"},
                     {"kind": "azure", "container": "b", "mode": "move"}])
    copy, move = parse_tiers([{"kind": "s3", "bucket": "a"}, {"kind": "azure", "container": "b", "mode": "move"}])
    assert (copy.mode, move.mode) == ("copy", "move")


def test_tier_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="two tiers are named 's3'"):
        parse_tiers([{"kind": "s3", "bucket": "a"}, {"kind": "s3", "bucket": "b"}])


def test_tier_must_be_an_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('tier = "s3://x"\n')
    with pytest.raises(ConfigError, match=r"\[\[tier\]\] tables"):
        load_config(path)


def test_attach_urls() -> None:
    tier = tier_from_url("s3://bucket/some/prefix", endpoint="http://x", path_style=True)
    assert (tier.kind, tier.bucket, tier.prefix, tier.endpoint, tier.path_style) == ("s3", "bucket", "some/prefix",
                                                                                   "http://x", True)
    assert tier_from_url("azure://container").prefix == ""
    for bad in ("bucket/prefix", "ftp://x/y", "s3:///prefix"):
        with pytest.raises(ConfigError):
            tier_from_url(bad)
