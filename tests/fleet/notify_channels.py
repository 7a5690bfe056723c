"""The receiving end of notifications in tests: a real aiosmtpd SMTP server (with AUTH) and an aiohttp
webhook receiver in the test process, and the [notify] config that points a server at both."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import time
from collections.abc import AsyncIterator

from aiohttp import web

from tests.conftest import free_port, require_module

# Loopback SMTP in a test: AUTH without TLS is what tests using these channels mean to exercise. Test modules
# apply it with `pytestmark = pytest.mark.filterwarnings(LOOPBACK_AUTH_WARNING)`.
LOOPBACK_AUTH_WARNING = "ignore:Requiring AUTH while not requiring TLS"
SMTP_USER, SMTP_PASSWORD = "chunkyard", "s3cret"


class Inbox:
    """What the SMTP server and the webhook received."""

    def __init__(self) -> None:
        self.mails: list[email.message.EmailMessage] = []
        self.hooks: list[dict] = []
        self.fail_next_hook = 0
        self.logins: list[str] = []

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        """aiosmtpd's authenticator hook: one user, one password."""
        from aiosmtpd.smtp import AuthResult

        good = (auth_data.login, auth_data.password) == (SMTP_USER.encode(), SMTP_PASSWORD.encode())
        if good:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=good)

    async def handle_DATA(self, server, session, envelope) -> str:  # the aiosmtpd handler hook
        self.mails.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    async def hook(self, request: web.Request) -> web.Response:
        if self.fail_next_hook:
            self.fail_next_hook -= 1
            return web.Response(status=500)
        self.hooks.append(await request.json())
        return web.Response(status=204)

    async def wait(self, mails: int, hooks: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (len(self.mails) < mails or len(self.hooks) < hooks) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(self.mails) >= mails and len(self.hooks) >= hooks, (self.mails, self.hooks)

    @staticmethod
    def text(mail: email.message.EmailMessage) -> str:
        return mail.get_content().replace("\r\n", "\n")


@contextlib.asynccontextmanager
async def notify_channels() -> AsyncIterator[tuple[Inbox, int, int]]:
    """A running SMTP server and webhook receiver: (inbox, SMTP port, webhook port); the hook is at /hook."""
    controller_module = require_module("aiosmtpd.controller")
    box = Inbox()
    smtp_port = free_port()
    controller = controller_module.Controller(box, hostname="127.0.0.1", port=smtp_port, authenticator=box.authenticate,
                                              auth_required=True, auth_require_tls=False)
    controller.start()
    try:
        app = web.Application()
        app.router.add_post("/hook", box.hook)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            hook_port = free_port()
            await web.TCPSite(runner, "127.0.0.1", hook_port).start()
            yield box, smtp_port, hook_port
        finally:
            await runner.cleanup()
    finally:
        controller.stop()


def notify_config(smtp_port: int, hook_port: int, on: str, stale_hours: float = 26, password: str = "") -> str:
    """The [notify] section for a server config sending to notify_channels(); `on` is a TOML list. Without
    `password` the server must get the SMTP password from $CHUNKYARD_SMTP_PASSWORD."""
    return f"""
[notify]
webhook_url = "http://127.0.0.1:{hook_port}/hook"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
mail_from = "chunkyard@example.test"
mail_to = ["ops@example.test", "oncall@example.test"]
on = {on}
stale_hours = {stale_hours}
smtp_user = "{SMTP_USER}"
smtp_password = "{password}"
"""
