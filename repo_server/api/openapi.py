"""The OpenAPI 3 description of the API, served at /api/v1/openapi.json.

Written as a table of operations so that a test can check it against the router: every route
documented, nothing documented that is not routed.
"""

from __future__ import annotations

from typing import Any

from chunkyard import __version__
from repo_server.engine.retention import KEYS

OCTET = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
ERROR = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
JSON_OBJ = {"application/json": {"schema": {"type": "object"}}}

# path -> method -> (summary, roles or None for public, request body, success status, success content)
OPERATIONS: dict[str, dict[str, tuple[str, list[str] | None, Any, int, Any]]] = {
    "/health": {"get": ("Liveness and version", None, None, 200, JSON_OBJ)},
    "/openapi.json": {"get": ("This document", None, None, 200, JSON_OBJ)},
    "/repository": {"get": ("Chunk size, repository id and stats: logical, unique and stored bytes, dedup and "
                            "compression ratios, chunk, pack and point counts",
                            ["admin", "reader", "collector"], None, 200, JSON_OBJ)},
    "/metrics": {"get": ("Prometheus text exposition", ["admin", "reader"], None, 200,
                         {"text/plain": {"schema": {"type": "string"}}})},
    "/tokens": {
        "post": ("Create a token; the token is shown only in this answer", ["admin"],
                 {"$ref": "#/components/schemas/TokenRequest"}, 201, JSON_OBJ),
        "get": ("List tokens (ids, roles, names; never the secrets)", ["admin"], None, 200, JSON_OBJ),
    },
    "/tokens/{token_id}": {"delete": ("Revoke a token", ["admin"], None, 204, None)},
    "/sessions": {"post": ("Open a backup session for one VM; copies the base point's manifests",
                           ["admin", "collector"], {"$ref": "#/components/schemas/SessionRequest"}, 201, JSON_OBJ)},
    "/sessions/{sid}": {
        "get": ("Session state and counters (to resume an interrupted backup)", ["admin", "collector"], None, 200,
                JSON_OBJ),
        "delete": ("Abort the session; staged entries are dropped", ["admin", "collector"], None, 204, None),
    },
    "/sessions/{sid}/missing": {"post": (
        "Body: N×32-byte BLAKE3 digests (N ≤ 65536). Answer: a bitmap, bit i (LSB first) set when chunk i must be "
        "uploaded. The ZERO digest is never missing.", ["admin", "collector"], "binary", 200, OCTET)},
    "/sessions/{sid}/chunks": {"post": (
        "Body (≤ 64 MiB): frames `digest[32] codec u8 raw_len u32 stored_len u32 payload`, little-endian; codec 0 "
        "raw, 1 zstd. Every frame is decompressed and hashed; any bad frame rejects the whole body with 422.",
        ["admin", "collector"], "binary", 200, JSON_OBJ)},
    "/sessions/{sid}/disks/{disk_id}/map": {"post": (
        "Body: records `chunk_index u64 digest[32]`. Each digest must be ZERO or present, of the length its index "
        "covers. Unmapped indices keep the base point's digest (ZERO without a base).",
        ["admin", "collector"], "binary", 200, JSON_OBJ)},
    "/sessions/{sid}/blobs/{name}": {"put": ("Store a VM configuration file (≤ 64 MiB) with the point",
                                             ["admin", "collector"], "binary", 201, JSON_OBJ)},
    "/sessions/{sid}/commit": {"post": (
        "Assemble the synthetic full and create the restore point; all-or-nothing. Optional body "
        '{"read_bytes": n, "rct": {disk_id: id}}: the collector-side read counter and the change-tracking ids '
        "obtained after reading (they override those given at session creation).", ["admin", "collector"],
        "json-optional",
        201, JSON_OBJ)},
    "/vms": {"get": ("VMs with restore points", ["admin", "reader"], None, 200, JSON_OBJ)},
    "/vms/{vm_id}/points": {"get": ("Restore points of a VM, oldest first", ["admin", "reader"], None, 200,
                                    JSON_OBJ)},
    "/points/{pid}": {
        "get": ("A restore point", ["admin", "reader"], None, 200, JSON_OBJ),
        "delete": ("Delete a restore point (its data goes at the next GC); 409 when it is protected", ["admin"],
                   None, 204, None),
    },
    "/points/{pid}/disks/{disk_id}/map": {"get": (
        "The n chunk digests of the disk, 32 bytes each; one `Range` for a window (collectors page through it when "
        "change tracking is unavailable; a collector token may read only points it created)",
        ["admin", "reader", "collector"], None, 200, OCTET)},
    "/points/{pid}/disks/{disk_id}/raw": {"get": (
        "The raw disk image, streamed and verified chunk by chunk. One `Range` (206; 416 with "
        "`Content-Range: bytes */size` for malformed, reversed, multi or unsatisfiable ranges), `ETag`, "
        "`If-Range`. A chunk failing verification cuts the stream short of Content-Length.",
        ["admin", "reader"], None, 200, OCTET)},
    "/points/{pid}/disks/{disk_id}/vhdx": {"get": (
        "A dynamic VHDX generated on the fly from the point's manifest, importable by Hyper-V: deterministic "
        "layout (headers, log, metadata, BAT, then present blocks in order; zero chunks unallocated), so "
        "`Range`, `ETag` and `If-Range` behave as for /raw. A disk whose size is not whole 512-byte sectors "
        "is padded with zeros.", ["admin", "reader"], None, 200, OCTET)},
    "/admin/gc": {"post": (
        "Start a garbage collection job (mark from all points and open sessions, sweep, compact packs whose "
        'live fraction is under compact_below). Backups continue meanwhile. Optional body {"compact_below": 0.5}.'
        " Answers 202 with the job; follow it at /jobs/{id}.", ["admin"], "json-optional", 202, JSON_OBJ)},
    "/retention": {
        "get": ("Retention policies: the repository default and every VM's own", ["admin", "reader"], None, 200,
                JSON_OBJ),
        "put": ("Set the default GFS policy, used by VMs without their own. {} keeps every point",
                ["admin"], {"$ref": "#/components/schemas/RetentionPolicy"}, 200, JSON_OBJ),
        "delete": ("Remove the default policy", ["admin"], None, 204, None),
    },
    "/vms/{vm_id}/retention": {
        "get": ("A VM's own policy, the default, and which one prune applies", ["admin", "reader"], None, 200,
                JSON_OBJ),
        "put": ("Set a VM's GFS policy (overrides the default; {} keeps every point)", ["admin"],
                {"$ref": "#/components/schemas/RetentionPolicy"}, 200, JSON_OBJ),
        "delete": ("Remove a VM's policy: the default applies again", ["admin"], None, 204, None),
    },
    "/points/{pid}/protection": {"put": (
        "Protect a point (never deleted by prune or DELETE, which answers 409) or release it; kept across "
        "index rebuilds. Answers the point.", ["admin"], {"$ref": "#/components/schemas/Protection"}, 200,
        JSON_OBJ)},
    "/admin/prune": {"post": (
        "Start a prune job: per VM, keep the points its policy (or the body's override) selects, with reasons, "
        "and delete the rest; protected points and each VM's newest point are always kept, and a VM without "
        'any policy keeps everything. Optional body {"vm": id, "dry_run": true, "policy": {...}}: a dry run '
        "(the default) deletes nothing. Space comes back at the next GC. Answers 202 with the job.",
        ["admin"], "json-optional", 202, JSON_OBJ)},
    "/admin/verify": {"post": (
        'Start a verify job: {"mode": "all"} re-reads every live chunk once, pack by pack; "new" checks the chunks '
        'of points created since the last run; "sample" those of a random {"percent": p} of points. Bad chunks '
        "are quarantined (the next backup re-sends them) and every checked point gets a verify status.",
        ["admin"], "json-optional", 202, JSON_OBJ)},
    "/jobs": {"get": ("Recent maintenance jobs", ["admin", "reader"], None, 200, JSON_OBJ)},
    "/jobs/{job_id}": {"get": ("A job's state, phase, progress (done/total) and result", ["admin", "reader"], None,
                               200, JSON_OBJ)},
    "/points/{pid}/blobs/{name}": {"get": ("A stored configuration file", ["admin", "reader"], None, 200, OCTET)},
    "/tiers": {"get": (
        "Cloud tiers ([[tier]] in the server configuration) and their lag: per tier its state, the packs, bytes, "
        "points and files not yet copied, deletions waiting for a retention date, counters, the last error, "
        "synced_at (everything local at that time is in the tier), deletions_paused (the mass-deletion guard), "
        "local and cloud bytes, and in move mode the moved packs and bytes and the read cache",
        ["admin", "reader"], None, 200, JSON_OBJ)},
    "/tiers/sync": {"post": (
        "Start a sync cycle (and a move pass) of every tier now. Answers 202 with `requested`; a tier has caught "
        "up with this request once its synced_at ≥ requested. Optional body {\"allow_mass_delete\": true}: the "
        "cycle's cloud deletions go through even above the mass-deletion guard's threshold.",
        ["admin"], "json-optional", 202, JSON_OBJ)},
}

SCHEMAS = {
    "RetentionPolicy": {"type": "object", "additionalProperties": False, "description": (
        "GFS counts, UTC, weeks are ISO weeks; missing counts are 0. keep_last keeps the N newest points; each "
        "other rule keeps the newest point of each of its N most recent periods that hold one."),
        "properties": {k: {"type": "integer", "minimum": 0} for k in KEYS}},
    "Protection": {"type": "object", "required": ["protected"], "additionalProperties": False, "properties": {
        "protected": {"type": "boolean"}, "note": {"type": "string", "maxLength": 1000}}},
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
    "TokenRequest": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["admin", "collector", "reader"]}, "name": {"type": "string"}}},
    "SessionRequest": {"type": "object", "required": ["host", "vm", "disks"], "properties": {
        "host": {"type": "string"},
        "vm": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"},
                                                                     "name": {"type": "string"}}},
        "disks": {"type": "array", "items": {"type": "object", "required": ["disk_id", "size"], "properties": {
            "disk_id": {"type": "string"}, "name": {"type": "string"}, "size": {"type": "integer"}}}},
        "base": {"oneOf": [{"type": "string"}, {"type": "null"}], "description": '"latest", a point id or null'},
        "consistency": {"type": "string", "enum": ["application", "crash", "saved-state"]},
        "rct": {"type": "object", "additionalProperties": {"type": "string"}},
    }},
}


def _operation(summary: str, roles: list[str] | None, body: Any, status: int, content: Any) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {str(status): {"description": "success"}}}
    if content:
        op["responses"][str(status)]["content"] = content
    if roles is None:
        op["security"] = []
    else:
        op["description"] = f"Roles: {', '.join(roles)}."
        op["responses"] |= {"401": ERROR, "403": ERROR}
    if body == "binary":
        op["requestBody"] = {"required": True, "content": OCTET}
        op["responses"] |= {"413": ERROR, "422": ERROR}
    elif body == "json-optional":
        op["requestBody"] = {"required": False, "content": JSON_OBJ}
    elif body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        op["responses"] |= {"400": ERROR, "422": ERROR}
    op["responses"].setdefault("404", ERROR)
    return op


def openapi_document() -> dict:
    paths: dict[str, dict] = {}
    for path, methods in OPERATIONS.items():
        item: dict[str, Any] = {}
        for method, spec in methods.items():
            item[method] = _operation(*spec)
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            item["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                  for p in params]
        paths[path] = item
    return {
        "openapi": "3.0.3",
        "info": {"title": "Chunkyard repository server", "version": __version__,
                 "description": "Deduplicating backup repository for Hyper-V fleets. Binary bodies are "
                                "little-endian. Errors are JSON {error, message}."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
        "paths": paths,
    }
