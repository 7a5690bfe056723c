"""The fleet engine in-process (no HTTP): its Prometheus families, and the [notify] configuration table."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from chunkyard.config import ConfigError, load_config
from repo_server.fleet.scheduler import Fleet

from .fleet_server import INVENTORY, job, result


async def test_metric_families(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "fleet", poll_seconds=5)
    await fleet.start()
    try:
        await fleet.register("acme", INVENTORY)
        await fleet.create_job("acme", job(vm_pattern="web-*", max_per_host=3))
        run = await fleet.run_now("acme", "nightly", {})
        items = [await fleet.take_work("acme", "col1", 0) for _ in range(3)]
        await fleet.result("acme", items[0]["work_id"], result(point_id="p"))
        await fleet.result("acme", items[1]["work_id"], result(False, error="boom"))

        class Source:  # the registry protocol: anything with collect()
            def collect(self):
                return fleet.metric_families()

        registry = CollectorRegistry()
        registry.register(Source())
        text = generate_latest(registry).decode()
        assert 'chunkyard_fleet_vms{state="running"} 1.0' in text
        assert 'chunkyard_fleet_collectors_online{tenant="acme"} 1.0' in text
        assert "chunkyard_fleet_runs_total{" not in text  # nothing finished yet
        await fleet.result("acme", items[2]["work_id"], result(point_id="p"))
        text = generate_latest(registry).decode()
        assert 'chunkyard_fleet_runs_total{job="nightly",state="partial",tenant="acme"} 1.0' in text
        assert 'chunkyard_fleet_vms{state="running"} 0.0' in text
        assert fleet.get_run("acme", run["run_id"])["state"] == "partial"
    finally:
        await fleet.close()


BASE = '[notify]\nsmtp_host = "mail"\nmail_from = "a@b"\nmail_to = ["c@d"]\n'


def test_notify_config(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(BASE + 'webhook_url = "https://hooks.example/x"\non = ["failure"]\nstale_hours = 2\n')
    notify = load_config(path).notify
    assert (notify.smtp_host, notify.mail_to, notify.on, notify.stale_hours) == ("mail", ("c@d",), ("failure",), 2)
    assert notify.smtp_port == 25 and not notify.smtp_starttls
    assert load_config(None).notify.on == ("failure", "success", "stale")


@pytest.mark.parametrize(("text", "message"), [
    ("[notify]\nsurprise = 1\n", "unknown setting notify.surprise"),
    ("[notify]\nsmtp_port = \"25\"\n", "notify.smtp_port must be int"),
    ("[notify]\nsmtp_port = 70000\n", "smtp_port 1-65535"),
    ("[notify]\nsmtp_starttls = 1\n", "notify.smtp_starttls must be bool"),
    ("[notify]\nstale_hours = -1\n", "stale_hours must be positive"),
    ("[notify]\nstale_hours = true\n", "stale_hours must be float"),
    ("[notify]\non = [\"sometimes\"]\n", "notify.on may hold"),
    ("[notify]\non = \"failure\"\n", "must be a list of strings"),
    ("[notify]\nmail_to = [1]\n", "must be a list of strings"),
    ("[notify]\nwebhook_url = \"ftp://x\"\n", "http:// or https://"),
    ("[notify]\nsmtp_host = \"mail\"\n", "mail_from and mail_to"),
    ("notify = 5\n", "[notify] must be a table"),
    ("[server]\nfleet_poll_seconds = 0\n", "fleet_poll_seconds must be positive"),
    ("[server]\nfleet_silent_seconds = \"x\"\n", "fleet_silent_seconds must be float"),
])
def test_bad_notify_config(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
