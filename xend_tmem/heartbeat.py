"""The guest's own view of a migration's downtime: the gap in its heartbeat.

The simulated guest writes ``(CLOCK_MONOTONIC ns, count)`` into its own RAM at
least every millisecond while it runs (:mod:`xend_tmem.hypervisor.guest`). The
RAM moves with the domain, so the destination, before it unpauses the
restored domain, reads the last beat the source wrote
(``hv.guest_heartbeat(domid)``); after unpausing it waits for the first beat
its own guest writes. The difference is how long the guest did not run, as a
guest's clock or a ping would notice it: the ``guest_downtime_ms`` of issue 7,
measured independently of the toolstack's own ``downtime_ms``. Both beats are
on one host's monotonic clock (the two daemons of a migration share it).

A real Xen guest would need its own agent for this; the figure is a property
of the simulation, and says so by its name.
"""
from __future__ import annotations

import time
from typing import Optional

from .hypervisor.guest import HEARTBEAT_PERIOD_S
from .hypervisor.interface import Inspection

POLL_S = 0.0002          # well under one beat period: the first new beat is seen
MAX_TIMEOUT_S = 60.0     # a caller's timeout is capped: no unbounded wait


def guest_gap_ms(hv: Inspection, domid: int, last_beat_ns: int, timeout: float,
                 last_count: Optional[int] = None) -> Optional[float]:
    """Milliseconds from the last beat of the image (``last_beat_ns``, read before
    unpause) to the guest's first beat after it, polling ``hv.guest_heartbeat``.

    ``None`` when the guest did not beat within ``timeout`` seconds (no guest
    process: a domain without a workload never beats) or when the image held
    no beat (``last_beat_ns`` 0). With ``last_count`` (the count read with
    ``last_beat_ns``) a poll that saw a later beat than the first is corrected
    by the beats it missed, at the guest's beat period.
    """
    if last_beat_ns <= 0:
        return None
    deadline = time.monotonic() + min(max(timeout, 0.0), MAX_TIMEOUT_S)
    while True:
        ns, count = hv.guest_heartbeat(domid)
        if ns != last_beat_ns and ns > 0:
            missed = 0
            if last_count is not None and count > last_count + 1:
                missed = count - last_count - 1
            first_ns = ns - int(missed * HEARTBEAT_PERIOD_S * 1e9)
            return max(0.0, (first_ns - last_beat_ns) / 1e6)
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


__all__ = ["guest_gap_ms", "POLL_S"]
