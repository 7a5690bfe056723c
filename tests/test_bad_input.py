"""Bad input over real HTTP: every rejection is a JSON error {"error": code, "message": text} with a fitting
status (DESIGN §4), a rejected request stores nothing, and the server keeps serving valid requests."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zstandard
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from chunkyard.wire import (
    API_PREFIX,
    CODEC_RAW,
    CODEC_ZSTD,
    FRAME_HEADER,
    MAX_CHUNK_BODY,
    MAX_MISSING_QUERY,
    ZERO,
    Client,
    Frame,
    digest,
    encode_frame,
    encode_frames,
    encode_map,
    make_frame,
)
from tests.conftest import ServerProcess
from tests.helpers import MiB, backup, make_disk, restore

UNKNOWN_SID = "0" * 32
UNKNOWN_PID = "0" * 20
MALFORMED_IDS = ("..%2Fx", "%2e%2e%2fx", "..%2F..%2Fetc%2Fpasswd", "XYZ", "abc", "0" * 65)
"""Session or point ids that are not 16-64 lower-case hex characters (sent as written, never normalised)."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
STORED = ("chunk_count", "unique_bytes", "stored_bytes", "point_count", "logical_bytes", "vm_count")


# ------------------------------------------------------------------------------------------ raw HTTP


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """Raw requests: the path goes out exactly as written (percent-escapes included), any header, any body."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session = session
        self.url = url

    async def __call__(self, method: str, path: str, token: str | None = None, *, headers: dict | None = None,
                       prefix: str = API_PREFIX, **body: Any) -> Answer:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = URL(self.url + prefix + path, encoded=True)
        async with self.session.request(method, url, headers=headers, **body) as resp:
            return Answer(resp.status, resp.headers, await resp.read())


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, server.url)


async def send_raw(server: ServerProcess, request: bytes) -> Answer:
    """Send request bytes as they are (aiohttp would not encode such headers); the answer is read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict(line.split(": ", 1) for line in lines)
    return Answer(int(status_line.split()[1]), CIMultiDictProxy(headers), body)


def assert_error(answer: Answer, status: int, code: str | None = None) -> dict:
    """The answer is `status` with a JSON body {"error": code, "message": non-empty text}; returns it."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.headers.get("Content-Type", "").startswith("application/json"), (answer.headers, answer.body[:300])
    error = answer.json()
    assert isinstance(error, dict) and set(error) == {"error", "message"}, error
    assert isinstance(error["error"], str) and isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["error"] == code, error
    return error


# ------------------------------------------------------------------------------------------ repository state


@dataclass(frozen=True)
class Point:
    point_id: str
    disk_id: str
    image: bytes


async def make_point(client: Client, vm_id: str, *, seed: int = 1) -> Point:
    """A committed point of one 2 MiB + 1000 byte disk `d0` (random chunk, compressible chunk, short tail)."""
    image = make_disk("rc", seed=seed, tail=1000)
    return Point((await backup(client, vm_id, {"d0": image}))["point_id"], "d0", image)


async def stored(admin: Client) -> dict:
    stats = await admin.repository()
    return {k: stats[k] for k in STORED}


async def assert_nothing_stored(admin: Client, before: dict, *points: Point) -> None:
    """Repository counters are as `before`, and each point still restores bit-exact."""
    assert await stored(admin) == before
    for p in points:
        assert await restore(admin, p.point_id, p.disk_id) == p.image


async def new_token(admin: Client, role: str) -> str:
    return (await admin.create_token(role, f"bad-input {role}"))["token"]


def session_body(**changes: Any) -> dict:
    """A valid `POST /sessions` body for VM vm-a with one 2 MiB disk d0, with fields replaced."""
    body = {"host": "host1", "vm": {"id": "vm-a", "name": "A"}, "base": None, "consistency": "crash", "rct": {},
            "disks": [{"disk_id": "d0", "name": "d0.vhdx", "size": 2 * MiB}]}
    return body | changes


async def open_session(client: Client, **changes: Any) -> str:
    return (await client.json("POST", "/sessions", session_body(**changes)))["session_id"]


def session_calls(sid: str, frame: Frame) -> list[tuple[str, str, bytes | None]]:
    """Every request made inside a session, with valid bodies; commit and abort come last."""
    return [
        ("GET", f"/sessions/{sid}", None),
        ("POST", f"/sessions/{sid}/missing", frame.digest),
        ("POST", f"/sessions/{sid}/chunks", encode_frame(frame)),
        ("POST", f"/sessions/{sid}/disks/d0/map", encode_map([(0, frame.digest)])),
        ("PUT", f"/sessions/{sid}/blobs/vm.vmcx", b"<config/>"),
        ("POST", f"/sessions/{sid}/commit", None),
        ("DELETE", f"/sessions/{sid}", None),
    ]


def random_frame(size: int = MiB, seed: int = 0) -> Frame:
    return make_frame(random.Random(seed).randbytes(size))


def raw_frame(dig: bytes, codec: int, raw_len: int, payload: bytes) -> bytes:
    """One encoded frame; stored_len is the payload's length."""
    return encode_frame(Frame(dig, codec, raw_len, payload))


def zstd_bomb(chunk_size: int) -> bytes:
    """A frame declaring one chunk of zeros whose 2 KiB zstd payload inflates to 64 MiB."""
    return raw_frame(digest(bytes(chunk_size)), CODEC_ZSTD, chunk_size,
                     zstandard.ZstdCompressor().compress(bytes(64 * MiB)))


async def oversized(size: int) -> AsyncIterator[bytes]:
    """A streamed body of `size` zero bytes: chunked transfer encoding, no Content-Length."""
    for start in range(0, size, MiB):
        yield bytes(min(MiB, size - start))


def peak_rss(server: ServerProcess) -> int:
    """The server process's peak resident memory in bytes (Linux VmHWM)."""
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.M)
    assert match, status
    return int(match[1]) << 10


# ------------------------------------------------------------------------------------------ auth and roles


async def test_missing_wrong_or_malformed_token_is_401(server: ServerProcess, api: Api, admin: Client) -> None:
    """Absent, wrong and malformed Authorization headers get 401 with WWW-Authenticate, and do nothing."""
    point = await make_point(admin, "vm-a")
    sid = await open_session(admin)
    token = server.admin_token
    frame = random_frame()
    calls = [
        ("GET", "/repository", None),
        ("GET", "/vms", None),
        ("POST", "/sessions", json.dumps(session_body()).encode()),
        ("POST", f"/sessions/{sid}/chunks", encode_frame(frame)),
        ("GET", f"/points/{point.point_id}/disks/d0/raw", None),
        ("DELETE", f"/points/{point.point_id}", None),
        ("POST", "/tokens", b'{"role": "admin"}'),
    ]
    bad_headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
                   {"Authorization": "Bearer cy_not-a-token"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                   {"Authorization": token}, {"Authorization": f"Token {token}"},
                   {"Authorization": f"Bearer {token}x"}]
    before = await stored(admin)
    tokens = await admin.tokens()
    for headers in bad_headers:
        for method, path, body in calls:
            answer = await api(method, path, headers=headers, data=body)
            assert_error(answer, 401, "unauthorized")
            assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer"), (headers, path)
    await assert_nothing_stored(admin, before, point)
    assert await admin.tokens() == tokens
    assert (await api("GET", "/health")).status == 200  # public
    lower_case_scheme = {"Authorization": f"bearer {token}"}
    assert (await api("GET", "/vms", headers=lower_case_scheme)).status == 200
    assert (await admin.upload(sid, [frame]))["stored"] == 1  # the session was untouched


async def test_authorization_with_bytes_that_are_not_utf8_is_401(server: ServerProcess, admin: Client) -> None:
    """An Authorization header whose token holds bytes that are not UTF-8 is a wrong token: 401, not a crash."""
    for token in (b"\xff\xfe", b"caf\xe9", server.admin_token.encode() + b"\xff"):
        answer = await send_raw(server, b"GET /api/v1/vms HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                                + token + b"\r\nConnection: close\r\n\r\n")
        assert_error(answer, 401, "unauthorized")
        assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert await admin.vms() == []


async def test_roles_are_enforced_with_403(server: ServerProcess, api: Api, admin: Client, collector: Client) -> None:
    """403: reader on session endpoints, collector on catalog/restore/DELETE point/tokens, a collector in another
    collector's session or reading the map of a point it did not create."""
    reader = await new_token(admin, "reader")
    intruder = await new_token(admin, "collector")
    own = await make_point(collector, "vm-own")
    admins = await make_point(admin, "vm-admin", seed=2)
    sid = await open_session(collector)
    frame = random_frame()
    admin_id = next(t["id"] for t in await admin.tokens() if t["role"] == "admin")
    before, tokens = await stored(admin), await admin.tokens()
    for token in (reader, intruder):
        for method, path, body in session_calls(sid, frame):
            assert_error(await api(method, path, token, data=body), 403, "forbidden")
    assert_error(await api("POST", "/sessions", reader, json=session_body()), 403, "forbidden")
    pid = own.point_id
    for method, path, body in [
        ("GET", "/vms", None), ("GET", "/vms/vm-own/points", None), ("GET", f"/points/{pid}", None),
        ("GET", f"/points/{pid}/disks/d0/raw", None), ("GET", f"/points/{pid}/blobs/vm.vmcx", None),
        ("DELETE", f"/points/{pid}", None), ("GET", "/tokens", None), ("GET", "/metrics", None),
        ("POST", "/tokens", b'{"role": "admin", "name": "escalate"}'), ("DELETE", f"/tokens/{admin_id}", None),
    ]:
        assert_error(await api(method, path, collector.token, data=body), 403, "forbidden")
    assert_error(await api("DELETE", f"/points/{pid}", reader), 403, "forbidden")
    assert_error(await api("GET", f"/points/{pid}/disks/d0/map", intruder), 403, "forbidden")
    assert_error(await api("GET", f"/points/{admins.point_id}/disks/d0/map", collector.token), 403, "forbidden")
    await assert_nothing_stored(admin, before, own, admins)
    assert await admin.tokens() == tokens
    assert len(await collector.disk_map(pid, "d0")) == 3 * 32  # its own point's map
    await collector.map(sid, "d0", [(0, ZERO)])  # the owner's session is intact
    assert (await collector.commit(sid))["point_id"]


# ------------------------------------------------------------------------------------------ unknown and malformed ids


async def test_unknown_ids_are_404_and_malformed_ids_422(api: Api, admin: Client) -> None:
    """Unknown session, point, disk and blob ids get 404; session and point ids that are not hex ids get 422."""
    point = await make_point(admin, "vm-a")
    frame = random_frame()
    token = admin.token
    before = await stored(admin)
    for method, path, body in session_calls(UNKNOWN_SID, frame):
        assert_error(await api(method, path, token, data=body), 404, "session_not_found")
    for bad in MALFORMED_IDS:
        for method, path, body in session_calls(bad, frame):
            assert_error(await api(method, path, token, data=body), 422, "bad_id")
    point_paths = ["", "/disks/d0/map", "/disks/d0/raw", "/blobs/vm.vmcx"]
    for path in point_paths:
        assert_error(await api("GET", f"/points/{UNKNOWN_PID}{path}", token), 404, "point_not_found")
        for bad in MALFORMED_IDS:
            assert_error(await api("GET", f"/points/{bad}{path}", token), 422, "bad_id")
    assert_error(await api("DELETE", f"/points/{UNKNOWN_PID}", token), 404, "point_not_found")
    assert_error(await api("DELETE", f"/points/{MALFORMED_IDS[0]}", token), 422, "bad_id")
    for path in ("map", "raw"):
        assert_error(await api("GET", f"/points/{point.point_id}/disks/d9/{path}", token), 404, "disk_not_found")
    assert_error(await api("GET", f"/points/{point.point_id}/blobs/absent.vmcx", token), 404, "blob_not_found")
    await assert_nothing_stored(admin, before, point)


async def test_unknown_vm_is_404(api: Api, admin: Client) -> None:
    """The points of a VM that has none (never backed up) are a 404, like any other unknown resource."""
    await make_point(admin, "vm-a")
    assert_error(await api("GET", "/vms/vm-never-seen/points", admin.token), 404)
    assert len(await admin.points("vm-a")) == 1


# ------------------------------------------------------------------------------------------ chunk uploads


async def test_bad_frames_are_422_and_store_nothing(api: Api, admin: Client) -> None:
    """Digest mismatch, cut header or payload, raw_len 0 or over the chunk size, unknown codec, raw payload of
    the wrong length, garbage zstd, zstd inflating to more (a bomb) or less than raw_len, empty body: 422."""
    point = await make_point(admin, "vm-a")
    cs = (await admin.repository())["chunk_size"]
    sid = await open_session(admin, disks=[{"disk_id": "d0", "size": cs}])
    data = random.Random(5).randbytes(cs + 1)
    chunk, dig = data[:cs], digest(data[:cs])
    good = raw_frame(dig, CODEC_RAW, cs, chunk)
    zstd = zstandard.ZstdCompressor(level=1)
    streaming = zstd.compressobj()  # no content size in the zstd frame header
    bomb_without_size = streaming.compress(bytes(64 * MiB)) + streaming.flush()
    cases = {
        "digest of other bytes": (raw_frame(digest(b"other"), CODEC_RAW, cs, chunk), "digest_mismatch"),
        "header cut": (good[: FRAME_HEADER.size - 1], "bad_frame"),
        "header cut after a good frame": (good + good[:10], "bad_frame"),
        "payload cut": (good[:-1], "bad_frame"),
        "raw_len over the chunk size": (raw_frame(digest(data), CODEC_RAW, cs + 1, data), "bad_length"),
        "raw_len 0": (raw_frame(digest(b""), CODEC_RAW, 0, b""), "bad_length"),
        "codec 7": (raw_frame(dig, 7, cs, chunk), "bad_codec"),
        "raw payload shorter than raw_len": (raw_frame(dig, CODEC_RAW, cs, chunk[:-1]), "bad_payload"),
        "raw payload longer than raw_len": (raw_frame(digest(chunk[:-1]), CODEC_RAW, cs - 1, chunk), "bad_payload"),
        "garbage zstd": (raw_frame(dig, CODEC_ZSTD, cs, data[:4096]), "bad_payload"),
        "zstd magic then garbage": (raw_frame(dig, CODEC_ZSTD, cs, ZSTD_MAGIC + b"\0\0not a block"), "bad_payload"),
        "zstd bomb": (zstd_bomb(cs), "bad_payload"),
        "zstd bomb without content size": (raw_frame(digest(bytes(cs)), CODEC_ZSTD, cs, bomb_without_size),
                                           "bad_payload"),
        "zstd short of raw_len": (raw_frame(dig, CODEC_ZSTD, cs, zstd.compress(chunk[: cs // 2])), "bad_payload"),
        "empty body": (b"", "bad_frame"),
    }
    before = await stored(admin)
    for name, (body, code) in cases.items():
        error = assert_error(await api("POST", f"/sessions/{sid}/chunks", admin.token, data=body), 422, code)
        assert await stored(admin) == before, (name, error)
    assert (await admin.json("GET", f"/sessions/{sid}"))["stats"]["uploaded_chunks"] == 0
    await assert_nothing_stored(admin, before, point)
    assert (await admin.upload(sid, [make_frame(chunk, zstd)]))["stored"] == 1
    await admin.map(sid, "d0", [(0, dig)])
    assert await restore(admin, (await admin.commit(sid))["point_id"], "d0") == chunk


async def test_one_bad_frame_rejects_the_whole_body(api: Api, admin: Client) -> None:
    """A bad frame first, in the middle or last among good ones: 422 and none of the good frames is stored."""
    sid = await open_session(admin)
    good = [random_frame(4096, seed=n) for n in range(8)]
    bad = Frame(digest(b"something else"), CODEC_RAW, 4096, good[0].payload)
    before = await stored(admin)
    for position in (0, 4, 8):
        body = encode_frames([*good[:position], bad, *good[position:]])
        assert_error(await api("POST", f"/sessions/{sid}/chunks", admin.token, data=body), 422, "digest_mismatch")
        await assert_nothing_stored(admin, before)
        assert await admin.missing(sid, [f.digest for f in good]) == b"\xff"  # all eight still missing
    assert (await admin.upload(sid, good))["stored"] == 8


async def test_many_tiny_chunks_in_one_body_take_seconds_not_minutes(admin: Client) -> None:
    """20000 distinct 8-byte chunks in one body (under 1 MiB) are stored in seconds: work per upload must grow
    linearly, or a 64 MiB body of such frames pins a worker thread for hours."""
    sid = await open_session(admin)
    frames = [make_frame(i.to_bytes(8, "little")) for i in range(20_000)]
    started = time.monotonic()
    assert (await admin.upload(sid, frames))["stored"] == len(frames)
    assert time.monotonic() - started < 5, "storing the chunks of one upload is quadratic in their number"


async def test_zstd_bomb_is_rejected_without_inflating(server: ServerProcess, api: Api, admin: Client) -> None:
    """A frame of 64 MiB of zeros zstd-compressed (2 KiB) but declared raw_len = one chunk: 422 without the
    server decompressing past raw_len (its peak memory must not grow by the bomb's size)."""
    cs = (await admin.repository())["chunk_size"]
    sid = await open_session(admin)
    body = zstd_bomb(cs)
    peak = peak_rss(server)
    assert_error(await api("POST", f"/sessions/{sid}/chunks", admin.token, data=body), 422, "bad_payload")
    assert peak_rss(server) - peak < 32 * MiB, "the server inflated the bomb far beyond raw_len"
    assert (await admin.upload(sid, [random_frame()]))["stored"] == 1


def zstd_declaring(chunk: bytes, content_size: int) -> bytes:
    """A valid zstd frame of `chunk` whose header claims `content_size` bytes of content."""
    honest = zstandard.ZstdCompressor(write_content_size=False).compress(chunk)
    assert honest[4] & 0xE3 == 0  # frame header: no content size, not single-segment, no dictionary id
    descriptor = honest[4] | 0xC0  # an 8-byte content size field follows the window descriptor
    lying = honest[:4] + bytes([descriptor]) + honest[5:6] + content_size.to_bytes(8, "little") + honest[6:]
    assert zstandard.frame_content_size(lying) == content_size
    return lying


HOSTILE_ZSTD = {
    "header-claims-16-TiB": lambda chunk: zstd_declaring(chunk, 16 << 40),
    "trailing-bytes-after-the-frame": lambda chunk: zstandard.ZstdCompressor().compress(chunk) + bytes(4 * MiB),
}


@pytest.mark.parametrize("kind", HOSTILE_ZSTD)
async def test_hostile_zstd_payloads_are_422(api: Api, admin: Client, kind: str) -> None:
    """A zstd payload whose header claims 16 TiB, or that carries bytes after its frame (which would be stored
    as they are): 422 JSON, nothing stored."""
    cs = (await admin.repository())["chunk_size"]
    sid = await open_session(admin)
    chunk = bytes(range(256)) * (cs // 256)
    before = await stored(admin)
    body = raw_frame(digest(chunk), CODEC_ZSTD, cs, HOSTILE_ZSTD[kind](chunk))
    assert_error(await api("POST", f"/sessions/{sid}/chunks", admin.token, data=body), 422, "bad_payload")
    await assert_nothing_stored(admin, before)
    assert (await admin.upload(sid, [make_frame(chunk, zstandard.ZstdCompressor())]))["stored"] == 1


async def test_bodies_over_the_limit_are_413(api: Api, admin: Client) -> None:
    """Chunk, map and blob bodies of 64 MiB + 1 (with Content-Length, and streamed without), a gzip-encoded
    body inflating past the limit and a session request over 1 MiB get 413; a 64 MiB blob is accepted."""
    sid = await open_session(admin)
    before = await stored(admin)
    for method, path in (("POST", f"/sessions/{sid}/chunks"), ("POST", f"/sessions/{sid}/disks/d0/map"),
                         ("PUT", f"/sessions/{sid}/blobs/big.vmcx")):
        for body in (bytes(MAX_CHUNK_BODY + 1), oversized(MAX_CHUNK_BODY + 1)):
            assert_error(await api(method, path, admin.token, data=body), 413, "body_too_large")
            await assert_nothing_stored(admin, before)
    gzip_bomb = gzip.compress(bytes(2 * MAX_CHUNK_BODY), 1)  # the limit counts decoded bytes
    answer = await api("POST", f"/sessions/{sid}/chunks", admin.token, data=gzip_bomb,
                       headers={"Content-Encoding": "gzip"})
    assert_error(answer, 413, "body_too_large")
    big_request = session_body(host="h" * MiB)
    assert_error(await api("POST", "/sessions", admin.token, json=big_request), 413, "body_too_large")
    await assert_nothing_stored(admin, before)
    assert (await admin.put_blob(sid, "big.vmcx", bytes(MAX_CHUNK_BODY)))["size"] == MAX_CHUNK_BODY
    assert (await admin.upload(sid, [random_frame()]))["stored"] == 1


# ------------------------------------------------------------------------------------------ missing and map


async def test_bad_missing_queries(api: Api, admin: Client) -> None:
    """`missing` bodies that are not whole digests, empty, or over 65536 digests are refused."""
    sid = await open_session(admin)
    path = f"/sessions/{sid}/missing"
    before = await stored(admin)
    for body in (b"", bytes(31), bytes(33), bytes(32 * 3 + 1)):
        assert_error(await api("POST", path, admin.token, data=body), 422, "bad_body")
    too_many = random.Random(1).randbytes(32 * (MAX_MISSING_QUERY + 1))
    assert_error(await api("POST", path, admin.token, data=too_many), 413, "body_too_large")
    await assert_nothing_stored(admin, before)
    bitmap = await admin.binary("POST", path, too_many[32:])  # exactly the maximum
    assert bitmap == b"\xff" * (MAX_MISSING_QUERY // 8)


async def test_bad_maps_are_rejected_and_stage_nothing(api: Api, admin: Client) -> None:
    """Map records of the wrong size, indices beyond the disk, unknown digests, chunks whose length does not fit
    the index, a disk not in the session: rejected, and none of a rejected body's records is staged."""
    cs = (await admin.repository())["chunk_size"]
    sid = await open_session(admin, disks=[{"disk_id": "d0", "size": 2 * cs + 1000}])  # chunks 0, 1 full; 2 short
    rng = random.Random(9)
    full, short, shorter = (make_frame(rng.randbytes(n)) for n in (cs, 1000, 500))
    await admin.upload(sid, [full, short, shorter])
    a, s, s2 = full.digest, short.digest, shorter.digest
    record = encode_map([(0, a)])
    cases = [
        (record[:-1], "bad_body"),
        (record + b"\0", "bad_body"),
        (b"", "bad_body"),
        (encode_map([(1, a), (3, a)]), "index_out_of_range"),
        (encode_map([(1, a), ((1 << 64) - 1, ZERO)]), "index_out_of_range"),
        (encode_map([(1, a), (0, digest(b"never uploaded"))]), "unknown_chunk"),
        (encode_map([(1, a), (0, s)]), "bad_length"),  # a short chunk at a full-size index
        (encode_map([(1, a), (2, a)]), "bad_length"),  # a full chunk at the short tail
        (encode_map([(1, a), (2, s2)]), "bad_length"),  # a tail of the wrong length
    ]
    before = await stored(admin)
    for body, code in cases:
        assert_error(await api("POST", f"/sessions/{sid}/disks/d0/map", admin.token, data=body), 422, code)
    for disk in ("d9", "%2e%2e%2fd0"):
        assert_error(await api("POST", f"/sessions/{sid}/disks/{disk}/map", admin.token, data=record), 404,
                     "disk_not_found")
    await assert_nothing_stored(admin, before)
    assert (await admin.json("GET", f"/sessions/{sid}"))["stats"]["mapped_chunks"] == 0
    assert (await admin.map(sid, "d0", [(0, a), (2, s)]))["mapped"] == 2
    point = await admin.commit(sid)
    # index 1, mapped only by rejected bodies, stays zero
    assert await restore(admin, point["point_id"], "d0") == full.payload + bytes(cs) + short.payload


# ------------------------------------------------------------------------------------------ session states


async def test_closed_sessions_refuse_everything_with_409(api: Api, admin: Client) -> None:
    """Commit of an aborted session, a second commit (naming the point), upload/map/missing/blob/abort into
    an aborted or committed session: 409."""
    point = await make_point(admin, "vm-a")
    committed = await backup(admin, "vm-b", {"d0": point.image})
    aborted = await open_session(admin)
    await admin.abort(aborted)
    frame = random_frame()
    before = await stored(admin)
    for sid, state in ((aborted, "aborted"), (committed["session_id"], "committed")):
        for method, path, body in session_calls(sid, frame):
            if method != "GET":
                assert_error(await api(method, path, admin.token, data=body), 409, f"session_{state}")
        assert (await admin.json("GET", f"/sessions/{sid}"))["state"] == state
    again = assert_error(await api("POST", f"/sessions/{committed['session_id']}/commit", admin.token), 409)
    assert committed["point_id"] in again["message"] and "committed" in again["message"]
    await assert_nothing_stored(admin, before, point)
    assert (await admin.points("vm-b"))[0]["point_id"] == committed["point_id"]
    sid = await open_session(admin)  # a new session works
    assert (await admin.upload(sid, [frame]))["stored"] == 1


async def test_bad_session_requests(api: Api, admin: Client) -> None:
    """`POST /sessions`: 400 for a body that is not JSON; 422 for JSON of the wrong shape, types or values;
    404 for an unknown base point; 422 for a base point of another VM."""
    other = await make_point(admin, "vm-b")
    disk = {"disk_id": "d0", "name": "d0.vhdx", "size": MiB}
    no_host = {k: v for k, v in session_body().items() if k != "host"}
    no_disks = {k: v for k, v in session_body().items() if k != "disks"}
    cases: list[tuple[Any, int, str]] = [
        (b"{not json", 400, "bad_json"),
        (b"", 400, "bad_json"),
        (b"\xff\xfe{}", 400, "bad_json"),
        ([], 422, "bad_body"),
        (None, 422, "bad_body"),
        ("vm-a", 422, "bad_body"),
        (no_host, 422, "bad_field"),
        (session_body(host=5), 422, "bad_field"),
        (session_body(vm="vm-a"), 422, "bad_field"),
        (session_body(vm={"name": "A"}), 422, "bad_name"),
        (session_body(vm={"id": 5}), 422, "bad_name"),
        (session_body(vm={"id": "vm-a", "name": ["A"]}), 422, "bad_field"),
        (no_disks, 422, "bad_field"),
        (session_body(disks=[]), 422, "bad_field"),
        (session_body(disks=disk), 422, "bad_field"),
        (session_body(disks=["d0"]), 422, "bad_field"),
        (session_body(disks=[disk, disk]), 422, "bad_field"),
        (session_body(disks=[disk | {"disk_id": f"d{n}"} for n in range(257)]), 422, "bad_field"),
        *((session_body(disks=[disk | {"size": size}]), 422, "bad_field")
          for size in ("1048576", -1, 0, (64 << 40) + 1, 1.5, True, None)),
        (session_body(disks=[disk | {"name": 5}]), 422, "bad_field"),
        (session_body(consistency="bogus"), 422, "bad_field"),
        (session_body(consistency="CRASH"), 422, "bad_field"),
        (session_body(consistency=1), 422, "bad_field"),
        (session_body(rct=["x"]), 422, "bad_field"),
        (session_body(rct={"d0": 5}), 422, "bad_field"),
        (session_body(base=5), 422, "bad_field"),
        (session_body(base=UNKNOWN_PID), 404, "point_not_found"),
        (session_body(base="../x"), 422, "bad_id"),
        (session_body(base=other.point_id), 422, "bad_base"),
    ]
    before = await stored(admin)
    for body, status, code in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        answer = await api("POST", "/sessions", admin.token, data=data, headers={"Content-Type": "application/json"})
        assert_error(answer, status, code)
    await assert_nothing_stored(admin, before, other)
    for consistency in ("application", "crash", "saved-state"):
        body = session_body(consistency=consistency, disks=[disk | {"size": 64 << 40}])
        created = await admin.json("POST", "/sessions", body)
        assert created["base_point"] is None and created["chunk_size"] == MiB
        await admin.abort(created["session_id"])


async def test_json_bodies_that_do_not_parse_are_400(api: Api, admin: Client) -> None:
    """JSON endpoints (sessions, tokens, commit) answer 400 to a body that is not JSON or is nested deeper
    than the parser goes, and act on none of them."""
    sid = await open_session(admin)
    tokens, before = await admin.tokens(), await stored(admin)
    too_deep = b"[" * 100_000 + b"]" * 100_000
    for path in (f"/sessions/{sid}/commit", "/sessions", "/tokens"):
        for body in (b"{oops", too_deep):
            assert_error(await api("POST", path, admin.token, data=body), 400, "bad_json")
    await assert_nothing_stored(admin, before)
    assert await admin.tokens() == tokens
    assert (await admin.json("GET", f"/sessions/{sid}"))["state"] == "open"


# ------------------------------------------------------------------------------------------ unsafe names


async def test_unsafe_names_are_refused_and_nothing_escapes_the_data_dir(server: ServerProcess, api: Api,
                                                                         admin: Client) -> None:
    """VM ids, disk ids and blob names with '..', '/', a leading dot, over 128 characters (also
    percent-encoded in paths) are refused; points/ holds only the expected entries, nothing is written outside."""
    point = await make_point(admin, "vm-good")
    outside = sorted(p.name for p in server.data.parent.iterdir())
    top = sorted(p.name for p in server.data.iterdir())
    unsafe = ["../../etc", "..", "../x", "a/b", "a..b", ".hidden", "a\\b", "", "x" * 129]
    before = await stored(admin)
    for name in unsafe:
        for body in (session_body(vm={"id": name}), session_body(disks=[{"disk_id": name, "size": MiB}])):
            assert_error(await api("POST", "/sessions", admin.token, json=body), 422, "bad_name")
    sid = await open_session(admin)
    for name in ("..%2Fx", "%2e%2e%2fx", "%2e%2e", ".hidden", "%2ehidden", "a..b", "x" * 129):
        assert_error(await api("PUT", f"/sessions/{sid}/blobs/{name}", admin.token, data=b"x"), 422, "bad_name")
    for path in ("/vms/..%2F..%2Fetc/points", "/vms/%2e%2e/points",
                 f"/points/{point.point_id}/disks/%2e%2e%2fd0/raw", f"/points/{point.point_id}/disks/..%2Fd0/map"):
        assert_error(await api("GET", path, admin.token), 422, "bad_name")
    await assert_nothing_stored(admin, before, point)
    longest = "v" * 128
    await admin.put_blob(sid, longest, b"<config/>")  # 128 characters is allowed
    await admin.map(sid, "d0", [(0, ZERO)])
    committed = await admin.commit(sid)
    assert await admin.blob(committed["point_id"], longest) == b"<config/>"
    assert sorted(p.name for p in server.data.parent.iterdir()) == outside
    assert sorted(p.name for p in server.data.iterdir()) == top
    points = server.data / "points"
    assert sorted(p.name for p in points.iterdir()) == ["vm-a", "vm-good"]
    assert sorted(p.name for p in (points / "vm-good").iterdir()) == [f"{point.point_id}.json"]
    assert sorted(p.name for p in (points / "vm-a").iterdir()) == [f"{committed['point_id']}.json"]


async def test_names_ending_in_a_newline_are_refused(api: Api, admin: Client) -> None:
    """A VM id, disk id or blob name ending in a newline (which a `$`-anchored pattern lets through) is refused."""
    before = await stored(admin)
    for body in (session_body(vm={"id": "vm-a\n"}), session_body(disks=[{"disk_id": "d0\n", "size": MiB}])):
        assert_error(await api("POST", "/sessions", admin.token, json=body), 422, "bad_name")
    assert_error(await api("GET", "/vms/vm-a%0A/points", admin.token), 422, "bad_name")
    sid = await open_session(admin)
    assert_error(await api("PUT", f"/sessions/{sid}/blobs/vm.vmcx%0A", admin.token, data=b"x"), 422, "bad_name")
    await assert_nothing_stored(admin, before)
    assert (await admin.put_blob(sid, "vm.vmcx", b"x"))["size"] == 1


# ------------------------------------------------------------------------------------------ restore ranges


@pytest.mark.parametrize("fmt", ["raw", "vhdx"])
async def test_ranges_on_restore_downloads(api: Api, admin: Client, fmt: str) -> None:
    """Malformed, reversed, multi, unsatisfiable ranges: 416 with `Content-Range: bytes */size`; single,
    open-ended and suffix ranges: 206 with the exact bytes; If-Range with the right ETag 206, wrong ETag 200."""
    point = await make_point(admin, "vm-a")
    path = f"/points/{point.point_id}/disks/d0/{fmt}"
    full = await api("GET", path, admin.token)
    assert full.status == 200 and (fmt != "raw" or full.body == point.image)
    body, size, etag = full.body, len(full.body), full.headers["ETag"]
    for header in ("bytes=abc", "items=0-1", "bytes=10-5", "bytes=0-1,5-6", f"bytes={size}-",
                   f"bytes={size}-{size + 10}", "bytes=-0", "bytes=-", "bytes=", "bytes=99999999999999999999-"):
        answer = await api("GET", path, admin.token, headers={"Range": header})
        assert_error(answer, 416, "bad_range")
        assert answer.headers["Content-Range"] == f"bytes */{size}", header
    for header, start, stop in [
        ("bytes=0-9", 0, 10),
        (f"bytes={MiB - 5}-{MiB + 4}", MiB - 5, MiB + 5),  # across a chunk boundary
        (f"bytes={size - 10}-", size - 10, size),
        ("bytes=-100", size - 100, size),
        (f"bytes=-{size + 5}", 0, size),
        (f"bytes={size - 3}-{size + 100}", size - 3, size),
    ]:
        answer = await api("GET", path, admin.token, headers={"Range": header})
        assert answer.status == 206, (header, answer.body[:200])
        assert answer.body == body[start:stop], header
        assert answer.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
    partial = await api("GET", path, admin.token, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert partial.status == 206 and partial.body == body[5:10]
    for header in ("bytes=5-9", "bytes=abc"):
        stale = await api("GET", path, admin.token, headers={"Range": header, "If-Range": '"another-etag"'})
        assert stale.status == 200 and stale.body == body


# ------------------------------------------------------------------------------------------ routes and tokens


async def test_unknown_routes_and_wrong_methods(api: Api, admin: Client) -> None:
    """Unknown routes get a JSON 404 and wrong methods a JSON 405 with Allow, with or without a token."""
    sid = await open_session(admin)
    for token in (None, admin.token):
        for path, prefix in (("/nothing", API_PREFIX), ("/nothing", ""), ("/points/a/b/c/d", API_PREFIX)):
            assert_error(await api("GET", path, token, prefix=prefix), 404, "not_found")
        for method, path in (("PATCH", "/vms"), ("PUT", "/sessions"), ("GET", f"/sessions/{sid}/chunks"),
                             ("DELETE", "/repository")):
            answer = await api(method, path, token)
            assert_error(answer, 405, "method_not_allowed")
            assert answer.headers.get("Allow"), path


async def test_bad_token_requests(api: Api, admin: Client) -> None:
    """Tokens API: unknown role or malformed request 422 (400 for non-JSON), unknown id 404; a revoked token
    gets 401 everywhere, including in the session it opened."""
    tokens = await admin.tokens()
    for body, status, code in [(b'{"role": "root"}', 422, "bad_role"), (b"{}", 422, "bad_field"),
                               (b'{"role": 5}', 422, "bad_field"), (b"[]", 422, "bad_field"),
                               (b'{"role": "reader", "name": 5}', 422, "bad_name"),
                               (json.dumps({"role": "reader", "name": "n" * 201}).encode(), 422, "bad_name"),
                               (b"role=admin", 400, "bad_json")]:
        assert_error(await api("POST", "/tokens", admin.token, data=body), status, code)
    for token_id in ("0" * 16, "..%2Fx"):
        assert_error(await api("DELETE", f"/tokens/{token_id}", admin.token), 404, "token_not_found")
    assert await admin.tokens() == tokens
    created = await admin.create_token("collector", "to revoke")
    revoked = created["token"]
    sid = (await api("POST", "/sessions", revoked, json=session_body())).json()["session_id"]
    await admin.revoke_token(created["id"])
    for method, path in (("GET", "/repository"), ("GET", f"/sessions/{sid}"), ("DELETE", f"/sessions/{sid}")):
        assert_error(await api(method, path, revoked), 401, "unauthorized")
    assert_error(await api("DELETE", f"/tokens/{created['id']}", admin.token), 404, "token_not_found")
    assert await admin.tokens() == tokens
    assert (await admin.json("GET", f"/sessions/{sid}"))["state"] == "open"
