"""The web dashboard: static HTML, CSS and JavaScript modules from repo_server/web/, served at /ui/.

The files are public (they hold no data; the page asks for a token and calls the JSON API with it).
Only the files found under web/ when the server starts are served, looked up by exact name, so no
request path can reach anything else (`..`, encoded slashes, absolute paths all miss the table).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .common import ApiError, public

WEB = Path(__file__).resolve().parent.parent / "web"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Everything from this server, nothing inline, no framing: a token pasted into the page stays in it.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate every time (a cheap 304): an upgraded server never runs with a stale script.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class WebFile:
    body: bytes
    content_type: str
    etag: str


def load_files(root: Path = WEB) -> dict[str, WebFile]:
    """Every servable file under root by its relative POSIX path; other file types are left out."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in TYPES:
            body = path.read_bytes()
            files[path.relative_to(root).as_posix()] = WebFile(
                body, TYPES[path.suffix], f'"{hashlib.sha256(body).hexdigest()[:20]}"')
    return files


FILES = web.AppKey("dashboard_files", dict)


@public
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


@public
async def ui_file(request: web.Request) -> web.Response:
    name = request.match_info["path"] or "index.html"
    file = request.app[FILES].get(name)
    if file is None:
        raise ApiError(404, "not_found", f"the dashboard has no file {name!r:.80}; open /ui/")
    headers = HEADERS | {"ETag": file.etag}
    if request.headers.get("If-None-Match") == file.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers=headers | {"Content-Type": file.content_type})


def add_routes(app: web.Application) -> None:
    app[FILES] = load_files()
    app.router.add_get("/", root)
    app.router.add_get("/ui", root)
    app.router.add_get("/ui/{path:.*}", ui_file)
