"""Xen release profiles and the defect switches, and the plugin on top of them.

The simulator rules of issue #6 item 3, one by one on a small domain; then a
save per defect (H1, H2, H3 with the switch on, H8 on a 4.4 profile), live and
not: it either fails with an error naming the defect or writes a stream that
restores, on a fixed hypervisor, to exactly the state saved. Last, SAVE_END
is owed only after a SAVE_BEGIN that returned True (autospec'd hypervisor).
"""
from __future__ import annotations

import errno
import io
import os
import re
import struct
import zlib
from typing import Dict, List, Optional

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import HypervisorError, SaveError, StreamError, XendTmemError
from xend_tmem.hooks import hookimpl
from xend_tmem.binio import StreamReader, StreamWriter
from xend_tmem.hypervisor.interface import DomainInfo, HostInfo, Hypervisor
from xend_tmem.hypervisor.profiles import make_profile
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.tmem.restore import TmemRestorer
from xend_tmem.tmem.save import TmemWriter
from xend_tmem.xen import EFROZEN

A5, CD = 0xA5A5A5A5A5A5A5A5, 0x0123456789ABCDEF
V1P = 0x01000001


def oid(n: int):
    return (n, A5, CD)


def page(b: int) -> bytes:
    return bytes((b,)) * 4096


def domain(hv: SimHypervisor, *, frozen: bool = False, pages: int = 3, ephemeral_only: bool = False,
           name: str = "d") -> int:
    """Persistent pool 0 with ``pages`` pages (put order oid(1)/0, oid(1)/1 ...),
    an ephemeral pool 1, and a private persistent pool 2 with a uuid."""
    version = hv.tmem_version()
    o = 1 if version == 0 else list(oid(1))
    pools: List[Dict] = [{"id": 1, "persistent": False, "pages": [{"oid": o, "index": 0, "fill": 9}]}]
    if not ephemeral_only:
        pools.insert(0, {"id": 0, "persistent": True,
                         "pages": [{"oid": o, "index": i, "fill": i + 1} for i in range(pages)]})
        pools.append({"id": 2, "persistent": True, "uuid": [5, 6],
                      "pages": [{"oid": o, "index": 7, "seed": 3}]})
    cfg = {"name": name, "memory": 4,
           "tmem": {"version": version, "pools": pools,
                    "client": {"weight": 3, "cap": 4, "compress": True, "frozen": frozen}}}
    return hv.create_domain(parse_domain_config(cfg))


def walk(hv: SimHypervisor, d: int, pool: int) -> list:
    out = []
    while True:
        r = hv.save_get_next_page(d, pool)
        if r is None:
            return out
        out.append((r[0], r[1]))
        assert len(out) < 1000


# ---------------------------------------------------------------------------
# the profile itself
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("release,spec,reports,copies", [
    ("4.0.0", 0, True, True), ("4.0.1", 0, True, True),
    ("4.0.2", 1, False, True), ("4.1.0", 1, False, True), ("4.1.3", 1, False, True),
    ("4.1.4", 1, True, True), ("4.2.0", 1, False, True), ("4.2.1", 1, True, True),
    ("4.3.0", 1, True, True), ("4.4.0", 1, True, False), ("4.5.x", 1, True, False)])
def test_profile_table(release, spec, reports, copies):
    p = make_profile(release)
    assert (p.spec_version, p.reports_pool_version, p.copies_pages) == (spec, reports, copies)
    hv = SimHypervisor(release=release)
    info = hv.host_info()
    assert info == HostInfo(backend="sim-inprocess", xen_release=release, tmem_spec_version=spec,
                            tmem_capacity_pages=1 << 22, tmem_free_pages=1 << 22,
                            can_move_tmem=copies, defects=())
    assert hv.tmem_version() == spec
    assert hv.host_info(backend="sim").backend == "sim"


@pytest.mark.parametrize("bad", ["3.4.0", "4.6.0", "4.0", "4.x.1", "5.0.0"])
def test_unknown_release_refused(bad):
    with pytest.raises(ValueError, match="4.0.0 to 4.5.x"):
        SimHypervisor(release=bad)


def test_defects_are_switches():
    hv = SimHypervisor(release="4.3.0", defects=["h3", "H1"])
    assert hv.host_info().defects == ("H1", "H3")
    with pytest.raises(ValueError, match="unknown defect 'H4'"):
        SimHypervisor(defects=["H4"])


# ---------------------------------------------------------------------------
# item 3: the sub-ops as the release did them
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("release", ["4.0.0", "4.0.2", "4.3.0"])
def test_restore_new_requires_exactly_the_spec_version_and_pagebits_0(release):
    hv = SimHypervisor(release=release)
    spec = hv.tmem_version()
    d = hv.create_domain_shell("r", 256, 1)
    hv.restore_begin(d)
    for version in (0, 1, 2):
        if version == spec:
            continue
        with pytest.raises(HypervisorError, match=f"spec version {version}; Xen {release} requires {spec}"):
            hv.restore_new_pool(d, 0, 1 | version << 24, (0, 0))
    with pytest.raises(HypervisorError, match="pagebits 4"):
        hv.restore_new_pool(d, 0, 1 | 4 << 4 | spec << 24, (0, 0))
    assert hv.tmem_state(d)["pools"] == {}
    assert hv.restore_new_pool(d, 0, 1 | spec << 24, (0, 0)) == 0


@pytest.mark.parametrize("release,bits", [("4.0.0", 0), ("4.0.2", 0), ("4.1.3", 0), ("4.2.0", 0),
                                          ("4.1.4", 1), ("4.2.1", 1), ("4.3.0", 1), ("4.5.x", 1)])
def test_save_get_pool_flags_version_bits(release, bits):
    hv = SimHypervisor(release=release)
    d = domain(hv)
    assert hv.save_get_pool_flags(d, 0) == 1 | bits << 24
    assert hv.save_get_pool_flags(d, 1) == bits << 24
    assert hv.tmem_state(d)["pools"][0]["flags"] >> 24 == hv.tmem_version()   # held with them


def test_restore_put_and_flush_on_frozen_client_answer_efrozen_flush_done():
    trace: list = []
    hv = SimHypervisor(trace=trace)
    d = hv.create_domain_shell("r", 256, 1)
    hv.restore_begin(d)
    hv.restore_new_pool(d, 0, V1P, (0, 0))
    hv.restore_put_page(d, 0, oid(1), 0, page(1))
    hv.restore_put_page(d, 0, oid(2), 0, page(2))
    hv.freeze(d)
    with pytest.raises(HypervisorError) as e:
        hv.restore_put_page(d, 0, oid(3), 0, page(3))
    assert e.value.code == EFROZEN
    with pytest.raises(HypervisorError) as e:
        hv.restore_put_pages(d, 0, struct.pack("<QQQI", *oid(3), 0) + page(3), 1)
    assert e.value.code == EFROZEN
    with pytest.raises(HypervisorError) as e:
        hv.restore_flush_page(d, 0, oid(1), 0)
    assert e.value.code == EFROZEN
    assert hv.tmem_state(d)["pools"][0]["pages"] == {(oid(2), 0): zlib.crc32(page(2))}  # H7
    assert trace[-1].startswith("RESTORE_FLUSH_PAGE pool=0 cli=1 oid=") and trace[-1].endswith("rc=-1000")


def test_save_end_without_a_save_restores_the_remembered_frozen_state():
    hv = SimHypervisor()
    d = domain(hv)
    hv.freeze(d)
    hv.save_end(d)                                   # no SAVE_BEGIN ever: "not frozen"
    assert hv.tmem_state(d)["client"]["frozen"] is False
    hv.freeze(d)
    assert hv.save_begin(d, False)                   # remembers FROZEN
    hv.save_end(d)
    assert hv.tmem_state(d)["client"]["frozen"] is True
    hv.thaw(d)
    hv.save_end(d)                                   # stale: FROZEN again, as Xen
    assert hv.tmem_state(d)["client"]["frozen"] is True


def test_restore_begin_refused_on_a_domain_with_a_client():
    hv = SimHypervisor()
    d = domain(hv)
    with pytest.raises(HypervisorError, match="already has a tmem client"):
        hv.restore_begin(d)
    e = hv.create_domain_shell("r", 256, 1)
    hv.restore_begin(e)
    with pytest.raises(HypervisorError, match="already has a tmem client"):
        hv.restore_begin(e)


@pytest.mark.parametrize("release", ["4.4.0", "4.5.x"])
def test_h8_pages_never_move_from_4_4(release):
    hv = SimHypervisor(release=release)
    d = domain(hv)
    assert hv.save_begin(d, False)
    for call in (lambda: hv.save_get_next_page(d, 0),
                 lambda: hv.save_get_pages(d, 0, 4),
                 lambda: hv.save_get_pages(d, 2, 1, bytearray(4124))):
        with pytest.raises(HypervisorError, match=rf"Xen {re.escape(release)} .*\(H8\)") as e:
            call()
        assert e.value.code == errno.EINVAL
    hv.save_end(d)
    r = hv.create_domain_shell("r", 256, 1)
    hv.restore_begin(r)
    hv.restore_new_pool(r, 0, V1P, (0, 0))
    for call in (lambda: hv.restore_put_page(r, 0, oid(1), 0, page(1)),
                 lambda: hv.restore_put_pages(r, 0, struct.pack("<QQQI", *oid(1), 0) + page(1), 1)):
        with pytest.raises(HypervisorError) as e:
            call()
        assert e.value.code == errno.EINVAL
    assert hv.tmem_state(r)["pools"][0]["pages"] == {}


def test_save_get_pages_into_a_caller_buffer():
    hv = SimHypervisor(release="4.3.0")
    d = domain(hv)
    assert hv.save_begin(d, False)
    buf = bytearray(5 * 4124)
    n, view = hv.save_get_pages(d, 0, 5, buf)
    assert n == 3 and bytes(view) == bytes(buf[:3 * 4124])
    assert struct.unpack_from("<QQQI", buf, 4124) == (*oid(1), 1) and buf[4124 + 28] == 2
    with pytest.raises(HypervisorError, match="cannot hold"):
        hv.save_get_pages(d, 0, 6, buf)
    hv.save_end(d)


# -- the defect switches ------------------------------------------------------------

def test_h1_first_uuid_query_ends_the_save():
    hv = SimHypervisor(release="4.0.2", defects=["H1"])
    d = domain(hv)
    assert hv.save_begin(d, True)
    hv.guest_flush_page(d, 0, oid(1), 2)             # logged: the save is live
    assert hv.save_get_invs(d, 0, 10) == [(0, oid(1), 2)]
    assert hv.save_get_pool_uuid(d, 2) == (5, 6)     # ... and SAVE_END ran
    assert hv.save_get_invs(d, 0, 10) == []          # the -6 list emptied
    assert hv.tmem_state(d)["client"]["frozen"] is False
    assert hv.guest_put(d, 0, oid(9), 0, page(9))    # thawed: a new page goes in
    assert [k for k in walk(hv, d, 0)] == [(oid(1), 0), (oid(1), 1)]   # the walk goes on
    assert hv.save_begin(d, True)                    # a new save can begin
    hv.save_end(d)
    fixed = SimHypervisor(release="4.0.2")
    e = domain(fixed)
    assert fixed.save_begin(e, True)
    fixed.save_get_pool_uuid(e, 2)
    assert not fixed.guest_put(e, 0, oid(9), 0, page(9))   # still frozen


def test_h2_walk_never_returns_the_first_page():
    hv = SimHypervisor(defects=["H2"])
    d = domain(hv, pages=4)
    assert hv.save_begin(d, False)
    assert walk(hv, d, 0) == [(oid(1), i) for i in (1, 2, 3)]
    assert walk(hv, d, 2) == []
    hv.save_end(d)
    assert hv.save_begin(d, False)                   # every save, every pool
    n, _ = hv.save_get_pages(d, 0, 10)
    assert n == 3
    hv.save_end(d)


def test_h3_cursor_survives_save_end():
    hv = SimHypervisor(defects=["H3"])
    d = domain(hv, pages=4)
    assert hv.save_begin(d, False)
    assert hv.save_get_next_page(d, 0)[:2] == (oid(1), 0)     # a save that fails here
    hv.save_end(d)
    assert hv.save_begin(d, False)
    assert walk(hv, d, 0) == [(oid(1), i) for i in (1, 2, 3)]   # continues, not restarts
    hv.save_end(d)
    assert hv.save_begin(d, False)
    assert walk(hv, d, 0) == []                      # walked to the end before: nothing
    assert hv.save_get_pool_npages(d, 0) == 4
    hv.save_end(d)
    fixed = SimHypervisor()
    e = domain(fixed, pages=4)
    for _ in range(2):
        assert fixed.save_begin(e, False)
        assert len(walk(fixed, e, 0)) == 4
        fixed.save_end(e)


# ---------------------------------------------------------------------------
# item 4: the plugin on those hypervisors
# ---------------------------------------------------------------------------

def comparable(state: dict) -> dict:
    """Client settings, each pool's flags/uuid, persistent pages (ephemeral arrive empty)."""
    return {"client": state["client"],
            "pools": {i: (p["flags"], tuple(p["uuid"]), p["pages"] if p["persistent"] else {})
                      for i, p in state["pools"].items()}}


class Guest:
    """The guest while a live save runs: after the first round it flushes a
    page and tries to put a new one (refused while its tmem is frozen)."""

    def __init__(self, hv: SimHypervisor, domid: int) -> None:
        self.hv, self.domid = hv, domid
        self.at_suspend: Optional[dict] = None
        self.acted = False

    @hookimpl
    def checkpoint_save_after_round(self, session, round):
        if not self.acted:
            self.acted = True
            self.hv.guest_flush_page(self.domid, 0, oid(1), 1)
            self.hv.guest_put(self.domid, 0, oid(8), 0, page(8))

    @hookimpl(tryfirst=True)
    def checkpoint_save_after_suspend(self, session):
        self.at_suspend = comparable(self.hv.tmem_state(self.domid))


def save(hv: SimHypervisor, domid: int, live: bool, plan: str = "precopy"):
    guest = Guest(hv, domid)
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": plan}}, extra=[guest])
    buf = io.BytesIO()
    before = comparable(hv.tmem_state(domid))
    save_domain(hv, domid, buf, hooks=hooks, live=live, checkpoint=True)
    saved = guest.at_suspend if live else before
    return buf.getvalue(), saved, hooks


def restores_exactly(data: bytes, saved: dict, hooks) -> None:
    fixed = SimHypervisor(release="4.3.0")                      # no defects, moves pages
    newid, _ = restore_domain(fixed, io.BytesIO(data), hooks=hooks)
    assert comparable(fixed.tmem_state(newid)) == saved


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_h1_save_avoids_it_and_restores_exactly(live, frozen):
    trace: list = []
    hv = SimHypervisor(release="4.0.2", defects=["H1"], trace=trace)
    d = domain(hv, frozen=frozen)
    data, saved, hooks = save(hv, d, live)
    ops = [ln.split()[0] for ln in trace]
    begins = [i for i, op in enumerate(ops) if op == "SAVE_BEGIN"]
    uuids = [i for i, op in enumerate(ops) if op == "SAVE_GET_POOL_UUID"]
    # every uuid read between the two SAVE_BEGINs, none after the second
    assert len(begins) == 2 and begins[0] < min(uuids) and max(uuids) < begins[1]
    assert ops.count("SAVE_END") == 1
    if live:
        assert saved["pools"][0][2] == {(oid(1), 0): zlib.crc32(page(1)),
                                        (oid(1), 2): zlib.crc32(page(3))}   # flushed, not put
    restores_exactly(data, saved, hooks)
    assert hv.tmem_state(d)["client"]["frozen"] is frozen                 # thawed as it was


def test_h1_unavoided_would_write_another_state():
    """What the avoidance is for: a writer not told of H1 lets the guest run
    thawed mid-save; its new page and its flush reach neither chunk."""
    hv = SimHypervisor(release="4.0.2", defects=["H1"])
    d = domain(hv)
    w = TmemWriter(hv, d, live=True)                 # not told about H1
    assert w.begin()
    out = io.BytesIO()
    sw = StreamWriter(out)
    w.write_tmem(sw)
    assert hv.guest_put(d, 0, oid(9), 0, page(9))    # thawed: the put is taken
    assert hv.guest_flush_page(d, 0, oid(1), 0)      # and the flush goes unlogged
    assert w.write_extra(sw, always=True) == 0
    final = comparable(hv.tmem_state(d))
    w.end()
    sw.flush()
    fixed = SimHypervisor(release="4.3.0")
    r = fixed.create_domain_shell("r", 256, 1)
    rest = TmemRestorer(fixed, r)
    reader = StreamReader(io.BytesIO(out.getvalue()))
    while not reader.at_eof():
        off = reader.offset
        rest.read_chunk(reader, reader.s32("marker"), off)
    rest.finish()
    got = comparable(fixed.tmem_state(r))["pools"][0][2]
    assert (oid(9), 0) in final["pools"][0][2] and (oid(9), 0) not in got
    assert (oid(1), 0) not in final["pools"][0][2] and (oid(1), 0) in got


@pytest.mark.parametrize("live", [False, True])
def test_h2_reported_save_refused_before_anything_is_frozen(live):
    trace: list = []
    hv = SimHypervisor(defects=["H2"], trace=trace)
    d = domain(hv)
    with pytest.raises(SaveError, match=r"Xen 4\.0\.2 has defect H2 .*first page.* 4 persistent"):
        save(hv, d, live)
    assert not any(ln.startswith(("SAVE_BEGIN", "SAVE_END")) for ln in trace)
    assert hv.tmem_state(d)["client"]["frozen"] is False


class Unreported(SimHypervisor):
    """A hypervisor that has its defects but does not say so."""

    def host_info(self, backend: Optional[str] = None) -> HostInfo:
        info = super().host_info(backend)
        return HostInfo(**{**info.__dict__, "defects": ()})


@pytest.mark.parametrize("live", [False, True])
def test_h2_unreported_detected_by_the_walk(live):
    hv = Unreported(defects=["H2"])
    d = domain(hv)
    with pytest.raises(SaveError, match=r"pool 0 of domain 1 returned 2 of 3 pages .*defect H2"):
        save(hv, d, live)
    assert hv.tmem_state(d)["client"]["frozen"] is False      # SAVE_END ran


def fail_a_save_midway(hv: SimHypervisor, d: int) -> None:
    """A save that stopped after one page (a toolstack that died, a cancel)."""
    assert hv.save_begin(d, False)
    assert hv.save_get_next_page(d, 0) is not None
    hv.save_end(d)


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("hv_class", [SimHypervisor, Unreported])
def test_h3_detected_after_a_failed_save(live, hv_class):
    hv = hv_class(defects=["H3"])
    d = domain(hv)
    fail_a_save_midway(hv, d)
    with pytest.raises(SaveError, match=r"returned 2 of 3 pages with 0 deleted.*H3 \("):
        save(hv, d, live)
    assert hv.tmem_state(d)["client"]["frozen"] is False


@pytest.mark.parametrize("live", [False, True])
def test_h3_after_a_complete_save_detected_not_written(live):
    hv = SimHypervisor(defects=["H3"])
    d = domain(hv)
    data, saved, hooks = save(hv, d, live)             # first save: whole, restores exactly
    restores_exactly(data, saved, hooks)
    with pytest.raises(SaveError, match=r"pool 0 of domain 1 returned 0 of \d pages.*H3"):
        save(hv, d, live)


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("release", ["4.4.0", "4.5.x"])
def test_h8_save_refused_before_save_begin(release, live):
    trace: list = []
    hv = SimHypervisor(release=release, trace=trace)
    d = domain(hv)
    with pytest.raises(SaveError, match=rf"this host cannot move tmem \(Xen {re.escape(release)}"
                                        r".*H8\).*lose its 4 persistent tmem pages"):
        save(hv, d, live)
    assert not any(ln.startswith(("SAVE_BEGIN", "SAVE_END")) for ln in trace)
    assert hv.tmem_state(d)["client"]["frozen"] is False


@pytest.mark.parametrize("live", [False, True])
def test_h8_domain_without_persistent_pages_still_saves(live):
    hv = SimHypervisor(release="4.4.0")
    d = domain(hv, ephemeral_only=True)
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "precopy"}})
    buf = io.BytesIO()
    save_domain(hv, d, buf, hooks=hooks, live=live, checkpoint=True)
    dst = SimHypervisor(release="4.4.0")
    newid, _ = restore_domain(dst, io.BytesIO(buf.getvalue()), hooks=hooks)
    assert dst.tmem_state(newid)["pools"][1]["pages"] == {}


def test_h8_migration_preflight_refuses_source_and_destination():
    hooks = plugins.get_plugin_manager(["tmem"], {})
    src = SimHypervisor(release="4.4.0")
    d = domain(src)
    with pytest.raises(SaveError, match=r"Xen 4\.4\.0.*4 persistent tmem pages"):
        hooks.migrate_offer(src, d)
    ok = SimHypervisor(release="4.3.0")
    offer = hooks.migrate_offer(ok, domain(ok))
    assert hooks.migrate_check(ok, offer) == []
    reasons = hooks.migrate_check(SimHypervisor(release="4.4.0"), offer)
    assert len(reasons) == 1 and "cannot move tmem (Xen 4.4.0" in reasons[0]
    assert "4 persistent tmem pages would be lost" in reasons[0]
    eph = SimHypervisor(release="4.4.0")
    assert hooks.migrate_check(eph, hooks.migrate_offer(eph, domain(eph, ephemeral_only=True))) == []


# -- H4 and what the target cannot hold ---------------------------------------------------

@pytest.mark.parametrize("src_release", ["4.0.2", "4.2.0", "4.3.0"])
@pytest.mark.parametrize("dst_release", ["4.0.2", "4.1.4", "4.3.0"])
def test_v1_streams_restore_on_every_v1_release(src_release, dst_release):
    src = SimHypervisor(release=src_release)
    d = domain(src)
    data, saved, hooks = save(src, d, live=False)
    dst = SimHypervisor(release=dst_release)
    newid, _ = restore_domain(dst, io.BytesIO(data), hooks=hooks)
    assert comparable(dst.tmem_state(newid)) == saved


def test_v0_stream_on_v1_hypervisor_refused_clearly():
    src = SimHypervisor(release="4.0.0")
    data, _, hooks = save(src, domain(src), live=False)
    dst = SimHypervisor(release="4.0.2")
    with pytest.raises(StreamError, match=r"field version = 0 at offset \d+ .*spec version 0; "
                                          r"this hypervisor speaks version 1"):
        restore_domain(dst, io.BytesIO(data), hooks=hooks)
    assert [x.name for x in dst.list_domains()] == ["Domain-0"]


def test_64k_pages_refused_on_x86():
    src = SimHypervisor(release="4.3.0")
    d = src.create_domain(parse_domain_config({
        "name": "arm", "memory": 4,
        "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True, "pagebits": 4,
                                          "pages": [{"oid": list(oid(1)), "index": 0, "seed": 1}]}]}}))
    hooks = plugins.get_plugin_manager(["tmem"], {})
    buf = io.BytesIO()
    save_domain(src, d, buf, hooks=hooks, live=False, checkpoint=True)
    dst = SimHypervisor(release="4.3.0")
    with pytest.raises(StreamError, match=r"field pool flags = .* at offset \d+.*65536-byte pages"):
        restore_domain(dst, io.BytesIO(buf.getvalue()), hooks=hooks)


# ---------------------------------------------------------------------------
# SAVE_END only after a SAVE_BEGIN that returned True
# ---------------------------------------------------------------------------

def mocked_hv(mocker):
    hv = mocker.create_autospec(Hypervisor, instance=True)
    hv.host_info.return_value = HostInfo(backend="mock", xen_release="4.0.2", tmem_spec_version=1,
                                         tmem_capacity_pages=1024, tmem_free_pages=1024,
                                         can_move_tmem=True)
    return hv


@pytest.mark.parametrize("answer", [False, HypervisorError("SAVE_BEGIN", "refused"),
                                    KeyboardInterrupt()], ids=["returned-0", "refused", "ctrl-c"])
def test_writer_owes_save_end_only_after_save_begin_returned_true(mocker, answer):
    hv = mocked_hv(mocker)
    if isinstance(answer, BaseException):
        hv.save_begin.side_effect = answer
        with pytest.raises(type(answer)):
            TmemWriter(hv, 3, live=True).begin()
    else:
        hv.save_begin.return_value = answer
        w = TmemWriter(hv, 3, live=True)
        assert w.begin() is False
        w.end()
    hv.save_end.assert_not_called()
    hv.save_begin.return_value, hv.save_begin.side_effect = True, None
    w = TmemWriter(hv, 3, live=True)
    assert w.begin()
    w.end()
    w.end()
    hv.save_end.assert_called_once_with(3)


@pytest.mark.parametrize("answer", [False, HypervisorError("SAVE_BEGIN", "refused")],
                         ids=["returned-0", "refused"])
@pytest.mark.parametrize("live", [False, True])
def test_save_path_never_ends_a_save_it_did_not_begin(mocker, answer, live):
    hv = mocked_hv(mocker)
    hv.domain_info.return_value = DomainInfo(domid=3, name="web1", memory_mib=1, vcpus=1,
                                             running=True)
    hv.p2m_size.return_value = 8
    hv.read_pages.side_effect = lambda d, pfns: bytes(4096 * len(pfns))
    hv.map_foreign_range.return_value = None        # no mapping here: read_pages copies
    hv.read_and_clear_dirty.return_value = []
    hv.online_vcpus.return_value = [0]
    hv.get_vcpu_context.return_value = bytes(5168)
    hv.get_ext_vcpu_context.return_value = bytes(128)
    hv.get_vcpu_xsave.return_value = b""
    hv.get_shared_info.return_value = bytes(4096)
    hv.save_get_version.return_value = 1
    hv.save_get_maxpools.return_value = 16
    hv.save_get_pool_flags.side_effect = lambda d, p: None
    hv.save_get_invs.return_value = []
    if isinstance(answer, BaseException):
        hv.save_begin.side_effect = answer
    else:
        hv.save_begin.return_value = answer
    hooks = plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "precopy"}})
    if isinstance(answer, BaseException):
        with pytest.raises(XendTmemError):
            save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=live)
    else:
        save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=live)
    hv.save_begin.assert_called_once()
    hv.save_end.assert_not_called()


def test_setup_failure_does_not_call_save_end(mocker):
    hv = mocked_hv(mocker)
    hv.domain_info.return_value = DomainInfo(domid=3, name="w", memory_mib=1, vcpus=1)
    hv.p2m_size.return_value = 8
    hv.save_get_version.side_effect = HypervisorError("SAVE_GET_VERSION", "refused")
    hooks = plugins.get_plugin_manager(["tmem"], {})
    with pytest.raises(HypervisorError, match="SAVE_GET_VERSION"):
        save_domain(hv, 3, io.BytesIO(), hooks=hooks, live=False)
    hv.save_begin.assert_not_called()
    hv.save_end.assert_not_called()


# ---------------------------------------------------------------------------
# xend: xm info, and an H8 save through the daemon
# ---------------------------------------------------------------------------

@pytest.fixture
def xend_on(tmp_path_factory):
    from xend_tmem.config import parse_toolstack_config
    from xend_tmem.xend.service import XendService
    made = []

    def make(release: str, trace: Optional[list] = None):
        hv = SimHypervisor(release=release, trace=trace)
        state = tmp_path_factory.mktemp("state")
        s = XendService(parse_toolstack_config({"xend-state-dir": str(state)}), hv,
                        plugins.get_plugin_manager(["tmem"], {}))
        made.append(s)
        return s, hv

    yield make
    for s in made:
        s.stop(5)


@pytest.mark.parametrize("release,can", [("4.3.0", "yes"), ("4.4.0", None)])
def test_xm_info_shows_release_and_whether_tmem_moves(xend_on, release, can):
    svc, _ = xend_on(release)
    info = dict(svc.node_info())
    assert info["xen_release"] == release
    if can:
        assert info["tmem_can_move"] == can
    else:
        assert info["tmem_can_move"].startswith("no: this host cannot move tmem (Xen 4.4.0: ")


def test_xend_save_on_h8_refused_file_removed_name_kept(xend_on, tmp_path):
    svc, hv = xend_on("4.4.0")
    d = domain(hv, name="web1")
    job = svc.jobs.get(svc.job_save("web1", str(tmp_path / "web1.img"), False))
    assert job.finished_event.wait(20)
    st = job.status()
    assert st["state"] == "failed"
    assert "this host cannot move tmem (Xen 4.4.0" in st["error"]
    assert "4 persistent tmem pages" in st["error"]
    assert os.listdir(tmp_path) == []
    info = hv.domain_info(d)
    assert info.name == "web1" and info.running
    assert hv.tmem_state(d)["client"]["frozen"] is False


@pytest.mark.parametrize("live", [False, True])
def test_xend_migrate_on_h8_refused_before_the_source_is_renamed(xend_on, live, mocker):
    import socket
    trace: list = []
    svc, hv = xend_on("4.4.0", trace)
    d = domain(hv, name="web1")
    rename = mocker.spy(hv, "rename_domain")
    with socket.socket() as peer:                    # accepts, never answers
        peer.bind(("127.0.0.1", 0))
        peer.listen(1)
        job = svc.jobs.get(svc.job_migrate("web1", "127.0.0.1", live, peer.getsockname()[1]))
        assert job.finished_event.wait(20)
    st = job.status()
    assert st["state"] == "failed" and "this host cannot move tmem (Xen 4.4.0" in st["error"]
    info = hv.domain_info(d)
    assert info.name == "web1" and info.running
    assert not any(ln.startswith(("SAVE_BEGIN", "SAVE_END")) for ln in trace)
    rename.assert_not_called()


def test_op_trace_hands_out_the_trace_from_a_line_on():
    trace: list = []
    hv = SimHypervisor(trace=trace)
    d = domain(hv)
    assert hv.save_begin(d, True)
    hv.save_end(d)
    assert hv.op_trace() == [f"SAVE_BEGIN cli={d} arg1=1 rc=1", f"SAVE_END cli={d} rc=0"]
    assert hv.op_trace(1) == [f"SAVE_END cli={d} rc=0"]
    assert SimHypervisor().op_trace() == []
    with pytest.raises(HypervisorError, match="start -1"):
        hv.op_trace(-1)
