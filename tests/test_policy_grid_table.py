"""Policy v2 over issue 7's scenario table, on the model itself.

Cells: tmem 64 MiB .. 2 GiB, RAM 256 MiB .. 1 GiB, quiet / busy /
never-converging guests, 1 Gb/s and 10 Gb/s links. For every cell:

* ``auto`` meets the downtime limit wherever some plan does;
* with B the plan meeting the limit with the smallest freeze window (ties by
  total time), auto's freeze window is at most B's + 10 % (or 50 ms) and its
  total time at most 1.1 x B's;
* late-freeze is never chosen where it does not shorten precopy's freeze window;
* the decision carries its inputs and every plan's three estimates, as JSON;
* the stop rule, run round by round against the model's guest, stops within
  max-iters, max-total-s and 3 x p2m; goes silently only within the limit;
  warns (best-effort) naming the expected downtime, or aborts (strict) naming
  a limit that would have held.
"""
from __future__ import annotations

import itertools
import json
import math
from typing import Dict, List, Tuple

import pytest

from xend_tmem.tmem.policy import (PLANS, Limits, PlanChoice, Progress, Rates, choose_plan,
                                   dirtied_pages, should_stop)
from xend_tmem.xen import RAM_RECORD_BYTES, XEN_MAX_FACTOR

MiB = 1 << 20
LINKS = {"1Gb/s": 125e6, "10Gb/s": 1250e6}
TMEM_MIB = (64, 256, 1024, 2048)
RAM_MIB = (256, 1024)


def dirty_rate(guest: str, link_bps: float) -> float:
    """pages/s: quiet and busy are fixed; never-converging outruns the link twice."""
    return {"quiet": 50.0, "busy": 10_000.0,
            "never": 2 * link_bps / RAM_RECORD_BYTES}[guest]


CELLS: List[Tuple[str, int, int, str]] = list(itertools.product(
    LINKS, TMEM_MIB, RAM_MIB, ("quiet", "busy", "never")))


def cell_id(c: Tuple[str, int, int, str]) -> str:
    return f"{c[0]}-tmem{c[1]}-ram{c[2]}-{c[3]}"


def choice_for(cell: Tuple[str, int, int, str], limit_ms: float = 300.0,
               miss: str = "best-effort") -> Tuple[PlanChoice, Rates, Limits, int, int]:
    link, tmem, ram, guest = cell
    rates = Rates(LINKS[link], dirty_rate(guest, LINKS[link]), inv_per_s=200.0)
    limits = Limits(downtime_limit_ms=limit_ms, on_limit_miss=miss)
    return (choose_plan(tmem * MiB, ram * 256, rates, limits), rates, limits,
            tmem * MiB, ram * 256)


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_auto_against_the_best_fixed_plan(cell: Tuple[str, int, int, str]) -> None:
    c, _, _, _, _ = choice_for(cell)
    chosen = c.estimate()
    assert c.plan in PLANS and {e.plan for e in c.alternatives} == set(PLANS)
    meeting = [e for e in c.alternatives if e.meets_limit]
    if meeting:
        assert chosen.meets_limit, c.log_line()
        b = min(meeting, key=lambda e: (e.est_freeze_ms, e.est_total_ms))
        assert chosen.est_freeze_ms <= max(b.est_freeze_ms * 1.1, b.est_freeze_ms + 50), \
            c.log_line()
        assert chosen.est_total_ms <= 1.1 * b.est_total_ms, c.log_line()
    else:
        least = min(e.est_downtime_ms for e in c.alternatives)
        assert chosen.est_downtime_ms <= max(least * 1.1, least + 50), c.log_line()
        assert "no plan meets" in c.reason
    pre = c.estimate("precopy")
    if c.plan == "late-freeze" and pre.meets_limit:
        assert chosen.est_freeze_ms < pre.est_freeze_ms, c.log_line()


@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_estimates_are_consistent_with_the_plans(cell: Tuple[str, int, int, str]) -> None:
    c, rates, _, tmem, _ = choice_for(cell)
    by: Dict[str, object] = {e.plan: e for e in c.alternatives}
    after, late, pre = by["after-suspend"], by["late-freeze"], by["precopy"]
    t_tmem_ms = tmem / rates.bandwidth_bps * 1000
    assert after.est_freeze_ms == 0.0                        # type: ignore[attr-defined]
    assert after.est_downtime_ms >= t_tmem_ms                # type: ignore[attr-defined]
    for e in (late, pre):
        assert e.est_freeze_ms >= t_tmem_ms * 0.999          # type: ignore[attr-defined]
    for e in c.alternatives:
        assert 0 <= e.est_downtime_ms <= e.est_total_ms
        assert e.est_freeze_ms <= e.est_total_ms
        assert all(math.isfinite(v) for v in (e.est_downtime_ms, e.est_freeze_ms,
                                              e.est_total_ms))
    doc = json.loads(json.dumps(c.to_dict()))
    assert doc["plan"] == c.plan and doc["inputs"]["tmem_bytes"] == tmem
    assert set(doc["alternatives"]) == set(PLANS)
    for est in doc["alternatives"].values():
        assert {"est_downtime_ms", "est_freeze_ms", "est_total_ms"} <= set(est)
    assert doc["est_downtime_ms"] == doc["alternatives"][c.plan]["est_downtime_ms"]


def test_a_faster_link_never_estimates_more_downtime_or_freeze() -> None:
    for tmem, ram, guest in itertools.product(TMEM_MIB, RAM_MIB, ("quiet", "busy")):
        slow = choice_for(("1Gb/s", tmem, ram, guest))[0]
        fast = choice_for(("10Gb/s", tmem, ram, guest))[0]
        for plan in PLANS:
            s, f = slow.estimate(plan), fast.estimate(plan)
            assert f.est_downtime_ms <= s.est_downtime_ms + 1e-6, (tmem, ram, guest, plan)
            assert f.est_freeze_ms <= s.est_freeze_ms + 1e-6, (tmem, ram, guest, plan)


def test_late_freeze_loses_where_tmem_dwarfs_ram_under_a_heavy_guest() -> None:
    """Issue 7's measured case: 1 GiB of tmem, 256 MiB RAM, a heavy guest on 1 Gb/s:
    late-freeze's catch-up re-sends most of RAM, so its freeze window is no
    real gain and it takes longer in all: auto takes precopy."""
    for dirty in (10_000.0, 20_000.0):
        c = choose_plan(1024 * MiB, 256 * 256, Rates(125e6, dirty), Limits(300.0))
        late, pre = c.estimate("late-freeze"), c.estimate("precopy")
        assert late.est_total_ms > pre.est_total_ms
        assert c.plan == "precopy", c.log_line()
        assert "late-freeze" in c.reason


def test_small_tmem_on_a_fast_link_goes_after_suspend_and_freezes_nothing() -> None:
    c = choice_for(("10Gb/s", 64, 256, "quiet"))[0]
    assert c.plan == "after-suspend" and c.estimate().est_freeze_ms == 0.0
    assert "fits" in c.reason


# -- the stop rule, round by round, against the model's guest ------------------------

def run_rounds(cell: Tuple[str, int, int, str], miss: str, limit_ms: float = 300.0,
               max_iters: int = 29, max_total_s: float = 0.0):
    """A precopy-style migration of the cell's guest (tmem sent before the
    rounds, its invalidations pending after), stopped by should_stop only."""
    link, tmem, ram, guest = cell
    bw = LINKS[link]
    rates = Rates(bw, dirty_rate(guest, bw), inv_per_s=200.0)
    limits = Limits(limit_ms, miss, max_iters, max_total_s)
    pages = ram * 256
    t = tmem * MiB / bw
    to_send, sent, rounds = pages, 0, 0
    best = None
    history = []
    while True:
        dt = to_send * RAM_RECORD_BYTES / bw
        t += dt
        rounds += 1
        sent += to_send
        last = to_send
        to_send = int(math.ceil(dirtied_pages(pages, rates.dirty_pages_per_s, dt)))
        p = Progress(rounds, t, sent, to_send, pages, last, dt,
                     pending_invs=int(rates.inv_per_s * dt))
        d = should_stop(p, rates, limits, best)
        history.append((p, d))
        best = d.expected_downtime_ms if best is None else min(best, d.expected_downtime_ms)
        if d.stop:
            return d, history, limits
        assert rounds <= max_iters, "iterated past max-iters"


@pytest.mark.parametrize("miss", ["best-effort", "strict"])
@pytest.mark.parametrize("cell", CELLS, ids=cell_id)
def test_the_stop_rule_holds_the_limit_or_says_so(cell: Tuple[str, int, int, str],
                                                   miss: str) -> None:
    d, history, limits = run_rounds(cell, miss, max_total_s=60.0)
    p = history[-1][0]
    assert p.rounds <= limits.max_iters
    assert p.pages_sent <= XEN_MAX_FACTOR * p.ram_pages + p.ram_pages
    assert p.elapsed_s <= limits.max_total_s or p.rounds == 1
    for _, e in history[:-1]:
        assert e.action == "iterate" and not e.stop
    limit = limits.downtime_limit_ms
    if d.expected_downtime_ms <= limit:
        assert d.action == "go" and d.warning is None and "fits" in d.why
    elif miss == "strict":
        assert d.action == "abort" and d.warning is None
        assert d.workable_limit_ms is not None
        assert d.workable_limit_ms >= min(e.expected_downtime_ms for _, e in history)
        assert f"a limit of {d.workable_limit_ms} ms would have held" in d.why
    else:
        assert d.action == "go" and d.warning is not None
        assert f"expected downtime {d.expected_downtime_ms:.0f} ms" in d.warning \
            or f"expected downtime {d.expected_downtime_ms / 1000:.1f} s" in d.warning
    if cell[3] == "quiet":
        assert d.action == "go" and d.warning is None       # quiet guests always make it


def test_a_never_converging_guest_is_not_iterated_29_times() -> None:
    d, history, _ = run_rounds(("1Gb/s", 64, 1024, "never"), "best-effort")
    assert len(history) < 5 and "not converging" in d.why and d.warning


def test_max_iters_and_max_total_s_are_ceilings() -> None:
    d, history, _ = run_rounds(("1Gb/s", 64, 1024, "busy"), "best-effort", limit_ms=1,
                               max_iters=4)
    assert len(history) <= 4
    d, history, _ = run_rounds(("1Gb/s", 64, 1024, "busy"), "strict", limit_ms=1,
                               max_total_s=0.5)
    assert d.action == "abort"
