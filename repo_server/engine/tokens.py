"""API tokens: only sha256(token) is stored; the token itself is shown once at creation.

A token belongs to a tenant ("" = the whole repository, the operator's own tokens) and may expire."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from .errors import Invalid, NotFound
from .index import Index

ROLES = ("admin", "collector", "reader")
TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class TokenInfo:
    id: str
    role: str
    name: str
    created: float
    tenant: str = ""  # "" = not scoped: sees the whole repository
    expires: float | None = None  # unix time after which the token is refused

    def public(self) -> dict:
        return {"id": self.id, "role": self.role, "name": self.name, "created": self.created,
                "tenant": self.tenant, "expires": self.expires}

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now if now is not None else time.time()) >= self.expires


def _key(token: str) -> bytes:
    # Header bytes that are not UTF-8 arrive as surrogates: they can never match, so hash them anyway.
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class TokenStore:
    def __init__(self, index: Index):
        self.index = index

    def create(self, role: str, name: str = "", tenant: str = "", expires: float | None = None
               ) -> tuple[str, TokenInfo]:
        if role not in ROLES:
            raise Invalid(f"role must be one of {', '.join(ROLES)}; got {role!r:.40}", "bad_role")
        if not isinstance(name, str) or len(name) > 200:
            raise Invalid("token name must be a string of at most 200 characters", "bad_name")
        if not isinstance(tenant, str) or len(tenant) > 64 or not set(tenant) <= TENANT_CHARS:
            raise Invalid("tenant must be at most 64 characters of a-z, 0-9, '-' and '_'", "bad_tenant")
        now = time.time()
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))
                                    or not now < expires < 1e11):
            raise Invalid("expires must be a future unix time in seconds", "bad_expires")
        token = "cy_" + secrets.token_urlsafe(32)
        key = _key(token)
        info = TokenInfo(key[:8].hex(), role, name, now, tenant, None if expires is None else float(expires))
        batch = self.index.batch()
        batch.put("tokens", key, json.dumps(info.public()).encode())
        self.index.write(batch, sync=True)
        return token, info

    def verify(self, token: str) -> TokenInfo | None:
        """The token's record, or None when it is unknown or expired."""
        info = self.lookup(token)
        return None if info is None or info.expired() else info

    def lookup(self, token: str) -> TokenInfo | None:
        """The token's record even when expired (expired records are kept, so the server can tell the
        holder its token expired instead of calling it unknown), or None when unknown."""
        value = self.index.get("tokens", _key(token))
        return TokenInfo(**json.loads(value)) if value else None

    def list(self, tenant: str = "") -> list[TokenInfo]:
        """Every token, or with `tenant` only that tenant's."""
        infos = (TokenInfo(**json.loads(v)) for _, v in self.index.scan("tokens"))
        return [t for t in infos if not tenant or t.tenant == tenant]

    def revoke(self, token_id: str, tenant: str = "") -> TokenInfo:
        """Revoke by id; with `tenant`, another tenant's token is "not found" like an unknown id."""
        for key, value in self.index.scan("tokens"):
            info = TokenInfo(**json.loads(value))
            if info.id == token_id and (not tenant or info.tenant == tenant):
                batch = self.index.batch()
                batch.delete("tokens", key)
                self.index.write(batch, sync=True)
                return info
        raise NotFound(f"no token with id {token_id!r:.40}", "token_not_found")
