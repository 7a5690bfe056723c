"""Fixtures of the tier tests: moto's S3 server and Azurite, each started once per session on a free
loopback port (every test gets a bucket or container of its own; under CI=true a missing Azurite fails
the run, it never skips), and a repository served in the test's own process."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from aiohttp import web
from botocore.config import Config

from chunkyard.config import load_config
from chunkyard.wire import Client
from repo_server.api import create_app
from repo_server.engine import Repository, init_repository
from tests.conftest import ROOT, free_port, require_tool
from tiering.config import TierConfig
from tiering.retry import Backoff
from tiering.stores.azure import AzureStore
from tiering.stores.base import CloudStore, Store
from tiering.stores.s3 import S3Store
from tiering.sync import TierWorker

AZURITE = ROOT / "tools" / "node_modules" / ".bin" / "azurite-blob"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PART = 5 << 20  # S3's smallest part: large-object tests stay small
KINDS = ["s3", "azure"]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    """boto3 reads credentials from the environment, as in production; these are moto's dummies."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Azurite's blob service in memory; yields its connection string."""
    require_tool("node")
    exe = require_tool(str(AZURITE))
    port = free_port()
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        proc.terminate()
        proc.wait(10)


class Emulators:
    """Creates buckets and containers on the emulators, and stores over them."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request

    @property
    def s3_endpoint(self) -> str:
        return self._request.getfixturevalue("moto_endpoint")

    @property
    def azure_connection_string(self) -> str:
        return self._request.getfixturevalue("azurite")

    def s3_client(self):
        return boto3.client("s3", endpoint_url=self.s3_endpoint, config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self, kind: str, *, locked: bool = False) -> str:
        """A fresh bucket (S3, with Object Lock when `locked`) or container (Azure)."""
        name = f"cy-{uuid.uuid4().hex[:16]}"
        if kind == "s3":
            self.s3_client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=locked)
        else:
            from azure.storage.blob import BlobServiceClient

            BlobServiceClient.from_connection_string(self.azure_connection_string).create_container(name)
        return name

    def store(self, kind: str, *, bucket: str | None = None, prefix: str = "", locked: bool = False,
              part_size: int = PART) -> CloudStore:
        bucket = bucket or self.new_bucket(kind, locked=locked)
        if kind == "s3":
            return S3Store(bucket, prefix, endpoint=self.s3_endpoint, path_style=True, part_size=part_size)
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.azure_connection_string, retry_total=0)
        return AzureStore(service, bucket, prefix, block_size=part_size)

    def env(self, kind: str) -> dict[str, str]:
        """What a server or CLI process needs in its environment to reach the emulator."""
        if kind == "s3":
            return dict(AWS_ENV)
        return {"AZURE_STORAGE_CONNECTION_STRING": self.azure_connection_string}

    def tier_table(self, kind: str, bucket: str, **extra: object) -> dict[str, object]:
        """A [[tier]] table for the server's TOML file."""
        if kind == "s3":
            return {"kind": "s3", "bucket": bucket, "endpoint": self.s3_endpoint, "path_style": True,
                    "region": "us-east-1", **extra}
        return {"kind": "azure", "container": bucket, **extra}


@pytest.fixture
def emulators(request: pytest.FixtureRequest) -> Emulators:
    return Emulators(request)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(emulators: Emulators, kind: str) -> Iterator[CloudStore]:
    s = emulators.store(kind)
    yield s
    s.close()



CHUNK = 256 << 10  # the smallest chunk size, and 1 MiB packs: several packs from a few MiB of disks
FAST = Backoff(attempts=3, base=0.01, cap=0.05)
FAST_READS = Backoff(attempts=8, base=0.01, cap=0.05)  # reads of moved packs under random faults


@dataclass
class Live:
    """A repository served in this process (so tests can run uploader cycles on it directly)."""

    data: Path
    repo: Repository
    client: Client

    def worker(self, store: Store, kind: str = "s3", *, clock: Callable[[], float] = time.time,
               **settings: object) -> TierWorker:
        tier = TierConfig(name="t", kind=kind, bucket="-", **{"concurrency": 2} | settings)  # type: ignore[arg-type]
        return TierWorker(self.repo, tier, store, backoff=FAST, clock=clock, read_backoff=FAST_READS)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    data = tmp_path / "data"
    init_repository(data, CHUNK)
    repo = Repository(data, pack_size=1 << 20)
    token, _ = repo.tokens.create("admin", "tier tests")
    runner = web.AppRunner(create_app(load_config(), repo=repo))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with Client(f"http://127.0.0.1:{port}", token) as client:
            yield Live(data, repo, client)
    finally:
        await runner.cleanup()
        repo.close()
