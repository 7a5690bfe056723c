"""Backup job definitions: the fields, their defaults, and the validation of a job as a client sends it."""

from __future__ import annotations

import json
from typing import Any

from repo_server.engine.errors import Invalid
from repo_server.engine.names import check_name
from repo_server.engine.retention import check_policy
from repo_server.engine.tokens import TENANT_CHARS

from . import calendar

DEFAULTS: dict[str, Any] = {
    "host_pattern": "*", "vm_pattern": "*", "retention": None, "tier": None, "max_per_host": 1,
    "bandwidth_mib_s": None, "retries": 2, "retry_delay_s": 300, "missed": "run", "enabled": True,
}
REQUIRED = ("name", "collector", "schedule")
FIELDS = frozenset(DEFAULTS) | frozenset(REQUIRED) | {"tenant"}
MAX_PATTERN = 200


def _number(body: dict, key: str, lo: float, hi: float, *, integer: bool) -> None:
    value = body[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        raise Invalid(f"{key} must be {'an integer' if integer else 'a number'} from {lo:g} to {hi:g}; "
                      f"got {json.dumps(value)[:40]}", "bad_job")


def check_job(body: object, *, tenant: str, tiers: list[str]) -> dict:
    """The job a client asked for, complete with defaults; `tenant` is the caller's ("" = unscoped, which
    may name any tenant in the body). Raises Invalid saying what is wrong and what is accepted."""
    if not isinstance(body, dict):
        raise Invalid("a backup job is a JSON object with at least name, collector and schedule", "bad_job")
    unknown = set(body) - FIELDS
    if unknown:
        raise Invalid(f"unknown job field(s) {', '.join(sorted(unknown))[:200]}; the fields are "
                      f"{', '.join(sorted(FIELDS))}", "bad_job")
    missing = [k for k in REQUIRED if k not in body]
    if missing:
        raise Invalid(f"a backup job needs {', '.join(missing)}", "bad_job")
    job = DEFAULTS | body
    job["name"] = check_name(job["name"], "job name")
    job["collector"] = check_name(job["collector"], "collector name")
    owner = job.pop("tenant", tenant)
    if tenant and owner != tenant:
        raise Invalid(f"a token of tenant {tenant!r} creates jobs of that tenant only", "bad_job")
    if not isinstance(owner, str) or len(owner) > 64 or not set(owner) <= TENANT_CHARS:
        raise Invalid("tenant must be at most 64 characters of a-z, 0-9, '-' and '_'", "bad_job")
    job["tenant"] = owner
    for key in ("host_pattern", "vm_pattern"):
        if not isinstance(job[key], str) or not 0 < len(job[key]) <= MAX_PATTERN:
            raise Invalid(f"{key} must be an fnmatch pattern (e.g. \"*\", \"web-*\") of 1-{MAX_PATTERN} characters",
                          "bad_job")
    calendar.parse(job["schedule"])
    if job["retention"] is not None:
        job["retention"] = check_policy(job["retention"])
    if job["tier"] is not None and job["tier"] not in tiers:
        raise Invalid(f"tier {str(job['tier'])[:40]!r} is not a configured [[tier]]; configured: "
                      f"{', '.join(tiers) or 'none'}", "bad_job")
    _number(job, "max_per_host", 1, 1000, integer=True)
    _number(job, "retries", 0, 100, integer=True)
    _number(job, "retry_delay_s", 0, 7 * 86400, integer=False)
    if job["bandwidth_mib_s"] is not None:
        _number(job, "bandwidth_mib_s", 0.01, 1e6, integer=False)
    if job["missed"] not in ("run", "skip"):
        raise Invalid('missed must be "run" (one catch-up run after downtime) or "skip"', "bad_job")
    if not isinstance(job["enabled"], bool):
        raise Invalid("enabled must be true or false", "bad_job")
    return job
