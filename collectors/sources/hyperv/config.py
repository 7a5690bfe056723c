"""Configuration of the Hyper-V source: the `[hyperv]` table of a TOML file.

Unknown keys and wrong types are errors (a typo must not silently fall back to a default). The
password never sits in the file or on the command line: it comes from an environment variable
(`password_env`) or a file readable only by the collector (`password_file`).
"""

from __future__ import annotations

import ntpath
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import HyperVError

TRANSPORTS = ("ntlm", "kerberos", "credssp")
PRUNE_POLICIES = ("all", "previous")
DATA_PATHS = ("smb", "local")
_COLLECTOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


class ConfigError(HyperVError):
    """The configuration is wrong; the message names the key."""


def _default_collector_id() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-")[:40] or "collector"


@dataclass(frozen=True)
class HyperVConfig:
    host: str
    port: int = 0  # 0: 5986 with https, 5985 without
    https: bool = True
    transport: str = "ntlm"
    verify_tls: bool = True
    ca_file: str | None = None
    user: str | None = None
    password_env: str = "CHUNKYARD_HYPERV_PASSWORD"
    password_file: str | None = None
    collector_id: str = field(default_factory=_default_collector_id)
    vms: tuple[str, ...] = ("*",)  # names (glob patterns, case-insensitive) or VM ids
    exclude: tuple[str, ...] = ()
    saved_state_fallback: bool = True  # save a VM briefly when it can take no live checkpoint at all
    prune_reference_points: str = "all"  # after a commit: "all" other RCT reference points, or "previous"
    job_timeout: float = 3600.0
    command_timeout: float = 900.0
    operation_timeout: int = 20
    data_path: str = "smb"  # "local": the collector runs on the host and opens the files directly
    admin_shares: bool = True  # map D:\x to \\host\D$\x when no `paths` entry matches
    paths: dict[str, str] = field(default_factory=dict)  # Windows prefix -> UNC path or local directory
    smb_port: int = 445
    smb_encrypt: bool = False
    reads_in_flight: int = 2  # open handles per disk, so reads overlap on the wire

    def __post_init__(self) -> None:
        if self.port == 0:
            object.__setattr__(self, "port", 5986 if self.https else 5985)

    def password(self) -> str | None:
        """The password from password_file or password_env; None is fine only for Kerberos."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().rstrip("\r\n")
            except OSError as e:
                raise ConfigError(f"hyperv.password_file {self.password_file}: {e.strerror}") from None
        value = os.environ.get(self.password_env)
        if value is None and self.transport != "kerberos":
            raise ConfigError(f"no password for {self.user}: set the environment variable {self.password_env} "
                              "or hyperv.password_file")
        return value


_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "port": (int,), "https": (bool,), "transport": (str,), "verify_tls": (bool,),
    "ca_file": (str,), "user": (str,), "password_env": (str,), "password_file": (str,), "collector_id": (str,),
    "vms": (list,), "exclude": (list,), "saved_state_fallback": (bool,), "prune_reference_points": (str,),
    "job_timeout": (int, float), "command_timeout": (int, float), "operation_timeout": (int,),
    "data_path": (str,), "admin_shares": (bool,), "paths": (dict,), "smb_port": (int,), "smb_encrypt": (bool,),
    "reads_in_flight": (int,),
}
_CHOICES = {"transport": TRANSPORTS, "prune_reference_points": PRUNE_POLICIES, "data_path": DATA_PATHS}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
                        "list": "a list of strings", "dict": "a table of strings"}[t.__name__] for t in types)


def _value(key: str, value: Any) -> Any:
    types = _TYPES[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ConfigError(f"hyperv.{key} must be {_type_name(types)}; got {value!r:.80}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"hyperv.{key} must be one of {', '.join(_CHOICES[key])}; got {value!r:.80}")
    if isinstance(value, list):
        if not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"hyperv.{key} must be a list of non-empty strings; got {value!r:.80}")
        return tuple(value)
    if isinstance(value, dict):
        return _paths(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
        raise ConfigError(f"hyperv.{key} must be positive; got {value}")
    return value


def _paths(table: dict) -> dict[str, str]:
    out = {}
    for prefix, target in table.items():
        if not isinstance(target, str) or not target:
            raise ConfigError(f"hyperv.paths.{prefix!r} must be a non-empty string (a UNC path or a directory)")
        drive, rest = ntpath.splitdrive(prefix)
        if not drive or (not rest.startswith(("\\", "/")) and rest):
            raise ConfigError(f"hyperv.paths key {prefix!r} must be an absolute Windows path such as 'D:\\VMs' "
                              "or '\\\\server\\share'")
        out[prefix] = target
    return out


def parse_config(table: dict[str, Any]) -> HyperVConfig:
    """A HyperVConfig from the `[hyperv]` table, checked key by key."""
    if "password" in table:
        raise ConfigError("hyperv.password is not accepted: passwords do not belong in config files; "
                          "use password_env (an environment variable) or password_file")
    unknown = set(table) - set(_TYPES)
    if unknown:
        raise ConfigError(f"unknown setting(s) hyperv.{', hyperv.'.join(sorted(unknown))}; "
                          f"known: {', '.join(f.name for f in fields(HyperVConfig))}")
    if "host" not in table:
        raise ConfigError("hyperv.host is required (the Hyper-V host's DNS name)")
    values = {key: _value(key, value) for key, value in table.items()}
    config = HyperVConfig(**values)
    if config.transport != "kerberos" and not config.user:
        raise ConfigError(f"hyperv.user is required with transport {config.transport!r}")
    if not _COLLECTOR_ID.match(config.collector_id):
        raise ConfigError("hyperv.collector_id must be 1-40 letters, digits, '-' or '_' (it names checkpoints); "
                          f"got {config.collector_id!r}")
    if config.transport == "credssp" and not config.https:
        raise ConfigError("transport credssp sends the password to the host; use it only with https = true")
    return config


def load_config(path: str | os.PathLike[str]) -> HyperVConfig:
    """Read the `[hyperv]` table of a TOML file."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    table = raw.get("hyperv")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a [hyperv] table")
    try:
        return parse_config(table)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
