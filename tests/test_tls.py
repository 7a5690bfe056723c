"""TLS: `chunkyard serve --tls-cert/--tls-key` with a private CA made here; backup and restore over https with
--cacert / CHUNKYARD_CACERT; a client without the CA fails with a clear certificate error; bad certificate
or key paths fail `serve` at startup with a clear message."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chunkyard.config import ConfigError, load_config
from chunkyard.wire import CertificateError, Client
from tests.conftest import ROOT, ServerProcess
from tests.helpers import make_disk


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_pki(folder: Path, common: str = "Chunkyard test CA") -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("chunkyard server")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    return paths


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_server(tmp_path: Path, pki: dict[str, Path]):
    srv = ServerProcess(tmp_path / "data", tls=(pki["cert"], pki["key"]), cacert=pki["ca"])
    srv.start()
    yield srv
    srv.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "CHUNKYARD_CACERT"} | (env or {}))


def test_backup_and_restore_over_https(tls_server: ServerProcess, pki: dict[str, Path], tmp_path: Path):
    assert tls_server.url.startswith("https://")
    image = tmp_path / "disk.img"
    image.write_bytes(make_disk("rrzcr", seed=3, tail=4096))
    auth = ["--server", tls_server.url, "--token", tls_server.admin_token]
    done = cli("backup", "--source", f"file:{image}", "--vm", "web01", "--state", str(tmp_path / "state"),
               "--json", "--cacert", str(pki["ca"]), *auth)
    assert done.returncode == 0, done.stderr
    import json

    point_id = json.loads(done.stdout)["point_id"]
    out = tmp_path / "restored.raw"
    # The CA through the environment this time.
    done = cli("restore", point_id, "--format", "raw", "-o", str(out), *auth, env={"CHUNKYARD_CACERT": str(pki["ca"])})
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == image.read_bytes()


async def test_a_client_without_the_ca_fails_clearly(tls_server: ServerProcess, pki: dict[str, Path],
                                                     tmp_path: Path):
    os.environ.pop("CHUNKYARD_CACERT", None)
    async with Client(tls_server.url, tls_server.admin_token) as client:
        with pytest.raises(CertificateError) as info:
            await client.vms()
    assert "certificate" in str(info.value) and "--cacert" in str(info.value)
    # Another CA's certificate does not help either.
    other = make_pki(tmp_path / "other", "Some other CA")
    async with Client(tls_server.url, tls_server.admin_token, cacert=other["ca"]) as client:
        with pytest.raises(CertificateError) as info:
            await client.vms()
    assert str(other["ca"]) in str(info.value)
    # The CLI says so without a traceback, for catalog commands and for backups.
    auth = ["--server", tls_server.url, "--token", tls_server.admin_token]
    for args in (("vms", *auth), ("backup", "--source", f"file:{pki['ca']}", "--vm", "x", "--state",
                                  str(tmp_path / "state"), *auth)):
        done = cli(*args)
        assert done.returncode == 2, done.stderr
        assert "certificate" in done.stderr and "--cacert" in done.stderr and "Traceback" not in done.stderr
    # A CA file that is not a certificate is named in the error.
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00not a certificate")
    done = cli("vms", "--cacert", str(junk), *auth)
    assert done.returncode == 2 and str(junk) in done.stderr and "Traceback" not in done.stderr
    # A URL without a scheme is refused up front.
    with pytest.raises(ValueError, match="http:// or https://"):
        Client(f"127.0.0.1:{tls_server.port}")


def test_bad_certificate_or_key_fails_serve_at_startup(tmp_path: Path, pki: dict[str, Path]):
    data = tmp_path / "data"
    ServerProcess(data)  # initialises the repository
    other = make_pki(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(os.urandom(300))
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki["key"])], "missing.pem"),
        (["--tls-cert", str(pki["cert"]), "--tls-key", str(tmp_path / "nokey.pem")], "nokey.pem"),
        (["--tls-cert", str(garbage), "--tls-key", str(pki["key"])], "garbage.pem"),
        (["--tls-cert", str(pki["cert"]), "--tls-key", str(other["key"])], "key"),  # a key of another cert
        (["--tls-cert", str(pki["cert"])], "--tls-key"),
        (["--tls-key", str(pki["key"])], "--tls-cert"),
    ]
    for args, expected in cases:
        done = subprocess.run([sys.executable, "-m", "chunkyard.cli", "serve", "--data", str(data), "--listen",
                               "127.0.0.1:1", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_tls_settings_in_the_config_file(tmp_path: Path, pki: dict[str, Path]):
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\ntls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n')
    loaded = load_config(config)
    assert (loaded.tls_cert, loaded.tls_key) == (pki["cert"], pki["key"])
    for bad, message in (('tls_cert = 5\ntls_key = "k"', "tls_cert must be a string path"),
                         (f'tls_cert = "{pki["cert"]}"', "both"),
                         ('tls_cert = ["a"]\ntls_key = "k"', "string path")):
        config.write_text(f"[server]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(config)
    # A server started from the config file serves HTTPS.
    config.write_text(f'[server]\ntls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\n')
    srv = ServerProcess(tmp_path / "data", config=config, cacert=pki["ca"])
    srv.url = srv.url.replace("http://", "https://")  # no --tls flags: the file alone turns TLS on
    srv.start()
    try:
        log = srv.log.read_text()
        assert "https://" in log
    finally:
        srv.stop()
