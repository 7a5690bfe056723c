"""`chunkyard`: the one command for the server, its administration and its catalog."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from chunkyard import __version__
from chunkyard.config import ConfigError, load_config
from chunkyard.units import format_size, parse_duration, parse_size
from chunkyard.wire import ApiError, CertificateError, Client

DEFAULT_SERVER = "http://127.0.0.1:8420"
PASSPHRASE_ENV = "CHUNKYARD_PASSPHRASE"
ROLES = ("admin", "collector", "reader")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _token_file_fallback() -> str | None:
    path = Path("data/admin.token")
    return path.read_text().strip() if path.exists() else None


def _client(args: argparse.Namespace) -> Client:
    token = args.token or os.environ.get("CHUNKYARD_TOKEN") or _token_file_fallback()
    if not token:
        raise UserError("no token: pass --token, set CHUNKYARD_TOKEN, or run from the directory holding "
                        "data/admin.token (written by `chunkyard init`)")
    return Client(args.server or os.environ.get("CHUNKYARD_SERVER") or DEFAULT_SERVER, token,
                  cacert=getattr(args, "cacert", None))


def _call(args: argparse.Namespace, fn: Callable[[Client], Coroutine[Any, Any, Any]]) -> Any:
    async def go() -> Any:
        async with _client(args) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except ApiError as e:
        hint = {401: " (check --token / CHUNKYARD_TOKEN)", 403: " (this token's role may not do that)"}
        raise UserError(f"server said: {e.message}{hint.get(e.status, '')}") from None
    except CertificateError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot reach the server: {e} (is `chunkyard serve` running? --server / "
                        "CHUNKYARD_SERVER)") from None


def _print(args: argparse.Namespace, value: Any, table: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(value, indent=2))
    else:
        table(value)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


# ------------------------------------------------------------------------------------------ commands

def cmd_init(args: argparse.Namespace) -> None:
    from repo_server.engine import Repository, init_repository

    data = Path(args.data)
    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    desc = init_repository(data, parse_size(args.chunk_size), encrypt=not args.no_encrypt, passphrase=passphrase)
    repo = Repository(data, passphrase=passphrase)
    try:
        token, _ = repo.tokens.create("admin", "initial admin")
    finally:
        repo.close()
    token_path = data / "admin.token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"Initialised repository {desc.repository_id} in {data} (chunk size {format_size(desc.chunk_size)}).")
    print(f"Admin token (shown once; also saved to {token_path}, mode 0600):\n\n    {token}\n")
    if args.no_encrypt:
        print("WARNING: the repository is NOT encrypted (--no-encrypt): its disks and cloud copies reveal the data.")
    elif passphrase:
        print(f"Encrypted (AES-256-GCM); the key is wrapped by ${PASSPHRASE_ENV} (fingerprint {desc.key_fingerprint}).")
    else:
        print(f"Encrypted (AES-256-GCM). No ${PASSPHRASE_ENV} was set, so the key is in {data / 'repo.key'}:\n"
              "  EXPORT THE PAPER KEY NOW and keep it off this machine: without it a lost site means lost backups.\n"
              f"  chunkyard key export --paper --data {data}\n"
              f"  chunkyard key change-passphrase --data {data}   (to protect the key with a passphrase)")


def cmd_serve(args: argparse.Namespace) -> None:
    from repo_server.server import serve

    config = load_config(Path(args.config) if args.config else None,
                         data=Path(args.data) if args.data else None, listen=args.listen,
                         tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                         tls_key=Path(args.tls_key) if args.tls_key else None)
    if not (config.data / "repo.toml").exists():
        raise UserError(f"{config.data} holds no repository: create one with `chunkyard init --data {config.data}`")
    asyncio.run(serve(config, passphrase_for(config.data)))


def cmd_repair(args: argparse.Namespace) -> None:
    from repo_server.engine import rebuild_index

    if args.check:
        _repair_check(args)
        return
    if not args.rebuild_index:
        raise UserError("say what to do: --check (report) or --rebuild-index (repair)")
    print(f"Rebuilding the index of {args.data} from its packs and point files...")
    try:
        result = rebuild_index(Path(args.data), passphrase_for(Path(args.data)))
    except Exception as e:
        _audit_offline(Path(args.data), "repair", "rebuild-index", outcome="failed", error=str(e))
        raise
    _audit_offline(Path(args.data), "repair", "rebuild-index", **result)
    print(f"Done: {result['packs_scanned']} packs, {result['chunks']} chunks, {result['points']} points, "
          f"{result['tokens_kept']} tokens kept, {result['possession']} tenant possession entries rebuilt.")
    if not result["tokens_kept"]:
        print("No tokens survived: create an admin token with "
              f"`chunkyard token create --role admin --data {args.data}`.")


def _repair_check(args: argparse.Namespace) -> None:
    from repo_server.engine.verify import check_repository

    repo = _offline_repo(args)
    try:
        report = check_repository(repo)
    finally:
        repo.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"Checked {report['chunks_checked']} chunks ({format_size(report['bytes_checked'])}) and "
              f"{report['points_checked']} points.")
        for key in ("damaged_chunks", "damaged_points", "orphan_packs", "missing_packs"):
            if report[key]:
                print(f"  {key.replace('_', ' ')}: {', '.join(report[key][:20])}"
                      + (f" (+{len(report[key]) - 20} more)" if len(report[key]) > 20 else ""))
        if report["packs_in_cloud_unchecked"]:
            print(f"  {report['packs_in_cloud_unchecked']} packs live in a cloud tier (move mode) and were not "
                  f"checked offline, nor {report['points_unchecked']} points whose manifests are there: "
                  "`chunkyard verify` on the running server reads them back.")
        print("Healthy." if report["healthy"] else "Problems found: start the server and run `chunkyard verify` "
              "to quarantine damaged chunks (the next backups re-send them).")
    if not report["healthy"]:
        raise SystemExit(1)


async def wait_job(client: Client, job: dict, label: str) -> dict:
    """Follow a maintenance job until it ends, showing its phase and progress on stderr."""
    shown = ""
    while job["state"] == "running":
        await asyncio.sleep(0.2)
        job = await client.job(job["id"])
        total = f"/{job['total']}" if job.get("total") else ""
        line = f"{label}: {job['phase']} {job['done']}{total}"
        if line != shown and sys.stderr.isatty():
            print(f"\r{line:<70}", end="", file=sys.stderr, flush=True)
        shown = line
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if job["state"] != "done":
        raise UserError(f"the {job['kind']} job {job['id']} failed: {job['error']}")
    return job


def cmd_gc(args: argparse.Namespace) -> None:
    async def go(c: Client) -> dict:
        return await wait_job(c, await c.json("POST", "/admin/gc", {"compact_below": args.compact_below}),
                              "gc")

    result = _call(args, go)["result"]
    _print(args, result, lambda r: print(
        f"Swept {r['swept_chunks']} chunks ({format_size(r['swept_bytes'])}), deleted {r['packs_deleted']} "
        f"packs, compacted {r['packs_compacted']}; {format_size(r['bytes_freed'])} freed in {r['seconds']:.1f} s."))


def cmd_verify(args: argparse.Namespace) -> None:
    async def go(c: Client) -> dict:
        return await wait_job(c, await c.json("POST", "/admin/verify", {"mode": args.mode,
                                                                         "percent": args.percent}), "verify")

    result = _call(args, go)["result"]

    def table(r: dict) -> None:
        print(f"Verified {r['chunks_checked']} chunks ({format_size(r['bytes_checked'])}) of "
              f"{r['points_checked']} points in {r['seconds']:.1f} s.")
        if r["damaged_chunks"]:
            print(f"{len(r['damaged_chunks'])} damaged chunks quarantined; damaged points (the next backups "
                  f"of their VMs heal them): {', '.join(r['points_damaged'])}")
        else:
            print("Everything verified.")

    _print(args, result, table)
    if result["damaged_chunks"]:
        raise SystemExit(1)


def passphrase_for(data: Path) -> str | None:
    """$CHUNKYARD_PASSPHRASE, else a prompt on a terminal when the key is passphrase-protected."""
    from repo_server.engine.keyring import KEY_FILE, WRAPPED_FILE

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if (data / WRAPPED_FILE).exists() and not (data / KEY_FILE).exists() and sys.stdin.isatty():
        return getpass.getpass(f"Passphrase for the repository key of {data}: ")
    return None


def _offline_repo(args: argparse.Namespace) -> Any:
    from repo_server.engine import Repository

    return Repository(Path(args.data), passphrase=passphrase_for(Path(args.data)))


def _audit_offline(data: Path, action: str, target: str | None, **details: Any) -> None:
    """Offline commands act without a token: they are on record as the local user."""
    from repo_server.engine.audit import AUDIT_FILE, AuditLog, local_who

    if not (data / "repo.toml").exists():  # not a repository: nothing happened to audit
        return
    outcome = details.pop("outcome", "ok")
    AuditLog(data / AUDIT_FILE).append(local_who(), action, target, outcome=outcome, **details)


def cmd_token_create(args: argparse.Namespace) -> None:
    try:
        lifetime = parse_duration(args.expires) if args.expires else None
    except ValueError as e:
        raise UserError(f"--expires: {e}") from None
    if args.data:
        repo = _offline_repo(args)
        try:
            token, info = repo.tokens.create(args.role, args.name, args.tenant or "",
                                             time.time() + lifetime if lifetime else None)
            result = info.public() | {"token": token}
        finally:
            repo.close()
        _audit_offline(Path(args.data), "token.create", info.id, tenant=info.tenant, role=info.role,
                       name=info.name, expires=info.expires)
    else:
        result = _call(args, lambda c: c.create_token(args.role, args.name, tenant=args.tenant,
                                                      expires_in=lifetime))

    def line(r: dict) -> None:
        scope = f"tenant {r['tenant']}" if r["tenant"] else "unscoped: the whole repository"
        print(f"Created {r['role']} token {r['id']} ({r['name'] or 'unnamed'}; {scope}; "
              f"{'expires ' + _when(r['expires']) if r['expires'] else 'never expires'}); shown once:\n\n"
              f"    {r['token']}\n")

    _print(args, result, line)


def cmd_token_list(args: argparse.Namespace) -> None:
    if args.data:
        repo = _offline_repo(args)
        try:
            tokens = [t.public() | {"expired": t.expired()} for t in repo.tokens.list()]
        finally:
            repo.close()
    else:
        tokens = _call(args, lambda c: c.tokens())

    def table(rows: list[dict]) -> None:
        print(f"{'ID':<18}{'ROLE':<11}{'TENANT':<18}{'CREATED':<21}{'EXPIRES':<29}NAME")
        for t in rows:
            expires = _when(t["expires"]) + (" (expired)" if t.get("expired") else "") if t["expires"] else "never"
            print(f"{t['id']:<18}{t['role']:<11}{t['tenant'] or '(all)':<18.18}{_when(t['created']):<21}"
                  f"{expires:<29}{t['name']}")

    _print(args, tokens, table)


def cmd_token_revoke(args: argparse.Namespace) -> None:
    if args.data:
        repo = _offline_repo(args)
        try:
            info = repo.tokens.revoke(args.token_id)
        finally:
            repo.close()
        _audit_offline(Path(args.data), "token.revoke", info.id, tenant=info.tenant, role=info.role,
                       name=info.name)
    else:
        _call(args, lambda c: c.revoke_token(args.token_id))
    print(f"Revoked token {args.token_id}.")


def cmd_audit(args: argparse.Namespace) -> None:
    if not 1 <= args.limit <= 10000:
        raise UserError("--limit must be from 1 to 10000")

    def table(records: list[dict]) -> None:
        print(f"{'WHEN (UTC)':<22}{'WHO':<30}{'ACTION':<17}{'TARGET':<24}{'TENANT':<14}OUTCOME")
        for r in reversed(records):  # oldest first, like a log
            who = r.get("who") or {}
            by = f"{who.get('name') or '-'} ({who.get('token_id') or 'local'})"
            print(f"{_utc(r['time']):<22}{by:<30.29}{r['action']:<17}{r.get('target') or '-':<24.23}"
                  f"{r.get('tenant') or '-':<14.13}{r['outcome']}")

    _print(args, _call(args, lambda c: c.audit(args.limit)), table)


def cmd_vms(args: argparse.Namespace) -> None:
    def table(vms: list[dict]) -> None:
        print(f"{'VM ID':<38}{'NAME':<24}{'HOST':<18}{'POINTS':>7}  LATEST")
        for v in vms:
            print(f"{v['id']:<38}{v.get('name', ''):<24.24}{v.get('host', ''):<18.18}{v['points']:>7}  "
                  f"{v.get('latest_point', '-')} ({_when(v.get('latest_time'))})")

    _print(args, _call(args, lambda c: c.vms()), table)


def cmd_points(args: argparse.Namespace) -> None:
    def table(points: list[dict]) -> None:
        print(f"{'POINT':<22}{'CREATED':<21}{'CONSISTENCY':<13}{'DISKS':>5}{'SIZE':>12}{'CHANGED':>12}{'NEW':>12}")
        for p in points:
            size = sum(d["size"] for d in p["disks"])
            s = p["stats"]
            print(f"{p['point_id']:<22}{_when(p['created']):<21}{p['consistency']:<13}{len(p['disks']):>5}"
                  f"{format_size(size):>12}{format_size(s['changed_bytes']):>12}{format_size(s['new_bytes']):>12}")

    _print(args, _call(args, lambda c: c.points(args.vm)), table)


def cmd_restore(args: argparse.Namespace) -> None:
    from chunkyard.restore import RestoreError, part_paths, restore_disk

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists: pass --force to overwrite it (it is replaced only once the restore "
                        "has been verified)")
    if args.attempts < 1:
        raise UserError("--attempts must be at least 1")
    try:
        summary = _call(args, lambda c: restore_disk(c, args.point, args.disk, out, args.format,
                                                     attempts=args.attempts))
    except RestoreError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        part = part_paths(out)[0]
        if part.exists():
            print(f"\nchunkyard: interrupted; {part} is kept: run the same command again to resume",
                  file=sys.stderr)
        raise

    def line(s: dict) -> None:
        resumed = f", resumed at {format_size(s['resumed_from'])}" if s["resumed_from"] else ""
        print(f"Restored disk {s['disk_id']} of point {s['point_id']} to {s['file']} ({s['format']}, "
              f"{format_size(s['bytes'])}{resumed}) in {s['seconds']:.1f} s ({format_size(s['rate'])}/s); "
              "verified against the point's digest map.")

    _print(args, summary, line)


def cmd_stats(args: argparse.Namespace) -> None:
    def table(s: dict) -> None:
        for warning in s.pop("warnings", []):
            print(f"WARNING: {warning}\n")
        for key, value in s.items():
            shown = format_size(value) if key.endswith("_bytes") or key == "chunk_size" else value
            print(f"{key:<20}{shown}")

    _print(args, _call(args, lambda c: c.repository()), table)


def _policy_flags(p: argparse.ArgumentParser, purpose: str) -> None:
    """One --keep-* flag per retention setting (the engine's list, so the two cannot drift)."""
    from repo_server.engine.retention import KEYS

    units = {"hourly": "hours", "daily": "days", "weekly": "ISO weeks", "monthly": "months", "yearly": "years"}
    for key in KEYS:
        period = key.removeprefix("keep_")
        what = "the N newest points" if period == "last" else \
            f"the newest point of each of the N latest {units[period]} (UTC) that have one"
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, metavar="N", help=f"{purpose}{what}")


def _policy_from(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in vars(args).items() if k.startswith("keep_") and v is not None}


def _policy_text(policy: dict[str, int] | None) -> str:
    if policy is None:
        return "none"
    if not policy:
        return "{} (keeps every point)"
    text = ", ".join(f"{k.removeprefix('keep_')} {n}" for k, n in policy.items())
    return text if any(policy.values()) else f"{text} (keeps only the newest point)"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def cmd_retention_show(args: argparse.Namespace) -> None:
    def table(r: dict) -> None:
        if args.vm:
            source = {"vm": "its own", "default": "the repository default"}.get(r["source"])
            applied = f"{_policy_text(r['effective'])} ({source})" if source else "every point (no policy)"
            print(f"VM {r['vm']}\n  own policy:  {_policy_text(r['policy'])}\n  default:     "
                  f"{_policy_text(r['default'])}\n  prune keeps: {applied}")
            return
        print(f"{'VM':<38}POLICY")
        print(f"{'(default)':<38}{_policy_text(r['default'])}")
        for vm, policy in sorted(r["vms"].items()):
            print(f"{vm:<38}{_policy_text(policy)}")

    _print(args, _call(args, lambda c: c.retention(args.vm)), table)


def cmd_retention_set(args: argparse.Namespace) -> None:
    policy = _policy_from(args)
    _call(args, lambda c: c.set_retention(policy, args.vm))
    print(f"Retention of {f'VM {args.vm}' if args.vm else 'the repository default'}: {_policy_text(policy)}. "
          "`chunkyard prune` shows what it would delete.")


def cmd_retention_unset(args: argparse.Namespace) -> None:
    _call(args, lambda c: c.set_retention(None, args.vm))
    print(f"Removed the policy of VM {args.vm}; the repository default applies to it." if args.vm else
          "Removed the repository default; VMs without a policy of their own keep every point.")


def cmd_protect(args: argparse.Namespace) -> None:
    def line(p: dict) -> None:
        note = p.get("protection", {}).get("note")
        state = "protected" + (f" ({note})" if note else "") if p["protected"] else "no longer protected"
        print(f"Point {p['point_id']} of VM {p['vm']['id']} is {state}.")

    _print(args, _call(args, lambda c: c.protect(args.point, not args.off, args.note)), line)


def cmd_prune(args: argparse.Namespace) -> None:
    policy = _policy_from(args) or None

    async def go(c: Client) -> dict:
        return await wait_job(c, await c.prune(vm=args.vm, dry_run=not args.yes, policy=policy), "prune")

    job = _call(args, go)

    def table(r: dict) -> None:
        sources = {"vm": "its own policy", "default": "the repository default", "override": "this run's policy"}
        for vm in r["vms"]:
            why = vm.get("note") or f"{sources[vm['source']]}: {_policy_text(vm['policy'])}"
            print(f"VM {vm['vm']} — {why}")
            rows = [("KEEP", p, ", ".join(p["reasons"])) for p in vm["kept"]]
            rows += [("WOULD GO" if r["dry_run"] else "REMOVED", p, "") for p in vm["removed"]]
            for action, p, reasons in sorted(rows, key=lambda row: row[1]["created"], reverse=True):
                print(f"  {action:<10}{p['point_id']:<22}{_utc(p['created']):<22}{reasons}")
        if r["dry_run"]:
            print(f"Dry run: {r['removed']} points would be removed, {r['kept']} kept. Nothing was deleted; "
                  "run again with --yes to delete them.")
        else:
            print(f"Removed {r['removed']} points, kept {r['kept']}. Their data is freed by the next garbage "
                  "collection (POST /api/v1/admin/gc).")

    _print(args, job["result"], table)


# ------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkyard",
        description="Chunkyard: deduplicating backup repository for Hyper-V fleets.",
        epilog="Quick start: `chunkyard init --data ./data`, then `chunkyard serve --data ./data`. "
               "Client commands read CHUNKYARD_SERVER (default http://127.0.0.1:8420), CHUNKYARD_TOKEN and, for "
               "https:// servers with a private CA, CHUNKYARD_CACERT.",
    )
    parser.add_argument("--version", action="version", version=f"chunkyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help="server URL (default: $CHUNKYARD_SERVER or http://127.0.0.1:8420)")
        p.add_argument("--token", help="API token (default: $CHUNKYARD_TOKEN, else ./data/admin.token)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--cacert", metavar="FILE",
                       help="trust the server certificate's private CA from this PEM file (default: "
                            "$CHUNKYARD_CACERT, else the system's CAs); https:// URLs are always verified")

    p = sub.add_parser("init", help="create a repository and its first admin token")
    p.add_argument("--data", default="./data", help="repository directory (default ./data)")
    p.add_argument("--chunk-size", default="1MiB", help="chunk size for life: 256KiB..8MiB, power of two (1MiB)")
    p.add_argument("--no-encrypt", action="store_true",
                   help="store data unencrypted (not recommended); by default AES-256-GCM with a key wrapped by "
                        "$CHUNKYARD_PASSPHRASE, or kept in DATA/repo.key when that is unset")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the repository server")
    p.add_argument("--data", help="repository directory (default ./data)")
    p.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8420)")
    p.add_argument("--config", help="TOML file with a [server] table (see README)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="create, list or revoke API tokens")
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    for name, func, text in (("create", cmd_token_create, "create a token (shown once)"),
                             ("list", cmd_token_list, "list tokens"),
                             ("revoke", cmd_token_revoke, "revoke a token by id")):
        tp = tsub.add_parser(name, help=text)
        client_args(tp)
        tp.add_argument("--data", help="work on a stopped server's repository directory instead of over HTTP")
        if name == "create":
            tp.add_argument("--role", required=True, choices=ROLES)
            tp.add_argument("--name", default="", help="what the token is for, e.g. the collector's host")
            tp.add_argument("--tenant", help="scope the token to this tenant (a-z, 0-9, - and _): it sees only "
                                             "that tenant's VMs and points (default: yours; unscoped for an "
                                             "unscoped admin)")
            tp.add_argument("--expires", metavar="DURATION",
                            help="refuse the token after this long: 3600, 90m, 12h, 30d, 2w, 1y (default: never)")
        if name == "revoke":
            tp.add_argument("token_id")
        tp.set_defaults(func=func)

    p = sub.add_parser("audit", help="show the audit log of administrative actions (newest last)")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="the N newest records (default 50)")
    client_args(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("vms", help="list VMs that have restore points")
    client_args(p)
    p.set_defaults(func=cmd_vms)

    p = sub.add_parser("points", help="list the restore points of a VM")
    p.add_argument("vm", help="VM id")
    client_args(p)
    p.set_defaults(func=cmd_points)

    p = sub.add_parser(
        "restore", help="download a disk of a restore point as VHDX or raw, verified",
        description="Download one disk of a restore point to FILE, as a dynamic VHDX that Hyper-V can attach "
                    "or as a raw image. The download goes to FILE.part and becomes FILE only after every "
                    "chunk has been checked against the point's BLAKE3 digest map; an interrupted restore "
                    "resumes where it stopped when the same command is run again.",
        epilog="Example: chunkyard restore 0194c3a1f2e07d3b9a12 --disk d0 -o d0.vhdx")
    p.add_argument("point", metavar="POINT", help="restore point id (see `chunkyard points VM`)")
    p.add_argument("--disk", metavar="DISK", help="disk id to restore; may be left out when the point has one disk")
    p.add_argument("--format", choices=("vhdx", "raw"), default="vhdx",
                   help="vhdx: dynamic VHDX, sparse where the disk is zero (default); raw: a flat disk image")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the disk")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--attempts", type=int, default=5, metavar="N",
                   help="give up after N broken or refused attempts in a row that make no progress (default 5)")
    client_args(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("stats", help="repository size, dedup and compression")
    client_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "retention", help="show or set GFS retention policies (per VM, or the repository default)",
        description="Retention policies say which restore points `chunkyard prune` keeps. A VM's own policy "
                    "overrides the repository default; a VM with neither keeps every point. Rules count in UTC "
                    "and each may keep the same point: with --keep-last 3 --keep-daily 7 the newest point is "
                    "both 'last 1' and today's daily. Protected points are always kept.",
        epilog="Example (PBS's ten years of dailies): chunkyard retention set --keep-last 3 --keep-daily 13 "
               "--keep-weekly 8 --keep-monthly 11 --keep-yearly 9")
    rsub = p.add_subparsers(dest="retention_command", required=True, metavar="ACTION")
    for name, func, text in (("show", cmd_retention_show, "show the policies"),
                             ("set", cmd_retention_set, "set a policy (settings not given are 0; none at all "
                                                        "keeps every point)"),
                             ("unset", cmd_retention_unset, "remove a policy")):
        rp = rsub.add_parser(name, help=text)
        rp.add_argument("--vm", help="a VM's policy (default: the repository default)")
        if name == "set":
            _policy_flags(rp, "keep ")
        client_args(rp)
        rp.set_defaults(func=func)

    p = sub.add_parser(
        "prune", help="delete the restore points retention no longer keeps (a dry run unless --yes)",
        description="Apply the retention policies and list every point kept (with its reasons) and removed. "
                    "Without --yes nothing is deleted. Protected points and each VM's newest point are always "
                    "kept. Deleted points' data is freed by the next garbage collection.")
    p.add_argument("--vm", help="only this VM (default: every VM)")
    _policy_flags(p, "instead of the stored policies, keep ")
    p.add_argument("--yes", action="store_true", help="really delete (default: a dry run)")
    client_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("protect", help="protect a restore point from prune and deletion, or release it")
    p.add_argument("point", metavar="POINT", help="restore point id")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--note", default="", help="why it is kept (shown with the point)")
    group.add_argument("--off", action="store_true", help="release the protection")
    client_args(p)
    p.set_defaults(func=cmd_protect)

    from collectors.agent_cli import add_collector_parser
    from collectors.backup_cli import add_backup_parser
    from collectors.lab_cli import add_lab_parser
    from tiering.cli import add_tier_parser

    from .job_cli import add_job_parser
    from .key_cli import add_key_parser

    add_backup_parser(sub, client_args, _client)
    add_lab_parser(sub)
    add_key_parser(sub, passphrase_for)
    add_tier_parser(sub, client_args, _call)
    add_collector_parser(sub, client_args, _client, _call)
    add_job_parser(sub, client_args, _call)

    p = sub.add_parser("gc", help="garbage-collect chunks no point needs and compact packs (backups go on)")
    p.add_argument("--compact-below", type=float, default=0.5, metavar="FRACTION",
                   help="rewrite packs whose live fraction is under this (default 0.5)")
    client_args(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("verify", help="re-read and hash stored chunks; quarantine damage so backups heal it")
    p.add_argument("--mode", choices=("all", "new", "sample"), default="all",
                   help="all chunks once (default), chunks of points new since the last run, or a sample")
    p.add_argument("--percent", type=float, default=10, help="share of points for --mode sample (default 10)")
    client_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("repair", help="offline repairs of a stopped server's repository")
    p.add_argument("--data", default="./data", help="repository directory (default ./data)")
    p.add_argument("--rebuild-index", action="store_true", help="rebuild the index from packs and point files")
    p.add_argument("--check", action="store_true",
                   help="read-only: re-hash every chunk, resolve every point, compare packs and index")
    p.add_argument("--json", action="store_true", help="print the --check report as JSON")
    p.set_defaults(func=cmd_repair)
    return parser


def main(argv: list[str] | None = None) -> int:
    from collectors.agent_cli import CollectorError
    from collectors.sources import SourceError
    from repo_server.engine import EngineError
    from tiering.cli import TierCommandError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ConfigError, ValueError, EngineError, SourceError, TierCommandError, CertificateError,
            CollectorError) as e:
        print(f"chunkyard: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
