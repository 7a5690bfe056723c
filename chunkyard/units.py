"""Human sizes in and out: '1MiB', '256K', '2G' -> bytes; bytes -> '1.5 GiB'. Durations: '30d' -> seconds."""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Binary units: 'K', 'KiB' and 'KB' all mean 1024."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 1048576, 1MiB, 256K, 2G)")
    return int(float(m[1]) * _UNITS[m[2].lower()])


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdwy]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'90' or '90s' seconds, '15m', '12h', '30d', '2w', '1y' (365 days) -> seconds, more than zero."""
    m = _DURATION.match(text)
    if not m or float(m[1]) <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 3600, 90m, 12h, 30d, 2w, 1y)")
    return float(m[1]) * _DURATION_UNITS[m[2].lower()]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
