"""`chunkyard collector run|list`: the pull collector as a service, and the server's list of collectors."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from chunkyard.wire import ApiError, Client

from .agent import Agent, Backoff, default_name, log
from .backup_cli import SOURCES, open_source

Call = Callable[[argparse.Namespace, Callable[[Client], Coroutine[Any, Any, Any]]], Any]


class CollectorError(Exception):
    """The collector cannot start or go on (bad token, unknown source); printed without a traceback."""


def cmd_run(args: argparse.Namespace, client_factory: Callable[[argparse.Namespace], Client]) -> None:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    name = args.name or default_name()
    source = open_source(args.source, args.vm or Path(args.source.partition(":")[2]).name)
    state_dir = Path(args.state_dir) if args.state_dir else Path.home() / ".local/state/chunkyard" / f"collector-{name}"

    async def go() -> None:
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, main.cancel)
        async with client_factory(args) as client:
            agent = Agent(client, source, name, state_dir, backoff=Backoff(cap=args.max_backoff))
            try:
                await agent.run()
            except asyncio.CancelledError:
                pending = agent.current.load()
                log.info("collector %s stopped after %d work items%s", name, agent.completed,
                         f"; work {pending.get('work_id')} resumes at the next start" if pending else "")
            except ApiError as e:
                hint = {401: " (check --token: a collector token of this server)",
                        403: " (the token's role must be collector)"}.get(e.status, "")
                raise CollectorError(f"server said: {e.message}{hint}") from None

    asyncio.run(go())


def cmd_list(args: argparse.Namespace, call: Call) -> None:
    collectors = call(args, lambda c: c.collectors())
    if args.json:
        print(json.dumps(collectors, indent=2))
        return
    print(f"{'NAME':<20}{'TENANT':<12}{'VERSION':<9}{'STATE':<9}{'LAST SEEN':<21}{'HOSTS':>6}{'VMS':>6}")
    for c in collectors:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["last_seen"])) if c.get("last_seen") else "-"
        vms = sum(len(h["vms"]) for h in c["hosts"])
        print(f"{c['name']:<20.19}{c.get('tenant') or '-':<12.11}{c['version']:<9.8}"
              f"{'online' if c['online'] else 'offline':<9}{seen:<21}{len(c['hosts']):>6}{vms:>6}")


def add_collector_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None],
                         client_factory: Callable[[argparse.Namespace], Client], call: Call) -> None:
    p = sub.add_parser("collector", help="pull collectors: run one as a service, or list those the server knows")
    csub = p.add_subparsers(dest="collector_command", required=True, metavar="ACTION")

    sp = csub.add_parser(
        "run", help="register with the server and run the backups its jobs hand out, until stopped",
        description="Registers NAME with the server together with the hosts and VMs the source sees, then "
                    "long-polls for work and runs each backup, reporting progress and results. Needs only "
                    "outbound HTTP(S) to the server. Survives server restarts and network drops: it backs off "
                    "and retries, keeps undelivered results in the state directory, and resumes an interrupted "
                    "backup session. SIGTERM or Ctrl-C stops it; a backup in flight resumes at the next start. "
                    "Logs one line per work item; run it under systemd or another service manager.",
        epilog="Example: chunkyard collector run --server https://backup.example:8420 --token $TOKEN "
               "--source hyperv:/etc/chunkyard/hv01.toml --name hv01")
    sp.add_argument("--source", required=True, help=SOURCES)
    sp.add_argument("--name", help="collector name that jobs refer to (default: this machine's host name)")
    sp.add_argument("--vm", help="file/blockdev sources: the VM name to file the disk under (default: file name)")
    sp.add_argument("--state-dir", metavar="DIR",
                    help="where work in flight, undelivered results and backup sessions are kept "
                         "(default ~/.local/state/chunkyard/collector-NAME)")
    sp.add_argument("--max-backoff", type=float, default=30.0, metavar="SECONDS",
                    help="longest wait between attempts to reach the server (default 30)")
    sp.add_argument("--verbose", action="store_true", help="log debug details too")
    sp.add_argument("--server", help="server URL (default: $CHUNKYARD_SERVER or http://127.0.0.1:8420)")
    sp.add_argument("--token", help="a collector token of that server (default: $CHUNKYARD_TOKEN)")
    sp.set_defaults(func=lambda args: cmd_run(args, client_factory))

    sp = csub.add_parser("list", help="collectors the server knows: tenant, version, online, hosts and VMs")
    client_args(sp)
    sp.set_defaults(func=lambda args: cmd_list(args, call))
