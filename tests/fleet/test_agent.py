"""The pull collector (collectors/agent.py) against a real server process: registration, the work loop,
progress, results kept across a server restart, backoff while the server is down, resume of an
interrupted session, and the bandwidth limiter's accounting."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest

from chunkyard.wire import ApiError
from collectors.agent import Backoff, Outbox, TokenBucket, inventory, transient
from collectors.sources import VmInfo


class FakeClock:
    """Time that passes only when the limiter sleeps: accounting without wall-clock asserts."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# ------------------------------------------------------------------------------------------ pure parts

def test_backoff_grows_with_jitter_to_the_cap_and_resets() -> None:
    backoff = Backoff(base=1.0, cap=30.0, rng=random.Random(7).random)
    delays = [backoff.next() for _ in range(10)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0 and delays[-1] >= 15.0
    assert len({round(d, 6) for d in delays[6:]}) == 4  # capped, yet still jittered (no lockstep)
    backoff.reset()
    assert backoff.next() <= 1.0


async def test_token_bucket_accounting() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    await bucket.acquire(500)  # the burst passes at once
    assert clock.slept == []
    await bucket.acquire(2000)  # a body larger than the bucket waits off its deficit
    assert clock.slept == [pytest.approx(2.0)]
    clock.now += 10  # idle time refills only up to the burst
    await bucket.acquire(600)
    assert clock.slept[-1] == pytest.approx(0.1)
    assert bucket.granted == 3100
    # Never ahead of the limit: granted <= burst + rate × elapsed.
    assert bucket.granted <= bucket.burst + bucket.rate * (clock.now - 100.0) + 1e-6
    assert bucket.waited == pytest.approx(2.1)


async def test_token_bucket_serialises_concurrent_uploads() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock, sleep=clock.sleep)
    await asyncio.gather(*(bucket.acquire(100) for _ in range(5)))
    assert bucket.granted == 500
    assert clock.now - 100.0 == pytest.approx(4.0)  # first 100 from the burst, then 1 s per 100 bytes


def test_token_bucket_refuses_a_useless_rate() -> None:
    for rate in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            TokenBucket(rate)


def test_inventory_groups_vms_by_host() -> None:
    vms = [VmInfo("1", "web", "hv2"), VmInfo("2", "sql", "hv1"), VmInfo("3", "dc", "hv2")]
    assert inventory(vms) == [{"host": "hv1", "vms": [{"id": "2", "name": "sql"}]},
                              {"host": "hv2", "vms": [{"id": "1", "name": "web"}, {"id": "3", "name": "dc"}]}]
    assert inventory([]) == []


def test_transient_errors() -> None:
    assert transient(aiohttp.ServerDisconnectedError())
    assert transient(ConnectionRefusedError())
    assert transient(asyncio.TimeoutError())
    assert transient(ApiError(503, "unavailable", "starting"))
    assert not transient(ApiError(401, "unauthorized", "bad token"))
    assert not transient(ApiError(422, "bad", "bad body"))
    assert not transient(ValueError("bug"))


def test_outbox_keeps_results_in_order_and_survives_garbage(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox")
    assert box.pending() == []
    box.put("w/1", {"ok": True})
    box.put("w2", {"ok": False})
    (tmp_path / "outbox" / "junk.json").write_bytes(b"\xff\x00 not json")
    (tmp_path / "outbox" / "list.json").write_text("[1, 2]")
    assert [d["work_id"] for d in box.pending()] == ["w/1", "w2"]
    assert box.pending()[0]["result"] == {"ok": True}
    box.remove("w/1")
    assert [d["work_id"] for d in box.pending()] == ["w2"]
    assert Outbox(tmp_path / "outbox").pending()[0]["result"] == {"ok": False}  # a new process sees it
