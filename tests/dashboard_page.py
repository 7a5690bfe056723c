"""A page object for the web dashboard, driven in Debian's chromium by Playwright.

Tests talk to the dashboard through these methods (login, vm_rows, open_vm, download_point, start_job,
wait_run_finished, ...) rather than selectors, so the jobs tests can reuse them.
Playwright never downloads a browser here (no `playwright install`): it launches /usr/bin/chromium.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import require_module, require_tool

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A fresh headless chromium (new user-data dir) as a Playwright browser context; downloads accepted."""
    chromium_path = require_tool("chromium")
    sync_api = require_module("playwright.sync_api")
    with tempfile.TemporaryDirectory(prefix="chunkyard-chromium-") as profile, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


class DashboardPage:
    def __init__(self, context: object, base_url: str):
        self.page = context.new_page()  # type: ignore[attr-defined]
        self.base_url = base_url.rstrip("/")
        # Uncaught exceptions in the page's JavaScript, and anything the Content-Security-Policy blocked
        # (an inline style or script slipping in would otherwise fail silently).
        self.script_errors: list[str] = []
        self.page.on("pageerror", lambda e: self.script_errors.append(str(e)))
        self.page.on("console", lambda m: "Content Security Policy" in m.text and self.script_errors.append(m.text))

    # --- login ---
    def open(self) -> DashboardPage:
        self.page.goto(self.base_url + "/")
        return self

    def login(self, token: str) -> DashboardPage:
        """Log in and wait for the app to show (use try_login for a token that should be refused)."""
        self.try_login(token)
        self.page.locator("#logout").wait_for(state="visible")
        return self

    def try_login(self, token: str) -> None:
        self.page.fill("#token", token)
        self.page.click("#login-form button[type=submit]")

    def login_error(self) -> str:
        error = self.page.locator("#login-error:not(:empty)")  # locators, not wait_for_function: the CSP
        error.wait_for()  # forbids the eval that a JavaScript predicate needs
        return error.inner_text()

    def identity(self) -> str:
        """The role and tenant shown next to "Log out"."""
        return self.page.locator("#whoami").inner_text()

    def logged_in(self) -> bool:
        return self.page.locator("#logout").is_visible()

    def logout(self) -> None:
        self.page.click("#logout")
        self.page.locator("#login").wait_for(state="visible")

    def banner(self) -> str | None:
        banner = self.page.locator("#banner")
        return banner.inner_text() if banner.is_visible() else None

    # --- navigation ---
    def go(self, section: str) -> None:
        """fleet, jobs, collectors or repository, by the navigation bar."""
        self.page.click(f"#nav a[data-section={section}]")
        self.page.locator(f"#nav a[data-section={section}][aria-current=page]").wait_for()

    # --- fleet and points ---
    def vm_rows(self) -> list[dict[str, str]]:
        """The fleet overview's rows as {column heading: cell text} plus 'id'."""
        self.go("fleet")
        self.page.locator("#vms tbody tr, #vms-empty").first.wait_for()
        return self._rows("#vms", "vmId")

    def open_vm(self, name: str | None = None, *, vm_id: str | None = None) -> None:
        """A VM's restore points, by name or by id (VMs on different hosts may share a name)."""
        row = f"data-vm-id='{vm_id}'" if vm_id else f"data-vm-name='{name}'"
        self.page.locator(f"#vms tbody tr[{row}] a").click()
        self.page.locator("#points tbody tr, #points-empty").first.wait_for()

    def vm_last_backup(self, vm_id: str) -> str | None:
        """A fleet row's last backup as an ISO time (the cell shows it relative: "2 minutes ago")."""
        return self.page.locator(f"#vms tbody tr[data-vm-id='{vm_id}'] time").first.get_attribute("datetime")

    def point_rows(self) -> list[dict[str, str]]:
        """The open VM's points, newest first, one row per disk: {heading: text} plus 'id' (point id)."""
        return self._rows("#points", "pointId")

    def download_point(self, point_id: str, disk_id: str, fmt: str = "raw", dest: Path | None = None) -> Path:
        """Click a point's download button; returns the downloaded file (its suggested name kept)."""
        row = self.page.locator(f"#points tbody tr[data-point-id='{point_id}'][data-disk-id='{disk_id}']")
        with self.page.expect_download(timeout=120_000) as info:
            row.locator(f"button.download[data-format={fmt}]").click()
        download = info.value
        target = (dest or Path(tempfile.mkdtemp(prefix="chunkyard-dl-"))) / download.suggested_filename
        download.save_as(target)
        if download.failure():
            raise AssertionError(f"download failed: {download.failure()}")
        return target

    # --- repository ---
    def repository_facts(self) -> dict[str, str]:
        self.go("repository")
        self.page.locator("#repository").wait_for()
        facts = self.page.locator("#repository dd")
        return {facts.nth(i).get_attribute("data-fact"): facts.nth(i).inner_text() for i in range(facts.count())}

    def tiers_text(self) -> str:
        return self.page.locator("#tiers, #tiers-empty").first.inner_text()

    # --- jobs and collectors ---
    def jobs_text(self) -> str:
        self.go("jobs")
        return self.page.locator("#jobs, #jobs-empty").first.inner_text()

    def job_rows(self) -> list[dict[str, str]]:
        return self._rows("#jobs", "job")

    def open_job(self, name: str) -> None:
        """A job's page (its definition and runs), from the jobs view."""
        self.go("jobs")
        self.page.locator(f"#jobs tbody tr[data-job='{name}'] th a").click()
        self.page.locator("#runs tbody tr, #runs-empty").first.wait_for()

    def job_run_rows(self) -> list[dict[str, str]]:
        """The open job's runs, newest first: {heading: text} plus 'id' (run id)."""
        return self._rows("#runs", "runId")

    def collectors_text(self) -> str:
        self.go("collectors")
        return self.page.locator("#collectors, #collectors-empty").first.inner_text()

    def collector_rows(self) -> list[dict[str, str]]:
        return self._rows("#collectors", "collector")

    def can_run_now(self, name: str) -> bool:
        """Does the jobs list offer "Run now" for the job? (Only admin tokens get the button.)"""
        self.go("jobs")
        row = self.page.locator(f"#jobs tbody tr[data-job='{name}']")
        row.wait_for()
        return row.locator("button.run-now").count() == 1

    def start_job(self, name: str) -> str:
        """Click the job's "Run now"; returns the run id the dashboard then follows live."""
        self.go("jobs")
        self.page.locator(f"#jobs tbody tr[data-job='{name}'] button.run-now").click()
        self.page.wait_for_url("**/ui/#/runs/*")
        return self.page.url.rsplit("/", 1)[1]

    def run_state(self) -> str:
        return self.page.locator("#run-state").get_attribute("data-state") or ""

    def run_vm_rows(self) -> list[dict[str, str]]:
        return self._rows("#run-vms", "vmName")

    def wait_run_finished(self, timeout_s: float = 120) -> str:
        """Wait on the live run view until the run is no longer queued or running; returns its state."""
        self.page.locator("#run-state:not([data-state=queued]):not([data-state=running])").wait_for(
            timeout=timeout_s * 1000)
        return self.run_state()

    def status(self) -> str:
        return self.page.locator("#status").inner_text()

    def _rows(self, table: str, key: str) -> list[dict[str, str]]:
        """A table's body rows as dicts keyed by the column headings, with 'id' from a data attribute."""
        return self.page.evaluate(
            """([table, key]) => {
                const t = document.querySelector(table);
                if (!t) return [];
                const heads = [...t.querySelectorAll('thead th')].map((th) => th.textContent.trim());
                return [...t.querySelectorAll('tbody tr')].map((tr) => {
                    const row = {id: tr.dataset[key]};
                    [...tr.children].forEach((cell, i) => { row[heads[i] || `col${i}`] = cell.innerText.trim(); });
                    return row;
                });
            }""", [table, key])
