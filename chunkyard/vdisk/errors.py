"""Errors raised for malformed or unusable VHDX files."""


class VhdxError(Exception):
    """A VHDX file is corrupt, unsupported, or its parent chain is broken.

    The message always starts with the name of the offending file, so an
    operator looking at a failed backup knows which disk of which VM to check.
    """


class FormatError(ValueError):
    """Internal: a structure failed validation; the reader adds the file name."""
