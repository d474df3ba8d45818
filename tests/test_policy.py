"""The migration policy is a pure function: unit-tested on its own."""
from __future__ import annotations

import dataclasses

import pytest

from xend_tmem.errors import ConfigError
from xend_tmem.tmem import policy
from xend_tmem.tmem.settings import parse_settings
from xend_tmem import xen

MiB = 1 << 20


def test_settings_seed_layout_forces_precopy():
    s = parse_settings({"layout": "seed"})
    assert s.plan == "precopy"
    s = parse_settings({"bandwidth-mbps": 800, "downtime-limit-ms": 50})
    assert s.bandwidth_bps == 100e6
    with pytest.raises(ConfigError, match=r"tmem\.downtime-limit-ms: must be at least 1"):
        parse_settings({"downtime-limit-ms": 0})


# -- policy v2: the stop rule and its inputs ------------------------------------------

def progress(dirty=1000, rounds=3, ram_pages=65536, tmem_after=0, before=0, invs=0,
             elapsed=5.0, sent=100_000, last=2000):
    return policy.Progress(rounds=rounds, elapsed_s=elapsed, pages_sent=sent,
                           dirty_pages=dirty, ram_pages=ram_pages, last_round_pages=last,
                           last_round_s=0.1, tmem_after_bytes=tmem_after,
                           before_bytes=before, pending_invs=invs)


def test_expected_downtime_counts_ram_tmem_invalidations_and_the_tail():
    rates = policy.Rates(100e6, overhead_ms=5.0)
    p = progress(dirty=1000, tmem_after=10 * MiB, invs=1000)
    want = (1000 * xen.RAM_RECORD_BYTES + 10 * MiB + 1000 * xen.INV_RECORD_BYTES
            + policy.TAIL_BYTES) / 100e6 * 1000 + 5.0
    assert policy.expected_downtime_ms(p, rates) == pytest.approx(want)


def test_should_stop_is_re_estimated_from_the_measured_bandwidth():
    limits = policy.Limits(300)
    p = progress(dirty=5000)                                  # ~20.5 MB
    fast = policy.should_stop(p, policy.Rates(1000e6, 100), limits)
    slow = policy.should_stop(p, policy.Rates(20e6, 100), limits)
    assert fast.stop and fast.action == "go" and "fits" in fast.why
    assert not slow.stop and slow.action == "iterate" and "exceeds" in slow.why
    assert slow.expected_downtime_ms > 300 > fast.expected_downtime_ms


def test_tmem_after_suspend_beyond_the_limit_aborts_under_strict_naming_a_limit():
    rates = policy.Rates(100e6, 100)
    p = progress(dirty=10, tmem_after=100 * MiB)              # ~1.05 s of tmem after suspend
    d = policy.should_stop(p, rates, policy.Limits(300, "strict"))
    assert d.stop and d.action == "abort" and d.workable_limit_ms >= d.expected_downtime_ms
    assert f"a limit of {d.workable_limit_ms} ms would have held" in d.why
    assert "MiB of tmem" in d.why
    b = policy.should_stop(p, rates, policy.Limits(300, "best-effort"))
    assert b.action == "go" and b.stop and str(round(b.expected_downtime_ms)) in b.warning
    # the best earlier round names the limit that would have held then
    d2 = policy.should_stop(p, rates, policy.Limits(300, "strict"), best_expected_ms=400.0)
    assert d2.workable_limit_ms == 440


def test_bytes_owed_before_suspend_keep_iterating_until_a_ceiling():
    rates = policy.Rates(100e6, 100)
    p = progress(dirty=10, before=200 * MiB)
    assert policy.should_stop(p, rates, policy.Limits(300)).action == "iterate"
    d = policy.should_stop(progress(dirty=10, before=200 * MiB, rounds=29), rates,
                           policy.Limits(300))
    assert d.stop and "max-iters 29" in d.why and d.warning


def test_xen_rule_is_the_fallback_without_a_limit():
    rates = policy.Rates(100e6)
    xen = policy.Limits(downtime_limit_ms=None)
    assert not policy.should_stop(progress(last=50), rates, xen).stop
    d = policy.should_stop(progress(last=49), rates, xen)
    assert d.stop and "< 50" in d.why
    assert policy.should_stop(progress(last=5000, rounds=29), rates, xen).stop
    assert policy.should_stop(progress(last=5000, sent=3 * 65536), rates, xen).stop
    assert "3 x p2m_size" in policy.should_stop(progress(last=5000, sent=3 * 65536),
                                                rates, xen).why


def test_max_total_s_counts_the_next_round():
    rates = policy.Rates(100e6, 100)
    limits = policy.Limits(1, "best-effort", max_total_s=10)
    assert not policy.should_stop(progress(dirty=20_000, elapsed=5.0), rates, limits).stop
    d = policy.should_stop(progress(dirty=20_000, elapsed=9.5), rates, limits)  # +0.82 s
    assert d.stop and "max-total-s" in d.why


def test_limits_are_validated():
    with pytest.raises(ValueError, match="on_limit_miss"):
        policy.Limits(300, "sometimes")
    with pytest.raises(ValueError, match="max_iters"):
        policy.Limits(300, max_iters=0)


def test_round_window_measures_rates_over_the_latest_rounds_under_the_cap():
    w = policy.RoundWindow(rounds=2)
    assert w.rates(fallback_bps=50e6).source == "assumed"
    assert w.rates(fallback_bps=50e6, cap_bps=10e6).bandwidth_bps == 10e6
    w.add(100_000_000, 10.0, 9999, 10.0, 0)                   # dropped: window of 2
    w.add(30_000_000, 1.0, 1000, 1.0, 10)
    w.add(10_000_000, 1.0, 3000, 1.0, 30)
    r = w.rates()
    assert r.source == "measured" and r.bandwidth_bps == 20e6
    assert r.dirty_pages_per_s == 2000 and r.inv_per_s == 20
    assert w.rates(cap_bps=12.5e6).bandwidth_bps == 12.5e6


def test_late_freeze_now_waits_for_ram_and_leaves_a_catch_up_round():
    rates, limits = policy.Rates(100e6, 100), policy.Limits(300)
    assert policy.late_freeze_now(progress(dirty=100_000), rates, limits) is None
    assert "RAM is ready" in policy.late_freeze_now(progress(dirty=100), rates, limits)
    assert "round 28" in policy.late_freeze_now(progress(dirty=100_000, rounds=28), rates,
                                                limits)


def test_re_estimating_mid_migration_leaves_precopy_out():
    start = progress(dirty=3000, rounds=1, elapsed=2.0, sent=65536)
    c = policy.choose_plan(200 * MiB, 65536, policy.Rates(1000e6, 500), policy.Limits(300),
                           start=start)
    assert {e.plan for e in c.alternatives} == {"after-suspend", "late-freeze"}
    assert c.plan == "after-suspend" and c.inputs["rounds_done"] == 1
    assert c.estimate().est_total_ms > 2000            # counts the time already spent


def test_a_fixed_precopy_is_re_estimated_mid_migration_as_frozen_since_the_start():
    start = progress(dirty=3000, rounds=2, elapsed=4.0, sent=70_000)
    c = policy.choose_plan(200 * MiB, 65536, policy.Rates(100e6, 500), policy.Limits(300),
                           requested="precopy", start=start)
    e = c.estimate()
    assert c.plan == "precopy" and e.est_freeze_ms > 4000 and e.meets_limit
    assert e.est_total_ms == pytest.approx(e.est_freeze_ms + e.est_downtime_ms)


def test_late_freeze_now_gives_up_on_a_guest_that_never_converges():
    rates = policy.Rates(100e6, 1e6)                          # dirties far faster than sent
    why = policy.late_freeze_now(progress(dirty=60_000), rates, policy.Limits(300))
    assert why is not None and why.startswith("RAM will not get better (RAM is not converging")


# -- what the grid found missing: margin, receiver backlog, restore cost ------------

def test_a_go_within_the_margin_of_the_limit_is_warned_about():
    """bigram-busy-10g: 255 ms expected, over 300 ms measured, no warning. A go
    whose estimate plus its margin passes the limit warns before the suspend."""
    limits = policy.Limits(300)
    p = progress(dirty=10, tmem_after=26 * MiB)               # ~274 ms at 100 MB/s
    d = policy.should_stop(p, policy.Rates(100e6), limits)
    assert d.stop and d.action == "go" and d.expected_downtime_ms <= 300
    assert d.warning and "may exceed the 300 ms limit" in d.warning and "25%" in d.warning
    far = policy.should_stop(progress(dirty=10, tmem_after=16 * MiB), policy.Rates(100e6),
                             limits)
    assert far.action == "go" and far.warning is None         # ~169 ms: 211 ms with margin
    # a measured spread of the rates widens the margin
    spread = policy.Rates(100e6, spread=0.5)
    assert spread.margin() == 1.0
    assert policy.should_stop(progress(dirty=10, tmem_after=16 * MiB), spread,
                              limits).warning                 # 169 ms: 338 ms with margin


def test_round_window_spread_is_the_bandwidth_scatter_under_the_cap():
    w = policy.RoundWindow(3)
    w.add(100_000_000, 1.0, 10, 1.0)
    assert w.rates().spread == 0.0                            # one round: nothing to scatter
    w.add(50_000_000, 1.0, 10, 1.0)
    assert w.rates().spread == pytest.approx(25e6 / 75e6)
    assert w.rates(cap_bps=40e6).spread == 0.0                # both rounds at the cap


def test_bytes_the_receiver_has_not_taken_are_downtime():
    rates = policy.Rates(100e6)
    base = progress(dirty=0)
    queued = dataclasses.replace(base, in_flight_bytes=1_000_000)
    assert policy.expected_downtime_ms(queued, rates) == pytest.approx(
        policy.expected_downtime_ms(base, rates) + 10.0)


def test_over_the_limit_anyway_best_effort_still_sends_ram_that_shrinks():
    """The demo: the destination's digest alone needs more than the limit. Under
    best-effort a round that shrinks RAM's part of the downtime still runs (the
    least downtime is the goal then); strict aborts at once."""
    rates = policy.Rates(100e6, dirty_pages_per_s=100.0, overhead_ms=1000.0)
    p = progress(dirty=4096)                                  # ~168 ms of RAM
    d = policy.should_stop(p, rates, policy.Limits(300))
    assert d.action == "iterate"
    s = policy.should_stop(p, rates, policy.Limits(300, "strict"))
    assert s.action == "abort" and "1000 ms of handover and restore" in s.why
    done = policy.should_stop(progress(dirty=40), rates, policy.Limits(300))
    assert done.action == "go" and done.warning and "exceeds the 300 ms limit" in done.warning


def test_a_fit_without_margin_iterates_while_ram_still_shrinks():
    """strict-busy-1g: late-freeze expected 245-290 ms under a 300 ms limit and
    measured 283-305. While a round still cuts RAM's part, the stop rule goes on
    until the estimate fits with its margin; once it cannot, it goes and warns."""
    rates = policy.Rates(10e6, dirty_pages_per_s=100.0)
    limits = policy.Limits(300)
    p = progress(dirty=600, ram_pages=65536)                  # ~253 ms, shrinking fast
    d = policy.should_stop(p, rates, limits)
    assert d.action == "iterate" and "not with the estimate's margin" in d.why
    assert policy.should_stop(progress(dirty=300), rates, limits).action == "go"   # ~130 ms
    # a guest that never converges gains nothing from another round: go, warned
    never = policy.Rates(10e6, dirty_pages_per_s=100_000.0)
    g = policy.should_stop(p, never, limits)
    assert g.action == "go" and g.warning and "may exceed" in g.warning
    # at a ceiling too
    c = policy.should_stop(progress(dirty=600, rounds=29), rates, limits)
    assert c.action == "go" and c.warning
