"""Disk manifests: the digest of every chunk of a disk, in pages of up to 4096 digests.

A page is itself stored as a chunk (meta flag); a page whose entries are all ZERO is not
stored and is named by the ZERO digest. A disk's manifest root is its list of page digests.
Synthetic-full assembly copies the base root and rewrites only the pages holding changed
indices: O(changed chunks + touched pages), never O(disk size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chunkyard.wire import DIGEST_LEN, ZERO

PAGE_ENTRIES = 4096


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


@dataclass
class AssemblyResult:
    root: list[bytes]
    changed_chunks: int
    changed_bytes: int
    allocated_chunks: int


PageLoader = Callable[[bytes, int], list[bytes]]
"""(page digest, expected entries) -> the page's digests; ZERO pages need not be asked for."""
PageStorer = Callable[[list[bytes]], bytes]
"""A page's digests -> the page's digest after storing it durably."""


def load_page(load: PageLoader, page_digest: bytes, entries: int) -> list[bytes]:
    if page_digest == ZERO:
        return [ZERO] * entries
    digests = load(page_digest, entries)
    if len(digests) < entries:  # the base disk was smaller: the grown part reads as zeros
        digests = digests + [ZERO] * (entries - len(digests))
    return digests[:entries]


def assemble(
    *,
    base_root: list[bytes],
    base_size: int,
    base_allocated: int,
    size: int,
    chunk_size: int,
    changes: dict[int, bytes],
    load: PageLoader,
    store: PageStorer,
) -> AssemblyResult:
    """Build the manifest root of a synthetic full from a base root and changed entries."""
    chunks = chunk_count(size, chunk_size)
    base_chunks = chunk_count(base_size, chunk_size)
    pages = page_count(chunks)
    root = list(base_root[:pages]) + [ZERO] * max(0, pages - len(base_root))
    allocated = base_allocated
    by_page: dict[int, list[int]] = {}
    for index in changes:
        by_page.setdefault(index // PAGE_ENTRIES, []).append(index)
    if size != base_size and base_chunks:
        # The page holding the old or new end changes length even without changed entries.
        edge = (min(chunks, base_chunks) - 1) // PAGE_ENTRIES
        if edge < pages:
            by_page.setdefault(edge, [])
        for dropped in range(pages, len(base_root)):  # shrink: entries beyond the end are gone
            old = load_page(load, base_root[dropped], page_entries(dropped, base_chunks))
            allocated -= sum(d != ZERO for d in old)
        if chunks < base_chunks and pages:
            last = pages - 1
            old = load_page(load, base_root[last], page_entries(last, base_chunks))
            allocated -= sum(d != ZERO for d in old[page_entries(last, chunks) :])
    changed = changed_bytes = 0
    for page, indices in by_page.items():
        entries = load_page(load, root[page], page_entries(page, chunks))
        for index in indices:
            slot = index - page * PAGE_ENTRIES
            new, old = changes[index], entries[slot]
            if new != old:
                changed += 1
                changed_bytes += chunk_length(index, size, chunk_size)
                allocated += (new != ZERO) - (old != ZERO)
                entries[slot] = new
        root[page] = ZERO if all(d == ZERO for d in entries) else store(entries)
    return AssemblyResult(root, changed, changed_bytes, allocated)


def iter_digests(root: Iterable[bytes], chunks: int, load: PageLoader) -> Iterable[bytes]:
    """Every chunk digest of a disk in order, loading one page at a time."""
    for page, page_digest in enumerate(root):
        yield from load_page(load, page_digest, page_entries(page, chunks))
