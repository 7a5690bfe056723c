"""Server configuration: embedded defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    data: Path = Path("./data")
    listen: str = "127.0.0.1:8420"
    pack_size_mib: int = 32
    index_cache_mib: int = 128
    max_chunk_body_mib: int = 64
    max_blob_mib: int = 64
    workers: int = 4
    session_idle_hours: float = 24.0
    keep_closed_sessions_days: float = 7.0
    housekeeping_seconds: float = 60.0
    tiers: tuple[dict[str, Any], ...] = ()  # the [[tier]] tables, checked by tiering.config (docs/tiering.md)
    tls_cert: Path | None = None  # PEM certificate chain: serve HTTPS (with tls_key)
    tls_key: Path | None = None

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def with_overrides(self, **values: Any) -> ServerConfig:
        return replace(self, **{k: v for k, v in values.items() if v is not None})


def _check(config: ServerConfig) -> ServerConfig:
    host, sep, port = config.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen must be HOST:PORT (e.g. 127.0.0.1:8420); got {config.listen!r}")
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{f.name} must be positive; got {value}")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("TLS needs both a certificate and its private key: give --tls-cert and --tls-key "
                          "(server.tls_cert and server.tls_key in the config file)")
    return config


def load_config(path: Path | None = None, **overrides: Any) -> ServerConfig:
    """Read the [server] table of a TOML file (unknown keys are an error, so typos are caught)."""
    config = ServerConfig()
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        table = raw.get("server", {})
        if not isinstance(table, dict) or set(raw) - {"server", "tier"}:
            raise ConfigError(f"{path}: expected only a [server] table and [[tier]] tables; found {sorted(raw)}")
        tiers = raw.get("tier", [])
        if not isinstance(tiers, list) or not all(isinstance(t, dict) for t in tiers):
            raise ConfigError(f"{path}: cloud tiers are [[tier]] tables (see docs/tiering.md)")
        known = {f.name: f.type for f in fields(ServerConfig) if f.name != "tiers"}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown setting server.{key}; known: {', '.join(sorted(known))}")
            default = getattr(config, key)
            if isinstance(default, Path) or "Path" in str(known[key]):
                if not isinstance(value, str):
                    raise ConfigError(f"{path}: server.{key} must be a string path")
                value = Path(value)
            elif isinstance(default, bool) or type(value) not in (type(default), int):
                raise ConfigError(f"{path}: server.{key} must be {type(default).__name__}; got {value!r}")
            values[key] = value
        config = replace(config, **values, tiers=tuple(tiers))
    return _check(config.with_overrides(**overrides))
