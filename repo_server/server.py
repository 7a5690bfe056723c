"""Run the server process: open the repository, serve until SIGTERM or SIGINT, close cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys

from aiohttp import web

from chunkyard.config import ConfigError, ServerConfig
from repo_server.api import create_app
from repo_server.api.common import REPO


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context from tls_cert/tls_key, or None for plain HTTP. Checked before anything
    else starts, so a wrong path or a key that does not match fails `serve` at once, saying which."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    for what, path in (("certificate", config.tls_cert), ("private key", config.tls_key)):
        if not path.is_file():
            raise ConfigError(f"TLS {what} file {path} does not exist (or is not a file)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot use TLS certificate {config.tls_cert} with key {config.tls_key}: {e} "
                          "(both must be PEM, and the key must belong to the certificate)") from None
    return context


async def serve(config: ServerConfig, passphrase: str | None = None) -> None:
    tls = tls_context(config)
    app = create_app(config, passphrase=passphrase)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()  # opens the repository and runs startup recovery
    repo = app[REPO]
    site = web.TCPSite(runner, config.host, config.port, backlog=256, reuse_address=True, ssl_context=tls)
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
          f"{'https' if tls else 'http'}://{config.listen}/api/v1 — Ctrl-C stops", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Chunkyard: stopping", file=sys.stderr, flush=True)
    await runner.cleanup()
