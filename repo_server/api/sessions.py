"""Backup session endpoints: create, missing, chunks, map, blobs, commit, abort."""

from __future__ import annotations

import asyncio

from aiohttp import web

from chunkyard.wire import FrameError, decode_frames
from repo_server.engine.sessions import verify_frames

from .common import CONFIG, METRICS, POOL, REPO, ApiError, read_body, read_json, roles, run, token_of

MiB = 1 << 20


def _own_session(request: web.Request) -> str:
    """The session id of the path, after checking the caller started that session (or is admin)."""
    sid = request.match_info["sid"]
    header = request.app[REPO].sessions.header(sid)
    token = token_of(request)
    if token.tenant and header.get("tenant", "") != token.tenant:  # answered like an unknown session
        raise ApiError(404, "session_not_found", f"no backup session {sid} (it expired or never existed)")
    if token.role != "admin" and header["token_id"] != token.id:
        raise ApiError(403, "forbidden", f"session {sid} belongs to another token")
    return sid


@roles("admin", "collector")
async def create_session(request: web.Request) -> web.Response:
    body = await read_json(request)
    result = await run(request, request.app[REPO].sessions.create, body, token_of(request))
    return web.json_response(result, status=201)


@roles("admin", "collector")
async def get_session(request: web.Request) -> web.Response:
    sid = _own_session(request)
    repo = request.app[REPO]
    header = repo.sessions.header(sid)
    return web.json_response(header | {"stats": repo.sessions.stats(sid)})


@roles("admin", "collector")
async def missing(request: web.Request) -> web.Response:
    sid = _own_session(request)
    body = await read_body(request, 65536 * 32)
    bitmap = await run(request, request.app[REPO].sessions.missing, sid, body)
    return web.Response(body=bitmap, content_type="application/octet-stream")


@roles("admin", "collector")
async def upload_chunks(request: web.Request) -> web.Response:
    sid = _own_session(request)
    repo = request.app[REPO]
    repo.sessions.open_header(sid)
    body = await read_body(request, request.app[CONFIG].max_chunk_body_mib * MiB)
    try:
        frames = decode_frames(body)
    except FrameError as e:
        raise ApiError(422, "bad_frame", str(e)) from None
    if not frames:
        raise ApiError(422, "bad_frame", "the body holds no frames")
    # Verify in slices on the worker threads (zstd and BLAKE3 release the GIL).
    workers = request.app[POOL]._max_workers
    step = -(-len(frames) // min(workers, len(frames)))
    loop = asyncio.get_running_loop()
    parts = await asyncio.gather(*(
        loop.run_in_executor(request.app[POOL], verify_frames, frames[i : i + step], repo.chunk_size, i)
        for i in range(0, len(frames), step)
    ))
    chunks = [c for part in parts for c in part]
    result = await run(request, repo.sessions.store_chunks, sid, chunks)
    request.app[METRICS].ingested(result.stored, result.duplicate, result.raw_bytes,
                                  sum(c.raw_len for c in chunks) - result.raw_bytes, result.bytes)
    return web.json_response({"stored": result.stored, "duplicate": result.duplicate, "bytes": result.bytes})


@roles("admin", "collector")
async def map_disk(request: web.Request) -> web.Response:
    sid = _own_session(request)
    body = await read_body(request, 64 * MiB)
    mapped = await run(request, request.app[REPO].sessions.map, sid, request.match_info["disk_id"], body)
    return web.json_response({"mapped": mapped})


@roles("admin", "collector")
async def put_blob(request: web.Request) -> web.Response:
    sid = _own_session(request)
    request.app[REPO].sessions.open_header(sid)
    body = await read_body(request, request.app[CONFIG].max_blob_mib * MiB)
    result = await run(request, request.app[REPO].sessions.put_blob, sid, request.match_info["name"], body)
    return web.json_response(result, status=201)


@roles("admin", "collector")
async def commit(request: web.Request) -> web.Response:
    sid = _own_session(request)
    reported = await read_json(request, optional=True)
    if not isinstance(reported, dict):
        raise ApiError(422, "bad_body", "the commit body, when given, must be a JSON object")
    record = await run(request, request.app[REPO].sessions.commit, sid, reported)
    return web.json_response({"point_id": record["point_id"], "stats": record["stats"]}, status=201)


@roles("admin", "collector")
async def abort(request: web.Request) -> web.Response:
    sid = _own_session(request)
    await run(request, request.app[REPO].sessions.abort, sid)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/sessions", create_session)
    r.add_get("/api/v1/sessions/{sid}", get_session)
    r.add_delete("/api/v1/sessions/{sid}", abort)
    r.add_post("/api/v1/sessions/{sid}/missing", missing)
    r.add_post("/api/v1/sessions/{sid}/chunks", upload_chunks)
    r.add_post("/api/v1/sessions/{sid}/disks/{disk_id}/map", map_disk)
    r.add_put("/api/v1/sessions/{sid}/blobs/{name}", put_blob)
    r.add_post("/api/v1/sessions/{sid}/commit", commit)
