"""Errors of the Hyper-V source. All are SourceErrors, so the CLI prints the message and stops."""

from __future__ import annotations

from ..base import SourceError


class HyperVError(SourceError):
    """The host, WinRM or SMB said no, or answered something we cannot use; the message says which."""


class HostAccessDenied(HyperVError):
    """The account lacks rights on the host (WinRM, WMI or the share): nothing to retry, fix the account."""


class HostRefused(HyperVError):
    """A WMI method or its job failed on the host: the operation was refused, the host still works.

    Callers may fall back (crash-consistent checkpoint, full read) on this error, and only on this one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class HostTimeout(HyperVError):
    """A host job or command did not finish in the configured time."""
