"""Signed download URLs (what the dashboard's download buttons use) and the dashboard's static files,
against a real server process: bit-exact downloads without a token, Range, and every way a link can be
tampered with, expire, or be aimed at something else; then content types, caching and path traversal."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
import tomllib
import urllib.parse

import aiohttp
import pytest
from multidict import CIMultiDict

from chunkyard.wire import Client
from repo_server.api.dashboard import WEB
from repo_server.api.signed import LIFETIME, SECRET_FILE, UrlSigner
from tests.conftest import ROOT, ServerProcess
from tests.helpers import MiB, backup, make_disk

DISK = make_disk("rzcr1", MiB, seed=3, tail=777)


async def link(client: Client, pid: str, disk_id: str = "d0", fmt: str = "raw") -> dict:
    return await client.json("POST", f"/points/{pid}/disks/{disk_id}/download-url", {"format": fmt})


def with_query(url: str, **changes: str) -> str:
    path, _, query = url.partition("?")
    params = dict(urllib.parse.parse_qsl(query)) | changes
    return f"{path}?{urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})}"


async def fetch(server: ServerProcess, url: str, method: str = "GET", headers: dict | None = None
                ) -> tuple[int, CIMultiDict, bytes]:
    """A request with no Authorization header, as a browser following a link makes it."""
    async with aiohttp.ClientSession() as s, s.request(method, server.url + url, headers=headers,
                                                       allow_redirects=False) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_signed_url_downloads_bit_exact_with_range(server: ServerProcess, admin: Client) -> None:
    pid = (await backup(admin, "vm1", {"d0": DISK}))["point_id"]
    reader_token = (await admin.create_token("reader", "dashboard"))["token"]
    async with server.client(reader_token) as reader:
        answer = await link(reader, pid)
    assert answer["url"].startswith(f"/api/v1/points/{pid}/disks/d0/raw?")
    assert abs(answer["expires"] - (time.time() + LIFETIME)) < 5
    assert answer["filename"] == f"VM1-d0-{pid}.raw"

    status, headers, body = await fetch(server, answer["url"])
    assert status == 200 and body == DISK
    assert headers["Content-Disposition"] == f'attachment; filename="VM1-d0-{pid}.raw"'
    status, headers, body = await fetch(server, answer["url"], headers={"Range": "bytes=1048000-2097999"})
    assert status == 206 and body == DISK[1048000:2098000]
    status, headers, body = await fetch(server, answer["url"], "HEAD")
    assert status == 200 and int(headers["Content-Length"]) == len(DISK) and body == b""

    vhdx = await link(admin, pid, fmt="vhdx")
    status, headers, body = await fetch(server, vhdx["url"])
    assert status == 200 and body[:8] == b"vhdxfile" and f"VM1-d0-{pid}.vhdx" in headers["Content-Disposition"]
    async with admin._session.get(f"{admin.base}/points/{pid}/disks/d0/vhdx") as r:
        assert await r.read() == body  # the same bytes as with a token

    # The secret is private to the server and outlives a restart: links stay valid across it.
    secret = server.data / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    server.restart()
    assert (await fetch(server, answer["url"]))[0] == 200


async def test_tampered_expired_and_misdirected_links_are_refused(server: ServerProcess, admin: Client) -> None:
    a = (await backup(admin, "vm1", {"d0": DISK, "d1": DISK[:MiB]}))["point_id"]
    b = (await backup(admin, "vm2", {"d0": DISK}))["point_id"]
    good = (await link(admin, a))["url"]
    path, _, query = good.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    flipped = ("0" if params["sig"][0] != "0" else "1") + params["sig"][1:]
    forged = {
        "another point": good.replace(a, b),
        "another disk": good.replace("/disks/d0/", "/disks/d1/"),
        "another format": good.replace("/raw?", "/vhdx?"),
        "a later expiry": with_query(good, exp=str(int(params["exp"]) + 3600)),
        "a changed signature": with_query(good, sig=flipped),
        "another token id": with_query(good, tok="0" * 16),
        "no signature": with_query(good, sig=None),
        "no expiry": with_query(good, exp=None),
        "a garbage signature": with_query(good, sig="zz" * 32),
        "a huge expiry": with_query(good, exp="9" * 40),
        "a negative expiry": with_query(good, exp="-5"),
        "a superscript expiry": with_query(good, exp="²" * 3),
        "a token id with a newline": with_query(good, tok=params["tok"] + "\n"),
        "an upper-case signature": with_query(good, sig=params["sig"].upper()),
    }
    for what, url in forged.items():
        status, _, body = await fetch(server, url)
        assert status in (401, 403), (what, status)
        assert json.loads(body)["error"] in ("bad_signature", "unauthorized"), what
        assert DISK[:4096] not in body

    # A signature opens only its signable GET route: not the point record, not a delete, not a POST.
    for method, other in [("GET", f"/api/v1/points/{a}"), ("DELETE", f"/api/v1/points/{a}"),
                          ("GET", f"/api/v1/points/{a}/disks/d0/map"), ("GET", "/api/v1/vms"),
                          ("POST", f"/api/v1/points/{a}/disks/d0/download-url")]:
        status, _, _ = await fetch(server, f"{other}?{query}", method)
        assert status == 401, (method, other)
    assert (await admin.point(a))["point_id"] == a  # nothing was deleted

    # Expired: signed with the server's own secret, as if ten minutes had passed.
    signer = UrlSigner(bytes.fromhex((server.data / SECRET_FILE).read_text()))
    old, _ = signer.sign(path, params["tok"], now=time.time() - LIFETIME - 1)
    status, _, body = await fetch(server, old)
    assert status == 401 and json.loads(body)["error"] == "link_expired"
    fresh, _ = signer.sign(path, params["tok"])
    assert (await fetch(server, fresh))[0] == 200

    # Revoking the token that asked for a link revokes the link.
    reader = await admin.create_token("reader", "soon revoked")
    async with server.client(reader["token"]) as client:
        url = (await link(client, a))["url"]
    assert (await fetch(server, url))[0] == 200
    await admin.revoke_token(reader["id"])
    status, _, body = await fetch(server, url)
    assert status == 401 and json.loads(body)["error"] == "link_revoked"


async def test_download_url_bad_input(server: ServerProcess, admin: Client, collector: Client) -> None:
    pid = (await backup(admin, "vm1", {"d0": DISK}))["point_id"]
    url = f"{admin.base}/points/{pid}/disks/d0/download-url"
    for body, status in [(b"", 400), (b"\xff\xfe garbage", 400), (b"{", 400), (b"[]", 422), (b'"raw"', 422),
                         (b"{}", 422), (b'{"format": "zip"}', 422), (b'{"format": 1}', 422),
                         (b'{"format": ["raw"]}', 422), (b'{"format": null}', 422),
                         (b'{"format": "' + b"r" * 100_000 + b'"}', 422), (b" " * (2 << 20), 413)]:
        async with admin._session.post(url, data=body) as r:
            assert r.status == status, (body[:40], r.status)
            assert (await r.json())["message"]
    for path, status in [(f"/points/{pid}/disks/nope/download-url", 404),
                         (f"/points/{'0' * 20}/disks/d0/download-url", 404),
                         ("/points/not-hex/disks/d0/download-url", 422),
                         (f"/points/{pid}/disks/..%2f..%2fx/download-url", 422)]:
        async with admin._session.post(admin.base + path, json={"format": "raw"}) as r:
            assert r.status == status, (path, r.status)
            assert (await r.json())["message"]
    with pytest.raises(Exception) as e:
        await link(collector, pid)
    assert getattr(e.value, "status", None) == 403  # collectors do not download
    async with aiohttp.ClientSession() as anonymous, anonymous.post(url, json={"format": "raw"}) as r:
        assert r.status == 401


async def test_dashboard_static_files(server: ServerProcess) -> None:
    status, headers, _ = await fetch(server, "/")
    assert status == 302 and headers["Location"] == "/ui/"
    status, headers, _ = await fetch(server, "/ui")
    assert status == 302 and headers["Location"] == "/ui/"
    types = {"/ui/": ("index.html", "text/html"), "/ui/index.html": ("index.html", "text/html"),
             "/ui/style.css": ("style.css", "text/css"), "/ui/js/app.js": ("js/app.js", "text/javascript"),
             "/ui/js/api.js": ("js/api.js", "text/javascript")}
    for path, (name, ctype) in types.items():
        status, headers, body = await fetch(server, path)
        assert status == 200 and headers["Content-Type"].startswith(ctype) and body == (WEB / name).read_bytes()
        assert headers["X-Content-Type-Options"] == "nosniff" and "frame-ancestors 'none'" in \
            headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-cache" and headers["ETag"]
        status, _, again = await fetch(server, path, headers={"If-None-Match": headers["ETag"]})
        assert status == 304 and again == b""
    assert (await fetch(server, "/ui/", headers={"If-None-Match": '"stale"'}))[0] == 200
    assert (await fetch(server, "/ui/nope.js"))[0] == 404


async def test_dashboard_path_traversal(server: ServerProcess) -> None:
    """Raw request lines (no client-side normalisation) that try to leave web/: none may read a file."""
    secret = (server.data / "repo.toml").read_bytes()
    attempts = ["/ui/../repo.toml", "/ui/..%2frepo.toml", "/ui/%2e%2e/%2e%2e/data/repo.toml",
                "/ui/%2e%2e%2f%2e%2e%2fapi%2fv1%2fvms", "/ui//etc/passwd", "/ui/%2fetc%2fpasswd",
                "/ui/js/../../../../etc/passwd", "/ui/....//....//etc/passwd", "/ui/js/%00app.js",
                "/ui/..\\..\\repo.toml", "/ui/%5c..%5crepo.toml", "/ui/js/app.js/../../../pyproject.toml",
                "/ui/./../api/dashboard.py", "/ui/%252e%252e/repo.toml"]
    for target in attempts:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
        writer.close()
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 404), (target, answer[:200])
        for leak in (secret, b"root:x:0:0", b"[project]", b"def add_routes"):
            assert leak not in answer, target


def test_web_files_are_package_data_and_offline() -> None:
    """Every dashboard file ships in a non-editable install, and none loads anything from another origin."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["repo_server"]
    files = [p for p in WEB.rglob("*") if p.is_file()]
    assert files
    for path in files:
        rel = path.relative_to(WEB.parent)
        assert any(rel.match(g) for g in globs), f"{rel} is not in [tool.setuptools.package-data]"
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{rel} refers to another origin"
