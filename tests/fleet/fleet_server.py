"""The server side of fleet tests: a real server with a fast scheduler, tenant tokens made offline,
and a tiny JSON client that plays a pull collector's HTTP side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from repo_server.engine import Repository
from tests.conftest import ServerProcess
from tests.helpers import backup, make_disk

FAST = """
[server]
fleet_poll_seconds = 2.0
fleet_silent_seconds = {silent}
fleet_tick_seconds = 0.2
"""


def fleet_server(tmp_path: Path, *, silent: float = 30.0, extra: str = "",
                 tokens: tuple[tuple[str, str, str], ...] = ()) -> tuple[ServerProcess, dict[str, str]]:
    """A fleet server (not started) and tokens made offline: (role, name, tenant) -> token by name."""
    config = tmp_path / "server.toml"
    config.write_text(FAST.format(silent=silent) + extra)
    server = ServerProcess(tmp_path / "data", config=config)
    made = {}
    if tokens:
        repo = Repository(server.data)
        try:
            for role, name, tenant in tokens:
                made[name] = repo.tokens.create(role, name, tenant)[0]
        finally:
            repo.close()
    return server, made


class Api:
    """JSON over HTTP with one token; answers (status, body or None)."""

    def __init__(self, url: str, token: str):
        self.url = url + "/api/v1"
        self.session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   timeout: float = 90) -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        async with self.session.request(method, self.url + path, data=data,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await r.read()
            return r.status, json.loads(text) if text else None

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = await self.call(method, path, body)
        assert got == status, (method, path, got, answer)
        return answer

    async def close(self) -> None:
        await self.session.close()


INVENTORY = {"name": "col1", "version": "test-1", "hosts": [
    {"host": "hv1", "vms": [{"id": "vm-a", "name": "web-a"}, {"id": "vm-b", "name": "web-b"},
                            {"id": "vm-c", "name": "db-c"}]},
    {"host": "hv2", "vms": [{"id": "vm-d", "name": "web-d"}]},
]}


def job(name: str = "nightly", **fields: Any) -> dict:
    return {"name": name, "collector": "col1", "schedule": "mon..fri 22:00", "retries": 0} | fields


def result(ok: bool = True, point_id: str | None = None, error: str | None = None, **counters: Any) -> dict:
    return {"ok": ok, "point_id": point_id, "consistency": "crash" if ok else None, "bytes_read": 1000,
            "bytes_changed": 500, "bytes_new": 200, "bytes_sent": 150, "duration_s": 1.5, "error": error} | counters


async def real_points(server: ServerProcess, vm_ids: list[str] = ("vm-a", "vm-b", "vm-c", "vm-d")) -> dict[str, str]:
    """One real restore point per VM (a 1 MiB disk through the backup protocol): vm id -> point id, what a
    collector reports after its commit."""
    async with server.client() as client:
        return {vm: (await backup(client, vm, {"d0": make_disk("r", seed=n)}))["point_id"]
                for n, vm in enumerate(vm_ids)}
