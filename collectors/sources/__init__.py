"""Collector sources: lab (local stand-in hypervisor), file/blockdev, and later Hyper-V."""

from .base import Backup, DiskInfo, DiskReader, Range, Source, SourceError, VmInfo

__all__ = ["Backup", "DiskInfo", "DiskReader", "Range", "Source", "SourceError", "VmInfo"]
