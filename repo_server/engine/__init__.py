"""The storage engine: packs, index, manifests, points, sessions. Knows nothing of HTTP."""

from .errors import Conflict, Corrupt, EngineError, Forbidden, Invalid, NotFound, Unavailable
from .repository import Repository, init_repository, read_descriptor, rebuild_index

__all__ = ["Conflict", "Corrupt", "EngineError", "Forbidden", "Invalid", "NotFound", "Repository", "Unavailable",
           "init_repository", "read_descriptor", "rebuild_index"]
