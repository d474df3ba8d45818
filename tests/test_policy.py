"""The migration policy is a pure function: unit-tested on its own."""
from __future__ import annotations

import pytest

from xend_tmem.tmem import policy
from xend_tmem.tmem.settings import parse_settings

MiB = 1 << 20


def inputs(tmem_mib, bw_mbs=100.0, limit_ms=300, ram_mib=256, dirty=0.0):
    return policy.PolicyInputs(tmem_bytes=int(tmem_mib * MiB), ram_bytes=ram_mib * MiB,
                               downtime_limit_s=limit_ms / 1000,
                               bandwidth_bps=bw_mbs * 1e6 if bw_mbs else None,
                               dirty_rate_bps=dirty)


def test_small_tmem_goes_after_suspend():
    d = policy.decide(inputs(4))
    assert d.plan == "after-suspend"
    assert d.est_freeze_s == 0.0 and d.est_downtime_s <= 0.3
    assert "fits" in d.reason


def test_large_tmem_late_freeze_has_smaller_freeze_window():
    inp = inputs(1024, dirty=20e6)
    d = policy.decide(inp)
    assert d.plan == "late-freeze"
    assert policy.estimate("late-freeze", inp).est_freeze_s < policy.estimate("precopy", inp).est_freeze_s
    assert "freezes" in d.reason


def test_downtime_limit_comes_first():
    # 20 MiB at 100 MB/s ~ 0.21 s: fits a 300 ms limit but not a 100 ms one
    assert policy.decide(inputs(20, limit_ms=300)).plan == "after-suspend"
    assert policy.decide(inputs(20, limit_ms=100)).plan != "after-suspend"


def test_faster_link_moves_to_after_suspend():
    assert policy.decide(inputs(200, bw_mbs=100)).plan != "after-suspend"
    assert policy.decide(inputs(200, bw_mbs=10000)).plan == "after-suspend"


def test_configured_plan_is_kept_and_no_tmem_is_trivial():
    assert policy.decide(inputs(1024), "precopy").plan == "precopy"
    d = policy.decide(inputs(0), "precopy")
    assert d.plan == "after-suspend" and "no persistent tmem" in d.reason


def test_unmeetable_limit_picks_least_downtime():
    d = policy.decide(inputs(4096, limit_ms=1))
    assert d.plan in ("late-freeze", "precopy")
    assert "no plan meets" in d.reason


@pytest.mark.parametrize("converged,rnd,sent,due", [
    (True, 1, 100, True), (False, 3, 100, False), (False, 27, 100, True),
    (False, 5, 2600, True)])
def test_late_freeze_due(converged, rnd, sent, due):
    assert bool(policy.late_freeze_due(converged, rnd, sent, 29, 3000)) is due


def test_settings_seed_layout_forces_precopy():
    s = parse_settings({"layout": "seed"})
    assert s.plan == "precopy"
    s = parse_settings({"bandwidth-mbps": 800, "downtime-limit-ms": 50})
    assert s.bandwidth_bps == 100e6 and s.downtime_limit_s == 0.05
