"""Run the server process: open the repository, serve until SIGTERM or SIGINT, close cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from chunkyard.config import ServerConfig
from repo_server.api import create_app
from repo_server.api.common import REPO


async def serve(config: ServerConfig, passphrase: str | None = None) -> None:
    app = create_app(config, passphrase=passphrase)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()  # opens the repository and runs startup recovery
    repo = app[REPO]
    site = web.TCPSite(runner, config.host, config.port, backlog=256, reuse_address=True)
    await site.start()
    rec = repo.recovery
    if rec.records_reindexed or rec.bytes_truncated or repo.points_recovered or repo.points_dropped:
        logging.warning("recovery: %d chunk records re-indexed, %d torn bytes cut, %d points re-indexed, "
                        "%d stale point entries dropped", rec.records_reindexed, rec.bytes_truncated,
                        repo.points_recovered, repo.points_dropped)
    if repo.descriptor.encryption == "none":
        logging.warning("this repository is NOT encrypted: its disks and any cloud copy reveal the backups")
    for damage in rec.damaged:
        logging.error("recovery: damaged record at %s (skipped; its chunk fails verification)", damage)
    print(f"Chunkyard {repo.descriptor.repository_id} ({config.data}) serving on "
          f"http://{config.listen}/api/v1 — Ctrl-C stops", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Chunkyard: stopping", file=sys.stderr, flush=True)
    await runner.cleanup()
