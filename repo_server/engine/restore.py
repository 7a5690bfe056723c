"""Reading a restore point's disk back: chunk locations by index, verified chunk bytes.

Every point is a full, so restoring never walks a chain: page -> digests -> locations.
"""

from __future__ import annotations

from chunkyard.wire import ZERO

from .chunk_store import ChunkReader
from .errors import Corrupt, NotFound
from .index import Location
from .manifest import PAGE_ENTRIES, chunk_count, chunk_length, load_page, page_entries, split_page
from .names import check_name
from .repository import Repository


def find_disk(point: dict, disk_id: str) -> dict:
    check_name(disk_id, "disk id")
    for disk in point["disks"]:
        if disk["disk_id"] == disk_id:
            return disk
    raise NotFound(f"point {point['point_id']} has no disk {disk_id}", "disk_not_found")


class DiskImage:
    """One disk of one point. Thread-safe for reads; close() when the stream ends."""

    def __init__(self, repo: Repository, point: dict, disk_id: str):
        self.repo = repo
        self.point = point
        self.disk = find_disk(point, disk_id)
        self.size: int = self.disk["size"]
        self.chunk_size: int = point["chunk_size"]
        self.chunks = chunk_count(self.size, self.chunk_size)
        self.root = [bytes.fromhex(p) for p in self.disk["pages"]]
        self.etag = f'"{point["point_id"]}.{disk_id}"'
        self._reader: ChunkReader = repo.chunks.reader()

    def close(self) -> None:
        self._reader.close()

    def page(self, page: int) -> list[bytes]:
        return split_page(load_page(self._reader.read_digest, self.root[page], page_entries(page, self.chunks)))

    def digests(self, first: int, stop: int) -> list[bytes]:
        """Digests of chunks [first, stop)."""
        out: list[bytes] = []
        for page in range(first // PAGE_ENTRIES, (stop - 1) // PAGE_ENTRIES + 1):
            base = page * PAGE_ENTRIES
            out += self.page(page)[max(first - base, 0) : stop - base]
        return out

    def locations(self, first: int, stop: int) -> list[Location | None]:
        """Where chunks [first, stop) are; None for zero chunks."""
        digests = self.digests(first, stop)
        nonzero = [d for d in digests if d != ZERO]
        found = iter(self.repo.index.locate_many(nonzero))
        out: list[Location | None] = []
        for i, d in enumerate(digests, first):
            if d == ZERO:
                out.append(None)
                continue
            loc = next(found)
            if loc is None:
                raise Corrupt(f"chunk {d.hex()} (index {i}) of disk {self.disk['disk_id']} is missing from the index")
            out.append(loc)
        return out

    def read_chunk(self, index: int, loc: Location | None) -> bytes:
        """Chunk `index`, verified against its digest; zeros for a zero chunk."""
        if loc is None:
            return bytes(chunk_length(index, self.size, self.chunk_size))
        return self._reader.read(loc)
