"""API tokens: only sha256(token) is stored; the token itself is shown once at creation."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from .errors import Invalid, NotFound
from .index import Index

ROLES = ("admin", "collector", "reader")


@dataclass(frozen=True)
class TokenInfo:
    id: str
    role: str
    name: str
    created: float

    def public(self) -> dict:
        return {"id": self.id, "role": self.role, "name": self.name, "created": self.created}


def _key(token: str) -> bytes:
    # Header bytes that are not UTF-8 arrive as surrogates: they can never match, so hash them anyway.
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class TokenStore:
    def __init__(self, index: Index):
        self.index = index

    def create(self, role: str, name: str = "") -> tuple[str, TokenInfo]:
        if role not in ROLES:
            raise Invalid(f"role must be one of {', '.join(ROLES)}; got {role!r:.40}", "bad_role")
        if not isinstance(name, str) or len(name) > 200:
            raise Invalid("token name must be a string of at most 200 characters", "bad_name")
        token = "cy_" + secrets.token_urlsafe(32)
        key = _key(token)
        info = TokenInfo(key[:8].hex(), role, name, time.time())
        batch = self.index.batch()
        batch.put("tokens", key, json.dumps(info.public()).encode())
        self.index.write(batch, sync=True)
        return token, info

    def verify(self, token: str) -> TokenInfo | None:
        value = self.index.get("tokens", _key(token))
        return TokenInfo(**json.loads(value)) if value else None

    def list(self) -> list[TokenInfo]:
        return [TokenInfo(**json.loads(v)) for _, v in self.index.scan("tokens")]

    def revoke(self, token_id: str) -> None:
        for key, value in self.index.scan("tokens"):
            if json.loads(value)["id"] == token_id:
                batch = self.index.batch()
                batch.delete("tokens", key)
                self.index.write(batch, sync=True)
                return
        raise NotFound(f"no token with id {token_id!r:.40}", "token_not_found")
