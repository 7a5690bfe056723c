"""The service around the API: OpenAPI coverage, health, metrics, tokens, CLI and configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chunkyard.config import ConfigError, load_config
from chunkyard.wire import ApiError, Client
from repo_server.api import create_app
from repo_server.api.openapi import openapi_document
from tests.conftest import ROOT, ServerProcess
from tests.helpers import backup


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_openapi_documents_exactly_the_routes() -> None:
    app = create_app(load_config())
    routed = {(r.method.lower(), r.resource.canonical)
              for r in app.router.routes() if r.method != "HEAD"}
    doc = openapi_document()
    documented = {(m, p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert routed == documented


async def test_health_openapi_metrics_and_stats(server: ServerProcess, admin: Client) -> None:
    async with server.client("") as anonymous:
        assert (await anonymous.health())["status"] == "ok"
        assert (await anonymous.json("GET", "/openapi.json"))["openapi"].startswith("3.")
    await backup(admin, "vm1", {"d0": b"\x01" * 5000})
    resp = await admin._request("GET", "/metrics")
    text = await resp.text()
    assert "chunkyard_point_count 1.0" in text and 'route="/api/v1/sessions"' in text
    stats = await admin.repository()
    assert stats["chunk_count"] == 2 and stats["logical_bytes"] == 1 << 20  # the data chunk + its page


async def test_token_lifecycle(server: ServerProcess, admin: Client) -> None:
    created = await admin.create_token("reader", "dashboards")
    assert created["token"].startswith("cy_") and created["role"] == "reader"
    listed = await admin.tokens()
    assert {t["role"] for t in listed} == {"admin", "reader"} and all("token" not in t for t in listed)
    async with server.client(created["token"]) as reader:
        assert await reader.vms() == []
        await admin.revoke_token(created["id"])
        with pytest.raises(ApiError) as e:
            await reader.vms()
        assert e.value.status == 401


def test_cli_help_reads_well() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for command in ("init", "serve", "token", "vms", "points", "stats", "repair"):
        assert command in out.stdout
    assert "CHUNKYARD_SERVER" in out.stdout


def test_cli_init_serve_and_catalog(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = cli("init", "--data", str(data), "--chunk-size", "512KiB")
    assert out.returncode == 0, out.stderr
    token = (data / "admin.token").read_text().strip()
    assert token in out.stdout and (data / "admin.token").stat().st_mode & 0o777 == 0o600
    again = cli("init", "--data", str(data))
    assert again.returncode == 2 and "already holds a repository" in again.stderr
    srv = ServerProcess(data)
    srv.start()
    try:
        base = ["--server", srv.url, "--token", token]
        stats = cli("stats", *base)
        assert "512.0 KiB" in stats.stdout
        created = cli("token", "create", "--role", "collector", "--name", "hv01", *base, "--json")
        assert created.returncode == 0 and '"role": "collector"' in created.stdout
        assert "hv01" in cli("token", "list", *base).stdout
        assert "VM ID" in cli("vms", *base).stdout
        denied = cli("vms", "--server", srv.url, "--token", "cy_wrong")
        assert denied.returncode == 2 and "--token" in denied.stderr
        busy = cli("token", "list", "--data", str(data))
        assert busy.returncode == 2 and "in use by another Chunkyard process" in busy.stderr
    finally:
        srv.stop()
    unreachable = cli("vms", "--server", srv.url, "--token", token)
    assert unreachable.returncode == 2 and "cannot reach the server" in unreachable.stderr
    no_repo = cli("serve", "--data", str(tmp_path / "nothing"))
    assert no_repo.returncode == 2 and "chunkyard init" in no_repo.stderr


@pytest.mark.parametrize("text, message", [
    ("[server\n", "not valid TOML"),
    ('[server]\nlisten = "nohost"\n', "HOST:PORT"),
    ("[server]\nworkers = 0\n", "must be positive"),
    ('[server]\nworkers = "four"\n', "must be int"),
    ("[server]\nwrokers = 4\n", "unknown setting server.wrokers"),
    ("[client]\nx = 1\n", "expected only a [server] table"),
])
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\ndata = "/srv/chunkyard"\nlisten = "0.0.0.0:9000"\nworkers = 8\n')
    config = load_config(path, listen="127.0.0.1:9001")
    assert (config.data, config.port, config.host, config.workers) == (Path("/srv/chunkyard"), 9001,
                                                                      "127.0.0.1", 8)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


async def test_head_of_downloads_sends_headers_only(server: ServerProcess, admin: Client) -> None:
    """HEAD must not stream (or read) the disk: a reused connection would otherwise be corrupted."""
    import aiohttp

    point = await backup(admin, "vm1", {"d0": b"\x07" * (3 << 20)})
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for fmt in ("raw", "vhdx", "map"):
            url = f"{server.url}/api/v1/points/{point['point_id']}/disks/d0/{fmt}"
            async with s.head(url) as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) > 0
                assert await r.read() == b""
            async with s.get(url, headers={"Range": "bytes=0-9"} if fmt != "map" else {}) as r:
                assert r.status in (200, 206)  # the same connection still works
