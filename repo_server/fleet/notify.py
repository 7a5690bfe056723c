"""Notifications of fleet runs and stale VMs: a JSON webhook and an SMTP email ([notify] in the config).

A notification never blocks the scheduler: it is sent from its own task, the SMTP conversation on a
thread, each channel with a few retries; a channel that still fails is logged and the event dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
from email.message import EmailMessage

import aiohttp

from chunkyard.config import NotifyConfig

log = logging.getLogger("chunkyard.notify")
ATTEMPTS = 3
PASSWORD_ENV = "CHUNKYARD_SMTP_PASSWORD"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def describe(event: str, details: dict) -> tuple[str, str]:
    """The subject and plain-text body of an event ("success", "failure", "stale")."""
    if event == "stale":
        vms = details["vms"]
        subject = f"Chunkyard: {len(vms)} VM(s) without a good backup for {details['stale_hours']:g} hours"
        lines = [f"- {v['vm']['name']} ({v['vm']['id']}) on {v['host']}, job {v['job']}"
                 f"{' (tenant ' + v['tenant'] + ')' if v['tenant'] else ''}: no good backup for {v['hours']:g} h"
                 for v in vms]
        return subject, "\n".join(["These VMs have no recent restore point:", "", *lines]) + "\n"
    run = details["run"]
    t = run["totals"]
    if event == "success":
        subject = f"Chunkyard: backup job {run['job']} succeeded ({t['vms']} VMs, {_size(t['bytes_new'])} new)"
    else:
        subject = (f"Chunkyard: backup job {run['job']} {run['state']}: {t['failed']} of {t['vms']} VMs failed"
                   if run["vms"] else f"Chunkyard: backup job {run['job']} failed: {run['error']}")
    lines = [f"Job {run['job']}{' (tenant ' + run['tenant'] + ')' if run['tenant'] else ''}, run {run['run_id']} "
             f"({run['trigger']}): {run['state']}", ""]
    for v in run["vms"]:
        line = f"- {v['vm']['name']} ({v['vm']['id']}) on {v['host']}: {v['state']}"
        if v["state"] == "succeeded":
            line += (f", point {v['point_id']}, {v['consistency'] or 'unknown'} consistency, read "
                     f"{_size(v['bytes_read'])}, new {_size(v['bytes_new'])}, {v['duration_s']:.0f} s")
        else:
            line += f" after {v['attempt']} attempt(s): {v['error']}"
        lines.append(line)
    if run["error"]:
        lines.append(f"Error: {run['error']}")
    return subject, "\n".join(lines) + "\n"


class Notifier:
    def __init__(self, config: NotifyConfig):
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def send(self, event: str, details: dict) -> None:
        """Send an event to every configured channel if the config asks for this kind of event."""
        if event not in self.config.on:
            return
        subject, text = describe(event, details)
        channels = []
        if self.config.webhook_url:
            channels.append(self._retry("webhook", self._post, {"event": event, "subject": subject, "text": text}
                                        | details))
        if self.config.smtp_host:
            channels.append(self._retry("email", self._mail_in_thread, subject, text))
        await asyncio.gather(*channels)

    async def _retry(self, what: str, fn, *args) -> None:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await fn(*args)
                return
            except Exception as e:  # any failure of a channel: retry, then log; never raise into the scheduler
                if attempt == ATTEMPTS:
                    log.error("%s notification failed after %d attempts: %s", what, ATTEMPTS, e)
                    return
                await asyncio.sleep(attempt)

    async def _post(self, payload: dict) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        async with self._session.post(self.config.webhook_url, json=payload) as response:
            if response.status >= 300:
                raise RuntimeError(f"the webhook answered HTTP {response.status}")

    async def _mail_in_thread(self, subject: str, text: str) -> None:
        await asyncio.to_thread(self._mail, subject, text)

    def _mail(self, subject: str, text: str) -> None:
        c = self.config
        message = EmailMessage()
        message["Subject"], message["From"], message["To"] = subject, c.mail_from, ", ".join(c.mail_to)
        message.set_content(text)
        with smtplib.SMTP(c.smtp_host, c.smtp_port, timeout=30) as smtp:
            if c.smtp_starttls:
                smtp.starttls()
            if c.smtp_user:
                smtp.login(c.smtp_user, c.smtp_password or os.environ.get(PASSWORD_ENV, ""))
            smtp.send_message(message)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
