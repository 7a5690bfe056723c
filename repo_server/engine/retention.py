"""Retention: per-VM GFS policies, the prune plan (which points to keep, and why) and the prune itself.

Policies live in <data>/retention.json, `{"*": default policy, "<vm_id>": policy, ...}`, written
atomically. The file is the only copy (the index holds none), so `chunkyard repair --rebuild-index`
cannot lose a policy and there is no second copy to reconcile after a crash.

A policy is an object of `keep_*` counts. `{}`, or no policy at all, keeps every point: retention is
asked for, never assumed. A policy whose counts are all 0 still keeps the newest point (the safety net).

The plan follows restic's `forget` (doc/060_forget.rst), all times in UTC. Points are taken newest
first; keep_last keeps the N newest; each calendar rule (hourly, daily, weekly = ISO week, monthly,
yearly) keeps the newest point of each of its N most recent buckets that hold a point (empty periods do
not count). Rules count independently, so one point may be kept for several reasons: with keep_last 3
and keep_daily 7 the newest point counts as both "last 1" and today's daily, so "daily 7" means the
last 7 days with points. (PBS instead lets each rule skip buckets covered by earlier rules, so its
counts reach further back and keep more.) Protected points are always kept and take part in the rules
like any other point.

Pruning only deletes point records; their chunks are freed by the next garbage collection.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .durable import write_atomic
from .errors import Conflict, Corrupt, Invalid, NotFound

if TYPE_CHECKING:
    from .repository import Repository

KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
DEFAULT = "*"  # the key of the repository default in retention.json (no VM id can be "*")
BUCKETS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}
NEWEST = "newest point (always kept)"
Progress = Callable[[str, int, int | None], None]  # (phase, done, total)


def check_policy(value: object) -> dict[str, int]:
    """A policy as given, validated: a JSON object of known keep_* keys with non-negative integer counts.
    Keys are kept as given (not filled with zeros) so that `{}` still reads as "no retention"."""
    example = 'such as {"keep_last": 3, "keep_daily": 7}'
    if not isinstance(value, dict):
        raise Invalid(f"a retention policy must be a JSON object {example}; got {json.dumps(value)[:80]}",
                      "bad_policy")
    for key, count in value.items():
        if key not in KEYS:
            raise Invalid(f"unknown retention setting {key!r:.80}; the settings are {', '.join(KEYS)}",
                          "bad_policy")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise Invalid(f"{key} must be a non-negative integer; got {json.dumps(count)[:80]}", "bad_policy")
    return {key: value[key] for key in KEYS if key in value}


def plan(points: Iterable[Mapping[str, Any]], policy: Mapping[str, int] | None) -> tuple[list[dict], list[dict]]:
    """Split points (each with point_id, created in epoch seconds, protected) into kept, each with its
    reasons, and removed; both newest first. See the module docstring for the rules."""
    order = sorted(points, key=lambda p: (p["created"], p["point_id"]), reverse=True)
    reasons: dict[str, list[str]] = {p["point_id"]: [] for p in order}
    if not policy:
        for why in reasons.values():
            why.append("no retention policy")
    else:
        for rank, p in enumerate(order[: policy.get("keep_last", 0)], 1):
            reasons[p["point_id"]].append(f"last {rank}")
        for rule, label in BUCKETS.items():
            wanted = policy.get(f"keep_{rule}", 0)
            buckets: list[str] = []
            for p in order:
                if len(buckets) == wanted:
                    break
                bucket = label(datetime.fromtimestamp(p["created"], UTC))
                if not buckets or buckets[-1] != bucket:
                    buckets.append(bucket)
                    reasons[p["point_id"]].append(f"{rule} {bucket}")
    for p in order:
        if p.get("protected"):
            reasons[p["point_id"]].append("protected")
    if order and not reasons[order[0]["point_id"]]:
        reasons[order[0]["point_id"]].append(NEWEST)
    kept = [{"point_id": p["point_id"], "created": p["created"], "reasons": reasons[p["point_id"]]}
            for p in order if reasons[p["point_id"]]]
    removed = [{"point_id": p["point_id"], "created": p["created"]} for p in order if not reasons[p["point_id"]]]
    return kept, removed


def effective(policies: Mapping[str, dict[str, int]], vm_id: str) -> tuple[dict[str, int] | None, str | None]:
    """The policy that applies to a VM and where it comes from: "vm", "default" or None (none at all)."""
    if vm_id in policies:
        return policies[vm_id], "vm"
    if DEFAULT in policies:
        return policies[DEFAULT], "default"
    return None, None


class Policies:
    """The retention policies of a repository, read from their file on every call: they are few, used
    rarely, and a hand edit of the file is seen at once."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict[str, int]]:
        """Every policy by key: a VM id, or DEFAULT for the repository default."""
        with self._lock:
            return self._load()

    def _load(self) -> dict[str, dict[str, int]]:
        try:
            doc = json.loads(self.path.read_bytes())
            if not isinstance(doc, dict):
                raise Invalid("the file must hold a JSON object")
            return {key: check_policy(policy) for key, policy in doc.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, Invalid) as e:
            detail = e.message if isinstance(e, Invalid) else str(e)
            raise Corrupt(f"{self.path} is unreadable ({detail}); fix it or move it away (it holds only "
                          "retention policies)", "bad_retention_file") from None

    def set(self, key: str, policy: dict[str, int] | None) -> None:
        """Set a VM's policy or (key DEFAULT) the default; None removes it."""
        with self._lock:
            doc = self._load()
            if policy is None:
                doc.pop(key, None)
            else:
                doc[key] = policy
            write_atomic(self.path, json.dumps(doc, indent=2, sort_keys=True).encode())


def prune(repo: Repository, policies: Policies, progress: Progress, *, vm: str | None = None,
          policy: dict[str, int] | None = None, dry_run: bool = True, tenant: str = "") -> dict:
    """Plan (and unless dry_run, delete) per VM. `policy` overrides every VM's own for this run;
    `tenant` limits the run to that tenant's VMs.

    Points committed while this runs are not in the plan and so are kept. A point protected after its
    plan was made refuses deletion (Conflict) and is reported kept; one deleted meanwhile is gone anyway.
    """
    vm_ids = [vm] if vm else sorted(v["id"] for v in repo.points.vms(tenant))
    stored = policies.all()  # one snapshot for the whole run
    results = []
    for done, vm_id in enumerate(vm_ids):
        progress("prune", done, len(vm_ids))
        try:
            records = repo.points.of_vm(vm_id, tenant)
        except NotFound:  # its last point went while we worked
            continue
        applied, source = (policy, "override") if policy is not None else effective(stored, vm_id)
        kept, removed = plan(({"point_id": r["point_id"], "created": r["created"], "protected": "protection" in r}
                              for r in records), applied)
        if not dry_run:
            for point in list(removed):
                try:
                    repo.points.delete(point["point_id"], tenant)
                except Conflict:
                    removed.remove(point)
                    kept.append(point | {"reasons": ["protected"]})
                except NotFound:
                    pass
        result = {"vm": vm_id, "policy": applied, "source": source, "kept": kept, "removed": removed}
        if applied is None:
            result["note"] = "no retention policy for this VM and no repository default: every point is kept"
        results.append(result)
    progress("prune", len(vm_ids), len(vm_ids))
    return {
        "dry_run": dry_run,
        "kept": sum(len(r["kept"]) for r in results),
        "removed": sum(len(r["removed"]) for r in results),
        "note": "dry run: nothing was deleted" if dry_run else
                "points deleted; their data is freed by the next garbage collection (POST /admin/gc)",
        "vms": results,
    }
