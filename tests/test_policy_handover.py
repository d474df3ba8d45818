"""What issue 7's grid found missing from the downtime estimate, end to end:
the receiver's backlog (drained before the suspend), the destination's
restore-finishing work (announced at pre-flight), and the plugin that costs it.
"""
from __future__ import annotations

import socket
import threading
from typing import List, Tuple
from unittest import mock

import pytest

from xend_tmem.errors import Cancelled
from xend_tmem.xend.relocation.client import RateLimiter, _Channel, _PeerWriter, _restore_ms
from xend_tmem.xend.relocation.protocol import RECV_BUFFER
from xend_tmem.hooks import digest


def _pair() -> Tuple[socket.socket, socket.socket]:
    """A loopback TCP connection whose receiving end has the relocation server's
    bounded queue."""
    ls = socket.socket()
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        a = socket.create_connection(ls.getsockname())
        b, _ = ls.accept()
    finally:
        ls.close()
    return a, b


def _late_reader(sock: socket.socket, go: threading.Event, started: threading.Event,
                 got: List[int]) -> None:
    go.wait(10)
    started.set()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return
        got[0] += len(data)


def test_drain_waits_for_the_receiver_to_take_what_was_written() -> None:
    a, b = _pair()
    ch = _Channel(a, "127.0.0.1")
    go, started, got = threading.Event(), threading.Event(), [0]
    t = threading.Thread(target=_late_reader, args=(b, go, started, got), daemon=True)
    t.start()
    try:
        w = _PeerWriter(ch, None, 30.0, framed=True)
        # more than the receiver's queue takes: some stays in this host's queue
        sender = threading.Thread(target=w.write, args=(bytes(4 * RECV_BUFFER),))
        sender.start()
        threading.Timer(0.05, go.set).start()
        sender.join(10)
        w.drain(timeout=10.0)
        assert started.is_set()              # the drain could only end once it read
        assert w.in_flight() == 0
    finally:
        go.set()
        ch.close()
        t.join(10)
        b.close()


def test_drain_stops_for_a_cancel_and_at_its_timeout() -> None:
    a, b = _pair()
    try:
        cancel = threading.Event()
        ch = _Channel(a, "127.0.0.1")
        w = _PeerWriter(ch, cancel, 30.0)
        a.setblocking(False)
        try:                                  # fill both queues; nobody reads
            while True:
                a.send(bytes(1 << 16))
        except BlockingIOError:
            pass
        a.setblocking(True)
        assert w.in_flight() > 0
        w.drain(timeout=0.0)                  # no wait at all: returns with bytes queued
        assert w.in_flight() > 0
        cancel.set()
        with pytest.raises(Cancelled):
            w.drain(timeout=10.0)
    finally:
        ch.close()
        b.close()


@pytest.mark.parametrize("value,ms", [("12.5", 12.5), ("0", 0.0), (None, 0.0), ("-3", 0.0),
                                      ("nan", 0.0), ("inf", 0.0), ("lots", 0.0)])
def test_the_pre_flight_restore_figure_is_read_defensively(value, ms) -> None:
    reply: list = ["ok", ["protocol", "2"]]
    if value is not None:
        reply.append(["restore-ms", value])
    assert _restore_ms(reply) == ms


def _offer(pages) -> dict:
    return {"tmem": {"version": 1, "pools": [], "persistent_pages": pages, "page_size": 4096}}


def test_the_digest_plugin_announces_its_restore_work_per_persistent_page() -> None:
    hv = mock.Mock(spec=[])
    with mock.patch.object(digest, "_per_page_s", [2e-6]):
        assert digest.checkpoint_migrate_restore_cost(hv, _offer(262144)) == \
            pytest.approx(524.288)           # 1 GiB at 2 us a page
        assert digest.checkpoint_migrate_restore_cost(hv, _offer(0)) is None
        assert digest.checkpoint_migrate_restore_cost(hv, _offer("many")) is None
        assert digest.checkpoint_migrate_restore_cost(hv, {}) is None


def test_the_digest_cost_is_calibrated_once_then_measured_by_restores() -> None:
    with mock.patch.object(digest, "_per_page_s", []), \
            mock.patch.object(digest, "_measured", [False]), \
            mock.patch.object(digest, "_calibration", []), \
            mock.patch.object(digest, "CALIBRATION_PAGES", 256):
        first = digest._calibrated_per_page_s()
        assert 0 < first < 1e-3 and digest._calibrated_per_page_s() == first
        pages = digest.MEASURED_MIN_PAGES

        def restore(seconds: float) -> None:
            session = mock.Mock()
            session.report = {}
            session.hv.tmem_digest.return_value = {0: (pages, "ab" * 32)}
            clock = mock.Mock()
            clock.monotonic.side_effect = [10.0, 10.0 + seconds]
            with mock.patch.object(digest, "time", clock):
                digest.checkpoint_restore_done(session, mock.Mock(ok=True))
            assert session.report[digest.NAME]["persistent_pages"] == pages

        restore(0.5)                    # measured: replaces the calibration
        assert digest._calibrated_per_page_s() == pytest.approx(0.5 / pages)
        restore(2.0)                    # a descheduled one does not raise the rate
        assert digest._calibrated_per_page_s() == pytest.approx(0.5 / pages)
        for _ in range(digest.MEASURED_KEPT):
            restore(1.0)                # the last few only
        assert digest._calibrated_per_page_s() == pytest.approx(1.0 / pages)


def test_a_drain_earns_the_rate_limiter_no_tokens() -> None:
    """Drains are excluded from the sending time the rate is judged over, so
    the bucket must not fill while the sender waits for the receiver."""
    now = [0.0]
    lim = RateLimiter(1e6, burst=100_000, clock=lambda: now[0])
    now[0] += 0.1                                       # sending time earns the burst
    assert lim.reserve(100_000) == 0.0                  # the burst is spent
    tokens = lim.pause()
    now[0] += 5.0                                       # a long drain
    lim.resume(tokens)
    assert lim.reserve(10_000) == pytest.approx(0.01)   # still in debt: no refill
    now[0] += 5.0                                       # sending time does refill
    assert lim.reserve(10_000) == 0.0
