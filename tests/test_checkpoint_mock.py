"""Call sequences and error paths of the save path, with a mocked hypervisor.

Every control op and every write is failed in turn (and interrupted with
KeyboardInterrupt): the done phase must run exactly once, SAVE_END must follow
every SAVE_BEGIN, and the guest must be resumed.
"""
from __future__ import annotations

import io
import struct

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import save_domain
from xend_tmem.errors import HypervisorError
from xend_tmem.hooks import hookimpl
from xend_tmem.hypervisor.interface import DomainInfo, HostInfo, Hypervisor
from xend_tmem.tmem import policy

P2M = 64
BIG_P2M = 16384          # 64 MiB: RAM rounds long enough for late-freeze to pay


def records(n: int, start: int = 0) -> bytes:
    return b"".join(struct.pack("<QQQI", 1, 2, start + i, i) + bytes([i]) * 4096 for i in range(n))


def make_hv(mocker):
    hv = mocker.create_autospec(Hypervisor, instance=True, name="hv")
    hv.host_info.return_value = HostInfo(backend="mock", xen_release="4.0.2",
                                         tmem_spec_version=1, tmem_capacity_pages=1 << 20,
                                         tmem_free_pages=1 << 20, can_move_tmem=True)
    hv.domain_info.return_value = DomainInfo(domid=3, name="web1", memory_mib=1, vcpus=1,
                                             running=True,
                                             config={"name": "web1", "memory": 1, "vcpus": 1})
    hv.p2m_size.return_value = P2M
    hv.read_pages.side_effect = lambda d, pfns: bytes(4096 * len(pfns))
    hv.map_foreign_range.return_value = None        # no mapping here: read_pages copies
    hv.read_and_clear_dirty.return_value = []
    hv.online_vcpus.return_value = [0]
    hv.get_vcpu_context.return_value = bytes(5168)
    hv.get_ext_vcpu_context.return_value = bytes(128)
    hv.get_vcpu_xsave.return_value = b""
    hv.get_shared_info.return_value = bytes(4096)
    hv.save_begin.return_value = True
    hv.save_get_version.return_value = 1
    hv.save_get_maxpools.return_value = 16
    hv.save_get_client_flags.return_value = 0
    hv.save_get_client_weight.return_value = 5
    hv.save_get_client_cap.return_value = 7
    hv.save_get_pool_flags.side_effect = lambda d, p: (1 | 1 << 24) if p == 0 else None
    hv.save_get_pool_npages.return_value = 3
    hv.save_get_pool_uuid.return_value = (0, 0)
    pages = iter([(3, records(3)), (0, b"")])
    hv.save_pages_lending.return_value = None       # lends nothing: save_get_pages copies
    hv.save_get_pages.side_effect = lambda d, p, n: next(pages, (0, b""))
    hv.save_get_invs.return_value = []
    return hv


class DoneCounter:
    def __init__(self):
        self.done = []

    @hookimpl
    def checkpoint_save_done(self, session, outcome):
        self.done.append(outcome)


def run_save(hv, live, out=None, plan="precopy"):
    counter = DoneCounter()
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": plan}}, extra=[counter])
    out = out or io.BytesIO()
    try:
        return save_domain(hv, 3, out, hooks=hooks, live=live), counter
    finally:
        run_save.counter = counter


def names(hv):
    return [c[0] for c in hv.mock_calls]


def test_nonlive_sequence(mocker):
    hv = make_hv(mocker)
    report, counter = run_save(hv, live=False)
    seq = names(hv)
    assert seq.index("suspend") < seq.index("save_begin") < seq.index("read_pages")
    assert hv.save_begin.call_args.args == (3, False)
    assert seq.count("save_end") == 1 and seq.index("save_end") > seq.index("get_shared_info")
    hv.resume.assert_not_called()
    assert len(counter.done) == 1 and counter.done[0].ok
    assert report["plugins"]["tmem"]["pages"] == 3


@pytest.mark.parametrize("plan", ["precopy", "late-freeze", "after-suspend"])
def test_live_sequence(mocker, plan):
    hv = make_hv(mocker)
    report, counter = run_save(hv, live=True, plan=plan)
    seq = names(hv)
    assert hv.save_begin.call_args.args == (3, True)
    assert seq.index("enable_logdirty") < seq.index("suspend")
    if plan == "precopy":
        assert seq.index("save_begin") < seq.index("read_pages")
    elif plan == "after-suspend":
        assert seq.index("suspend") < seq.index("save_begin")
    else:
        assert seq.index("read_pages") < seq.index("save_begin") < seq.index("suspend")
    assert seq.count("save_end") == 1 and seq[-1] in ("save_end", "disable_logdirty")
    assert "disable_logdirty" in seq
    assert report["plugins"]["tmem"]["plan"] == plan


TMEM_OPS = ["save_begin", "save_get_version", "save_get_maxpools", "save_get_client_flags",
            "save_get_client_weight", "save_get_client_cap", "save_get_pool_flags",
            "save_get_pool_npages", "save_get_pool_uuid", "save_get_pages", "save_get_invs"]
DOMAIN_OPS = ["read_pages", "enable_logdirty", "read_and_clear_dirty", "suspend",
              "online_vcpus", "get_vcpu_context", "get_shared_info"]


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("exc", [HypervisorError("op", "refused"), KeyboardInterrupt()],
                         ids=["refused", "ctrl-c"])
@pytest.mark.parametrize("op", TMEM_OPS + DOMAIN_OPS)
def test_each_op_failing_releases_everything(mocker, op, exc, live):
    hv = make_hv(mocker)
    if op in ("save_get_invs", "enable_logdirty", "read_and_clear_dirty") and not live:
        pytest.skip("non-live saves have no invalidation log and no log-dirty rounds")
    getattr(hv, op).side_effect = exc
    with pytest.raises(type(exc)):
        run_save(hv, live=live)
    counter = run_save.counter
    seq = names(hv)
    if op == "suspend" and not live:
        # a non-live save suspends before any plugin's setup: nothing to release
        assert counter.done == [] and "save_begin" not in seq
    else:
        assert len(counter.done) == 1 and not counter.done[0].ok
        assert counter.done[0].cancelled is isinstance(exc, KeyboardInterrupt)
    if "save_begin" in seq and op != "save_begin":
        assert seq.count("save_end") == 1
        assert seq.index("save_end") > max(i for i, n in enumerate(seq) if n == op)
    elif op == "save_begin":
        assert "save_end" not in seq        # SAVE_END is owed only after SAVE_BEGIN said 1
    if "suspend" in seq or not live:
        hv.resume.assert_called_once_with(3)
    if live and "enable_logdirty" in seq and op != "enable_logdirty":
        hv.disable_logdirty.assert_called_once_with(3)


class FailingWriter(io.RawIOBase):
    def __init__(self, limit, exc):
        self.limit, self.exc, self.n = limit, exc, 0

    def writable(self):
        return True

    def write(self, b):
        n = memoryview(b).nbytes
        if self.n + n > self.limit:
            raise self.exc
        self.n += n
        return n


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("limit", [0, 10, 200, 5000, 13000, 200000, 270000])
def test_each_write_failing_releases_everything(mocker, limit, live):
    hv = make_hv(mocker)
    with pytest.raises(OSError):
        run_save(hv, live=live, out=FailingWriter(limit, OSError(28, "No space left on device")))
    counter = run_save.counter
    assert len(counter.done) == 1
    seq = names(hv)
    assert seq.count("save_begin") == seq.count("save_end") or "save_begin" not in seq
    hv.resume.assert_called_once_with(3)


def test_plugin_done_failure_does_not_hide_thaw(mocker):
    hv = make_hv(mocker)
    hv.save_end.side_effect = HypervisorError("SAVE_END", "boom")
    with pytest.raises(HypervisorError, match="SAVE_END"):
        run_save(hv, live=False)
    hv.resume.assert_called_once_with(3)


def test_auto_plan_revised_with_measured_bandwidth(mocker):
    """200 MB of tmem: too slow for 1 s at the assumed 100 MB/s, so auto starts
    with late-freeze (64 MiB of RAM rounds first shorten precopy's freeze window);
    the first round measures the real link and after-suspend then fits."""
    hv = make_hv(mocker)
    hv.p2m_size.return_value = BIG_P2M
    hv.save_get_pool_npages.side_effect = [50_000, 3]   # sizing, then what the save finds
    hooks = plugins.get_plugin_manager(["tmem"], {})
    # the host's clock only: each reading 0.1 ms later, so round 1 "measures" ~GB/s
    ticks = iter(range(100_000))
    fake_time = mocker.patch("xend_tmem.checkpoint.time")
    fake_time.monotonic.side_effect = lambda: next(ticks) * 1e-4
    report = save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=True,
                         limits=policy.Limits(downtime_limit_ms=1000))
    tm = report["plugins"]["tmem"]
    assert tm["policy"]["alternatives"]["late-freeze"]["meets_limit"]
    assert tm["plan"] == "after-suspend" and "measured" in tm["reason"]
    assert tm["policy"]["inputs"]["bandwidth_source"] == "measured"
    seq = names(hv)
    assert seq.index("suspend") < seq.index("save_begin")


def test_auto_plan_keeps_late_freeze_on_a_slow_link(mocker):
    """100 Mbit/s configured: 200 MB of tmem take 16 s, 64 MiB of RAM 5 s; late-freeze
    sends RAM first and freezes tmem for ~16 s where precopy would for ~21 s."""
    hv = make_hv(mocker)
    hv.p2m_size.return_value = BIG_P2M
    hv.save_get_pool_npages.side_effect = [50_000, 3]   # sizing, then what the save finds
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"bandwidth-mbps": 100}})
    report = save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=True)
    tm = report["plugins"]["tmem"]
    assert tm["plan"] == "late-freeze" and "configured" in tm["reason"]
    alts = tm["policy"]["alternatives"]
    assert alts["late-freeze"]["est_freeze_ms"] < 0.9 * alts["precopy"]["est_freeze_ms"]
    seq = names(hv)
    assert seq.index("read_pages") < seq.index("save_begin") < seq.index("suspend")
