"""`chunkyard job ...` and `chunkyard collector ...` against a real server: tables, JSON, exit statuses, and
clear errors for bad input (the happy path with real collectors is in test_e2e_fleet.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServerProcess

from .fleet_server import fleet_server


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    server, _ = fleet_server(tmp_path)
    server.start()
    yield server
    server.stop()


def run(server: ServerProcess, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkyard.cli", *args, "--server", server.url,
                           "--token", token or server.admin_token], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_job_commands_and_their_errors(srv: ServerProcess, tmp_path: Path) -> None:
    made = run(srv, "job", "create", "nightly", "--collector", "hv01", "--vms", "sql*", "--schedule",
               "mon..fri 22:00", "--keep-last", "3", "--keep-daily", "7", "--max-per-host", "2", "--bandwidth",
               "12.5", "--retries", "1", "--retry-delay", "60", "--missed", "skip", "--json")
    assert made.returncode == 0, made.stderr
    job = json.loads(made.stdout)
    assert {k: job[k] for k in ("name", "collector", "host_pattern", "vm_pattern", "schedule", "retention",
                                "max_per_host", "bandwidth_mib_s", "retries", "retry_delay_s", "missed",
                                "enabled")} == {
        "name": "nightly", "collector": "hv01", "host_pattern": "*", "vm_pattern": "sql*",
        "schedule": "mon..fri 22:00", "retention": {"keep_last": 3, "keep_daily": 7}, "max_per_host": 2,
        "bandwidth_mib_s": 12.5, "retries": 1, "retry_delay_s": 60, "missed": "skip", "enabled": True}

    listed = run(srv, "job", "list")
    assert listed.returncode == 0 and "nightly" in listed.stdout and "mon..fri 22:00" in listed.stdout
    assert "never" in listed.stdout  # no run yet
    shown = run(srv, "job", "show", "nightly")
    assert "last 3, daily 7" in shown.stdout and "12.5 MiB/s" in shown.stdout and "1 (after 60 s)" in shown.stdout

    off = run(srv, "job", "disable", "nightly")
    assert off.returncode == 0 and "disabled" in off.stdout
    assert "enabled       no" in run(srv, "job", "show", "nightly").stdout
    on = json.loads(run(srv, "job", "enable", "nightly", "--json").stdout)
    assert on["enabled"] is True and on["retention"] == job["retention"] and on["bandwidth_mib_s"] == 12.5
    assert on["next_run"] == job["next_run"]  # the rest of the definition is kept

    # A run on a collector that never registered fails at once: --wait says so and exits 1.
    failed = run(srv, "job", "run", "nightly", "--wait")
    assert failed.returncode == 1 and "failed" in failed.stderr, failed
    assert "of job nightly (manual): failed, 0/0 VMs" in failed.stdout
    runs = json.loads(run(srv, "job", "history", "nightly", "--json").stdout)
    assert [r["state"] for r in runs] == ["failed"]
    table = run(srv, "job", "history", "nightly").stdout
    assert runs[0]["run_id"] in table and "manual" in table
    detail = run(srv, "job", "history", "nightly", "--run", runs[0]["run_id"])
    assert detail.returncode == 0 and "failed, 0/0 VMs" in detail.stdout

    deleted = run(srv, "job", "delete", "nightly")
    assert deleted.returncode == 0 and "Deleted job nightly" in deleted.stdout
    assert json.loads(run(srv, "job", "list", "--json").stdout) == []

    # The server's refusals reach the user as one clear line, exit status 2.
    for args, message in (
        (["job", "create", "x", "--collector", "c", "--schedule", "mon..fry 25:00"], "is not a weekday"),
        (["job", "create", "x", "--collector", "c", "--schedule", "every day"], "mon..fri 22:00"),
        (["job", "create", "x", "--collector", "c", "--schedule", "daily", "--max-per-host", "0"], "max_per_host"),
        (["job", "create", "x", "--collector", "c", "--schedule", "daily", "--tier", "glacier"], "not a configured"),
        (["job", "create", "bad/name", "--collector", "c", "--schedule", "daily"], "job name"),
        (["job", "show", "nosuch"], "nosuch"),
        (["job", "run", "nosuch", "--wait"], "nosuch"),
        (["job", "delete", "nosuch"], "nosuch"),
        (["job", "enable", "nosuch"], "nosuch"),
    ):
        out = run(srv, *args)
        assert out.returncode == 2 and out.stderr.startswith("chunkyard: server said:") and message in out.stderr, \
            (args, out.stderr)
    # Flags argparse refuses before anything is sent.
    for args in (["--retries", "-1"], ["--bandwidth", "fast"], ["--missed", "later"], ["--keep-last", "x"]):
        out = run(srv, "job", "create", "x", "--collector", "c", "--schedule", "daily", *args)
        assert out.returncode == 2 and "usage:" in out.stderr, args


def test_collector_commands_and_their_errors(srv: ServerProcess, tmp_path: Path) -> None:
    empty = run(srv, "collector", "list")
    assert empty.returncode == 0 and empty.stdout.startswith("NAME")
    assert json.loads(run(srv, "collector", "list", "--json").stdout) == []

    (tmp_path / "disk.img").write_bytes(b"\1" * 65536)
    source = f"file:{tmp_path / 'disk.img'}"
    for args, message in (
        (["--source", source, "--token", "cy_not-a-token"], "check --token"),
        (["--source", "nosuch:x"], "unknown source kind"),
        (["--source", "lab"], "--source must be"),
        (["--source", f"lab:{tmp_path / 'no-lab'}"], "not a usable lab"),
        (["--source", source, "--name", "bad name!"], "collector name"),
    ):
        out = subprocess.run([sys.executable, "-m", "chunkyard.cli", "collector", "run", "--server", srv.url,
                              "--token", srv.admin_token, "--state-dir", str(tmp_path / "state"), *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
