"""The relocation protocol in-process: two simulated hosts on loopback threads.

Covers the wire contract both ways (stock xend peers, the pre-flight and
acknowledgement extensions) and that every failure leaves the source running
under its own name with its tmem thawed.
"""
from __future__ import annotations

import io
import logging
import re
import socket
import threading
import time

import pytest

from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import Cancelled, PeerError, StreamError
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.relocation.client import RateLimiter, migrate
from xend_tmem.xend.relocation.protocol import err_line, parse_reply, reply_error_message
from xend_tmem.xend.relocation.server import GO_TIMEOUT_S, RelocationServer, host_allowed

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [
              {"id": 0, "persistent": True, "bulk": {"pages": 64, "objects": 2}},
              {"id": 1, "persistent": False, "bulk": {"pages": 16}}]}}


@pytest.fixture
def hooks():
    return get_plugin_manager(["tmem"], {})


@pytest.fixture
def source(hooks):
    hv = SimHypervisor()
    domid = hv.create_domain(parse_domain_config(DOMAIN))
    return hv, domid


class Receiver:
    """A receiving host: a sim hypervisor behind a RelocationServer."""

    def __init__(self, hooks, check=lambda offer: [], restore=None, patterns=(),
                 journal=None, go_timeout=GO_TIMEOUT_S) -> None:
        self.hv = SimHypervisor()
        self.hooks = hooks
        self.offers = []
        self.restores = 0

        def default_restore(stream, peer, paused=False, on_created=None, page_check=None):
            self.restores += 1
            return restore_domain(self.hv, stream, hooks=hooks, paused=paused,
                                  on_created=on_created, page_check=page_check)

        def check_offer(offer):
            self.offers.append(offer)
            return check(offer)

        self.server = RelocationServer(
            "127.0.0.1", 0, hosts_allow=[re.compile(p) for p in patterns],
            restore=restore or default_restore, check_offer=check_offer,
            discard=self.hv.destroy_domain, unpause=self.hv.unpause, journal=journal,
            go_timeout=go_timeout)
        self.server.start()

    def names(self):
        return [d.name for d in self.hv.list_domains()]


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kwargs):
        r = Receiver(*args, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.server.stop(5)


def assert_source_intact(hv, domid: int) -> None:
    info = hv.domain_info(domid)
    assert info.name == "web1" and info.running and not info.shutdown
    client = hv.tmem_state(domid)["client"]
    assert client["frozen"] is False
    assert "saving=0" in hv.tmem_list(domid)


def test_host_allowed_matches_whole_address_or_name() -> None:
    pats = [re.compile(r"10\.0\.0\.1"), re.compile(r"^db[0-9]+\.example$")]
    names = {"10.0.0.10": ["other.example"], "10.0.0.7": ["db7.example"]}.get
    assert host_allowed(pats, "10.0.0.1", lambda a: [])
    assert not host_allowed(pats, "10.0.0.10", lambda a: names(a, []))
    assert host_allowed(pats, "10.0.0.7", lambda a: names(a, []))
    assert host_allowed([], "192.0.2.1", lambda a: [])


def test_extended_migration_acknowledged(source, hooks, receivers) -> None:
    hv, domid = source
    rx = receivers(hooks)
    accepted = []
    report = migrate(hv, domid, "127.0.0.1", rx.server.port, live=True, hooks=hooks,
                     on_accepted=lambda: accepted.append(hv.domain_info(domid).name))
    assert accepted == ["web1"]
    assert report["extended"] is True and report["peer_domid"] == 1
    assert rx.offers[0]["plugins"]["tmem"]["persistent_pages"] == 64
    assert rx.offers[0]["domain"]["name"] == "web1"
    assert hv.domain_info(domid).shutdown                     # left suspended for the caller
    assert rx.names() == ["Domain-0", "web1"]
    assert rx.hv.tmem_digest(1) == hv.tmem_digest(domid)


def test_preflight_refusal_touches_nothing(source, hooks, receivers) -> None:
    hv, domid = source
    rx = receivers(hooks, check=lambda offer: ["no room", "wrong moon phase"])
    called = []
    with pytest.raises(PeerError, match=r"^migration refused: no room; wrong moon phase "
                                        r"\(from 127\.0\.0\.1\); domain web1 keeps running "
                                        r"here, untouched: .*retry xm migrate"):
        migrate(hv, domid, "127.0.0.1", rx.server.port, live=True, hooks=hooks,
                on_accepted=lambda: called.append(1))
    assert called == [] and rx.restores == 0
    assert_source_intact(hv, domid)


def test_restore_failure_on_the_receiver_resumes_the_source(source, hooks, receivers) -> None:
    hv, domid = source

    def failing_restore(stream, peer, paused=False, on_created=None, page_check=None):
        stream.read(1 << 16)
        raise StreamError("pool flags wrong", offset=1234, field="pool flags", value=5)

    rx = receivers(hooks, restore=failing_restore)
    with pytest.raises(PeerError, match=r"pool flags wrong \(from 127\.0\.0\.1\); domain web1 keeps "
                                        r"running here \(it was not started on 127\.0\.0\.1, "
                                        r"whose copy is destroyed\): retry xm migrate$"):
        migrate(hv, domid, "127.0.0.1", rx.server.port, live=False, hooks=hooks)
    assert_source_intact(hv, domid)


def test_stock_sender_gets_xends_answers(source, hooks, receivers) -> None:
    """A sender that knows nothing of the extensions: receive, image, silence."""
    hv, domid = source
    image = io.BytesIO()
    save_domain(hv, domid, image, hooks=hooks, live=False, checkpoint=True)
    rx = receivers(hooks)
    with socket.create_connection(("127.0.0.1", rx.server.port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(b"(help)\n")
        assert f.readline() == b"(err (type Error) (value \"Invalid operation help\"))\n"
        s.sendall(b"receive\n")
        assert f.readline() == b"(ready receive)\n"
        s.sendall(image.getvalue())
        s.shutdown(socket.SHUT_WR)
        assert f.read() == b""                              # success: no word, as xend
        f.close()
    assert rx.names() == ["Domain-0", "web1"]


def test_stock_receiver_is_used_without_extensions(source, hooks) -> None:
    """A receiver that answers the pre-flight as an unknown op and never acks."""
    hv, domid = source
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = {}

    def stock() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            got["first"] = f.readline()
            conn.sendall(b"(err (type Error) (value 'Invalid operation xend-tmem-preflight'))\n")
            got["second"] = f.readline()
            conn.sendall(b"(ready receive)\n")
            got["image"] = f.read()

    t = threading.Thread(target=stock)
    t.start()
    try:
        report = migrate(hv, domid, "127.0.0.1", listener.getsockname()[1],
                         live=False, hooks=hooks)
    finally:
        t.join(10)
        listener.close()
    assert got["first"].startswith(b"(xend-tmem-preflight (offer ")
    assert got["second"] == b"receive\n"
    assert got["image"].startswith(b"LinuxGuestRecord") and len(got["image"]) == report["bytes"]
    assert report["extended"] is False and "peer_domid" not in report


def test_cancel_while_the_receiver_stalls(source, hooks) -> None:
    hv, domid = source
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def stalled() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            f.readline()
            conn.sendall(b"(ok (protocol 2))\n")
            f.readline()
            conn.sendall(b"(ready receive)\n")
            stop.wait(20)                                    # never reads the image

    t = threading.Thread(target=stalled)
    t.start()
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            migrate(hv, domid, "127.0.0.1", listener.getsockname()[1], live=True,
                    hooks=hooks, cancel=cancel)
    finally:
        stop.set()
        t.join(10)
        listener.close()
    assert time.monotonic() - started < 5
    assert_source_intact(hv, domid)


def test_connection_refused_is_a_peer_error(source, hooks) -> None:
    hv, domid = source
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerError, match=f"can't connect to 127.0.0.1:{port}: "):
        migrate(hv, domid, "127.0.0.1", port, live=True, hooks=hooks)
    assert_source_intact(hv, domid)


def test_err_line_is_one_line_and_parses_back() -> None:
    line = err_line("StreamError", "bad 'stream'\nat offset 5")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    form = parse_reply(line, "h")
    assert form[0] == "err" and reply_error_message(form) == "bad 'stream' at offset 5"


def test_timing_figures_over_the_handshake(hooks, caplog) -> None:
    """downtime_ms (suspend -> running, the source's clock), its parts restore_ms
    and handshake_ms, and the guest's own heartbeat gap, all measured apart."""
    caplog.set_level(logging.INFO, logger="xend_tmem.hypervisor.sim")
    src = SimHypervisor(guest_processes=True)
    dst = SimHypervisor(guest_processes=True)
    server = RelocationServer(
        "127.0.0.1", 0, hosts_allow=[],
        restore=lambda stream, peer, paused=False, on_created=None, page_check=None:
        restore_domain(dst, stream, hooks=hooks, paused=paused, on_created=on_created,
                       page_check=page_check),
        check_offer=lambda offer: [], discard=dst.destroy_domain, unpause=dst.unpause,
        hv=dst)
    server.start()
    try:
        domid = src.create_domain(parse_domain_config(
            {**DOMAIN, "workload": {"ram_dirty_pages_per_s": 500}}))
        deadline = time.monotonic() + 10
        while src.guest_heartbeat(domid)[1] < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        # capped so the image takes ~0.5 s: the destination's guest process (a
        # python started when the restore builds the domain) is up before go
        report = migrate(src, domid, "127.0.0.1", server.port, live=True,
                         hooks=hooks, rate_cap_bps=80e6 / 8)
        assert "downtime_s" not in report and "resumed_after_s" not in report
        down, hand, rest = report["downtime_ms"], report["handshake_ms"], report["restore_ms"]
        guest = report["guest_downtime_ms"]
        assert isinstance(rest, float) and report["destination"]["restore_ms"] == rest
        assert 0 < hand < down and 0 <= rest < down
        assert report["image_ms"] < down                      # suspend -> image complete
        assert report["wire_bytes"] > report["bytes"]          # frames, CRCs, lines
        assert guest is not None
        # the guest beats until it acknowledges the suspend barrier, which under
        # load can come several ms after the call began (the downtime's start)
        stops = [float(m) for r in caplog.records for m in re.findall(
            rf"domain {domid} (?:suspended|stopped) at mono=([0-9.]+)", r.getMessage())]
        barrier_ms = (stops[-1] - stops[-2]) * 1000.0
        tol = max(0.10 * down, 5.0)
        assert down - barrier_ms - tol <= guest <= down + tol, {k: report.get(k) for k in (
            "downtime_ms", "guest_downtime_ms", "image_ms", "restore_ms", "handshake_ms")}
    finally:
        server.stop(5)
        src.close()
        dst.close()


def test_rate_cap_bounds_the_whole_transfer(source, hooks, receivers) -> None:
    hv, domid = source
    rx = receivers(hooks)
    cap = 200e6 / 8                                            # xm migrate -r 200
    t0 = time.monotonic()
    report = migrate(hv, domid, "127.0.0.1", rx.server.port, live=True,
                     hooks=hooks, rate_cap_bps=cap)
    took = time.monotonic() - t0
    assert report["rate_cap_mbit"] == 200.0
    burst = RateLimiter(cap).burst
    assert took >= (report["wire_bytes"] - burst) / cap
    assert report["send_mbit"] <= 200 * 1.05


def test_the_done_phase_runs_after_running_and_delays_nothing(source, hooks, receivers,
                                                              monkeypatch) -> None:
    hv, domid = source
    rx = receivers(hooks)
    order = []
    real_done = hooks.save_done

    def slow_done(session, outcome):
        order.append(("done", rx.hv.domain_info(1).running))   # the destination runs it already
        time.sleep(0.4)
        return real_done(session, outcome)

    monkeypatch.setattr(hooks, "save_done", slow_done)
    report = migrate(hv, domid, "127.0.0.1", rx.server.port, live=True, hooks=hooks)
    assert order == [("done", True)]
    assert report["downtime_ms"] < 400 and report["handshake_ms"] < 400
