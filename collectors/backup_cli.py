"""`chunkyard backup`: run one backup from a source to the server and print what it cost."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from chunkyard.units import format_size
from chunkyard.wire import Client

from .pipeline import Options, Result, run_backup
from .sources import Source, SourceError

SOURCES = "lab:DIR | file:PATH | blockdev:DEV | hyperv:CONFIG.toml"


def open_source(spec: str, vm: str) -> Source:
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise SourceError(f"--source must be {SOURCES}; got {spec!r}")
    if kind == "lab":
        from .sources.lab import LabSource

        return LabSource(Path(target))
    if kind in ("file", "blockdev"):
        from .sources.file import FileSource

        return FileSource(Path(target), vm, block_device=kind == "blockdev")
    if kind == "hyperv":
        from .sources.hyperv import HyperVSource, load_config

        return HyperVSource(load_config(Path(target)))
    raise SourceError(f"unknown source kind {kind!r}: use {SOURCES}")


def summary(result: Result) -> str:
    s = result.server_stats
    rate = result.read_bytes / result.seconds if result.seconds else 0
    plans = ", ".join(f"{d.disk_id} {d.plan}" for d in result.disks)
    new, sent = s.get("new_bytes", 0), result.sent_bytes
    return "\n".join([
        f"Backed up {result.vm} as point {result.point_id} in {result.seconds:.1f} s"
        + (" (resumed an interrupted session)" if result.resumed_session else ""),
        f"  disks     {plans}",
        f"  read      {format_size(result.read_bytes)} ({format_size(rate)}/s)",
        f"  changed   {format_size(s.get('changed_bytes', 0))}",
        f"  new       {format_size(new)} (data the repository did not have; the rest deduplicated)",
        f"  sent      {format_size(sent)}" + (f" (compression {new / sent:.2f}x)" if sent else ""),
        *(f"  {key.replace('_', ' ')}: {value}" for key, value in result.source_report.items()),
    ])


def cmd_backup(args: argparse.Namespace, client_factory: Callable[[argparse.Namespace], Client]) -> None:
    source = open_source(args.source, args.vm)
    options = Options(full=args.full, state_dir=Path(args.state) if args.state else None)

    async def go() -> Result:
        async with client_factory(args) as client:
            with source.begin(args.vm) as backup:
                return await run_backup(client, backup, options=options)

    result = asyncio.run(go())
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        print(summary(result))


def add_backup_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None],
                      client_factory: Callable[[argparse.Namespace], Client]) -> None:
    p = sub.add_parser(
        "backup", help="back up a VM (or a disk image or block device) to the server",
        description="Reads only what changed since the last point when the source tracks changes; otherwise "
                    "reads everything allocated and sends only chunks whose digests differ. Every point is a "
                    "synthetic full.")
    p.add_argument("--source", required=True, help=SOURCES)
    p.add_argument("--vm", required=True, help="VM name or id (for file/blockdev: the name to file it under)")
    p.add_argument("--full", action="store_true",
                   help="ignore change tracking and read everything (still deduplicated)")
    p.add_argument("--state", default=str(Path.home() / ".local/state/chunkyard"),
                   help="where an interrupted run's session is remembered so a re-run resumes it")
    client_args(p)
    p.set_defaults(func=lambda args: cmd_backup(args, client_factory))
