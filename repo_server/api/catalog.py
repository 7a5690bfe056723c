"""Catalog and restore endpoints: VMs, points, disk maps, blobs, raw disk downloads."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque

from aiohttp import web

from repo_server.engine import Corrupt
from repo_server.engine.points import public
from repo_server.engine.restore import DiskImage, find_disk

from .common import METRICS, POOL, REPO, ApiError, roles, run, token_of

log = logging.getLogger("chunkyard.restore")
READ_AHEAD = 8  # chunks decompressed and verified ahead of the socket
LOCATE_BATCH = 256
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@roles("admin", "reader")
async def list_vms(request: web.Request) -> web.Response:
    return web.json_response({"vms": await run(request, request.app[REPO].points.vms)})


@roles("admin", "reader")
async def list_points(request: web.Request) -> web.Response:
    points = await run(request, request.app[REPO].points.of_vm, request.match_info["vm_id"])
    return web.json_response({"points": [public(p) for p in points]})


@roles("admin", "reader")
async def get_point(request: web.Request) -> web.Response:
    return web.json_response(public(request.app[REPO].points.get(request.match_info["pid"])))


@roles("admin")
async def delete_point(request: web.Request) -> web.Response:
    await run(request, request.app[REPO].points.delete, request.match_info["pid"])
    return web.Response(status=204)


@roles("admin", "reader", "collector")
async def get_map(request: web.Request) -> web.StreamResponse:
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"])
    token = token_of(request)
    if token.role == "collector" and point["token_id"] != token.id:
        raise ApiError(403, "forbidden", "collectors may read only the maps of points they created")
    image = DiskImage(repo, point, request.match_info["disk_id"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "ETag": image.etag})
    resp.content_length = image.chunks * 32
    await resp.prepare(request)
    try:
        for page in range(len(image.root)):
            await resp.write(b"".join(await run(request, image.page, page)))
    finally:
        image.close()
    await resp.write_eof()
    return resp


@roles("admin", "reader")
async def get_blob(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"])
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


async def stream_image(request: web.Request, image: DiskImage, resp: web.StreamResponse, start: int,
                       stop: int) -> None:
    """Write bytes [start, stop) of a disk: chunks located in batches, read and verified ahead on the pool."""
    loop = asyncio.get_running_loop()
    pool = request.app[POOL]
    cs = image.chunk_size
    first, last = start // cs, (stop - 1) // cs
    pending: deque[tuple[int, asyncio.Future]] = deque()
    metrics = request.app[METRICS]

    async def drain_one() -> None:
        index, fut = pending.popleft()
        data = await fut
        lo = start - index * cs if index == first else 0
        hi = stop - index * cs if index == last else len(data)
        await resp.write(data[lo:hi] if lo or hi != len(data) else data)
        metrics.bytes_out += hi - lo

    try:
        for batch_start in range(first, last + 1, LOCATE_BATCH):
            batch_stop = min(last + 1, batch_start + LOCATE_BATCH)
            locations = await loop.run_in_executor(pool, image.locations, batch_start, batch_stop)
            for index, loc in enumerate(locations, batch_start):
                pending.append((index, loop.run_in_executor(pool, image.read_chunk, index, loc)))
                if len(pending) >= READ_AHEAD:
                    await drain_one()
        while pending:
            await drain_one()
    except Corrupt as e:
        # Headers are sent: the only honest signal left is to cut the connection short of Content-Length.
        log.error("restore of %s stopped: %s", image.etag, e)
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError(f"restore aborted: {e}") from e
    finally:
        for _, fut in pending:
            fut.cancel()
        await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        image.close()


@roles("admin", "reader")
async def get_raw(request: web.Request) -> web.StreamResponse:
    repo = request.app[REPO]
    point = repo.points.get(request.match_info["pid"])
    find_disk(point, request.match_info["disk_id"])
    image = DiskImage(repo, point, request.match_info["disk_id"])
    try:
        span = parse_range(request, image.size, image.etag)
    except ApiError:
        image.close()
        raise
    start, stop = span or (0, image.size)
    resp = web.StreamResponse(status=206 if span else 200, headers={
        "Content-Type": "application/octet-stream", "ETag": image.etag, "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{image.disk["disk_id"]}.raw"',
    })
    if span:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{image.size}"
    resp.content_length = stop - start
    await resp.prepare(request)
    await stream_image(request, image, resp, start, stop)
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/vms", list_vms)
    r.add_get("/api/v1/vms/{vm_id}/points", list_points)
    r.add_get("/api/v1/points/{pid}", get_point)
    r.add_delete("/api/v1/points/{pid}", delete_point)
    r.add_get("/api/v1/points/{pid}/disks/{disk_id}/map", get_map)
    r.add_get("/api/v1/points/{pid}/disks/{disk_id}/raw", get_raw)
    r.add_get("/api/v1/points/{pid}/blobs/{name}", get_blob)
