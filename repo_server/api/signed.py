"""Short-lived signed download URLs: how a browser link downloads a restore point without a token in it.

A link cannot carry an `Authorization` header and a token must never be put in a URL (it would end up in
browser history, proxy logs and Referer headers, valid until revoked). Instead a token holder asks for a
URL signed with a per-server secret: HMAC-SHA256 over the method, the exact path, the expiry time and the
id of the token that asked. It opens that one path, for GET/HEAD only, for a few minutes, and only while
the token that asked for it still exists with a role that may download.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import time
import urllib.parse
from pathlib import Path

from aiohttp import web

from repo_server.engine.tokens import TokenInfo, TokenStore

from .common import ApiError, Handler

SECRET_FILE = "url-signing.key"
LIFETIME = 600  # seconds a signed URL stays valid
_HEX = re.compile(r"[0-9a-f]{64}")
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")
_EXPIRES = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit() would let "²" through to int()


def signable(handler: Handler) -> Handler:
    """Mark a GET handler as reachable with a signed URL instead of a Bearer token."""
    handler.signable = True  # type: ignore[attr-defined]
    return handler


def load_secret(data: Path) -> bytes:
    """The server's signing secret, created (random, mode 0600) on first use. Deleting the file and
    restarting the server invalidates every URL handed out."""
    path = data / SECRET_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    secret = path.read_text().strip()
    if not _HEX.fullmatch(secret):
        raise RuntimeError(f"{path} is damaged (expected 64 hex digits): delete it and restart the server; "
                           "download links handed out before then stop working")
    return bytes.fromhex(secret)


class UrlSigner:
    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, path: str, expires: int, token_id: str) -> str:
        message = f"GET\n{path}\n{expires}\n{token_id}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, path: str, token_id: str, now: float | None = None) -> tuple[str, int]:
        """A URL (path and query, relative to the server) for a GET of `path`, and its expiry time."""
        expires = int(now if now is not None else time.time()) + LIFETIME
        query = urllib.parse.urlencode({"exp": expires, "tok": token_id, "sig": self._mac(path, expires, token_id)})
        return f"{urllib.parse.quote(path)}?{query}", expires

    def check(self, request: web.Request, tokens: TokenStore) -> TokenInfo:
        """The token a signed request stands for; 403 for a wrong signature, 401 once expired or when the
        token that asked for it was revoked."""
        q = request.query
        sig, exp, tok = q.get("sig", ""), q.get("exp", ""), q.get("tok", "")
        if request.method not in ("GET", "HEAD") or not _EXPIRES.fullmatch(exp) or not _TOKEN_ID.fullmatch(tok) \
                or not _HEX.fullmatch(sig):
            raise ApiError(403, "bad_signature", "this download link is malformed: ask the dashboard for a new one")
        if not hmac.compare_digest(sig, self._mac(request.path, int(exp), tok)):
            raise ApiError(403, "bad_signature", "this download link's signature does not match its path and "
                           "expiry: ask the dashboard for a new one")
        if int(exp) <= time.time():
            raise ApiError(401, "link_expired", f"this download link expired (links last {LIFETIME // 60} "
                           "minutes): start the download again from the dashboard")
        info = next((t for t in tokens.list() if t.id == tok), None)
        if info is None or info.expired():
            raise ApiError(401, "link_revoked", "the token that made this download link was revoked or expired")
        return info


SIGNER = web.AppKey("url_signer", UrlSigner)
