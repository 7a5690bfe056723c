"""Cloud DR end to end, for S3 (moto) and Azure Blob (Azurite): a real server copies to the bucket, the
site is lost, `chunkyard tier attach` rebuilds it from the bucket alone, and every point restores
bit-exact. The S3 run uses a repository keyed by repo.key (attach needs the paper key); the Azure run
one whose key is wrapped by a passphrase (the bucket holds the wrapped key)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chunkyard.wire import Client
from tests.conftest import ROOT, ServerProcess
from tests.helpers import backup, make_disk, restore
from tests.tiering.conftest import CHUNK, Emulators


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | env, timeout=120)


def toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def write_config(path: Path, tier: dict[str, object]) -> None:
    lines = ["[server]", "pack_size_mib = 1", "", "[[tier]]"] + [f"{k} = {toml_value(v)}" for k, v in tier.items()]
    path.write_text("\n".join(lines) + "\n")


async def catalog(client: Client) -> dict:
    return {vm["id"]: await client.points(vm["id"]) for vm in await client.vms()}


async def test_copy_then_attach_after_losing_the_site(tmp_path: Path, emulators: Emulators, kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, env = emulators.new_bucket(kind), emulators.env(kind)
    if kind == "azure":
        monkeypatch.setenv("CHUNKYARD_PASSPHRASE", "correct horse battery staple")
    config = tmp_path / "server.toml"
    write_config(config, emulators.tier_table(kind, bucket, prefix="site-a", interval_seconds=3600))
    site = tmp_path / "site"
    server = ServerProcess(site, chunk_size="256KiB", config=config)
    server.start(env)
    first, second = make_disk("rrrrzcr1", CHUNK, seed=21), make_disk("rrrr", CHUNK, seed=22)
    changed = first[: 2 * CHUNK] + make_disk("r", CHUNK, seed=23) + first[3 * CHUNK :]
    try:
        async with server.client() as client:
            full = await backup(client, "vm1", {"d0": first, "d1": second})
            incremental = await backup(client, "vm1", {"d0": changed, "d1": second})
            other = await backup(client, "vm2", {"d0": make_disk("r1cz", CHUNK, seed=24, tail=1000)})
            await client.protect(full["point_id"], note="before the upgrade")
            await client.set_retention({"keep_last": 5})
            synced = cli("tier", "sync", "--json", "--server", server.url, "--token", server.admin_token, env=env)
            assert synced.returncode == 0, synced.stderr
            (tier,) = json.loads(synced.stdout)
            assert (tier["pending_packs"], tier["pending_points"], tier["error"]) == (0, 0, None)
            metrics = await (await client._request("GET", "/metrics")).text()
            lag = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                   if s.labels.get("tier") == kind}
            assert lag["chunkyard_tier_pending_bytes"] == lag["chunkyard_tier_oldest_pending_age_seconds"] == 0
            before = await catalog(client)
        if kind == "s3":
            exported = cli("key", "export", "--paper", "--data", str(site), env=env)
            (tmp_path / "paper.txt").write_text(exported.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    shutil.rmtree(site)  # the site is lost

    new = tmp_path / "rebuilt"
    args = ["tier", "attach", f"{kind}://{bucket}/site-a", "--data", str(new)]
    if kind == "s3":
        args += ["--endpoint", emulators.s3_endpoint, "--path-style", "--paper-key", str(tmp_path / "paper.txt")]
    attached = cli(*args, env=env)
    assert attached.returncode == 0, attached.stderr
    token = (new / "admin.token").read_text().strip()
    assert token in attached.stdout and "never stored in the bucket" in attached.stdout
    assert (new / "repo.key").exists() == (kind == "s3")

    server = ServerProcess(new, config=config)  # the same tier: what the bucket holds is adopted
    server.start(env)
    try:
        async with server.client() as client:
            assert await catalog(client) == before
            expected = {(full["point_id"], "d0"): first, (full["point_id"], "d1"): second,
                        (incremental["point_id"], "d0"): changed, (incremental["point_id"], "d1"): second,
                        (other["point_id"], "d0"): make_disk("r1cz", CHUNK, seed=24)}
            for (point_id, disk), image in expected.items():
                restored = await restore(client, point_id, disk)
                assert restored[: len(image)] == image
            assert (await client.point(full["point_id"]))["protected"]
            assert (await client.retention())["default"] == {"keep_last": 5}
            synced = cli("tier", "sync", "--json", "--server", server.url, "--token", token, env=env)
            assert synced.returncode == 0, synced.stderr
            (tier,) = json.loads(synced.stdout)
            assert tier["uploaded_bytes"] < 64 << 10  # no pack went up again, only the small mutable files
    finally:
        server.stop()


def test_attach_refuses_what_it_cannot_use(tmp_path: Path, emulators: Emulators) -> None:
    bucket, env = emulators.new_bucket("s3"), emulators.env("s3")
    where = ["--endpoint", emulators.s3_endpoint, "--path-style"]
    empty = cli("tier", "attach", f"s3://{bucket}", "--data", str(tmp_path / "x"), *where, env=env)
    assert empty.returncode == 2 and "holds no Chunkyard repository" in empty.stderr
    store = emulators.store("s3", bucket=bucket)
    store.put("repo.toml", b'repository_id = "r"\nencryption = "aes-256-gcm"\nkey_fingerprint = "abc"\n')
    keyless = cli("tier", "attach", f"s3://{bucket}", "--data", str(tmp_path / "x"), *where, env=env)
    assert keyless.returncode == 2 and "--paper-key" in keyless.stderr and not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "repo.toml").write_text("x")
    taken = cli("tier", "attach", f"s3://{bucket}", "--data", str(tmp_path / "taken"), *where, env=env)
    assert taken.returncode == 2 and "already holds a repository" in taken.stderr
