"""`chunkyard tier status|sync|attach`: watch the cloud copies, catch them up, or rebuild a site from one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from chunkyard.units import format_size
from chunkyard.wire import Client

Call = Callable[[argparse.Namespace, Callable[[Client], Coroutine[Any, Any, Any]]], Any]


class TierCommandError(Exception):
    """A tier command failed in a way the user can act on; printed without a traceback."""


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"


def _table(tiers: list[dict]) -> None:
    if not tiers:
        print("No cloud tiers: add [[tier]] tables to the server's configuration (docs/tiering.md).")
        return
    print(f"{'TIER':<12}{'WHERE':<40}{'STATE':<9}{'PENDING':>26}{'LOCKED':>8}  SYNCED")
    for t in tiers:
        pending = (f"{t['pending_packs']} packs {format_size(t['pending_bytes'])} "
                   f"{t['pending_points']} pts")
        print(f"{t['name']:<12}{t['url']:<40.40}{t['state']:<9}{pending:>26}{t['locked_deletes']:>8}  "
              f"{_when(t['synced_at'])}")
        where = f"local {format_size(t['local_bytes'])}, cloud {format_size(t['cloud_bytes'])}"
        if t["mode"] == "move":
            where += (f"; moved after {t['move_after_days']} days: {t['moved_packs']} packs "
                      f"({format_size(t['moved_bytes'])}); read cache {format_size(t['cache_bytes'])}, "
                      f"{t['cache_hits']} hits, {t['cloud_reads']} cloud reads")
        print(f"  {t['mode']}: {where}")
        for label in ("error", "deletions_paused", "move_error"):
            if t[label]:
                print(f"  {label.replace('_', ' ')}: {t[label]}")


def _show(args: argparse.Namespace, tiers: list[dict]) -> None:
    if args.json:
        print(json.dumps(tiers, indent=2))
    else:
        _table(tiers)


def cmd_status(args: argparse.Namespace, call: Call) -> None:
    _show(args, call(args, lambda c: c.json("GET", "/tiers"))["tiers"])


def cmd_sync(args: argparse.Namespace, call: Call) -> None:
    """Start a cycle and (unless --no-wait) follow every tier until it has caught up with the request."""

    async def go(client: Client) -> list[dict]:
        answer = await client.json("POST", "/tiers/sync", {"allow_mass_delete": args.allow_mass_delete})
        requested, tiers = answer["requested"], answer["tiers"]
        deadline = time.monotonic() + args.timeout
        while not args.no_wait and tiers:
            failed = [t for t in tiers if t["state"] == "error" and (t["last_error_time"] or 0) >= requested]
            if failed or all((t["synced_at"] or 0) >= requested for t in tiers):
                break
            if time.monotonic() > deadline:
                raise TierCommandError(f"the tiers did not catch up within {args.timeout:g} s "
                                       "(`chunkyard tier status` shows their lag)")
            await asyncio.sleep(0.25)
            tiers = (await client.json("GET", "/tiers"))["tiers"]
        return tiers

    tiers = call(args, go)
    _show(args, tiers)
    if not tiers:
        raise TierCommandError("the server has no cloud tiers to sync")
    if any(t["error"] for t in tiers):
        raise TierCommandError("a tier failed: " + "; ".join(f"{t['name']}: {t['error']}" for t in tiers
                                                                if t["error"]))
    if any(t["deletions_paused"] for t in tiers):
        raise TierCommandError("; ".join(f"{t['name']}: {t['deletions_paused']}" for t in tiers
                                         if t["deletions_paused"]))


def cmd_attach(args: argparse.Namespace) -> None:
    from chunkyard.config import ConfigError

    from .attach import AttachError, attach
    from .config import tier_from_url
    from .stores import StoreError, open_store

    paper_key = None
    if args.paper_key:
        paper_key = sys.stdin.read() if args.paper_key == "-" else Path(args.paper_key).read_text()
    try:
        store = open_store(tier_from_url(args.url, endpoint=args.endpoint, region=args.region,
                                         path_style=args.path_style))
        try:
            result = attach(store, Path(args.data), paper_key=paper_key,
                            passphrase=os.environ.get("CHUNKYARD_PASSPHRASE") or None,
                            concurrency=args.concurrency, progress=_progress if sys.stderr.isatty() else None)
        finally:
            store.close()
    except (AttachError, StoreError, ConfigError) as e:
        raise TierCommandError(str(e)) from None
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if result["skipped"]:
        print(f"Skipped {len(result['skipped'])} objects that were incomplete (an interrupted upload) or gone: "
              f"{', '.join(result['skipped'][:10])}. No point should need them; `chunkyard repair --check "
              f"--data {args.data}` confirms it.", file=sys.stderr)
    print(f"Attached repository {result['repository_id']} from {result['source']} into {args.data}: "
          f"{result['objects']} objects ({format_size(result['bytes'])}), {result['packs']} packs, "
          f"{result['chunks']} chunks, {result['points']} points; index rebuilt.")
    print(f"New admin token (tokens are never stored in the bucket; also saved to {result['token_file']}, "
          f"mode 0600):\n\n    {result['token']}\n")
    print(f"Next: chunkyard serve --data {args.data}   (add the same [[tier]] table to keep copying to this "
          "bucket: what is already there is adopted, not uploaded again)")


def _progress(done: int, total: int) -> None:
    print(f"\rdownloading {format_size(done)} of {format_size(total)}", end="", file=sys.stderr, flush=True)


def add_tier_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None],
                    call: Call) -> None:
    p = sub.add_parser("tier", help="cloud tiers: status, sync now, attach a bucket after losing the site")
    tsub = p.add_subparsers(dest="tier_command", required=True, metavar="ACTION")

    sp = tsub.add_parser("status", help="each tier's lag (packs, bytes and points not yet copied), local, cloud and "
                         "moved bytes, held deletions and errors")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_status(args, call))

    sp = tsub.add_parser("sync", help="copy what is pending now and wait until every tier has caught up")
    sp.add_argument("--no-wait", action="store_true", help="only start the cycle")
    sp.add_argument("--allow-mass-delete", action="store_true",
                    help="confirm cloud deletions the mass-deletion guard holds (after checking that the local "
                         "points really were deleted on purpose)")
    sp.add_argument("--timeout", type=float, default=3600, help="give up waiting after this many seconds")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_sync(args, call))

    sp = tsub.add_parser(
        "attach", help="rebuild a repository from a bucket into a new directory (cloud DR)",
        description="Download the repository a tier holds (descriptor, packs, points, retention, wrapped key) "
                    "into a new directory, rebuild its index and mint an admin token. Credentials come from the "
                    "standard AWS / Azure environment variables. An encrypted repository needs its key: "
                    "--paper-key, or $CHUNKYARD_PASSPHRASE when the bucket holds the passphrase-wrapped key.",
        epilog="Example: chunkyard tier attach s3://dr-bucket/site-a --data /srv/chunkyard --paper-key key.txt")
    sp.add_argument("url", metavar="URL", help="s3://BUCKET[/PREFIX] or azure://CONTAINER[/PREFIX]")
    sp.add_argument("--data", required=True, help="the new repository directory (must not hold one)")
    sp.add_argument("--endpoint", help="S3-compatible endpoint URL, or the Azure account URL")
    sp.add_argument("--region", help="S3 region")
    sp.add_argument("--path-style", action="store_true", help="S3 path-style addressing")
    sp.add_argument("--paper-key", metavar="FILE", help="the paper key (file, or - for standard input)")
    sp.add_argument("--concurrency", type=int, default=4, help="parallel downloads (default 4)")
    sp.set_defaults(func=cmd_attach)
