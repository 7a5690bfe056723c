"""Catalog and restore endpoints: VMs, points, disk maps, blobs, raw disk downloads."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from aiohttp import web

from chunkyard.vdisk import Piece, VhdxLayout
from chunkyard.wire import DIGEST_LEN, ZERO
from repo_server.engine import Corrupt, Repository, Unavailable
from repo_server.engine.manifest import PAGE_BYTES, PAGE_ENTRIES, chunk_length
from repo_server.engine.points import public, vm_view
from repo_server.engine.restore import DiskImage, find_disk
from repo_server.engine.verify import verify_status

from .audit import audited, note
from .common import METRICS, POOL, REPO, STREAMING, ApiError, read_json, roles, run, scope, token_of
from .signed import SIGNER, signable

log = logging.getLogger("chunkyard.restore")
READ_AHEAD = 8  # chunks decompressed and verified ahead of the socket
REMOTE_READ_AHEAD = 16  # the same when packs were moved to a cloud tier: reads of those wait on the network
LOCATE_BATCH = 256
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@roles("admin", "reader")
async def list_vms(request: web.Request) -> web.Response:
    vms = await run(request, request.app[REPO].points.vms, scope(request))
    return web.json_response({"vms": [vm_view(v) for v in vms]})


def shown(repo: Repository, record: dict) -> dict:
    """A point as the API shows it, with its latest verify status (None until verified)."""
    return public(record) | {"verify": verify_status(repo, record["point_id"])}


@roles("admin", "reader")
async def list_points(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    points = await run(request, repo.points.of_vm, request.match_info["vm_id"], scope(request))
    return web.json_response({"points": [shown(repo, p) for p in points]})


@roles("admin", "reader")
async def get_point(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    return web.json_response(shown(repo, repo.points.get(request.match_info["pid"], scope(request))))


@roles("admin")
@audited("point.delete", lambda request: request.match_info["pid"])
async def delete_point(request: web.Request) -> web.Response:
    record = await run(request, request.app[REPO].points.delete, request.match_info["pid"], scope(request))
    note(request, tenant=record.get("tenant", ""), vm=record["vm"]["id"])
    return web.Response(status=204)


@roles("admin", "reader", "collector")
async def get_map(request: web.Request) -> web.StreamResponse:
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"], scope(request))
    token = token_of(request)
    if token.role == "collector" and point["token_id"] != token.id:
        raise ApiError(403, "forbidden", "collectors may read only the maps of points they created")
    image = DiskImage(repo, point, request.match_info["disk_id"])
    size, etag = image.chunks * DIGEST_LEN, f'"{point["point_id"]}.{image.disk["disk_id"]}.map"'
    try:
        span = parse_range(request, size, etag)  # collectors page through huge maps with bounded memory
    except ApiError:
        image.close()
        raise
    start, stop = span or (0, size)
    resp = web.StreamResponse(status=206 if span else 200, headers={
        "Content-Type": "application/octet-stream", "ETag": etag, "Accept-Ranges": "bytes"})
    if span:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method == "HEAD":
        image.close()
        return resp
    request[STREAMING] = True
    try:
        first, last = start // PAGE_BYTES, (stop - 1) // PAGE_BYTES
        for page in range(first, last + 1):
            data = repo.keyring.digests(b"".join(await run(request, image.page, page)))
            lo = start - page * PAGE_BYTES if page == first else 0
            hi = stop - page * PAGE_BYTES if page == last else len(data)
            await resp.write(data[lo:hi])
    finally:
        image.close()
    await resp.write_eof()
    return resp


@roles("admin", "reader")
async def get_blob(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"], scope(request))
    data = await run(request, repo.read_blob, point, request.match_info["name"])
    return web.Response(body=data, content_type="application/octet-stream")


def parse_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """The single byte range asked for, as [start, stop); None for the whole body.

    Malformed, reversed, multi-range and unsatisfiable ranges get 416 with `Content-Range: bytes */size`;
    an If-Range that does not match the ETag asks for the whole body (RFC 9110 §13.1.5).
    """
    header = request.headers.get("Range")
    if header is None:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != etag:
        return None
    m = _RANGE.match(header.strip())
    unsatisfiable = ApiError(416, "bad_range", f"cannot serve range {header!r:.80} of a {size}-byte body "
                             "(one range 'bytes=a-b', 'bytes=a-' or 'bytes=-n' is supported)",
                             headers={"Content-Range": f"bytes */{size}"})
    if not m or (not m[1] and not m[2]):
        raise unsatisfiable
    if not m[1]:
        start, stop = max(0, size - int(m[2])), size
        if int(m[2]) == 0:
            raise unsatisfiable
    else:
        start = int(m[1])
        stop = min(size, int(m[2]) + 1) if m[2] else size
        if m[2] and int(m[2]) < start:
            raise unsatisfiable
    if start >= size:
        raise unsatisfiable
    return start, stop


ZERO_BLOCK = bytes(1 << 20)


def raw_pieces(image: DiskImage, start: int, stop: int) -> Iterator[Piece]:
    """The raw image's bytes [start, stop) as chunk slices."""
    cs = image.chunk_size
    for index in range(start // cs, (stop - 1) // cs + 1):
        lo = max(start - index * cs, 0)
        hi = min(stop - index * cs, chunk_length(index, image.size, cs))
        yield ("chunk", index, lo, hi - lo)


async def stream_pieces(request: web.Request, image: DiskImage, resp: web.StreamResponse,
                        pieces: Iterable[Piece], fmt: str) -> None:
    """Write pieces in order; chunks are located in batches and read, decompressed and verified
    ahead of the socket on the thread pool."""
    loop = asyncio.get_running_loop()
    pool = request.app[POOL]
    metrics = request.app[METRICS]
    pending: deque[tuple[asyncio.Future | bytes, int, int]] = deque()
    moved, remote = image.repo.chunks.moved, image.repo.chunks.remote
    read_ahead = REMOTE_READ_AHEAD if moved and remote is not None else READ_AHEAD
    located: list = []
    located_from = 0

    async def drain_one() -> None:
        item, lo, n = pending.popleft()
        data = item if isinstance(item, bytes) else await item
        if lo + n > len(data):  # the sector padding after an odd-sized disk's last chunk
            data = data.ljust(lo + n, b"\0")
        await resp.write(data if lo == 0 and n == len(data) else memoryview(data)[lo : lo + n])
        metrics.restored(n, fmt)

    try:
        for piece in pieces:
            if piece[0] == "bytes":
                pending.append((piece[1], 0, len(piece[1])))
            elif piece[0] == "zeros":
                for done in range(0, piece[1], len(ZERO_BLOCK)):
                    pending.append((ZERO_BLOCK, 0, min(len(ZERO_BLOCK), piece[1] - done)))
            else:
                _, index, lo, n = piece
                if not located_from <= index < located_from + len(located):
                    located_from = index
                    located = await loop.run_in_executor(
                        pool, image.locations, index, min(image.chunks, index + LOCATE_BATCH))
                loc = located[index - located_from]
                executor = remote.pool if remote is not None and loc is not None and loc.pack_id in moved else pool
                pending.append((loop.run_in_executor(executor, image.read_chunk, index, loc), lo, n))
            while len(pending) >= read_ahead:
                await drain_one()
        while pending:
            await drain_one()
    except (Corrupt, Unavailable) as e:
        # Headers are sent: the only honest signal left is to cut the connection short of Content-Length.
        log.error("restore of %s stopped: %s", image.etag, e)
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError(f"restore aborted: {e}") from e
    finally:
        futures = [item for item, _, _ in pending if isinstance(item, asyncio.Future)]
        for fut in futures:
            fut.cancel()
        await asyncio.gather(*futures, return_exceptions=True)
        image.close()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64]


def download_name(point: dict, disk_id: str, fmt: str) -> str:
    """<vm>-<disk>-<point>.<fmt>: the VM's and disk's names (the disk id without a name), filesystem-safe."""
    disk = find_disk(point, disk_id)
    stem = _safe(str(disk.get("name") or "").rsplit(".", 1)[0]) or _safe(disk_id)
    return f"{_safe(point['vm'].get('name') or point['vm']['id']) or 'vm'}-{stem}-{point['point_id']}.{fmt}"


async def download(request: web.Request, fmt: str) -> web.StreamResponse:
    """A restore download (raw or VHDX) with single-range, ETag and If-Range support."""
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"], scope(request))
    disk_id = request.match_info["disk_id"]
    find_disk(point, disk_id)
    image = DiskImage(repo, point, disk_id)
    try:
        if fmt == "vhdx":
            layout = await run(request, request.app[LAYOUTS].get, image)
            size, etag = layout.total_size, f'"{point["point_id"]}.{disk_id}.vhdx"'
        else:
            size, etag = image.size, image.etag
        span = parse_range(request, size, etag)
        if request.method != "HEAD":
            await run(request, repo.chunks.check_remote)  # a cloud tier that is down: 503 now, not a cut stream
    except BaseException:
        image.close()
        raise
    start, stop = span or (0, size)
    resp = web.StreamResponse(status=206 if span else 200, headers={
        "Content-Type": "application/octet-stream", "ETag": etag, "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{download_name(point, disk_id, fmt)}"',
    })
    if span:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method == "HEAD":  # aiohttp routes HEAD here too: headers only, no chunk reads
        image.close()
        return resp
    request[STREAMING] = True
    pieces = layout.pieces(start, stop) if fmt == "vhdx" else raw_pieces(image, start, stop)
    await stream_pieces(request, image, resp, pieces, fmt)
    await resp.write_eof()
    return resp


SECTOR = 512


class LayoutCache:
    """VHDX layouts of recent downloads: points are immutable, so a resumed download reuses its layout."""

    def __init__(self, size: int = 16):
        self._size = size
        self._layouts: OrderedDict[str, VhdxLayout] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image: DiskImage) -> VhdxLayout:
        with self._lock:
            layout = self._layouts.get(image.etag)
            if layout is not None:
                self._layouts.move_to_end(image.etag)
                return layout
        present = bytearray(image.chunks)
        for page, page_digest in enumerate(image.root):
            if page_digest != ZERO:
                for i, d in enumerate(image.page(page), page * PAGE_ENTRIES):
                    present[i] = d != ZERO
        # VHDX sizes are whole sectors: an odd-sized source (a file or device image) is padded with zeros.
        size = -(-image.size // SECTOR) * SECTOR
        layout = VhdxLayout(size, image.chunk_size, bytes(present), seed=image.etag.encode())
        with self._lock:
            self._layouts[image.etag] = layout
            while len(self._layouts) > self._size:
                self._layouts.popitem(last=False)
        return layout


LAYOUTS = web.AppKey("vhdx_layouts", LayoutCache)


@signable
@roles("admin", "reader")
async def get_raw(request: web.Request) -> web.StreamResponse:
    return await download(request, "raw")


@signable
@roles("admin", "reader")
async def get_vhdx(request: web.Request) -> web.StreamResponse:
    return await download(request, "vhdx")


@roles("admin", "reader")
async def download_url(request: web.Request) -> web.Response:
    """A signed link to the raw or VHDX download of one disk of one point (see signed.py)."""
    body = await read_json(request)
    fmt = body.get("format") if isinstance(body, dict) else None
    if fmt not in ("raw", "vhdx"):
        raise ApiError(422, "bad_field", 'the body must be {"format": "raw"} or {"format": "vhdx"}')
    pid, disk_id = request.match_info["pid"], request.match_info["disk_id"]
    point = request.app[REPO].points.get(pid, scope(request))
    filename = download_name(point, disk_id, fmt)  # 404 for a disk the point does not have
    url, expires = request.app[SIGNER].sign(f"/api/v1/points/{pid}/disks/{disk_id}/{fmt}", token_of(request).id)
    return web.json_response({"url": url, "expires": expires, "filename": filename})


def add_routes(app: web.Application) -> None:
    app[LAYOUTS] = LayoutCache()
    r = app.router
    r.add_get("/api/v1/vms", list_vms)
    r.add_get("/api/v1/vms/{vm_id}/points", list_points)
    r.add_get("/api/v1/points/{pid}", get_point)
    r.add_delete("/api/v1/points/{pid}", delete_point)
    r.add_get("/api/v1/points/{pid}/disks/{disk_id}/map", get_map)
    r.add_get("/api/v1/points/{pid}/disks/{disk_id}/raw", get_raw)
    r.add_get("/api/v1/points/{pid}/disks/{disk_id}/vhdx", get_vhdx)
    r.add_post("/api/v1/points/{pid}/disks/{disk_id}/download-url", download_url)
    r.add_get("/api/v1/points/{pid}/blobs/{name}", get_blob)
