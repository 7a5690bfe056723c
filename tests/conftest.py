"""Shared fixtures: a real `chunkyard serve` process on a free loopback port, and API clients."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chunkyard.wire import Client

ROOT = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """The path of an external tool; a missing one fails under CI=true and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it: scripts/install-system-deps.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str):
    """Import a test oracle module; a missing one fails under CI=true and skips elsewhere."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python module {name} is not installed (make test installs it with the [test] extras)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real server process over a data directory; can be killed (SIGKILL) and restarted."""

    def __init__(self, data: Path, *, chunk_size: str = "1MiB", config: Path | None = None,
                 tls: tuple[Path, Path] | None = None, cacert: Path | None = None):
        """tls: (certificate, key) to serve HTTPS; cacert: the CA that clients of this server trust."""
        self.data = data
        self.config = config
        self.tls, self.cacert = tls, cacert
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data.parent / f"{data.name}-server.log"
        if not (data / "repo.toml").exists():
            subprocess.run([sys.executable, "-m", "chunkyard.cli", "init", "--data", str(data),
                            "--chunk-size", chunk_size], check=True, capture_output=True, cwd=ROOT)
        self.admin_token = (data / "admin.token").read_text().strip()

    def start(self, env: dict[str, str] | None = None, *, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "chunkyard.cli", "serve", "--data", str(self.data),
               "--listen", f"127.0.0.1:{self.port}"]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=os.environ | (env or {}))
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                context = ssl.create_default_context(cafile=self.cacert) if self.url.startswith("https://") else None
                with urllib.request.urlopen(f"{self.url}/api/v1/health", timeout=1, context=context) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not become ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush; what a power cut does to the process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.stop()
        self.start(env)

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token if token is not None else self.admin_token, cacert=self.cacert)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def admin(server: ServerProcess) -> AsyncIterator[Client]:
    async with server.client() as client:
        yield client


@pytest.fixture
async def collector(server: ServerProcess, admin: Client) -> AsyncIterator[Client]:
    token = (await admin.create_token("collector", "test collector"))["token"]
    async with server.client(token) as client:
        yield client
