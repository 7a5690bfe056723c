"""Engine errors. Each carries a stable machine code; the API maps the class to an HTTP status."""


class EngineError(Exception):
    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class NotFound(EngineError):
    code = "not_found"


class Invalid(EngineError):
    """The request is well-formed but its content is unacceptable (bad frame, map beyond the disk, ...)."""

    code = "invalid"


class Forbidden(EngineError):
    """The caller's token may not touch this object (another collector's point or session)."""

    code = "forbidden"


class Conflict(EngineError):
    """The target's state forbids the operation (committed session, protected point, ...)."""

    code = "conflict"


class Corrupt(EngineError):
    """Stored data failed verification; the operation stops rather than serve wrong bytes."""

    code = "corrupt"


class Unavailable(EngineError):
    """Data lives in a cloud tier that cannot be reached now (move mode); retry later, nothing is lost."""

    code = "tier_unavailable"
