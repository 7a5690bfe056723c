"""Chunkyard: a deduplicating backup repository for Hyper-V fleets (shared core)."""

__version__ = "0.1.0"
