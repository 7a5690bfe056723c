"""GET /api/v1/whoami: any valid token learns its own id, name, role, tenant and expiry, never a secret."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from chunkyard.wire import Client
from tests.conftest import ServerProcess


async def whoami(server: ServerProcess, authorization: str | bytes | None, method: str = "GET") -> tuple[int, dict]:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession() as http, http.request(method, server.url + "/api/v1/whoami",
                                                             headers=headers) as r:
        text = await r.text()
        return r.status, json.loads(text) if text else {}


async def test_each_role_sees_its_own_token_and_no_secret(server: ServerProcess, admin: Client) -> None:
    status, me = await whoami(server, f"Bearer {server.admin_token}")
    assert status == 200 and me["role"] == "admin" and me["tenant"] == "" and me["expires"] is None
    assert set(me) == {"id", "name", "role", "tenant", "expires"}
    assert me["id"] in {t["id"] for t in await admin.tokens()}
    for role in ("reader", "collector", "admin"):
        made = await admin.create_token(role, f"acme {role}", tenant="acme", expires_in=3600)
        status, me = await whoami(server, f"Bearer {made['token']}")
        assert status == 200, me
        assert me == {"id": made["id"], "name": f"acme {role}", "role": role, "tenant": "acme",
                      "expires": made["expires"]}
        assert made["token"] not in json.dumps(me)


async def test_refused_without_a_valid_token(server: ServerProcess, admin: Client) -> None:
    for header in (None, "", "Bearer ", "Bearer cy_unknown", "Basic YWRtaW46YWRtaW4=", "Bearer " + "x" * 4000,
                   f"bearer{server.admin_token}", "Bearer \u00ff\u00fe garbage"):
        status, answer = await whoami(server, header)
        assert status == 401 and answer["error"] == "unauthorized", (header, answer)
    short = await admin.create_token("reader", "short", expires_in=1)
    await asyncio.sleep(1.3)
    status, answer = await whoami(server, f"Bearer {short['token']}")
    assert status == 401 and answer["error"] == "token_expired"
    assert (await whoami(server, f"Bearer {server.admin_token}", "POST"))[0] == 405
