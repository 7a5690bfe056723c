"""A store wrapper that injects failures, like kopia's fault-injecting blob storage, for tests.

Faults fire by rule (operation, key prefix, probability, how many times) from a seeded generator, so a
failing run replays exactly. Kinds:
- `error`:   the call fails before reaching the store (a refused connection);
- `timeout`: the call reaches the store and succeeds there, then the caller sees a timeout (the
             ambiguous outcome: did it happen?);
- `slow`:    the call is delayed, then proceeds;
- `cut`:     put only: a prefix of the data is stored as the whole object, then the caller sees an
             error. Real S3 and Azure never expose such a half object, but a gateway or a non-atomic
             store might; the uploader must never let a point depend on one.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from .base import ObjectInfo, Source, Store, TransientError, read_piece, source_size

T = TypeVar("T")
OPS = ("put", "get", "head", "list", "delete", "extend_retention")
KINDS = ("error", "timeout", "slow", "cut")


@dataclass(frozen=True)
class Fault:
    kind: str
    op: str = "*"  # one of OPS, or * for any
    key: str = ""  # only keys starting with this
    probability: float = 1.0
    times: int | None = None  # fire at most this many times
    delay: float = 0.0  # seconds, for slow and timeout

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.op != "*" and self.op not in OPS):
            raise ValueError(f"bad fault {self}")
        if self.kind == "cut" and self.op != "put":
            raise ValueError("a cut fault applies to put only")


class FaultyStore(Store):
    def __init__(self, inner: Store, faults: Iterable[Fault], seed: int = 0):
        self.inner = inner
        self.url = inner.url
        self.faults = list(faults)
        self.fired: Counter[int] = Counter()  # by index in faults
        self.calls: Counter[str] = Counter()  # by operation
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _pick(self, op: str, key: str) -> Fault | None:
        with self._lock:
            self.calls[op] += 1
            for i, fault in enumerate(self.faults):
                if (fault.op in ("*", op) and key.startswith(fault.key)
                        and (fault.times is None or self.fired[i] < fault.times)
                        and self._rng.random() < fault.probability):
                    self.fired[i] += 1
                    return fault
        return None

    def _call(self, op: str, key: str, call: Callable[[], T]) -> T:
        return self._apply(self._pick(op, key), op, key, call)

    @staticmethod
    def _apply(fault: Fault | None, op: str, key: str, call: Callable[[], T]) -> T:
        if fault is None:
            return call()
        if fault.kind == "error":
            raise TransientError(f"injected error: {op} {key}")
        time.sleep(fault.delay)
        result = call()
        if fault.kind == "timeout":
            raise TransientError(f"injected timeout after the store performed {op} {key}")
        return result

    def put(self, key: str, data: Source, *, if_absent: bool = True, retain_until: datetime | None = None) -> bool:
        fault = self._pick("put", key)
        if fault is not None and fault.kind == "cut":
            size = source_size(data)
            with self._lock:
                cut = self._rng.randrange(size) if size else 0
            self.inner.put(key, read_piece(data, 0, cut), if_absent=if_absent)
            raise TransientError(f"injected cut-off upload: {key} stopped after {cut} of {size} bytes")
        return self._apply(fault, "put", key, lambda: self.inner.put(key, data, if_absent=if_absent,
                                                                       retain_until=retain_until))

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self._call("get", key, lambda: self.inner.get(key, start, end))

    def head(self, key: str) -> ObjectInfo | None:
        return self._call("head", key, lambda: self.inner.head(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return iter(self._call("list", prefix, lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def extend_retention(self, key: str, until: datetime) -> None:
        self._call("extend_retention", key, lambda: self.inner.extend_retention(key, until))

    def close(self) -> None:
        self.inner.close()
