"""Lease admission planning: pure decisions, no containers."""

from __future__ import annotations

import pytest

from sparkd.scheduler.lease import Holder, Lease, plan


def holder(name, claim, lifecycle="normal", in_flight=0, last_used=0.0, leaving=False, sleep_claim=None):
    return Holder(name, claim, lifecycle, in_flight, last_used, leaving, sleep_claim)


def test_lease_never_exceeds_budget():
    lease = Lease(0.94)
    lease.grant("a", 0.8)
    assert not lease.fits(0.2)
    with pytest.raises(ValueError):
        lease.grant("b", 0.2)
    lease.grant("a", 0.1)  # shrinking a share (sleep) is allowed
    assert lease.fits(0.8)
    lease.release("a")
    assert lease.free == pytest.approx(0.94)


def test_a_share_may_shrink_under_a_budget_a_reload_lowered():
    lease = Lease(0.94)
    lease.grant("a", 0.8)
    lease.grant("b", 0.1)
    lease.budget = 0.3  # a reload: the holders keep their shares until they go
    lease.grant("a", 0.5)  # a goes to sleep: still over the new budget, but closer
    assert lease.holders == {"a": 0.5, "b": 0.1}
    with pytest.raises(ValueError):
        lease.grant("b", 0.2)  # growing is refused


def test_admit_when_it_fits():
    assert plan("b", 0.05, "utility", 0.0, [holder("a", 0.8)], 0.94).verdict == "admit"


def test_swap_evicts_the_holder():
    decision = plan("b", 0.8, "normal", 0.0, [holder("a", 0.8), holder("u", 0.05, "utility")], 0.94)
    assert decision.verdict == "evict"
    assert [e.name for e in decision.evictions] == ["a"]  # the utility model stays


def test_idle_before_busy_and_least_recently_used_first():
    holders = [holder("busy", 0.3, in_flight=2, last_used=1.0), holder("old", 0.3, last_used=1.0), holder("new", 0.3, last_used=5.0)]
    decision = plan("x", 0.3, "normal", 0.0, holders, 0.94)
    assert [e.name for e in decision.evictions] == ["old"]
    decision = plan("x", 0.6, "normal", 0.0, holders, 0.94)
    assert [e.name for e in decision.evictions] == ["old", "new"]


def test_exclusive_evicts_everyone_including_utility():
    decision = plan("x", 0.94, "exclusive", 0.0, [holder("a", 0.3), holder("u", 0.05, "utility")], 0.94)
    assert decision.verdict == "evict"
    assert {e.name for e in decision.evictions} == {"a", "u"}


def test_exclusive_holder_is_evicted_for_a_normal_model():
    decision = plan("a", 0.8, "normal", 0.0, [holder("x", 0.94, "exclusive")], 0.94)
    assert [e.name for e in decision.evictions] == ["x"]


def test_pinned_models_are_never_evicted():
    decision = plan("a", 0.8, "normal", 0.0, [holder("p", 0.5, "pinned")], 0.94)
    assert decision.verdict == "impossible"
    assert "pinned" in decision.reason


def test_wait_when_a_stopping_holder_frees_enough():
    assert plan("b", 0.8, "normal", 0.0, [holder("a", 0.8, leaving=True)], 0.94).verdict == "wait"


def test_sleep_when_sleeping_frees_enough_else_stop():
    holders = [holder("a", 0.8, sleep_claim=0.05)]
    decision = plan("b", 0.8, "normal", 0.0, holders, 0.94)
    assert [(e.name, e.action) for e in decision.evictions] == [("a", "sleep")]
    decision = plan("b", 0.92, "normal", 0.0, holders, 0.94)
    assert [(e.name, e.action) for e in decision.evictions] == [("a", "stop")]


def test_claim_above_budget_is_impossible():
    assert plan("huge", 0.99, "normal", 0.0, [], 0.94).verdict == "impossible"


def test_waking_model_needs_only_the_difference():
    # b sleeps holding 0.05 and wants 0.8 back; a holds 0.1: 0.05 + 0.1 + 0.75 <= 0.94
    assert plan("b", 0.8, "normal", 0.05, [holder("b", 0.05), holder("a", 0.1)], 0.94).verdict == "admit"
