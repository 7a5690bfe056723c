"""Disk manifests: the digest of every chunk of a disk, in pages of up to 4096 digests.

A page is itself stored as a chunk (meta flag); a page whose entries are all ZERO is not
stored and is named by the ZERO digest. A disk's manifest root is its list of page digests.
Synthetic-full assembly copies the base root and rewrites only the pages holding changed
indices: O(changed chunks + touched pages), never O(disk size). Pages stay flat byte strings
(patched in place as bytearrays) and changes arrive as a sorted stream, so a 1 TiB full costs
one page of memory at a time, not a million small objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import blake3

from chunkyard.wire import DIGEST_LEN, ZERO

PAGE_ENTRIES = 4096
PAGE_BYTES = PAGE_ENTRIES * DIGEST_LEN


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def page_count(chunks: int) -> int:
    return -(-chunks // PAGE_ENTRIES)


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """Bytes of disk covered by chunk `index` (the last chunk may be short)."""
    return min(chunk_size, size - index * chunk_size)


def page_entries(page: int, chunks: int) -> int:
    return min(PAGE_ENTRIES, chunks - page * PAGE_ENTRIES)


def split_page(data: bytes) -> list[bytes]:
    return [data[i : i + DIGEST_LEN] for i in range(0, len(data), DIGEST_LEN)]


def count_nonzero(page: bytes) -> int:
    zero_entries = sum(1 for i in range(0, len(page), DIGEST_LEN) if page[i : i + DIGEST_LEN] == ZERO)
    return len(page) // DIGEST_LEN - zero_entries


PageLoader = Callable[[bytes], bytes]
"""A stored page's digest -> its bytes (32 bytes per entry)."""


def load_page(load: PageLoader, page_digest: bytes, entries: int) -> bytes:
    """A page's bytes fitted to `entries`: a ZERO page, a grown disk's missing tail, a shrunk disk's cut."""
    want = entries * DIGEST_LEN
    if page_digest == ZERO:
        return bytes(want)
    data = load(page_digest)
    return data[:want] if len(data) >= want else data + bytes(want - len(data))


@dataclass
class AssemblyResult:
    root: list[bytes]
    changed_chunks: int
    changed_bytes: int
    allocated_chunks: int
    new_pages: list[bytes] = field(default_factory=list)  # page bytes the caller must store (one batch)


def _grouped(changes: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """Sorted (index, digest) pairs grouped by page."""
    page, group = -1, []
    for index, d in changes:
        p = index // PAGE_ENTRIES
        if p != page and group:
            yield page, group
            group = []
        page = p
        group.append((index, d))
    if group:
        yield page, group


def assemble(
    *,
    base_root: list[bytes],
    base_size: int,
    base_allocated: int,
    size: int,
    chunk_size: int,
    changes: Iterable[tuple[int, bytes]],
    load: PageLoader,
    page_id: Callable[[bytes], bytes] = lambda data: blake3.blake3(data).digest(),
) -> AssemblyResult:
    """Build the manifest root of a synthetic full from a base root and changed entries sorted by index.

    The rewritten pages are returned in `new_pages` (their ids, from `page_id`, are already in `root`)
    for the caller to store in one durable batch.
    """
    chunks = chunk_count(size, chunk_size)
    base_chunks = chunk_count(base_size, chunk_size)
    pages = page_count(chunks)
    root = list(base_root[:pages]) + [ZERO] * max(0, pages - len(base_root))
    result = AssemblyResult(root, 0, 0, base_allocated)
    extra: set[int] = set()
    if size != base_size and base_chunks:
        # The page holding the old or new end changes length even without changed entries.
        edge = (min(chunks, base_chunks) - 1) // PAGE_ENTRIES
        if edge < pages:
            extra.add(edge)
        for dropped in range(pages, len(base_root)):  # shrink: entries beyond the end are gone
            result.allocated_chunks -= count_nonzero(load_page(load, base_root[dropped],
                                                               page_entries(dropped, base_chunks)))
        if chunks < base_chunks and pages:
            last = pages - 1
            old = load_page(load, base_root[last], page_entries(last, base_chunks))
            result.allocated_chunks -= count_nonzero(old[page_entries(last, chunks) * DIGEST_LEN :])

    def rewrite(page: int, group: list[tuple[int, bytes]]) -> None:
        entries = bytearray(load_page(load, root[page], page_entries(page, chunks)))
        base = page * PAGE_ENTRIES
        for index, new in group:
            slot = (index - base) * DIGEST_LEN
            old = bytes(entries[slot : slot + DIGEST_LEN])
            if new != old:
                result.changed_chunks += 1
                result.changed_bytes += chunk_length(index, size, chunk_size)
                result.allocated_chunks += (new != ZERO) - (old != ZERO)
                entries[slot : slot + DIGEST_LEN] = new
        if entries == bytes(len(entries)):
            root[page] = ZERO
        else:
            data = bytes(entries)
            root[page] = page_id(data)
            result.new_pages.append(data)

    pending_extra = sorted(extra)
    for page, group in _grouped(changes):
        while pending_extra and pending_extra[0] < page:
            rewrite(pending_extra.pop(0), [])
        if pending_extra and pending_extra[0] == page:
            pending_extra.pop(0)
        rewrite(page, group)
    for page in pending_extra:
        rewrite(page, [])
    return result


def iter_digests(root: Iterable[bytes], chunks: int, load: PageLoader) -> Iterator[bytes]:
    """Every chunk digest of a disk in order, loading one page at a time."""
    for page, page_digest in enumerate(root):
        yield from split_page(load_page(load, page_digest, page_entries(page, chunks)))
