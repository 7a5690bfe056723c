"""Named crash points for crash-consistency tests.

`CHUNKYARD_CRASH_AT=<name>` makes the process die (like SIGKILL, no cleanup) the first time
it reaches that point, so tests can kill the server exactly between two durable steps.
Unset, a crash point costs one dict lookup.
"""

import os

_TARGET = os.environ.get("CHUNKYARD_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _TARGET and name == _TARGET:
        os._exit(137)
