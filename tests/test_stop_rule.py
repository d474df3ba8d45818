"""The host's stop rule wired into the save path (issue 7 item 2).

A mocked hypervisor whose dirty log says what the guest dirtied each round, a
rate cap that makes the link slow enough for the limit to matter, and the
report fields the save returns. One in-process simulator run checks that a
strict abort leaves the real source running with its tmem thawed.
"""
from __future__ import annotations

import io
import logging
import re
import time

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import SaveError
from xend_tmem.hooks import hookimpl
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.tmem import policy
from xend_tmem import xen

from test_checkpoint_mock import P2M, names
from test_checkpoint_mock import make_hv as mock_hv

CAP = 1e6             # 1 MB/s: one dirty page costs ~4 ms of downtime


@pytest.fixture
def link(mocker):
    """A clock that moves only as pages go out at the rate cap, as over a capped
    link: rounds take as long as their pages need, so rates are as measured there."""
    clock = [100.0]
    fake = mocker.Mock()
    fake.monotonic.side_effect = lambda: clock[0]
    mocker.patch("xend_tmem.checkpoint.time", fake)
    mocker.patch("xend_tmem.tmem.save.time", fake)
    return clock


def make_hv(mocker, clock):
    """The mocked hypervisor whose pages take their time at the cap."""
    hv = mock_hv(mocker)

    def read(d, pfns):
        clock[0] += len(pfns) * xen.RAM_RECORD_BYTES / CAP
        return bytes(4096 * len(pfns))
    hv.read_pages.side_effect = read
    return hv


def dirty_log(hv, rounds):
    """The pages the guest dirtied per round, then none (the final read too)."""
    seq = iter(rounds)
    hv.read_and_clear_dirty.side_effect = lambda d: list(next(seq, []))


def save(hv, limits, plan="precopy", settings=None):
    hooks = plugins.get_plugin_manager(["tmem"], settings or {"tmem": {"plan": plan}})
    return save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=True, limits=limits,
                       rate_cap_bps=CAP)


def test_iterates_while_the_expected_downtime_exceeds_the_limit(mocker, link):
    hv = make_hv(mocker, link)
    hv.p2m_size.return_value = 1024
    # 600, 200, then no dirty pages: ~2.5 s, ~0.9 s and 65 ms expected at 1 MB/s;
    # the guest dirties 3 more while it is being suspended
    dirty_log(hv, [range(600), range(200), [], range(3), []])
    report = save(hv, policy.Limits(downtime_limit_ms=100))
    assert report["rounds"] == 4          # three live rounds and the one after suspend
    assert report["est_downtime_ms"] <= 100
    assert report["last_round_pages"] == 3
    assert "warnings" not in report


def test_without_a_limit_xen_s_rule_stops_after_a_round_under_50_pages(mocker, link):
    hv = make_hv(mocker, link)
    dirty_log(hv, [range(60), []])
    report = save(hv, policy.Limits(downtime_limit_ms=None))
    # rounds of 64, 60 and 0 pages (the first under 50), then the one after suspend
    assert report["rounds"] == 4 and report["last_round_pages"] == 0


def test_max_iters_caps_the_rounds(mocker, link):
    hv = make_hv(mocker, link)
    hv.read_and_clear_dirty.side_effect = lambda d: list(range(60))   # never converges
    report = save(hv, policy.Limits(downtime_limit_ms=10_000, max_iters=3))
    assert report["rounds"] == 2          # 60 pages fit 10 s: the first round is enough
    hv = make_hv(mocker, link)
    # every page, every round: ~330 ms expected against 100, converging too slowly
    # to be given up on, until the third round
    hv.read_and_clear_dirty.side_effect = lambda d: list(range(P2M))
    report = save(hv, policy.Limits(downtime_limit_ms=100, max_iters=3))
    assert report["rounds"] == 4
    assert any("max-iters 3" in w for w in report["warnings"])


def test_strict_aborts_before_suspend_naming_a_limit_that_would_have_held(mocker, link):
    hv = make_hv(mocker, link)
    hv.read_and_clear_dirty.side_effect = lambda d: list(range(P2M))  # every page, always
    with pytest.raises(SaveError, match=r"a limit of \d+ ms would have held") as err:
        save(hv, policy.Limits(downtime_limit_ms=50, on_limit_miss="strict"))
    assert "not suspended" in str(err.value)
    seq = names(hv)
    assert "suspend" not in seq
    # precopy froze tmem before round 1: the done phase thawed it
    assert seq.count("save_begin") == 1 and seq.count("save_end") == 1
    assert "disable_logdirty" in seq


def test_best_effort_warns_before_suspend_and_reports_the_warning(mocker, caplog, link):
    hv = make_hv(mocker, link)
    hv.read_and_clear_dirty.side_effect = lambda d: list(range(P2M))
    warned_at_suspend = []
    hv.suspend.side_effect = lambda d: warned_at_suspend.append(
        any(r.levelno == logging.WARNING for r in caplog.records))
    with caplog.at_level(logging.INFO, logger="xend_tmem"):
        report = save(hv, policy.Limits(downtime_limit_ms=50))
    assert warned_at_suspend == [True]
    [warning] = report["warnings"]
    assert "expected downtime" in warning and "50 ms limit" in warning
    assert report["est_downtime_ms"] > 50
    # the estimate was logged every round
    assert sum("expected downtime" in r.getMessage() for r in caplog.records
               if "round" in r.getMessage()) >= report["rounds"] - 1


def test_report_fields_and_estimates(mocker, caplog, link):
    hv = make_hv(mocker, link)
    dirty_log(hv, [range(10), []])
    with caplog.at_level(logging.INFO, logger="xend_tmem"):
        report = save(hv, policy.Limits(downtime_limit_ms=300))
    for key in ("downtime_ms", "freeze_ms", "total_ms", "last_round_pages", "est_downtime_ms",
                "est_freeze_ms", "suspended_mono"):
        assert key in report, key
    assert "downtime_s" not in report and "resumed_after_s" not in report
    assert 0 < report["downtime_ms"] <= report["total_ms"]
    tm = report["plugins"]["tmem"]
    assert tm["plan"] == "precopy" and report["freeze_ms"] == tm["freeze_ms"] > 0
    assert report["est_freeze_ms"] == tm["est_freeze_ms"]
    pol = tm["policy"]
    assert pol["plan"] == "precopy" and pol["inputs"]["downtime_limit_ms"] == 300
    assert set(pol["alternatives"]) >= {"precopy"}
    assert any(r.getMessage().endswith("]") and "tmem plan precopy" in r.getMessage()
               for r in caplog.records)                     # c.log_line()


def test_the_rate_cap_bounds_the_bandwidth_the_estimates_use(mocker, link):
    hv = mock_hv(mocker)             # pages take no time: the link "measures" ~infinite
    dirty_log(hv, [range(10), []])
    report = save(hv, policy.Limits(downtime_limit_ms=300))
    # 10 pages and the tail at the 1 MB/s cap, not at the BytesIO's GB/s
    assert report["est_downtime_ms"] >= (10 * xen.RAM_RECORD_BYTES
                                         + policy.TAIL_BYTES) / CAP * 1000 - 1


def test_a_non_live_save_reports_downtime_as_the_whole_save(mocker, link):
    hv = make_hv(mocker, link)
    hooks = plugins.get_plugin_manager(["tmem"], {})
    report = save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=False)
    assert report["downtime_ms"] > 0 and report["est_downtime_ms"] is None
    assert report["freeze_ms"] == 0.0 and report["est_freeze_ms"] is None


class Guest:
    """Runs the in-process guest between rounds: RAM dirtied faster than the limit allows."""

    def __init__(self, hv, domid):
        self.hv, self.domid = hv, domid

    @hookimpl(trylast=True)
    def checkpoint_save_after_round(self, session, round):
        self.hv.tick(self.domid, 0.5)


def test_strict_abort_leaves_the_simulated_source_running_and_thawed():
    cfg = {"name": "busy", "memory": 8, "vcpus": 1,
           "workload": {"ram_dirty_pages_per_s": 4000, "tmem_puts_per_s": 100, "seed": 3},
           "tmem": {"version": 1, "client": {"weight": 1, "cap": 1},
                    "pools": [{"id": 0, "persistent": True, "shared": False, "pagebits": 0,
                               "uuid": [0, 0], "pages": [], "bulk": {"pages": 200}}]}}
    hv = SimHypervisor(tmem_version=1)
    try:
        domid = hv.create_domain(parse_domain_config(cfg))
        hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "precopy"}},
                                           extra=[Guest(hv, domid)])
        with pytest.raises(SaveError, match="on-limit-miss: strict"):
            save_domain(hv, domid, io.BytesIO(), hooks=hooks, live=True, rate_cap_bps=CAP,
                        limits=policy.Limits(downtime_limit_ms=20, on_limit_miss="strict"))
        assert hv.domain_info(domid).running
        assert hv.tmem_state(domid)["client"]["frozen"] is False
        assert hv.guest_put(domid, 0, (1, 2, 3), 7, bytes(4096))   # puts work again
    finally:
        hv.close()


def test_the_hypervisor_logs_suspend_and_unpause_on_the_monotonic_clock(caplog):
    hv = SimHypervisor(tmem_version=1)
    try:
        d = hv.create_domain(parse_domain_config({"name": "q", "memory": 4, "vcpus": 1}))
        before = time.monotonic()
        with caplog.at_level(logging.INFO, logger="xend_tmem.hypervisor"):
            hv.suspend(d)
            hv.resume(d)
            hv.pause(d)
            hv.unpause(d)
        after = time.monotonic()
        seen = {m.group(1): float(m.group(2)) for r in caplog.records
                for m in [re.fullmatch(rf"domain {d} (\w+) at mono=([0-9.]+)", r.getMessage())]
                if m}
        assert set(seen) == {"suspended", "stopped", "resumed", "unpaused"}
        assert (before <= seen["suspended"] <= seen["stopped"] <= seen["resumed"]
                <= seen["unpaused"] <= after)
    finally:
        hv.close()
