"""The GC write barrier: while a garbage collection runs, every chunk the outside world touches
(uploaded, answered present by `missing`, mapped, stored as a page) is remembered, and the sweep
never deletes a remembered chunk. Lookups that decide "present" and the sweep's deletions take the
same lock, so a chunk is never both reported present and swept.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class GcBarrier:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.chunks: set[bytes] = set()
        self.pages: set[bytes] = set()  # manifest pages referenced by roots created or copied during GC
        self.tenant_pages: set[tuple[str, bytes]] = set()  # the same, with the tenant the root is for

    def touch(self, digests: Iterable[bytes]) -> None:
        """Call with `lock` held."""
        if self.active:
            self.chunks.update(digests)

    def touch_pages(self, pages: Iterable[bytes], tenant: str = "") -> None:
        with self.lock:
            if self.active:
                pages = list(pages)
                self.pages.update(pages)
                if tenant:
                    self.tenant_pages.update((tenant, p) for p in pages)

    def start(self) -> None:
        with self.lock:
            self.active = True
            self.chunks.clear()
            self.pages.clear()
            self.tenant_pages.clear()

    def stop(self) -> None:
        with self.lock:
            self.active = False
            self.chunks.clear()
            self.pages.clear()
            self.tenant_pages.clear()
