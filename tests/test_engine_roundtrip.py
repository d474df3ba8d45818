"""Whole images through the checkpoint path and the simulated hypervisor.

Random tmem states go through both layouts, both widths and both spec versions
and come back identical; a live save under a guest workload restores exactly
the state the source had at suspend, whatever the plan.
"""
from __future__ import annotations

import io
import random

import pytest

from xend_tmem import plugins
from xend_tmem import xen
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import StreamError, XendTmemError
from xend_tmem.hooks import hookimpl
from xend_tmem.hypervisor.sim import SimHypervisor

MAX64 = 2**64 - 1


def random_config(seed: int, version: int, memory: int = 4) -> dict:
    rnd = random.Random(seed)
    pools = []
    ids = sorted(rnd.sample(range(16), rnd.randint(1, 5)))
    for pid in ids:
        persistent = rnd.random() < 0.7
        shared = rnd.random() < 0.3
        pages = []
        for _ in range(rnd.randint(0, 6)):
            a = rnd.choice([0, 1, MAX64 - 1, rnd.getrandbits(64) % (MAX64 - 1)])
            oid = a if version == 0 else [a, rnd.choice([0, MAX64, rnd.getrandbits(64)]),
                                          rnd.choice([0, MAX64 - 1, rnd.getrandbits(64)])]
            index = rnd.choice([0, 1, 2**32 - 1, rnd.getrandbits(32)])
            page = {"oid": oid, "index": index}
            page.update({"fill": rnd.randrange(256)} if rnd.random() < 0.5 else {"seed": rnd.randrange(1000)})
            pages.append(page)
        pool = {"id": pid, "persistent": persistent, "shared": shared, "pagebits": 0,
                "uuid": [rnd.getrandbits(64), rnd.getrandbits(64)] if shared else [0, 0],
                "pages": pages}
        if persistent and rnd.random() < 0.3:
            pool["bulk"] = {"pages": rnd.randint(1, 300)}
        pools.append(pool)
    client = {"compress": rnd.random() < 0.5, "frozen": rnd.random() < 0.3,
              "weight": rnd.randrange(1000), "cap": rnd.randrange(1000)}
    return {"name": f"rt{seed}", "memory": memory, "vcpus": rnd.randint(1, 3),
            "tmem": {"version": version, "client": client, "pools": pools}}


def comparable(state: dict) -> dict:
    """Persistent pages and client settings; ephemeral pools present and empty."""
    pools = {}
    for pid, p in state["pools"].items():
        pools[pid] = (p["flags"] & 0xFF, tuple(p["uuid"]) if p["shared"] else None,
                      p["pages"] if p["persistent"] else {})
    return {"client": state["client"], "pools": pools}


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("layout", ["released", "seed"])
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_random_state_round_trip(seed, width, layout, version):
    cfg = parse_domain_config(random_config(seed * 7 + width + version, version))
    src = SimHypervisor(tmem_version=version)
    domid = src.create_domain(cfg)
    before = comparable(src.tmem_state(domid))
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"layout": layout}})
    buf = io.BytesIO()
    save_domain(src, domid, buf, hooks=hooks, live=False, width=width)
    # the source is thawed (and its frozen setting kept) after the save
    assert comparable(src.tmem_state(domid)) == before
    dst = SimHypervisor(tmem_version=version)
    buf.seek(0)
    newid, report = restore_domain(dst, buf, hooks=hooks, width=width)
    assert comparable(dst.tmem_state(newid)) == before
    assert dst.read_pages(newid, range(16)) == src.read_pages(domid, range(16))


class Workload:
    """Drives the guest between rounds and snapshots tmem at suspend."""

    def __init__(self, hv, domid):
        self.hv, self.domid, self.at_suspend = hv, domid, None

    @hookimpl(trylast=True)
    def checkpoint_save_after_round(self, session, round):
        # after the plugin's step of the round (late-freeze may freeze there),
        # as a running guest keeps going while tmem is sent
        self.hv.tick(self.domid, 0.2)

    @hookimpl(tryfirst=True)
    def checkpoint_save_after_suspend(self, session):
        self.at_suspend = comparable(self.hv.tmem_state(self.domid))


LIVE_CFG = {
    "name": "busy", "memory": 8, "vcpus": 2,
    "workload": {"ram_dirty_pages_per_s": 300, "tmem_puts_per_s": 400, "tmem_gets_per_s": 100,
                 "tmem_flushes_per_s": 150, "seed": 5},
    "tmem": {"version": 1, "client": {"weight": 3, "cap": 4},
             "pools": [
                 {"id": 0, "persistent": True, "shared": False, "pagebits": 0, "uuid": [0, 0],
                  "pages": [], "bulk": {"pages": 400, "objects": 20}},
                 {"id": 1, "persistent": False, "shared": False, "pagebits": 0, "uuid": [0, 0],
                  "pages": [], "bulk": {"pages": 50}},
                 {"id": 2, "persistent": True, "shared": True, "pagebits": 0, "uuid": [9, 9],
                  "pages": [], "bulk": {"pages": 100, "objects": 5}}]},
}


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("plan", ["precopy", "late-freeze", "after-suspend"])
def test_live_save_under_workload_restores_state_at_suspend(plan, frozen):
    cfg_map = dict(LIVE_CFG)
    cfg_map["tmem"] = dict(LIVE_CFG["tmem"], client={"weight": 3, "cap": 4, "frozen": frozen})
    src = SimHypervisor(tmem_version=1)
    domid = src.create_domain(parse_domain_config(cfg_map))
    src.tick(domid, 0.5)
    wl = Workload(src, domid)
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": plan}}, extra=[wl])
    buf = io.BytesIO()
    report = save_domain(src, domid, buf, hooks=hooks, live=True)
    tm = report["plugins"]["tmem"]
    assert tm["plan"] == plan and report["rounds"] >= 2
    if plan != "after-suspend" and not frozen:
        assert tm["invalidations"] > 0           # the workload deleted pages while frozen
    dst = SimHypervisor(tmem_version=1)
    buf.seek(0)
    newid, _ = restore_domain(dst, buf, hooks=plugins.get_plugin_manager(["tmem"], {}))
    assert comparable(dst.tmem_state(newid)) == wl.at_suspend
    assert dst.tmem_state(newid)["client"]["frozen"] is frozen
    # RAM at suspend went across too
    assert dst.read_pages(newid, range(0, 2048, 7)) == src.read_pages(domid, range(0, 2048, 7))


def test_failed_save_leaves_source_thawed_and_a_second_save_complete(mocker):
    cfg = parse_domain_config(LIVE_CFG)
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain(cfg)
    before = comparable(hv.tmem_state(domid))
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "precopy"}})

    class Full(io.RawIOBase):
        n = 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 300_000:
                raise OSError(28, "No space left on device")
            return len(b)

    with pytest.raises(OSError):
        save_domain(hv, domid, Full(), hooks=hooks, live=True)
    assert not hv.tmem_state(domid)["client"]["frozen"]
    assert hv.domain_info(domid).running
    buf = io.BytesIO()
    save_domain(hv, domid, buf, hooks=hooks, live=False, checkpoint=True)
    dst = SimHypervisor()
    buf.seek(0)
    newid, _ = restore_domain(dst, buf, hooks=hooks)
    assert comparable(dst.tmem_state(newid)) == before       # H2/H3: every page, first included


def saved_image(version=1, layout="released"):
    hv = SimHypervisor(tmem_version=version)
    domid = hv.create_domain(parse_domain_config(LIVE_CFG))
    buf = io.BytesIO()
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"layout": layout}})
    save_domain(hv, domid, buf, hooks=hooks, live=False)
    return buf.getvalue()


@pytest.mark.parametrize("cut", [10, 100, 2000, 30000, 200000, 900000, -5000, -1])
def test_truncated_image_leaves_no_domain(cut):
    data = saved_image()
    dst = SimHypervisor()
    hooks = plugins.get_plugin_manager(["tmem"], {})
    before = [d.domid for d in dst.list_domains()]
    with pytest.raises(StreamError):
        restore_domain(dst, io.BytesIO(data[:cut]), hooks=hooks)
    assert [d.domid for d in dst.list_domains()] == before


def test_restore_without_tmem_plugin_is_a_clear_error():
    dst = SimHypervisor()
    for layout in ("released", "seed"):
        with pytest.raises(StreamError, match="no plugin handles tmem|-5"):
            restore_domain(dst, io.BytesIO(saved_image(layout=layout)),
                           hooks=plugins.get_plugin_manager([], {}))
        assert [d.domid for d in dst.list_domains()] == [0]


def test_restore_other_spec_version_leaves_nothing():
    dst = SimHypervisor(tmem_version=0)
    with pytest.raises(XendTmemError, match="spec version"):
        restore_domain(dst, io.BytesIO(saved_image(version=1)),
                       hooks=plugins.get_plugin_manager(["tmem"], {}))
    assert [d.domid for d in dst.list_domains()] == [0]


def test_seed_layout_puts_tmem_before_p2m_size():
    minus5 = (-5).to_bytes(4, "little", signed=True)
    for layout, first in (("seed", True), ("released", False)):
        data = saved_image(layout=layout)
        start = 20 + int.from_bytes(data[16:20], "big")
        assert (data[start:start + 4] == minus5) is first


def test_restore_into_full_hypervisor_removes_everything():
    dst = SimHypervisor(tmem_capacity_pages=10)
    with pytest.raises(XendTmemError) as ei:
        restore_domain(dst, io.BytesIO(saved_image()), hooks=plugins.get_plugin_manager(["tmem"], {}))
    assert "\n" not in str(ei.value)
    assert [d.domid for d in dst.list_domains()] == [0]
    assert dst.tmem_free_pages() == 10


def test_cancel_during_the_tmem_send_stops_it_and_thaws(mocker):
    import threading
    from xend_tmem.errors import Cancelled
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain(parse_domain_config(LIVE_CFG))
    cancel = threading.Event()
    phases = []

    def progress(phase, done, total):
        phases.append(phase)
        if phase == "tmem" and done > 100_000:
            cancel.set()

    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "precopy"}})
    with pytest.raises(Cancelled):
        save_domain(hv, domid, io.BytesIO(), hooks=hooks, live=True, progress=progress,
                    cancel=cancel)
    assert "rounds" not in phases                   # stopped inside the tmem chunk
    state = hv.tmem_state(domid)
    assert not state["client"]["frozen"] and hv.domain_info(domid).running


def test_restore_skips_pages_that_carry_no_data():
    """Xen's batches may name pfns without data (XTAB, XALLOC, BROKEN)."""
    from xend_tmem.binio import StreamWriter
    from xend_tmem.codec import image, legacy
    buf = io.BytesIO()
    w = StreamWriter(buf)
    image.write_header(w, "(domain (name xt) (memory 1) (vcpus 1) (image (linux)))")
    legacy.write_p2m_size(w, 256, 8)
    legacy.write_pv_ext_info(w, 8, 5168)
    legacy.write_p2m_frame_list(w, 8, range(legacy.p2m_frame_count(256, 8)))
    legacy.write_page_batch(w, 8, [3, 4, 5, 6], [0, xen.TYPE_XTAB, 0, xen.TYPE_XALLOC],
                            b"\x11" * 4096 + b"\x22" * 4096)
    legacy.write_vcpu_info(w, 0, [0])
    legacy.write_end(w)
    legacy.write_pv_tail(w, 8, [], [bytes(5168)], bytes(4096))
    w.flush()
    buf.seek(0)
    hv = SimHypervisor()
    domid, report = restore_domain(hv, buf, hooks=plugins.get_plugin_manager(["tmem"], {}))
    assert hv.read_pages(domid, [3, 5]) == b"\x11" * 4096 + b"\x22" * 4096
    assert hv.read_pages(domid, [4]) == bytes(4096)
