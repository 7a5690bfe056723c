"""Retention endpoints: GFS policies (per VM and the repository default), point protection, prune jobs."""

from __future__ import annotations

from aiohttp import web

from repo_server.engine.names import check_name
from repo_server.engine.points import public
from repo_server.engine.retention import DEFAULT, Policies, check_policy, effective, prune

from .audit import audited, audited_job
from .audit import note as add_note
from .common import REPO, ApiError, read_json, roles, run, scope
from .jobs import JOBS

POLICIES = web.AppKey("retention_policies", Policies)
PRUNE_FIELDS = {"vm", "dry_run", "policy"}
MAX_NOTE = 1000


def _key(request: web.Request) -> str:
    """The policy a request addresses: its VM's, or the repository default on /retention. A tenant
    addresses only its own VMs (another tenant's VM is "not found") and may not set the default."""
    vm_id = request.match_info.get("vm_id")
    tenant = scope(request)
    if vm_id is None:
        if tenant and request.method != "GET":
            raise ApiError(403, "operator_only", "the repository default policy applies to every tenant: only an "
                           "unscoped (operator) token may change it; set your VMs' own policies instead")
        return DEFAULT
    check_name(vm_id, "VM id")
    if tenant and request.app[REPO].points.owner(vm_id) != tenant:
        raise ApiError(404, "vm_not_found", f"no VM {vm_id} has restore points")
    return vm_id


def _owner(request: web.Request, key: str) -> str:
    """The tenant a policy concerns, for the audit record: its VM's owner ("" for the default)."""
    return "" if key == DEFAULT else request.app[REPO].points.owner(key) or ""


def _vm_target(request: web.Request) -> str:
    return request.match_info.get("vm_id", DEFAULT)


@roles("admin", "reader")
async def get_policies(request: web.Request) -> web.Response:
    policies = await run(request, request.app[POLICIES].all)
    default = policies.pop(DEFAULT, None)
    tenant = scope(request)
    if tenant:
        policies = {vm: p for vm, p in policies.items() if request.app[REPO].points.owner(vm) == tenant}
    return web.json_response({"default": default, "vms": policies})


@roles("admin", "reader")
async def get_vm_policy(request: web.Request) -> web.Response:
    vm_id = _key(request)
    policies = await run(request, request.app[POLICIES].all)
    applied, source = effective(policies, vm_id)
    return web.json_response({"vm": vm_id, "policy": policies.get(vm_id), "default": policies.get(DEFAULT),
                              "effective": applied, "source": source})


@roles("admin")
@audited("retention.set", _vm_target)
async def put_policy(request: web.Request) -> web.Response:
    key = _key(request)
    policy = check_policy(await read_json(request))
    await run(request, request.app[POLICIES].set, key, policy)
    add_note(request, policy=policy, tenant=_owner(request, key))
    return web.json_response({"policy": policy})


@roles("admin")
@audited("retention.unset", _vm_target)
async def delete_policy(request: web.Request) -> web.Response:
    key = _key(request)
    await run(request, request.app[POLICIES].set, key, None)
    add_note(request, tenant=_owner(request, key))
    return web.Response(status=204)


@roles("admin")
@audited("point.protect", lambda request: request.match_info["pid"])
async def put_protection(request: web.Request) -> web.Response:
    body = await read_json(request)
    note = body.get("note", "") if isinstance(body, dict) else None
    if (not isinstance(body, dict) or not isinstance(body.get("protected"), bool) or set(body) - {"protected", "note"}
            or not isinstance(note, str) or len(note) > MAX_NOTE):
        raise ApiError(422, "bad_body", 'the body must be {"protected": true|false, "note": "why"} '
                       f"(the note is optional, at most {MAX_NOTE} characters)")
    record = await run(request, request.app[REPO].points.set_protection, request.match_info["pid"],
                       body["protected"], note, scope(request))
    add_note(request, tenant=record.get("tenant", ""), protected=body["protected"],
             note_chars=len(note))  # the note itself stays sealed in the marker, never plain in the log
    return web.json_response(public(record))


@roles("admin")
@audited("prune", lambda request: None)
async def start_prune(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True)
    if not isinstance(body, dict) or set(body) - PRUNE_FIELDS:
        raise ApiError(422, "bad_body", 'the body may hold {"vm": "<vm id>" (default: every VM), '
                       '"dry_run": true|false (default true), "policy": {...} (overrides the stored policies)}')
    dry_run = body.get("dry_run", True)
    if not isinstance(dry_run, bool):
        raise ApiError(422, "bad_field", "dry_run must be true or false")
    repo, policies = request.app[REPO], request.app[POLICIES]
    vm, tenant = body.get("vm"), scope(request)
    if vm is not None and repo.points.vm(check_name(vm, "VM id"), tenant) is None:
        raise ApiError(404, "vm_not_found", f"no VM {vm} has restore points")
    override = None if body.get("policy") is None else check_policy(body["policy"])
    params = {"vm": vm, "dry_run": dry_run, "policy": override}
    work = audited_job(request, "prune", vm, lambda job: prune(repo, policies, job.progress, tenant=tenant, **params))
    job = request.app[JOBS].start("prune", params, work, tenant=tenant)
    add_note(request, target=vm, job=job.id, dry_run=dry_run, policy=override, outcome="started")
    return web.json_response(job.public(), status=202, headers={"Location": f"/api/v1/jobs/{job.id}"})


def add_routes(app: web.Application) -> None:
    async def open_policies(app: web.Application) -> None:  # runs after the repository is opened
        app[POLICIES] = Policies(app[REPO].data / "retention.json")

    app.on_startup.append(open_policies)
    r = app.router
    r.add_get("/api/v1/retention", get_policies)
    r.add_put("/api/v1/retention", put_policy)
    r.add_delete("/api/v1/retention", delete_policy)
    r.add_get("/api/v1/vms/{vm_id}/retention", get_vm_policy)
    r.add_put("/api/v1/vms/{vm_id}/retention", put_policy)
    r.add_delete("/api/v1/vms/{vm_id}/retention", delete_policy)
    r.add_put("/api/v1/points/{pid}/protection", put_protection)
    r.add_post("/api/v1/admin/prune", start_prune)
