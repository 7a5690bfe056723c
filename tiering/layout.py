"""Where a repository's files go in a bucket, and back. A bucket alone is a complete repository:

    <prefix>/repo.toml                       the descriptor (repository id, chunk size)
    <prefix>/packs/<pack_id:016x>.pack       sealed packs, byte for byte (flat: object stores need no fan-out)
    <prefix>/points/<vm>/<point_id>.json     restore point records
    <prefix>/points/<vm>/<point_id>.protect  protection markers
    <prefix>/retention.json                  retention policies
    <prefix>/keys/master.json                the master key wrapped by the passphrase (encrypted repositories)

No index is stored: `rebuild_index` recreates it from packs (their trailers) and point files.
Deliberately absent: API tokens (whoever reads the bucket must not gain the API's keys) and `repo.key`,
the unwrapped master key of a repository without a passphrase (the bucket would then hold the key to its
own data): attaching such a repository takes its paper key.
"""

from __future__ import annotations

import re
from pathlib import Path

from repo_server.engine.errors import Invalid
from repo_server.engine.keyring import WRAPPED_FILE
from repo_server.engine.names import check_name
from repo_server.engine.pack import pack_path

DESCRIPTOR = "repo.toml"
RETENTION = "retention.json"
WRAPPED_KEY = WRAPPED_FILE.as_posix()
MUTABLE = (RETENTION, WRAPPED_KEY)  # rewritten in place (policy changes, passphrase changes)
PACKS = "packs/"
POINTS = "points/"
_PACK = re.compile(r"^packs/([0-9a-f]{16})\.pack$")
_POINT = re.compile(r"^points/([^/]+)/[0-9a-f]{16,64}\.(json|protect)$")


def pack_key(pack_id: int) -> str:
    return f"{PACKS}{pack_id:016x}.pack"


def pack_id_of(key: str) -> int | None:
    match = _PACK.fullmatch(key)
    return int(match.group(1), 16) if match else None


def is_point(key: str) -> bool:
    return key.startswith(POINTS) and key.endswith(".json")


def local_path(data: Path, key: str) -> Path | None:
    """The file of a repository directory that a bucket key mirrors, or None for a key that is not part
    of the layout (checked strictly: keys come from a bucket and must not name paths outside `data`)."""
    if key in (DESCRIPTOR, *MUTABLE):
        return data / key
    pack_id = pack_id_of(key)
    if pack_id is not None:
        return pack_path(data / "packs", pack_id)
    match = _POINT.fullmatch(key)
    if match is None:
        return None
    try:
        check_name(match.group(1), "VM id")  # the engine's own rule for names that become paths
    except Invalid:
        return None
    return data / key


def mirrored_files(data: Path) -> dict[str, Path]:
    """The small files a tier copies besides packs, by bucket key: point records and protection markers,
    retention.json and the wrapped key when they exist."""
    found = {key: data / key for key in MUTABLE if (data / key).exists()}
    for path in (data / "points").glob("*/*"):
        key = path.relative_to(data).as_posix()
        if local_path(data, key) is not None:  # skips temporary files (.name.tmp) and strays
            found[key] = path
    return found
