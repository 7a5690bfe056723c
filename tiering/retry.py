"""Retries with exponential backoff and jitter, for store calls that fail with TransientError."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .stores.base import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    attempts: int = 6
    base: float = 0.5  # seconds before the first retry; doubles each time
    cap: float = 30.0

    def call(self, fn: Callable[[], T], *, stop: threading.Event | None = None,
             on_retry: Callable[[TransientError], None] | None = None) -> T:
        """fn(), retried on TransientError; the last one is raised. A set `stop` ends the waiting early."""
        stop = stop or threading.Event()
        for attempt in range(self.attempts):
            try:
                return fn()
            except TransientError as e:
                if attempt == self.attempts - 1 or stop.is_set():
                    raise
                if on_retry is not None:
                    on_retry(e)
                if stop.wait(min(self.cap, self.base * 2**attempt) * random.uniform(0.5, 1.0)):
                    raise
        raise AssertionError("unreachable")
