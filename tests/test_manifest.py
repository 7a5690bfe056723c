"""Synthetic-full assembly against an in-memory page store: multi-page disks, resizes, and cost."""

from __future__ import annotations

import os

import pytest

from chunkyard.wire import ZERO, digest
from repo_server.engine.manifest import PAGE_ENTRIES, assemble, chunk_count, iter_digests

CS = 1 << 20


class PageStore:
    """Pages kept in a dict, counting loads and stores to check the O(touched pages) promise."""

    def __init__(self) -> None:
        self.pages: dict[bytes, bytes] = {}
        self.loads = self.stores = 0

    def load(self, page_digest: bytes) -> bytes:
        self.loads += 1
        return self.pages[page_digest]

    def build(self, base: dict, size: int, changes: dict[int, bytes]) -> dict:
        result = assemble(base_root=base["root"], base_size=base["size"], base_allocated=base["allocated"],
                          size=size, chunk_size=CS, changes=sorted(changes.items()), load=self.load)
        for data in result.new_pages:
            self.stores += 1
            self.pages[digest(data)] = data
        assert all(p == ZERO or p in self.pages for p in result.root)  # every page named is stored
        return {"root": result.root, "size": size, "allocated": result.allocated_chunks, "result": result}

    def digests(self, point: dict) -> list[bytes]:
        return list(iter_digests(point["root"], chunk_count(point["size"], CS), self.load))


EMPTY = {"root": [], "size": 0, "allocated": 0}


def rand() -> bytes:
    return os.urandom(32)


def test_full_then_incremental_touches_only_changed_pages() -> None:
    store = PageStore()
    n = 3 * PAGE_ENTRIES + 10
    full = {i: rand() for i in range(0, n, 7)}
    p1 = store.build(EMPTY, n * CS, full)
    assert len(p1["root"]) == 4 and p1["allocated"] == len(full)
    expected = [full.get(i, ZERO) for i in range(n)]
    assert store.digests(p1) == expected

    store.loads = store.stores = 0
    change = {5: rand(), PAGE_ENTRIES * 2 + 5: ZERO}
    p2 = store.build(p1, n * CS, change)
    assert (store.loads, store.stores) == (2, 2)  # two pages touched, the other two copied by reference
    assert p2["root"][1] == p1["root"][1] and p2["root"][3] == p1["root"][3]
    expected[5], expected[PAGE_ENTRIES * 2 + 5] = change[5], ZERO
    assert store.digests(p2) == expected
    assert p2["result"].changed_chunks == 2
    assert p2["allocated"] == p1["allocated"] + (full.get(5) is None) - (PAGE_ENTRIES * 2 + 5 in full)


def test_no_change_costs_nothing_and_zero_pages_are_not_stored() -> None:
    store = PageStore()
    tib = 1 << 40
    p1 = store.build(EMPTY, tib, {})
    assert p1["root"] == [ZERO] * 256 and store.stores == 0
    p2 = store.build(p1, tib, {})
    assert p2["root"] == p1["root"] and (store.loads, store.stores) == (0, 0)


@pytest.mark.parametrize("new_chunks", [1, PAGE_ENTRIES - 1, PAGE_ENTRIES, PAGE_ENTRIES + 1, 2 * PAGE_ENTRIES + 3])
def test_resize_keeps_prefix_and_counts(new_chunks: int) -> None:
    """Grow and shrink across page boundaries: the common prefix survives, the rest is zero."""
    store = PageStore()
    old_chunks = PAGE_ENTRIES + 100
    data = {i: rand() for i in range(old_chunks)}
    p1 = store.build(EMPTY, old_chunks * CS, data)
    p2 = store.build(p1, new_chunks * CS, {})
    got = store.digests(p2)
    assert len(got) == new_chunks
    assert got == [data[i] if i < old_chunks else ZERO for i in range(new_chunks)]
    assert p2["allocated"] == min(new_chunks, old_chunks)
