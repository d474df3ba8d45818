"""The sender's rate cap (issue 7, ``xm migrate -r``): a token bucket over every
byte the relocation sender writes -- image frames, their CRCs and control lines.

The bucket's arithmetic is checked with a fake clock; a loopback measurement
(marked slow) checks the rate actually reached, 100 Mbit/s to 5 Gbit/s, stays
within 5 % of the cap wherever the uncapped rate is higher.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Tuple

import pytest

from xend_tmem import integrity
from xend_tmem.errors import Cancelled
from xend_tmem.xend.relocation.client import RateLimiter, _Channel, _pace, _PeerWriter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_empty_grants_an_earned_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    lim = RateLimiter(1_000_000, burst=100_000, clock=clock)     # 1 MB/s
    assert lim.reserve(1) > 0                                   # it starts empty
    clock.now += 0.1 + 1e-6                                     # 100 ms idle earn the burst
    lim.refund(1)
    assert lim.reserve(100_000) == 0.0                          # the burst goes at once
    assert lim.reserve(50_000) == pytest.approx(0.05)           # then 50 ms per 50 kB
    clock.now += 0.05
    assert lim.reserve(10_000) == pytest.approx(0.01)
    clock.now += 10.0                                           # idle: tokens cap at burst
    assert lim.reserve(100_000) == 0.0
    assert lim.reserve(1) > 0


def test_bucket_long_run_rate_is_the_cap_whatever_the_chunking() -> None:
    clock = FakeClock()
    rate = 12.5e6                                               # 100 Mbit/s
    lim = RateLimiter(rate, clock=clock)
    start = clock.now
    sent = 0
    for size in [lim.chunk, 77, 4096, 1 << 20, 3] * 400:
        wait = lim.reserve(size)
        clock.now += wait                                       # the sender sleeps that long
        sent += size
    elapsed = clock.now - start
    # never above the cap: the bucket starts empty, so not even by a burst
    assert sent <= rate * elapsed + 1                      # (+1: float rounding)
    assert sent / elapsed == pytest.approx(rate, rel=0.02)


def test_refund_returns_unsent_bytes() -> None:
    clock = FakeClock()
    lim = RateLimiter(1e6, burst=10_000, clock=clock)
    clock.now += 0.01                                           # earn the burst first
    assert lim.reserve(10_000) == 0.0
    lim.refund(10_000)
    assert lim.sent == 0 and lim.reserve(10_000) == 0.0


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)


def test_a_cancel_ends_the_wait() -> None:
    clock = FakeClock()
    lim = RateLimiter(1000, burst=1000, clock=clock)
    lim.reserve(1000)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        _pace(lim, 10_000, cancel)                              # 10 s owed: not waited


def _pair() -> Tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    finally:
        lsock.close()
    return a, b


def _drain(sock: socket.socket, got: List[int]) -> None:
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError:
            return
        if not data:
            return
        got[0] += len(data)


def send_for(cap_bps, seconds: float, crc: bool = True) -> Tuple[float, int, int]:
    """Frames (and a control line) through the sender for ``seconds``: the rate
    the receiver saw, its bytes, and the bytes the channel counted."""
    a, b = _pair()
    got = [0]
    t = threading.Thread(target=_drain, args=(b, got), daemon=True)
    t.start()
    try:
        ch = _Channel(a, "127.0.0.1", RateLimiter(cap_bps) if cap_bps else None)
        w = _PeerWriter(ch, None, 30.0, framed=True,
                        page_log=integrity.PageLog() if crc else None)
        block = memoryview(bytes(1 << 20))
        ch.send_line(["go"])
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            w.write(block)
        w.end()
        elapsed = time.monotonic() - t0
        a.shutdown(socket.SHUT_WR)
        t.join(10)
        return got[0] / elapsed, got[0], ch.wire_bytes
    finally:
        a.close()
        b.close()


def test_every_byte_written_is_counted_under_the_cap() -> None:
    rate, got, counted = send_for(200e6 / 8, 0.05)
    assert got == counted                     # frames, CRCs, the end frame and the line


@pytest.mark.slow
@pytest.mark.parametrize("mbit", [100, 500, 1000, 2500, 5000])
def test_loopback_rate_stays_within_5_percent_of_the_cap(mbit: int) -> None:
    cap = mbit * 1e6 / 8
    uncapped, _, _ = send_for(None, 0.3)
    if uncapped < cap * 1.05:
        pytest.skip(f"loopback moves {uncapped * 8 / 1e6:.0f} Mbit/s here, not above "
                    f"the {mbit} Mbit/s cap")
    rate, _, _ = send_for(cap, 1.0)
    assert cap * 0.95 <= rate <= cap * 1.05, (rate * 8 / 1e6, mbit)
