"""The hypervisor process and its client: the seam between toolstack and hypervisor.

Every interface call round-trips with the in-process simulator's answers,
errors keep their types and texts, a killed hypervisor is ECONNRESET naming
the call, the client is thread-safe, tmem pages travel through the shared
buffer (never in a message) and guest RAM through the client's own mapping.
"""
from __future__ import annotations

import errno
import inspect
import os
import signal
import struct
import threading
import zlib
from array import array
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from xend_tmem.errors import HypervisorError, NoSuchDomain
from xend_tmem.hypervisor import wire
from xend_tmem.hypervisor.client import HypervisorClient
from xend_tmem.hypervisor.interface import DomainInfo, HostInfo, Hypervisor, crc_mismatch_index
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.xen import EFROZEN

from hvfixtures import start_process, stop_process

A5, CD = 0xA5A5A5A5A5A5A5A5, 0x0123456789ABCDEF
V1P = 0x01000001
INTERFACE = sorted(n for n in dir(Hypervisor)
                   if not n.startswith("_") and callable(getattr(Hypervisor, n)))


def oid(n: int) -> Tuple[int, int, int]:
    return (n, A5, CD)


def page(b: int) -> bytes:
    return bytes((b,)) * 4096


def rec(n: int, fill: int) -> bytes:
    return struct.pack("<QQQI", *oid(n), n) + page(fill)


DOMAIN = {"name": "d", "memory": 2, "vcpus": 2,
          "tmem": {"version": 1, "client": {"weight": 3, "cap": 4},
                   "pools": [{"id": 0, "persistent": True,
                              "pages": [{"oid": list(oid(1)), "index": i, "fill": i + 1}
                                        for i in range(5)]},
                             {"id": 1, "persistent": False,
                              "pages": [{"oid": list(oid(2)), "index": 0, "fill": 9}]}]}}


@pytest.fixture
def proc() -> Iterator[HypervisorClient]:
    client, p, state_dir = start_process(trace=True)
    try:
        yield client
    finally:
        stop_process(client, p, state_dir)


class _Counting:
    """Counts and sizes the client's outgoing messages (page data must not be in them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: List[int] = []
        real = wire.send

        def send(sock: Any, obj: Any, fds: Any = ()) -> None:
            self.sizes.append(len(wire.encode(obj)))
            real(sock, obj, fds)
        monkeypatch.setattr(wire, "send", send)


# -- the contract ------------------------------------------------------------------

def test_client_implements_the_whole_interface_with_its_signatures() -> None:
    for name in INTERFACE:
        impl = getattr(HypervisorClient, name)
        assert list(inspect.signature(impl).parameters) == \
            list(inspect.signature(getattr(Hypervisor, name)).parameters), name


def _script(hv: Any) -> Dict[str, Any]:
    """Call every interface method once (close last) and collect the answers."""
    out: Dict[str, Any] = {}

    def call(name: str, *args: Any, **kw: Any) -> Any:
        value = getattr(hv, name)(*args, **kw)
        out.setdefault(name, value)
        return value

    out["list_domains"] = [(i.domid, i.name, i.state) for i in hv.list_domains()]
    d = call("create_domain", DOMAIN)
    info = call("domain_info", d)
    assert isinstance(info, DomainInfo)
    call("rename_domain", d, "renamed")
    call("pause", d)
    call("unpause", d)
    call("suspend", d)
    call("resume", d)
    call("online_vcpus", d)
    ctx = call("get_vcpu_context", d, 1)
    call("set_vcpu_context", d, 0, ctx[::-1])
    out["ctx0"] = hv.get_vcpu_context(d, 0)
    call("get_ext_vcpu_context", d, 0)
    call("set_ext_vcpu_context", d, 0, b"\x07" * 128)
    call("set_vcpu_xsave", d, 0, b"\x01" * 1024)
    call("get_vcpu_xsave", d, 0)
    call("get_vcpu_xsave", d, 0)
    call("get_shared_info", d)
    call("set_shared_info", d, b"\x03" * 4096)
    out["shared_info"] = hv.get_shared_info(d)
    call("p2m_size", d)
    call("enable_logdirty", d)
    call("write_pages", d, [3, 4, 100], b"".join(page(i) for i in (7, 8, 9)))
    call("read_pages", d, [100, 3, 4, 0])
    # the process client maps guest RAM, the in-process simulator declines
    view = hv.map_foreign_range(d, [3, 4])
    out["map_foreign_range"] = bytes(view) if view is not None else hv.read_pages(d, [3, 4])
    assert out["map_foreign_range"] == page(7) + page(8)
    if view is not None:
        view.release()
    call("read_and_clear_dirty", d)
    call("disable_logdirty", d)
    # guest side
    p = call("guest_new_pool", d, True, False, (0, 0), 0)
    call("guest_put", d, p, oid(7), 0, page(0x77))
    call("guest_get", d, p, oid(7), 0)
    call("guest_flush_page", d, p, oid(7), 0)
    call("guest_put", d, p, oid(8), 0, page(0x88))
    call("guest_flush_object", d, p, oid(8))
    q = hv.guest_new_pool(d, False)
    call("guest_destroy_pool", d, q)
    # save
    call("save_begin", d, True)
    call("save_get_version", d)
    call("save_get_maxpools", d)
    call("save_get_client_weight", d)
    call("save_get_client_cap", d)
    call("save_get_client_flags", d)
    call("save_get_pool_flags", d, 0)
    call("save_get_pool_npages", d, 0)
    call("save_get_pool_uuid", d, 0)
    call("save_get_next_page", d, 0)
    # both backends lend save batches (their own buffers: sizes differ, the walk not)
    out["save_pages_lending"] = hv.save_pages_lending() is not None
    n, held, release = hv.save_get_pages_held(d, 0, 1)
    out["save_get_pages_held"] = (n, bytes(held))
    release()
    release()                                          # idempotent
    assert n == 1
    call("save_get_pages", d, 0, 2)
    crcs = array("I", [0] * 3)                         # the hypervisor fills one per record
    n, recs = hv.save_get_pages(d, 0, 2, crcs=crcs)
    recs = bytes(recs)
    out["save_get_pages_crcs"] = (n, crcs.tolist())
    assert n and crcs[:n].tolist() == [zlib.crc32(recs[i * 4124 + 28:(i + 1) * 4124])
                                       for i in range(n)]
    out["save_get_pages_out"] = bytes(hv.save_get_pages(d, 0, 10, out=bytearray(10 * 4124))[1])
    hv.guest_flush_page(d, 0, oid(1), 0)
    call("save_get_next_inv", d)
    call("save_get_invs", d, 0, 10)
    call("save_end", d)
    # restore
    r = call("create_domain_shell", "shell", 64, 1, {"on_crash": "destroy"})
    call("restore_begin", r)
    call("restore_new_pool", r, 0, V1P, (5, 6))
    call("restore_put_page", r, 0, oid(1), 1, page(1))
    call("restore_put_pages", r, 0, rec(2, 2) + rec(3, 3), 2)
    good = array("I", [zlib.crc32(page(4)), zlib.crc32(page(5))])
    hv.restore_put_pages(r, 0, rec(4, 4) + rec(5, 5), 2, crcs=good)
    bad = array("I", [zlib.crc32(page(6)), zlib.crc32(page(6)), zlib.crc32(page(8))])
    e = _error(lambda: hv.restore_put_pages(r, 0, rec(6, 6) + rec(7, 7) + rec(8, 8), 3,
                                            crcs=bad))
    assert isinstance(e, HypervisorError) and e.code == errno.EILSEQ
    assert crc_mismatch_index(e) == 1
    out["restore_put_pages_crc_refusal"] = str(e)
    out["restore_put_pages_crc_stored"] = [hv.guest_get(r, 0, oid(n), n) is not None
                                           for n in (4, 5, 6, 7, 8)]
    # lent slots (the in-process store lends them, the process client declines):
    # either way the same records end up stored
    slots = hv.restore_lend_slots(r, 0, 2)
    if slots is not None:
        slots[:2 * 4124] = rec(9, 9) + rec(10, 10)
        hv.restore_put_lent(r, 0, 2)
    else:
        hv.restore_put_pages(r, 0, rec(9, 9) + rec(10, 10), 2)
    out["restore_lend_slots"] = [hv.guest_get(r, 0, oid(n), n) for n in (9, 10)]
    assert out["restore_lend_slots"] == [page(9), page(10)]
    e = _error(lambda: hv.restore_put_lent(r, 0, 1))   # nothing lent now, on both
    assert isinstance(e, HypervisorError)
    out["restore_put_lent"] = str(e)
    call("restore_flush_page", r, 0, oid(2), 2)
    call("restore_flush_pages", r, [(0, oid(3), 3), (0, oid(99), 0), (0, oid(4), 4)])
    out["after_flush_pages"] = [hv.guest_get(r, 0, oid(n), n) is None for n in (3, 4, 5)]
    assert out["after_flush_pages"] == [True, True, False]
    e = _error(lambda: hv.restore_flush_pages(r, [(0, oid(5), 5), (3, oid(6), 6)]))
    assert isinstance(e, HypervisorError)           # pool 3 does not exist: stops there
    out["restore_flush_pages refused"] = (str(e), hv.guest_get(r, 0, oid(5), 5) is None)
    # admin
    call("set_weight", r, 7)
    call("set_cap", r, 8)
    call("set_compress", r, True)
    call("freeze", r)
    call("thaw", r)
    call("flush", d, 1)
    call("tmem_list", None, True)
    call("query_freeable_mb")
    # inspection
    host = call("host_info")
    assert isinstance(host, HostInfo)
    out["host_info"] = (host.xen_release, host.tmem_spec_version, host.tmem_capacity_pages,
                        host.tmem_free_pages, host.can_move_tmem, host.defects)
    call("tmem_version")
    call("tmem_free_pages")
    call("guest_stats", d)
    call("tmem_state", r)
    call("tmem_digest", r)
    call("ram_digest", d)
    ram_crcs = array("I", [0] * 3)
    call("ram_page_crcs", d, [100, 3, 4], ram_crcs)
    out["ram_page_crcs_out"] = ram_crcs.tolist()
    assert ram_crcs.tolist() == [zlib.crc32(page(9)), zlib.crc32(page(7)), zlib.crc32(page(8))]
    call("guest_heartbeat", d)                         # no workload: (0, 0) on both
    call("op_trace", 0)
    # xm's everyday commands (issue 8 #9); times normalised, they differ run to run
    call("set_memory_target", d, 1)
    out["balloon"] = hv.domain_info(d).memory_mib
    out["vcpu_info"] = [(v["vcpu"], v["cpu"], v["online"], v["running"], v["blocked"])
                        for v in call("vcpu_info", d)]
    out["domain_uptime"] = 0 <= call("domain_uptime", d) < 600
    out["console_output"] = [ln.split("] ", 1)[-1]
                             for ln in call("console_output", d).splitlines()]
    out["read_console_ring"] = "Xen version" in call("read_console_ring", False)
    call("read_console_ring", True)
    out["ring_cleared"] = hv.read_console_ring(False)
    s = hv.create_domain({"name": "down", "memory": 1, "vcpus": 1})
    call("shutdown_domain", s, "poweroff")
    down = hv.domain_info(s)
    out["shutdown_domain"] = (down.state, down.shutdown_reason)
    hv.destroy_domain(s)
    call("destroy", r)
    call("destroy_domain", r)
    out["after"] = [(i.domid, i.name, i.state) for i in hv.list_domains()]
    call("close")
    return out


def test_every_interface_call_round_trips_with_the_simulators_answers(proc: HypervisorClient
                                                                        ) -> None:
    want = _script(SimHypervisor(tmem_capacity_pages=proc.host_info().tmem_capacity_pages))
    got = _script(proc)
    assert set(INTERFACE) <= set(got), set(INTERFACE) - set(got)
    assert want.pop("op_trace") == []                  # the in-process one keeps no trace here
    assert "SAVE_BEGIN cli=1 arg1=1 rc=1" in got.pop("op_trace")   # the process was asked to
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key


def test_op_trace_is_kept_by_a_tracing_process(proc: HypervisorClient) -> None:
    d = proc.create_domain_shell("r", 16, 1)
    proc.restore_begin(d)
    proc.restore_new_pool(d, 0, V1P, (0, 0))
    proc.restore_put_pages(d, 0, rec(1, 1), 1)
    trace = proc.op_trace(0)
    assert trace[0] == f"RESTORE_BEGIN cli={d} rc=1"
    assert trace[1].startswith(f"RESTORE_NEW pool=0 cli={d} flags=0x01000001")
    assert trace[2].startswith(f"RESTORE_PUT_PAGE pool=0 cli={d} oid=0x0000000000000001:")
    assert proc.op_trace(2) == trace[2:]


# -- errors ----------------------------------------------------------------------------

def _error(fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(Exception) as e:
        fn()
    return e.value


@pytest.mark.parametrize("case", [
    lambda hv, d: hv.domain_info(99),
    lambda hv, d: hv.pause(0),
    lambda hv, d: hv.read_pages(d, [0, 512]),
    lambda hv, d: hv.read_pages(0, [0]),
    lambda hv, d: hv.read_pages(99, [0]),
    lambda hv, d: hv.write_pages(d, [1], b"short"),
    lambda hv, d: hv.set_vcpu_context(d, 0, b"x"),
    lambda hv, d: hv.save_get_next_page(d, 0),
    lambda hv, d: hv.restore_begin(d),
    lambda hv, d: hv.create_domain({"name": "x", "memory": "lots"}),
    lambda hv, d: hv.create_domain(DOMAIN),
    lambda hv, d: hv.set_weight(d, -1),
    lambda hv, d: hv.guest_put(d, 0, oid(1), 0, b"short"),
    lambda hv, d: hv.restore_put_pages(d, 0, b"x" * 100, 1),
    lambda hv, d: hv.save_get_pool_flags(d, 16),
])
def test_errors_keep_their_types_messages_and_fields(proc: HypervisorClient, case: Any) -> None:
    sim = SimHypervisor()
    want = _error(lambda: case(sim, sim.create_domain(DOMAIN)))
    got = _error(lambda: case(proc, proc.create_domain(DOMAIN)))
    assert type(got) is type(want)
    assert str(got) == str(want)
    for attr in ("op", "code", "dom"):
        assert getattr(got, attr, None) == getattr(want, attr, None), attr


def test_efrozen_keeps_its_code(proc: HypervisorClient) -> None:
    d = proc.create_domain_shell("r", 16, 1)
    proc.restore_begin(d)
    proc.restore_new_pool(d, 0, V1P, (0, 0))
    proc.freeze(d)
    e = _error(lambda: proc.restore_put_pages(d, 0, rec(1, 1), 1))
    assert isinstance(e, HypervisorError) and e.code == EFROZEN and e.op == "RESTORE_PUT_PAGE"


def test_a_killed_hypervisor_is_econnreset_naming_the_call() -> None:
    client, p, state_dir = start_process()
    try:
        d = client.create_domain(DOMAIN)
        assert client.read_pages(d, [0])                  # mapped before the kill
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        for call, op in ((lambda: client.domain_info(d), "domain_info"),
                         (lambda: client.save_get_pages(d, 0, 4), "save_get_pages"),
                         (lambda: client.list_domains(), "list_domains")):
            e = _error(call)
            assert isinstance(e, HypervisorError), e
            assert (e.op, e.code) == (op, errno.ECONNRESET)
            assert op in str(e)
    finally:
        stop_process(client, p, state_dir)


def test_a_hypervisor_started_again_is_reached_again_with_fresh_mappings() -> None:
    client, p, state_dir = start_process()
    try:
        d = client.create_domain(DOMAIN)
        client.read_pages(d, [0])
        p.terminate()
        p.wait()
        assert _error(lambda: client.p2m_size(d)).code == errno.ECONNRESET  # type: ignore[attr-defined]
        from xend_tmem.hypervisor.client import spawn
        from xend_tmem.hypervisor.server import ServeOptions
        p = spawn(ServeOptions(state_dir=state_dir))
        assert [i.domid for i in client.list_domains()] == [0]
        e = _error(lambda: client.read_pages(d, [0]))     # the old mapping is gone
        assert isinstance(e, NoSuchDomain)
    finally:
        stop_process(client, p, state_dir)


# -- concurrency ----------------------------------------------------------------------

def test_client_is_thread_safe(proc: HypervisorClient) -> None:
    doms = [proc.create_domain({**DOMAIN, "name": f"t{i}"}) for i in range(4)]
    errors: List[BaseException] = []

    def worker(k: int) -> None:
        d = doms[k % len(doms)]
        try:
            for i in range(60):
                o = (1000 + k, i, 0)
                data = bytes((k * 7 + i) % 256 for _ in range(16)) * 256
                assert proc.guest_put(d, 0, o, i, data)
                assert proc.guest_get(d, 0, o, i) == data
                pfn = (k * 61 + i) % 512
                proc.write_pages(d, [pfn], data)
                assert proc.read_pages(d, [pfn]) == data
                assert proc.domain_info(d).name == f"t{k % len(doms)}"
        except BaseException as exc:      # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(proc._all) <= 8                # one connection per concurrent caller at most
    for d in doms:
        assert proc.guest_stats(d)["tmem_puts"] == 120


# -- the shared buffer and the mapping -------------------------------------------------

def test_tmem_batches_travel_through_the_shared_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    client, p, state_dir = start_process()
    small = HypervisorClient(state_dir, buffer_size=1 << 20)   # 254 records a round trip
    try:
        src = client.create_domain({"name": "src", "memory": 1, "tmem": {"pools": [
            {"id": 0, "persistent": True, "bulk": {"pages": 1000, "objects": 3, "seed": 5}}]}})
        dst = client.create_domain_shell("dst", 16, 1)
        counting = _Counting(monkeypatch)
        assert small.save_begin(src, False)
        n, recs = small.save_get_pages(src, 0, 700)         # several round trips
        out = bytearray(700 * 4124)
        m, view = small.save_get_pages(src, 0, 700, out=out)
        assert (n, m) == (700, 300) and len(recs) == 700 * 4124 and len(view) == 300 * 4124
        assert bytes(view) == bytes(out[:300 * 4124])
        assert small.save_get_pages(src, 0, 10) == (0, b"")
        small.restore_begin(dst)
        small.restore_new_pool(dst, 0, V1P, (0, 0))
        allrecs = recs + bytes(view)
        crcs = array("I", [zlib.crc32(allrecs[i * 4124 + 28:(i + 1) * 4124])
                           for i in range(1000)])
        crcs[600] ^= 1                  # in the third round trip: named by its batch index
        e = _error(lambda: small.restore_put_pages(dst, 0, allrecs, 1000, crcs=crcs))
        assert isinstance(e, HypervisorError) and e.code == errno.EILSEQ, e
        assert crc_mismatch_index(e) == 600 and "record 600: page CRC32" in str(e)
        assert client.tmem_digest(dst)[0][0] == 600          # none from record 600 on
        crcs[600] ^= 1
        small.restore_put_pages(dst, 0, allrecs, 1000, crcs=crcs)   # several round trips
        small.save_end(src)
        assert max(counting.sizes) < 1024, "page data went into a message"
        assert len(counting.sizes) >= 3 + 2 + 4 + 3
        assert client.tmem_digest(dst) == client.tmem_digest(src)
        assert client.tmem_digest(dst)[0][0] == 1000
    finally:
        small.close()
        stop_process(client, p, state_dir)


def test_ram_is_read_and_written_through_the_mapping(proc: HypervisorClient,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    d = proc.create_domain(DOMAIN)
    sim = SimHypervisor()
    e = sim.create_domain(DOMAIN)
    assert proc.read_pages(d, range(512)) == sim.read_pages(e, range(512))
    counting = _Counting(monkeypatch)
    data = os.urandom(3 * 4096)
    for _ in range(20):
        proc.write_pages(d, [7, 8, 300], data)
        assert proc.read_pages(d, [300, 7, 8]) == data[8192:] + data[:8192]
    assert counting.sizes == []                             # no round trip at all
    sim.write_pages(e, [7, 8, 300], data)
    assert proc.ram_digest(d) == sim.ram_digest(e)          # the hypervisor sees the writes
    proc.destroy_domain(d)
    assert isinstance(_error(lambda: proc.read_pages(d, [0])), NoSuchDomain)


def test_messages_are_bounded_and_never_pickled() -> None:
    with pytest.raises(ValueError):
        wire.encode(object())                      # no class can travel
    big = b"x" * (wire.MAX_MESSAGE + 1)
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode(big)
    assert zlib.crc32(wire.encode(("m", (1,)))) == zlib.crc32(wire.encode(("m", (1,))))


def test_connect_attaches_and_warns_when_the_release_differs(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    from xend_tmem.config import HypervisorSettings
    from xend_tmem.hypervisor.client import connect
    client, p, state_dir = start_process()
    other = None
    try:
        with caplog.at_level("WARNING", logger="xend_tmem.hypervisor"):
            other = connect(HypervisorSettings(xen_release="4.3.0", defects=("H1",)), state_dir)
        assert other.host_info().pid == p.pid               # attached, nothing started
        assert other.host_info().xen_release == "4.0.2"
        (warning,) = [r.getMessage() for r in caplog.records]
        assert f"the running hypervisor (pid {p.pid}) imitates Xen 4.0.2" in warning
        assert "asks for Xen 4.3.0 with defects H1" in warning
        assert "xend-tmem hypervisor stop" in warning
    finally:
        if other is not None:
            other.close()
        stop_process(client, p, state_dir)


def test_a_domain_destroyed_by_another_client_is_unmapped_at_the_next_listing(
        proc: HypervisorClient) -> None:
    other = HypervisorClient(proc.state_dir)
    try:
        d = proc.create_domain(DOMAIN)
        first = proc.read_pages(d, [1])
        other.destroy_domain(d)
        # like Xen's foreign mapping, the old mapping still reads the dying domain's pages
        assert proc.read_pages(d, [1]) == first
        assert d not in [i.domid for i in proc.list_domains()]
        assert isinstance(_error(lambda: proc.read_pages(d, [1])), NoSuchDomain)
    finally:
        other.close()


def test_a_listing_never_unmaps_a_domain_mapped_while_it_ran(proc: HypervisorClient,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    real = proc._call
    made: List[int] = []

    def racing_call(method: str, *args: Any) -> Any:
        value = real(method, *args)
        if method == "list_domains":          # another thread restores meanwhile
            e = real("create_domain_shell", "e", 16, 1, None)
            proc.write_pages(e, [0], page(1))
            made.append(e)
        return value
    monkeypatch.setattr(proc, "_call", racing_call)
    proc.list_domains()
    (e,) = made
    mapping = proc._maps[e]
    monkeypatch.setattr(proc, "_call", real)
    assert proc.read_pages(e, [0]) == page(1)
    assert proc._maps[e] is mapping           # kept, not dropped and made again


def test_a_restore_shell_is_filled_through_the_mapping_in_large_runs(proc: HypervisorClient
                                                                     ) -> None:
    d = proc.create_domain_shell("r", 1024, 1)
    data = os.urandom(300 * 4096)
    proc.write_pages(d, range(100, 400), data)             # one run: faulted in at once
    proc.write_pages(d, [1023, 0], data[:8192])             # two single pages
    assert proc.read_pages(d, range(100, 400)) == data
    assert proc.read_pages(d, [0, 1023, 99, 400]) == data[4096:8192] + data[:4096] + bytes(8192)
    sim = SimHypervisor()
    e = sim.create_domain_shell("r", 1024, 1)
    sim.write_pages(e, list(range(100, 400)), data)
    sim.write_pages(e, [1023, 0], data[:8192])
    assert proc.ram_digest(d) == sim.ram_digest(e)
