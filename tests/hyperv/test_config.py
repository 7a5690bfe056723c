"""The [hyperv] TOML table: defaults, every check, and where the password may come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from collectors.sources.hyperv import ConfigError, load_config, parse_config

GOOD = """
[hyperv]
host = "hv01.corp.example"
user = "CORP\\\\svc-backup"
password_file = "{secret}"
collector_id = "col-1"
vms = ["web*", "5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B9A88"]
exclude = ["web-test"]
prune_reference_points = "previous"
job_timeout = 120.5

[hyperv.paths]
'C:\\ClusterStorage\\Volume1' = '\\\\sofs01\\vms'
"D:\\\\VMs" = "/mnt/hv01-d"
"""


def test_full_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pa'ss$word\n")
    path = tmp_path / "collector.toml"
    path.write_text(GOOD.replace("{secret}", str(secret)))
    config = load_config(path)
    assert config.host == "hv01.corp.example" and config.user == "CORP\\svc-backup"
    assert (config.https, config.port, config.transport, config.verify_tls) == (True, 5986, "ntlm", True)
    assert config.vms == ("web*", "5B3D9E6A-1C2F-4E8B-9A7D-3F2E1C0B9A88") and config.exclude == ("web-test",)
    assert config.paths == {"C:\\ClusterStorage\\Volume1": "\\\\sofs01\\vms", "D:\\VMs": "/mnt/hv01-d"}
    assert config.job_timeout == 120.5 and config.prune_reference_points == "previous"
    assert config.password() == "pa'ss$word"  # only the trailing newline is stripped


def test_defaults_and_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({"host": "hv01", "user": "svc", "https": False})
    assert config.port == 5985 and config.data_path == "smb" and config.admin_shares
    assert config.saved_state_fallback and config.prune_reference_points == "all"
    monkeypatch.delenv("CHUNKYARD_HYPERV_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"set the environment variable CHUNKYARD_HYPERV_PASSWORD"):
        config.password()
    monkeypatch.setenv("CHUNKYARD_HYPERV_PASSWORD", "s3cret")
    assert config.password() == "s3cret"
    kerberos = parse_config({"host": "hv01", "transport": "kerberos"})
    monkeypatch.delenv("CHUNKYARD_HYPERV_PASSWORD")
    assert kerberos.user is None and kerberos.password() is None  # the ticket cache authenticates


@pytest.mark.parametrize(("table", "message"), [
    ({"user": "svc"}, "hyperv.host is required"),
    ({"host": "hv01", "user": "svc", "password": "x"}, "passwords do not belong in config files"),
    ({"host": "hv01", "user": "svc", "pasword_env": "X"}, "unknown setting.*hyperv.pasword_env"),
    ({"host": "hv01", "user": "svc", "port": "5986"}, "hyperv.port must be an integer"),
    ({"host": "hv01", "user": "svc", "port": True}, "hyperv.port must be an integer"),
    ({"host": "hv01", "user": "svc", "port": 0}, "hyperv.port must be positive"),
    ({"host": "hv01", "user": "svc", "https": "yes"}, "hyperv.https must be true/false"),
    ({"host": "hv01", "user": "svc", "transport": "basic"}, "transport must be one of ntlm, kerberos, credssp"),
    ({"host": "hv01", "user": "svc", "transport": "credssp", "https": False}, "only with https"),
    ({"host": "hv01"}, "hyperv.user is required with transport 'ntlm'"),
    ({"host": "hv01", "user": "svc", "vms": "web*"}, "hyperv.vms must be a list of strings"),
    ({"host": "hv01", "user": "svc", "vms": ["web", 3]}, "list of non-empty strings"),
    ({"host": "hv01", "user": "svc", "paths": {"VMs": "\\\\x\\y"}}, "absolute Windows path"),
    ({"host": "hv01", "user": "svc", "paths": {"D:\\VMs": 5}}, "non-empty string"),
    ({"host": "hv01", "user": "svc", "collector_id": "a b"}, "collector_id must be"),
    ({"host": "hv01", "user": "svc", "data_path": "nfs"}, "data_path must be one of smb, local"),
    ({"host": "hv01", "user": "svc", "job_timeout": -1}, "job_timeout must be positive"),
])
def test_bad_tables(table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(table)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[hyperv\nhost = 1")
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        load_config(bad)
    bad.write_text("[server]\nlisten = '1'\n")
    with pytest.raises(ConfigError, match=r"expected a \[hyperv\] table"):
        load_config(bad)
    bad.write_text("[hyperv]\nhost = 'h'\nuser = 'u'\nreads_in_flight = 2.5\n")
    with pytest.raises(ConfigError, match=r"bad.toml: hyperv.reads_in_flight must be an integer"):
        load_config(bad)
    missing = parse_config({"host": "h", "user": "u", "password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"password_file"):
        missing.password()
