"""The per-sandbox decision ring: bounded, ordered, with totals that survive eviction."""

from __future__ import annotations

import pytest

from cellbox.egress.log import EgressLog, EgressLogBook


def test_ring_keeps_the_latest_and_totals_keep_everything() -> None:
    log = EgressLog("sbx", capacity=3)
    records = [log.decision("connect", f"h{i}.example", 443, i % 2 == 0, "why") for i in range(5)]
    log.closed(records[0], 10, 20)  # evicted already, still counted
    log.closed(records[4], 1, 2, error="reset")
    kept = log.records()
    assert [r.seq for r in kept] == [2, 3, 4]
    assert [r.seq for r in log.records(after=2)] == [3, 4]
    assert [r.seq for r in log.records(limit=1)] == [2]
    assert kept[-1].to_dict()["bytes_down"] == 2 and kept[-1].error == "reset" and kept[-1].closed_at is not None
    assert log.summary() == {
        "sandbox_id": "sbx",
        "allowed": 3,
        "denied": 2,
        "bytes_up": 11,
        "bytes_down": 22,
        "next": 5,
    }
    with pytest.raises(ValueError):
        EgressLog("sbx", capacity=0)


def test_book_creates_gets_and_drops() -> None:
    book = EgressLogBook(capacity_per_sandbox=2)
    log = book.for_sandbox("a")
    assert book.for_sandbox("a") is log and book.get("a") is log and book.get("b") is None
    book.drop("a")
    book.drop("a")
    assert book.get("a") is None
