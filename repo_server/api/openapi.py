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

METRICS_OP = ("Prometheus text format (also at the root path /metrics, where scrapers look by default): request "
              "counts and latencies, ingest and restore bytes, repository sizes and ratios, last backup per VM, tier "
              "lag, maintenance job results, process RSS", ["admin", "reader"], None, 200,
              {"text/plain": {"schema": {"type": "string"}}})

# path (under /api/v1) -> method -> (summary, roles or None for public, request body, success status, success content)
OPERATIONS: dict[str, dict[str, tuple[str, list[str] | None, Any, int, Any]]] = {
    "/health": {"get": ("Liveness and version", None, None, 200, JSON_OBJ)},
    "/openapi.json": {"get": ("This document", None, None, 200, JSON_OBJ)},
    "/repository": {"get": ("Chunk size, repository id and stats: logical, unique and stored bytes, dedup and "
                            "compression ratios, chunk, pack and point counts; `encryption` (\"none\" or the "
                            "scheme) and `warnings` (e.g. an unencrypted repository; empty when all is well). "
                            "A tenant-scoped token gets only its tenant's VM and point counts and logical bytes",
                            ["admin", "reader", "collector"], None, 200, JSON_OBJ)},
    "/metrics": {"get": METRICS_OP},
    "/tokens": {
        "post": ("Create a token; the token is shown only in this answer", ["admin"],
                 {"$ref": "#/components/schemas/TokenRequest"}, 201, JSON_OBJ),
        "get": ("List tokens (ids, roles, names, tenants, expiry; never the secrets); a tenant-scoped admin sees "
                "its tenant's only", ["admin"], None, 200, JSON_OBJ),
    },
    "/whoami": {"get": ("The caller's own token: {id, name, role, tenant, expires} (never the secret); any valid "
                        "token", ["admin", "reader", "collector"], None, 200, JSON_OBJ)},
    "/tokens/{token_id}": {"delete": ("Revoke a token (a tenant-scoped admin: of its own tenant only)", ["admin"],
                                      None, 204, None)},
    "/sessions": {"post": ("Open a backup session for one VM; copies the base point's manifests. A VM id belongs to "
                           "the tenant whose token first opened a session for it: another tenant's token gets 403 "
                           "vm_not_yours",
                           ["admin", "collector"], {"$ref": "#/components/schemas/SessionRequest"}, 201, JSON_OBJ)},
    "/sessions/{sid}": {
        "get": ("Session state and counters (to resume an interrupted backup)", ["admin", "collector"], None, 200,
                JSON_OBJ),
        "delete": ("Abort the session; staged entries are dropped", ["admin", "collector"], None, 204, None),
    },
    "/sessions/{sid}/missing": {"post": (
        "Body: N×32-byte BLAKE3 digests (N ≤ 65536). Answer: a bitmap, bit i (LSB first) set when chunk i must be "
        "uploaded. The ZERO digest is never missing. For a tenant-scoped token a chunk is present only if stored "
        "AND that tenant uploaded or referenced it before (possession), so the answer reveals nothing of other "
        "tenants' data.", ["admin", "collector"], "binary", 200, OCTET)},
    "/sessions/{sid}/chunks": {"post": (
        "Body (≤ 64 MiB): frames `digest[32] codec u8 raw_len u32 stored_len u32 payload`, little-endian; codec 0 "
        "raw, 1 zstd. Every frame is decompressed and hashed; any bad frame rejects the whole body with 422.",
        ["admin", "collector"], "binary", 200, JSON_OBJ)},
    "/sessions/{sid}/disks/{disk_id}/map": {"post": (
        "Body: records `chunk_index u64 digest[32]`. Each digest must be ZERO or present (for a tenant-scoped "
        "token: and possessed by the tenant), of the length its index covers. Unmapped indices keep the base "
        "point's digest (ZERO without a base).",
        ["admin", "collector"], "binary", 200, JSON_OBJ)},
    "/sessions/{sid}/blobs/{name}": {"put": ("Store a VM configuration file (≤ 64 MiB) with the point",
                                             ["admin", "collector"], "binary", 201, JSON_OBJ)},
    "/sessions/{sid}/commit": {"post": (
        "Assemble the synthetic full and create the restore point; all-or-nothing. Optional body "
        '{"read_bytes": n, "rct": {disk_id: id}}: the collector-side read counter and the change-tracking ids '
        "obtained after reading (they override those given at session creation).", ["admin", "collector"],
        "json-optional",
        201, JSON_OBJ)},
    "/vms": {"get": (
        "VMs with restore points: name, host, point count, the newest point (latest_point, latest_time, "
        "latest_consistency, latest_size, latest_logical_bytes) and sums over all the VM's points (logical_bytes, "
        "new_bytes its backups added, stored_bytes) with dedup_ratio = logical_bytes / new_bytes",
        ["admin", "reader"], None, 200, JSON_OBJ)},
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
    "/points/{pid}/disks/{disk_id}/download-url": {"post": (
        'A short-lived signed link to the raw or VHDX download: body {"format": "raw"|"vhdx"} → {url, expires, '
        "filename}. The url is the /raw or /vhdx path plus `exp`, `tok` and `sig` query parameters (HMAC-SHA256 "
        "with a per-server secret over the method, path, expiry and the asking token's id): it opens that one path "
        "for GET/HEAD (Range works) without an Authorization header for 10 minutes, and only while the asking token "
        "exists. A wrong signature answers 403, an expired link or a revoked token 401. The dashboard's downloads "
        "use it, since a browser link cannot send a token and a token must never go into a URL.",
        ["admin", "reader"], {"$ref": "#/components/schemas/DownloadUrlRequest"}, 200, JSON_OBJ)},
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
    "/audit": {"get": (
        "The newest audit records (`?limit=N`, 1..10000, default 100), newest first: token create/revoke, point "
        "delete, protection, retention changes, prune, gc, verify, tier sync, repair; each {time, who {token_id, "
        "name, tenant}, action, target, tenant, outcome, details}. A tenant-scoped admin sees its tenant's only.",
        ["admin"], None, 200, JSON_OBJ)},
    "/collectors": {
        "post": ("Register a pull collector (idempotent per tenant and name): its version and the hosts and VMs it "
                 "sees; refreshes last_seen. Answers {name, poll_seconds}", ["admin", "collector"],
                 {"$ref": "#/components/schemas/CollectorRegistration"}, 200, JSON_OBJ),
        "get": ("Registered collectors with their inventory, last_seen and online", ["admin", "reader"], None, 200,
                JSON_OBJ),
    },
    "/collectors/{name}/work": {"get": (
        "Long-poll for the collector's next work item ({work_id, run_id, job, host, vm, options}); ?wait=S "
        "(≤ 60, default 30) seconds, then 204 when nothing came", ["admin", "collector"], None, 200, JSON_OBJ)},
    "/work/{work_id}/progress": {"post": (
        "Report progress {phase, done_bytes, total_bytes, rate_bytes_per_s}; answers {cancel}. Work without "
        "progress for fleet_silent_seconds fails and is retried", ["admin", "collector"],
        {"$ref": "#/components/schemas/WorkProgress"}, 200, JSON_OBJ)},
    "/work/{work_id}/result": {"post": (
        "Report a work item's outcome (idempotent: a repeated or superseded result changes nothing)",
        ["admin", "collector"], {"$ref": "#/components/schemas/WorkResult"}, 204, None)},
    "/backup-jobs": {
        "post": ("Define a backup job: VM selection, schedule (calendar event or cron), retention, tier, "
                 "concurrency, bandwidth, retries, missed-run policy", ["admin"],
                 {"$ref": "#/components/schemas/BackupJob"}, 201, JSON_OBJ),
        "get": ("Backup jobs with next_run and last_run", ["admin", "reader"], None, 200, JSON_OBJ),
    },
    "/backup-jobs/{name}": {
        "get": ("A backup job (?tenant= picks among same-named jobs of several tenants)", ["admin", "reader"], None,
                200, JSON_OBJ),
        "put": ("Replace a backup job (name and tenant stay)", ["admin"], {"$ref": "#/components/schemas/BackupJob"},
                200, JSON_OBJ),
        "delete": ("Delete a backup job; its unfinished VMs are cancelled, its run history stays", ["admin"], None,
                   204, None),
    },
    "/backup-jobs/{name}/run": {"post": (
        'Run the job now. Optional body {"full": true} for a full read. Answers 202 {run_id}; 409 while it runs',
        ["admin"], "json-optional", 202, JSON_OBJ)},
    "/backup-jobs/{name}/runs": {"get": ("Run summaries of a job, newest first (?limit=N, default 20)",
                                         ["admin", "reader"], None, 200, JSON_OBJ)},
    "/runs/{run_id}": {"get": ("A run with its per-VM state, progress, results and totals", ["admin", "reader"],
                               None, 200, JSON_OBJ)},
}

SCHEMAS = {
    "RetentionPolicy": {"type": "object", "additionalProperties": False, "description": (
        "GFS counts, UTC, weeks are ISO weeks; missing counts are 0. keep_last keeps the N newest points; each "
        "other rule keeps the newest point of each of its N most recent periods that hold one."),
        "properties": {k: {"type": "integer", "minimum": 0} for k in KEYS}},
    "Protection": {"type": "object", "required": ["protected"], "additionalProperties": False, "properties": {
        "protected": {"type": "boolean"}, "note": {"type": "string", "maxLength": 1000}}},
    "DownloadUrlRequest": {"type": "object", "required": ["format"], "properties": {
        "format": {"type": "string", "enum": ["raw", "vhdx"]}}},
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": {"type": "string"}, "message": {"type": "string"}}},
    "TokenRequest": {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["admin", "collector", "reader"]}, "name": {"type": "string"},
        "tenant": {"type": "string", "pattern": "^[a-z0-9_-]{0,64}$", "description": (
            '"" (the default for an unscoped admin) sees the whole repository; a tenant-scoped admin may create '
            "tokens of its own tenant only (the default)")},
        "expires_in": {"type": "number", "minimum": 1, "maximum": 315360000, "description": "seconds from now"},
        "expires": {"type": "number", "description": "unix time; give this or expires_in, not both"}}},
    "CollectorRegistration": {"type": "object", "required": ["name", "hosts"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"},
        "hosts": {"type": "array", "items": {"type": "object", "required": ["host", "vms"], "properties": {
            "host": {"type": "string"},
            "vms": {"type": "array", "items": {"type": "object", "required": ["id"], "properties": {
                "id": {"type": "string"}, "name": {"type": "string"}}}}}}},
    }},
    "WorkProgress": {"type": "object", "required": ["phase", "done_bytes", "rate_bytes_per_s"], "properties": {
        "phase": {"type": "string"}, "done_bytes": {"type": "integer"},
        "total_bytes": {"type": "integer", "nullable": True}, "rate_bytes_per_s": {"type": "number"}}},
    "WorkResult": {"type": "object", "required": ["ok"], "properties": {
        "ok": {"type": "boolean"}, "point_id": {"type": "string", "nullable": True},
        "consistency": {"type": "string", "nullable": True}, "bytes_read": {"type": "integer"},
        "bytes_changed": {"type": "integer"}, "bytes_new": {"type": "integer"}, "bytes_sent": {"type": "integer"},
        "duration_s": {"type": "number"}, "error": {"type": "string", "nullable": True}}},
    "BackupJob": {"type": "object", "required": ["name", "collector", "schedule"], "additionalProperties": False,
                  "properties": {
        "name": {"type": "string"}, "tenant": {"type": "string"}, "collector": {"type": "string"},
        "host_pattern": {"type": "string", "default": "*"}, "vm_pattern": {"type": "string", "default": "*"},
        "schedule": {"type": "string", "description": 'calendar event ("mon..fri 22:00", "*:0/15", "daily") or '
                                                      'cron ("30 22 * * 1-5")'},
        "retention": {"oneOf": [{"$ref": "#/components/schemas/RetentionPolicy"}, {"type": "null"}]},
        "tier": {"type": "string", "nullable": True}, "max_per_host": {"type": "integer", "default": 1},
        "bandwidth_mib_s": {"type": "number", "nullable": True}, "retries": {"type": "integer", "default": 2},
        "retry_delay_s": {"type": "number", "default": 300},
        "missed": {"type": "string", "enum": ["run", "skip"], "default": "run"},
        "enabled": {"type": "boolean", "default": True}}},
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


# Routes outside /api/v1, by their full path.
DASHBOARD_REDIRECT = ("Redirects to the web dashboard at /ui/", None, None, 302, None)
ROOT_OPERATIONS: dict[str, dict[str, tuple[str, list[str] | None, Any, int, Any]]] = {
    "/metrics": {"get": METRICS_OP},
    "/": {"get": DASHBOARD_REDIRECT},
    "/ui": {"get": DASHBOARD_REDIRECT},
    "/ui/{path}": {"get": ("The web dashboard's static files (public; they hold no data)", None, None, 200,
                           {"text/html": {"schema": {"type": "string"}}})},
}


def openapi_document() -> dict:
    """Paths are full (the API under /api/v1, a few routes at the root), so the server URL is "/"."""
    paths: dict[str, dict] = {}
    every = [(f"/api/v1{path}", methods) for path, methods in OPERATIONS.items()] + list(ROOT_OPERATIONS.items())
    for path, methods in every:
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
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": SCHEMAS},
        "paths": paths,
    }
