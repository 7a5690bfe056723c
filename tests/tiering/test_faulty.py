"""The fault-injecting wrapper: faults fire by rule, replay exactly from a seed, and mean what they say."""

from __future__ import annotations

import pytest

from tiering.stores import TransientError
from tiering.stores.base import CloudStore
from tiering.stores.faulty import Fault, FaultyStore


def outcomes(store: CloudStore, seed: int) -> list[bool]:
    faulty = FaultyStore(store, [Fault("error", op="head", probability=0.5)], seed=seed)
    result = []
    for _ in range(40):
        try:
            faulty.head("k")
            result.append(True)
        except TransientError:
            result.append(False)
    return result


def test_a_seed_replays_the_same_faults(store: CloudStore) -> None:
    first = outcomes(store, 3)
    assert first == outcomes(store, 3) != outcomes(store, 4)
    assert 5 < first.count(False) < 35


def test_fault_kinds(store: CloudStore) -> None:
    faulty = FaultyStore(store, [Fault("timeout", op="put", key="t", times=1),
                                 Fault("cut", op="put", key="c", times=1),
                                 Fault("error", op="get", times=1),
                                 Fault("slow", op="head", delay=0.05, times=1)])
    with pytest.raises(TransientError, match="timeout"):
        faulty.put("t", b"done anyway")
    assert store.get("t") == b"done anyway"  # the ambiguous outcome: it happened
    with pytest.raises(TransientError, match="cut-off"):
        faulty.put("c", b"0123456789" * 100)
    assert len(store.get("c")) < 1000  # a half object, as a non-atomic store would keep
    with pytest.raises(TransientError):
        faulty.get("t")
    assert faulty.get("t") == b"done anyway"  # `times` ran out
    assert faulty.head("t").size == len(b"done anyway")
    assert faulty.fired == {0: 1, 1: 1, 2: 1, 3: 1} and faulty.calls["put"] == 2


def test_rules_are_checked() -> None:
    with pytest.raises(ValueError):
        Fault("cut", op="get")
    with pytest.raises(ValueError):
        Fault("explode")
