"""The guest's heartbeat: its own clock in its RAM, and the gap a move leaves in it.

A running guest process beats at least every millisecond; a stopped one does
not; the beat travels with the RAM (a live save and restore carries the last
beat written before suspend, and the restored guest keeps counting); and
:func:`guest_gap_ms` measures a stop of known length to within a few ms.
"""
from __future__ import annotations

import io
import statistics
import time
from typing import Iterator, List, Tuple
from unittest.mock import create_autospec

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.heartbeat import guest_gap_ms
from xend_tmem.hypervisor.guest import HEARTBEAT_PERIOD_S
from xend_tmem.hypervisor.interface import Inspection
from xend_tmem.hypervisor.sim import SimHypervisor

from hvfixtures import start_process, stop_process


@pytest.fixture
def sim() -> Iterator[SimHypervisor]:
    s = SimHypervisor(guest_processes=True)
    try:
        yield s
    finally:
        s.close()


def busy(hv, name: str = "hb", rate: float = 2000) -> int:
    return hv.create_domain({"name": name, "memory": 8,
                             "workload": {"ram_dirty_pages_per_s": rate}})


def wait_beat(hv, domid: int, after: int = 0, timeout: float = 10.0) -> Tuple[int, int]:
    """The first beat seen whose count is above ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ns, count = hv.guest_heartbeat(domid)
        if count > after:
            return ns, count
        time.sleep(0.005)
    raise AssertionError(f"domain {domid} never beat")


def beats(hv, domid: int, seconds: float) -> List[Tuple[int, int]]:
    """Every distinct beat seen while polling for ``seconds``."""
    seen: List[Tuple[int, int]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        b = hv.guest_heartbeat(domid)
        if not seen or b != seen[-1]:
            seen.append(b)
        time.sleep(0.0001)
    return seen


def test_a_running_guest_beats_about_every_millisecond(sim: SimHypervisor) -> None:
    d = busy(sim)
    wait_beat(sim, d)
    seen = beats(sim, d, 0.3)
    steps = [(b[0] - a[0]) / 1e6 for a, b in zip(seen, seen[1:]) if b[1] == a[1] + 1]
    assert len(steps) > 50, seen[:5]
    assert all(b[1] > a[1] and b[0] > a[0] for a, b in zip(seen, seen[1:]))
    assert statistics.median(steps) <= 1.0, statistics.median(steps)


def test_a_domain_without_a_workload_never_beats(sim: SimHypervisor) -> None:
    d = sim.create_domain({"name": "still", "memory": 4})
    assert sim.guest_heartbeat(d) == (0, 0)
    assert guest_gap_ms(sim, d, 0, 0.05) is None            # no beat in the image


def test_a_suspended_guest_stops_beating_and_its_last_beat_precedes_the_barrier(
        sim: SimHypervisor) -> None:
    d = busy(sim)
    wait_beat(sim, d)
    sim.suspend(d)
    after = time.monotonic_ns()
    last = sim.guest_heartbeat(d)
    assert 0 < after - last[0] < 20_000_000                  # written just before it stopped
    time.sleep(0.03)
    assert sim.guest_heartbeat(d) == last
    assert guest_gap_ms(sim, d, last[0], 0.02) is None       # times out: it does not run
    sim.resume(d)
    nxt = wait_beat(sim, d, after=last[1])
    assert nxt[0] - last[0] >= 30_000_000


def test_the_gap_across_a_50_ms_stop_is_50_ms(sim: SimHypervisor) -> None:
    d = busy(sim)
    wait_beat(sim, d)
    sim.suspend(d)
    stopped = time.monotonic_ns()
    last_ns, last_count = sim.guest_heartbeat(d)
    time.sleep(0.05)
    resumed = time.monotonic_ns()
    sim.resume(d)
    gap = guest_gap_ms(sim, d, last_ns, 5.0, last_count)
    assert gap is not None
    held = (resumed - stopped) / 1e6                         # at least what the guest missed
    assert held <= gap <= held + 8, (gap, held)
    assert 49 <= gap <= 60, gap


def test_the_beat_moves_with_the_ram_and_the_restored_guest_keeps_counting(
        sim: SimHypervisor) -> None:
    d = busy(sim, rate=500)
    wait_beat(sim, d, after=100)             # a count a restart from 0 could not reach soon
    hooks = plugins.get_plugin_manager(["tmem"])
    f = io.BytesIO()
    save_domain(sim, d, f, hooks=hooks, live=True)           # leaves the source suspended
    at_suspend = sim.guest_heartbeat(d)
    sim.destroy_domain(d)
    f.seek(0)
    new, _ = restore_domain(sim, f, hooks=hooks, paused=True)
    assert sim.guest_heartbeat(new) == at_suspend            # the image's last beat
    sim.unpause(new)
    gap = guest_gap_ms(sim, new, at_suspend[0], 10.0, at_suspend[1])
    assert gap is not None and gap > 0
    assert at_suspend[1] > 100
    ns, count = sim.guest_heartbeat(new)
    assert at_suspend[1] < count < at_suspend[1] + 100        # counting on, not from 0


def test_missed_beats_are_corrected_by_the_guest_period() -> None:
    hv = create_autospec(Inspection, instance=True)
    base = 10_000_000_000
    first = base + 30_000_000                                 # the guest ran again 30 ms later
    seen = first + int(3 * HEARTBEAT_PERIOD_S * 1e9)          # the poll saw its 4th beat
    hv.guest_heartbeat.side_effect = [(base, 7), (base, 7), (seen, 11)]
    assert guest_gap_ms(hv, 3, base, 1.0, last_count=7) == pytest.approx(30.0, abs=1e-6)
    hv.guest_heartbeat.assert_called_with(3)
    hv.guest_heartbeat.side_effect = [(seen, 11)]
    assert guest_gap_ms(hv, 3, base, 1.0) == pytest.approx((seen - base) / 1e6)


def test_the_process_client_forwards_the_heartbeat() -> None:
    client, proc, state_dir = start_process()
    try:
        d = busy(client)
        first = wait_beat(client, d)
        time.sleep(0.02)
        later = client.guest_heartbeat(d)
        assert isinstance(later, tuple) and later[1] > first[1] and later[0] > first[0]
        assert abs(time.monotonic_ns() - later[0]) < 1_000_000_000   # one host, one clock
        client.destroy_domain(d)
    finally:
        stop_process(client, proc, state_dir)


def test_a_guest_started_before_its_ram_was_restored_counts_on_from_the_ram() -> None:
    """A guest process may start stopped before a restore fills its RAM: it
    takes the count from RAM when it first runs, not from when it started."""
    import mmap
    import os

    from xend_tmem.hypervisor.guest import (CMD_RUN, HEARTBEAT, HEARTBEAT_MAGIC,
                                            HEARTBEAT_OFFSET, GuestLog, GuestProcess,
                                            heartbeat_pfn, read_heartbeat)
    p2m = 64
    fd = os.memfd_create("hb-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, p2m * 4096)
    ram = mmap.mmap(fd, p2m * 4096)
    log = GuestLog.create(99, p2m)
    g = GuestProcess.spawn(fd, log, 1, running=False)
    try:
        time.sleep(0.2)                                      # it runs, stopped
        assert read_heartbeat(ram, p2m) == (0, 0)            # a stopped guest never beats
        then = time.monotonic_ns() - 40_000_000
        HEARTBEAT.pack_into(ram, heartbeat_pfn(p2m) * 4096 + HEARTBEAT_OFFSET,
                            HEARTBEAT_MAGIC, 6, then, 5000)  # "the restore" writes RAM
        g.command(CMD_RUN, wait=True)
        deadline = time.monotonic() + 5
        while read_heartbeat(ram, p2m)[1] <= 5000 and time.monotonic() < deadline:
            time.sleep(0.001)
        ns, count = read_heartbeat(ram, p2m)
        assert 5000 < count < 5100 and ns - then >= 40_000_000
        # the beat marks its page, just after writing it (a guest writes, then marks)
        while not log.current_bitmap()[heartbeat_pfn(p2m)] and time.monotonic() < deadline:
            time.sleep(0.001)
        assert log.current_bitmap()[heartbeat_pfn(p2m)] == 1
    finally:
        g.stop()
        log.close()
        ram.close()
        os.close(fd)


def test_a_guest_dead_before_its_first_beat_moves_no_beat_and_is_logged(
        sim: SimHypervisor, caplog: pytest.LogCaptureFixture) -> None:
    """Why one grid migration had no guest figure: its source guest process died
    before it beat (as one importing a half-edited guest.py does), so the
    domain ran without writes (last round: 0 pages) and its image held no beat
    for the destination to measure from. The hypervisor must say so."""
    import os
    import signal

    d = busy(sim, rate=3)
    pid = sim.guest_pid(d)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)          # within microseconds of spawn: before any beat
    deadline = time.monotonic() + 5
    while sim.guest_pid(d) is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    hooks = plugins.get_plugin_manager(["tmem"])
    f = io.BytesIO()
    with caplog.at_level("WARNING", logger="xend_tmem.hypervisor.sim"):
        report = save_domain(sim, d, f, hooks=hooks, live=True)
    assert report["last_round_pages"] == 0
    assert sim.guest_heartbeat(d) == (0, 0)                  # no beat to carry
    assert any(f"guest process {pid} exited on its own" in r.getMessage()
               for r in caplog.records)


def test_a_beat_read_waits_out_a_writer_descheduled_mid_beat() -> None:
    """A guest preempted between its two seq stores (a loaded host) must not
    read as "no beat": the old reader gave up after 1000 tight retries (~0.1 ms)
    and returned (0, 0), which broke the strictly-increasing beats above now
    and then. A writer that never finishes (killed mid-beat) still reads as no
    beat, within the reader's time bound."""
    import mmap
    import threading

    from xend_tmem.hypervisor import guest
    p2m = 4
    ram = mmap.mmap(-1, p2m * 4096)
    off = guest.heartbeat_pfn(p2m) * 4096 + guest.HEARTBEAT_OFFSET
    guest.HEARTBEAT.pack_into(ram, off, guest.HEARTBEAT_MAGIC, 7, 1_000, 3)   # seq odd: mid-beat

    def finish() -> None:
        time.sleep(0.005)                                   # descheduled for 5 ms
        guest.HEARTBEAT.pack_into(ram, off, guest.HEARTBEAT_MAGIC, 7, 2_000, 4)
        guest.HEARTBEAT.pack_into(ram, off, guest.HEARTBEAT_MAGIC, 8, 2_000, 4)

    t = threading.Thread(target=finish)
    t.start()
    try:
        assert guest.read_heartbeat(ram, p2m) == (2_000, 4)
    finally:
        t.join()
    guest.HEARTBEAT.pack_into(ram, off, guest.HEARTBEAT_MAGIC, 9, 3_000, 5)   # never finished
    t0 = time.monotonic()
    assert guest.read_heartbeat(ram, p2m) == (0, 0)
    assert time.monotonic() - t0 < 1.0
    ram.close()
