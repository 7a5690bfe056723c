"""Verification: re-read, decompress and BLAKE3-check stored chunks, and find the points they break.

- mode "all": every live chunk once, pack by pack (sequential reads), whatever number of points share it;
- mode "new": chunks of points created since the last verify run; "sample": of a random share of points.
  Both walk the chosen points' manifests and check each distinct chunk once (the `marks` column family
  remembers what was checked, so memory stays bounded).
A chunk that fails is quarantined: it leaves the index (so the next backup's `missing` asks for it again
and the repository heals itself, as PBS does) and is listed under meta `bad/`. Every checked point gets
a status (meta `verify/<point id>`): ok, or damaged with the count of bad chunks.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chunkyard.wire import ZERO

from .chunk_store import MOVED, PACK_KEY
from .codec import CodecError
from .errors import Corrupt, Invalid, Unavailable
from .index import Location
from .manifest import split_page
from .pack import (
    RECORD_HEADER,
    PackFormatError,
    Record,
    pack_path,
    parse_record,
    read_trailer,
    scan_records,
    trailer_records,
)

if TYPE_CHECKING:
    from .repository import Repository

MODES = ("all", "new", "sample")
BATCH = 1000
Progress = Callable[[str, int, int | None], None]


@dataclass
class VerifyStats:
    mode: str
    chunks_checked: int = 0
    bytes_checked: int = 0
    damaged_chunks: list[str] = field(default_factory=list)
    points_checked: int = 0
    points_damaged: list[str] = field(default_factory=list)
    packs_from_cloud: int = 0  # moved packs (tiering move mode), read back from their tier
    packs_in_cloud_unchecked: int = 0  # moved packs skipped: their tier is not running (an offline check)
    points_unchecked: int = 0  # offline check: points whose manifest pages only that tier holds
    seconds: float = 0.0


def point_pages(record: dict) -> Iterator[bytes]:
    for disk in record["disks"]:
        for page in disk["pages"]:
            if page != ZERO.hex():
                yield bytes.fromhex(page)


def point_blob_chunks(record: dict) -> Iterator[bytes]:
    for ref in record.get("blobs", {}).values():
        for piece in ref["chunks"]:
            if piece != ZERO.hex():
                yield bytes.fromhex(piece)


class Verifier:
    def __init__(self, repo: Repository, progress: Progress | None = None, *, mode: str = "all",
                 percent: float = 10.0, seed: int | None = None, read_only: bool = False):
        if mode not in MODES:
            raise Invalid(f"verify mode must be one of {', '.join(MODES)}", "bad_mode")
        if not 0 < percent <= 100:
            raise Invalid("percent must be in (0, 100]", "bad_field")
        self.repo, self.index = repo, repo.index
        self.progress = progress or (lambda phase, done, total: None)
        self.mode, self.percent, self.rng = mode, percent, random.Random(seed)
        self.stats = VerifyStats(mode)
        self.bad: set[bytes] = set()
        self.read_only = read_only  # `repair --check`: report, change nothing

    def run(self) -> VerifyStats:
        started = time.time()
        points = self._chosen_points()
        if self.mode == "all":
            self._verify_packs()
        else:
            self._verify_points(points)
        self._judge(points, started)
        self.stats.seconds = round(time.time() - started, 3)
        return self.stats

    def _chosen_points(self) -> list[dict]:
        points = [json.loads(v) for _, v in self.index.scan("points", b"p:")]
        if self.mode == "new":
            last = float(self.index.get("meta", b"verify_last") or b"0")
            points = [p for p in points if p["created"] > last]
        elif self.mode == "sample":
            points = [p for p in points if self.rng.random() * 100 < self.percent]
        return points

    # ---------------------------------------------------------------- checking chunks

    def _check(self, loc: Location, stored: bytes) -> None:
        self.stats.chunks_checked += 1
        self.stats.bytes_checked += loc.record.raw_len
        try:
            self.repo.chunks.decode(loc.record, stored)
        except CodecError as e:
            self._quarantine(loc, str(e))

    def _quarantine(self, loc: Location, reason: str) -> None:
        self.bad.add(loc.record.digest)
        self.stats.damaged_chunks.append(loc.record.digest.hex())
        if not self.read_only:
            self.repo.chunks.mark_bad(loc.record.digest, reason)
            self.repo.chunks.forget([loc])

    def _verify_packs(self) -> None:
        """Every live record of every pack, read sequentially. A pack moved to a cloud tier is read from
        there (one GET of the whole object, past the cache): the cloud copy is the only one left. Without
        its tier running (`repair --check` works offline) it is skipped and counted as unchecked."""
        packs = [(PACK_KEY.unpack(k)[0], json.loads(v)) for k, v in self.index.scan("packs")]
        for done, (pack_id, state) in enumerate(packs, 1):
            self.progress("verify packs", done, len(packs))
            if state["state"] == MOVED and self.repo.chunks.remote is None:
                self.stats.packs_in_cloud_unchecked += 1
                continue
            if state["state"] == MOVED:
                data = self.repo.chunks.read_remote(pack_id, 0, state["size"], cache=False)
                self.stats.packs_from_cloud += 1
                records = trailer_records(lambda offset, length, d=data: d[offset : offset + length], len(data))
                if records is None:  # a damaged cloud trailer: check every record the index puts there
                    located = (Location.decode(d, v) for d, v in self.index.scan("chunks"))
                    records = [loc.record for loc in located if loc.pack_id == pack_id]
            else:
                path = pack_path(self.repo.chunks.root, pack_id)
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue  # compacted away since the listing
                records = read_trailer(path)
            if records is None:  # the open pack: a scan skips damaged records, so look those up by header
                records, _, damaged = scan_records(path)
                records += [Record(RECORD_HEADER.unpack_from(data, off)[4], off, 0, 0, 0) for off in damaged
                            if off + RECORD_HEADER.size <= len(data)]
            current = self.index.locate_many([r.digest for r in records])
            for record, loc in zip(records, current, strict=True):
                if loc is None or loc.pack_id != pack_id or loc.record.offset != record.offset:
                    continue
                self._check_raw(loc, data)

    def _check_raw(self, loc: Location, data: bytes) -> None:
        buf = data[loc.record.offset : loc.record.offset + RECORD_HEADER.size + loc.record.stored_len]
        try:
            stored = parse_record(buf, loc.record)
        except (PackFormatError, struct.error) as e:  # a cut record counts as damage too
            self.stats.chunks_checked += 1
            self._quarantine(loc, f"record unreadable: {e}")
            return
        self._check(loc, stored)

    def _verify_points(self, points: list[dict]) -> None:
        """Chunks of the chosen points, each distinct chunk once."""
        self._clear_marks()
        try:
            with self.repo.chunks.reader() as reader:
                for done, record in enumerate(points, 1):
                    self.progress("verify points", done, len(points))
                    for page in point_pages(record):
                        if self._first_time([page]):
                            entries = self._read(reader, page)
                            if entries is not None:
                                self._verify_digests(reader, self._first_time(split_page(entries)))
                    self._verify_digests(reader, self._first_time(list(point_blob_chunks(record))))
        finally:
            self._clear_marks()

    def _read(self, reader, digest: bytes) -> bytes | None:
        loc = self.index.locate(digest)
        if loc is None:
            return None  # already missing: the point is judged damaged below
        try:
            stored = reader.read_stored(loc)
            self.stats.chunks_checked += 1
            self.stats.bytes_checked += loc.record.raw_len
            return self.repo.chunks.decode(loc.record, stored)
        except (Corrupt, CodecError) as e:
            self._quarantine(loc, str(e))
            return None

    def _verify_digests(self, reader, digests: list[bytes]) -> None:
        for d in digests:
            self._read(reader, d)

    def _first_time(self, digests: list[bytes]) -> list[bytes]:
        digests = [d for d in dict.fromkeys(digests) if d != ZERO]
        new: list[bytes] = []
        for start in range(0, len(digests), BATCH):
            part = digests[start : start + BATCH]
            seen = self.index.multi_get("marks", part)
            batch = self.index.batch()
            for d, s in zip(part, seen, strict=True):
                if s is None:
                    new.append(d)
                    batch.put("marks", d, b"")
            self.index.write(batch)
        return new

    def _clear_marks(self) -> None:
        batch = self.index.batch()
        batch.clear("marks")
        self.index.write(batch)

    # ---------------------------------------------------------------- judging points

    def _judge(self, points: list[dict], started: float) -> None:
        """A point is damaged when a page, a chunk or a blob piece it needs is bad or missing."""
        with self.repo.chunks.reader() as reader:
            for done, record in enumerate(points, 1):
                self.progress("judge points", done, len(points))
                try:
                    damaged = self._count_missing(reader, record)
                except Unavailable:
                    if not self.read_only:
                        raise
                    self.stats.points_unchecked += 1
                    continue
                if self.read_only:
                    if damaged:
                        self.stats.points_damaged.append(record["point_id"])
                    self.stats.points_checked += 1
                    continue
                status = {"time": started, "ok": damaged == 0, "damaged_chunks": damaged, "mode": self.mode}
                batch = self.index.batch()
                batch.put("meta", f"verify/{record['point_id']}".encode(), json.dumps(status).encode())
                self.index.write(batch)
                self.stats.points_checked += 1
                if damaged:
                    self.stats.points_damaged.append(record["point_id"])
        if not self.read_only:
            batch = self.index.batch()
            batch.put("meta", b"verify_last", str(started).encode())
            self.index.write(batch, sync=True)

    def _count_missing(self, reader, record: dict) -> int:
        missing = 0
        for page in point_pages(record):
            if page in self.bad or self.index.get("chunks", page) is None:
                missing += 1
                continue
            try:
                entries = [d for d in split_page(reader.read_digest(page)) if d != ZERO]
            except Corrupt:
                missing += 1
                continue
            missing += self._absent(entries)
        return missing + self._absent(list(point_blob_chunks(record)))

    def _absent(self, digests: Iterable[bytes]) -> int:
        digests = list(digests)
        return sum(v is None or d in self.bad for start in range(0, len(digests), BATCH)
                   for d, v in zip(digests[start : start + BATCH],
                                   self.index.multi_get("chunks", digests[start : start + BATCH]), strict=True))


def check_repository(repo: Repository, progress: Progress | None = None) -> dict:
    """`chunkyard repair --check`: read-only. Every live chunk re-read and hashed, every point's references
    resolved, pack files against the index. Returns what is wrong; an empty report means healthy."""
    verifier = Verifier(repo, progress, mode="all", read_only=True)
    stats = verifier.run()
    root = repo.chunks.root
    on_disk = {int(p.stem, 16) for p in root.glob("*/*.pack")}
    indexed = {PACK_KEY.unpack(k)[0] for k, _ in repo.index.scan("packs")} - repo.chunks.moved.keys()
    return {
        "chunks_checked": stats.chunks_checked,
        "bytes_checked": stats.bytes_checked,
        "damaged_chunks": stats.damaged_chunks,
        "points_checked": stats.points_checked,
        "damaged_points": stats.points_damaged,
        "packs_in_cloud_unchecked": stats.packs_in_cloud_unchecked,  # moved to a cloud tier; check them and
        "points_unchecked": stats.points_unchecked,  # these points with a verify job of the running server
        "orphan_packs": sorted(f"{p:016x}" for p in on_disk - indexed),
        "missing_packs": sorted(f"{p:016x}" for p in indexed - on_disk),
        "healthy": not (stats.damaged_chunks or stats.points_damaged or on_disk ^ indexed),
    }


def verify_status(repo: Repository, point_id: str) -> dict | None:
    value = repo.index.get("meta", f"verify/{point_id}".encode())
    return json.loads(value) if value else None
