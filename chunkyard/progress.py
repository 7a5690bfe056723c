"""Progress of long byte-moving operations (restores, backups) for people and for logs.

On a terminal one line is redrawn in place, at most 5 times a second, so a fast loop never floods
the terminal; when the stream is a file or a service's log, a plain line is written every
`log_every` seconds instead, because carriage-return redraws turn logs into noise. Either way
`close()` writes one final line: bytes, time, average rate.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from chunkyard.units import format_size


def format_duration(seconds: float) -> str:
    """'4.2 s' under a minute (short operations want the decimal), else H:MM:SS."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Bytes done of a total (None while unknown; it may be set later), smoothed rate, ETA, elapsed."""

    REDRAW = 0.2  # seconds between rate samples and terminal redraws
    SMOOTHING = 3.0  # seconds: time constant of the rate's moving average, so the ETA does not jitter

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None, *, log_every: float = 10.0):
        self.total = total
        self.label = label
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr  # resolved late, so redirections apply
        self.log_every = log_every
        self._tty = self.stream.isatty()
        self._start = self._sampled_at = self._logged_at = time.monotonic()
        self._sampled_done = 0
        self._skipped = 0
        self._rate: float | None = None
        self._width = 0
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def skip(self, n: int) -> None:
        """Count bytes done by an earlier run (a resumed download): they shorten the ETA but are not rate."""
        self.done += n
        self._sampled_done += n
        self._skipped += n

    def update(self, n: int) -> None:
        """Add n bytes done; redraws or logs only when it is time to."""
        self.done += n
        now = time.monotonic()
        if now - self._sampled_at < self.REDRAW:
            return
        self._sample(now)
        if self._tty:
            self._draw(self.line(), end="")
        elif now - self._logged_at >= self.log_every:
            self._logged_at = now
            self._draw(self.line())

    def note(self, text: str) -> None:
        """A message line (a retry, a warning) that does not garble the redrawn progress line."""
        self._draw(text)

    def line(self) -> str:
        """The current state as one line: done / total (percent), rate, ETA, elapsed."""
        parts = [format_size(self.done)]
        if self.total:
            parts[0] += f" / {format_size(self.total)} ({100 * self.done / self.total:.0f}%)"
        if self._rate is not None:
            parts.append(f"{format_size(self._rate)}/s")
            if self.total and self._rate > 0:
                parts.append(f"ETA {format_duration(max(self.total - self.done, 0) / self._rate)}")
        parts.append(f"elapsed {format_duration(self.elapsed)}")
        return f"{self.label}: {', '.join(parts)}"

    def close(self) -> None:
        """Write the final line once: bytes, time and the average rate of the bytes this run moved."""
        if self._closed:
            return
        self._closed = True
        elapsed = self.elapsed
        rate = (self.done - self._skipped) / elapsed if elapsed > 0 else 0.0
        resumed = f", {format_size(self._skipped)} of it from an earlier run" if self._skipped else ""
        self._draw(f"{self.label}: {format_size(self.done)} in {format_duration(elapsed)} "
                   f"({format_size(rate)}/s){resumed}")

    def _sample(self, now: float) -> None:
        dt = now - self._sampled_at
        instant = (self.done - self._sampled_done) / dt
        weight = 1 - math.exp(-dt / self.SMOOTHING)
        self._rate = instant if self._rate is None else self._rate + weight * (instant - self._rate)
        self._sampled_at, self._sampled_done = now, self.done

    def _draw(self, text: str, end: str = "\n") -> None:
        """On a terminal, overwrite the redrawn line (padding out what is left of a longer one)."""
        if self._tty:
            padded = "\r" + text.ljust(self._width)
            self._width = 0 if end else len(text)  # a finished line needs no padding over it
            text = padded
        self.stream.write(text + end)
        self.stream.flush()
