"""Validation of client-chosen names that end up in keys and paths (VM ids, disk ids, blob names)."""

from __future__ import annotations

import re

from .errors import Invalid

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._{}-]{0,127}$")
_HEX_ID = re.compile(r"^[0-9a-f]{16,64}$")


def check_name(value: object, what: str) -> str:
    """A safe single path component: letters, digits, `._-{}`, no leading dot, at most 128 chars."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise Invalid(
            f"{what} must be 1-128 characters of letters, digits, '.', '_', '-', '{{', '}}', "
            f"not starting with a dot or containing '..'; got {value!r:.80}",
            "bad_name",
        )
    return value


def check_hex_id(value: str, what: str) -> str:
    if not _HEX_ID.fullmatch(value):
        raise Invalid(f"{what} is not a valid id: {value!r:.80}", "bad_id")
    return value
