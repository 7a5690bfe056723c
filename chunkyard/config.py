"""Server configuration: embedded defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


NOTIFY_EVENTS = ("failure", "success", "stale")


@dataclass(frozen=True)
class NotifyConfig:
    """The [notify] table: where fleet run reports and stale-VM alerts go (docs/architecture.md)."""

    webhook_url: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = ""  # or $CHUNKYARD_SMTP_PASSWORD, which keeps it out of the file
    mail_from: str = ""
    mail_to: tuple[str, ...] = ()
    on: tuple[str, ...] = NOTIFY_EVENTS
    stale_hours: float = 26.0


def _notify(table: object, where: str) -> NotifyConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [notify] must be a table")
    config = NotifyConfig()
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in {f.name for f in fields(NotifyConfig)}:
            raise ConfigError(f"{where}: unknown setting notify.{key}; known: "
                              f"{', '.join(f.name for f in fields(NotifyConfig))}")
        default = getattr(config, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{where}: notify.{key} must be a list of strings")
            if key == "on" and set(value) - set(NOTIFY_EVENTS):
                raise ConfigError(f"{where}: notify.on may hold {', '.join(NOTIFY_EVENTS)}; got {value}")
            value = tuple(value)
        elif isinstance(default, bool) != isinstance(value, bool) or type(value) not in (type(default), int):
            raise ConfigError(f"{where}: notify.{key} must be {type(default).__name__}; got {value!r:.80}")
        values[key] = value
    config = replace(config, **values)
    if not 0 < config.stale_hours < 1e6 or not 0 < config.smtp_port < 65536:
        raise ConfigError(f"{where}: notify.stale_hours must be positive and notify.smtp_port 1-65535")
    if config.webhook_url and not config.webhook_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: notify.webhook_url must be an http:// or https:// URL")
    if config.smtp_host and not (config.mail_from and config.mail_to):
        raise ConfigError(f"{where}: with notify.smtp_host set, mail_from and mail_to (a list) are needed")
    return config


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
    fleet_poll_seconds: float = 30.0  # how long a pull collector's work request waits (its long-poll)
    fleet_silent_seconds: float = 300.0  # running work whose collector is silent this long fails (and retries)
    fleet_tick_seconds: float = 1.0  # how often the scheduler looks for due jobs, retries and silence
    audit_refusal_window_seconds: float = 60.0  # refused logins on admin routes: one audit record per source per window
    notify: NotifyConfig = NotifyConfig()

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
        if not isinstance(table, dict) or set(raw) - {"server", "tier", "notify"}:
            raise ConfigError(f"{path}: expected only a [server] table, [[tier]] tables and a [notify] table; "
                              f"found {sorted(raw)}")
        tiers = raw.get("tier", [])
        if not isinstance(tiers, list) or not all(isinstance(t, dict) for t in tiers):
            raise ConfigError(f"{path}: cloud tiers are [[tier]] tables (see docs/tiering.md)")
        known = {f.name: f.type for f in fields(ServerConfig) if f.name not in ("tiers", "notify")}
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
        config = replace(config, **values, tiers=tuple(tiers), notify=_notify(raw.get("notify", {}), str(path)))
    return _check(config.with_overrides(**overrides))
