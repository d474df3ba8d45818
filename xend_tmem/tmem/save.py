"""Saving a domain's tmem: the ``-5`` chunk from the hypervisor's walk, the
``-6`` invalidation log, and the plan that decides when each goes.

Fixes over Xen's ``xc_tmem_save``: SAVE_END after every SAVE_BEGIN that
returned 1, live or not (T10), and never after one that did not (Xen's SAVE_END
would restore a stale frozen state); a walk that runs short is ended with the
terminator rather than desynchronising (T3); an all-ones OID is refused (T4);
the spec version is written into every v1 pool's flags (H4); and the
invalidation log is sent in parts without re-sending what already went.

On defective hypervisors (SPEC §7), never a stream that restores to another
state than the one saved:

* H8 (4.4.0+, ``host_info().can_move_tmem`` False): a domain with persistent
  pages is refused in the setup phase, before SAVE_BEGIN (:func:`check_movable`).
* H2 (the walk skips each pool's first page) reported by the hypervisor: refused
  the same way; unreported, the walk check below catches it.
* H1 (the first SAVE_GET_POOL_UUID also runs SAVE_END): avoided. Every uuid is
  read right after SAVE_BEGIN, the accidental SAVE_END has then thawed nothing
  that was sent, and SAVE_BEGIN is issued once more; no uuid is asked again.
* H3 (a walk cursor left over from an earlier save) and any other short walk:
  a pool whose walk returns fewer pages than announced, more than the live
  save's logged deletions explain, fails the save naming the defects.
"""
from __future__ import annotations

import contextlib
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Sequence, Tuple

from ..binio import StreamWriter
from ..codec import tmemchunk as tc
from .. import xen
from ..errors import SaveError
from ..hypervisor.interface import Buffer, Hypervisor
from ..integrity import PageLog
from ..session import Pending, RoundStats, SaveSession
from . import policy
from .settings import TmemSettings

INV_BATCH = 4096


class TmemSizes:
    """Read-only look at the client before anything is frozen."""

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        self.version = hv.save_get_version(domid)
        self.max_pools = hv.save_get_maxpools(domid)
        self.pools = 0
        self.persistent_pages = 0
        self.persistent_bytes = 0
        for pool_id in range(min(self.max_pools, xen.MAX_POOLS)):
            flags = hv.save_get_pool_flags(domid, pool_id)
            if flags is None:
                continue
            self.pools += 1
            if flags & xen.POOL_PERSIST:
                n = hv.save_get_pool_npages(domid, pool_id)
                size = xen.PAGE_SIZE << ((flags >> xen.POOL_PAGEBITS_SHIFT) & 0xF)
                self.persistent_pages += n
                self.persistent_bytes += n * tc.record_size(self.version, size)


def check_movable(hv: Hypervisor, domid: int, persistent_pages: int) -> None:
    """Refuse, before anything is frozen or written, a save whose stream would
    lose persistent pages on this hypervisor (H8, or a reported H2)."""
    if not persistent_pages:
        return
    info = hv.host_info()
    if not info.can_move_tmem:
        raise SaveError(f"this host cannot move tmem (Xen {info.xen_release}: the hypervisor "
                        f"hands out tmem pages only on its compression path, H8): saving "
                        f"domain {domid} would lose its {persistent_pages} persistent tmem pages")
    if "H2" in info.defects:
        raise SaveError(f"Xen {info.xen_release} has defect H2 (its tmem page walk never "
                        f"returns a pool's first page): saving domain {domid} would lose "
                        f"pages of its {persistent_pages} persistent tmem pages")


class TmemWriter:
    """Writes the chunks for one save; the hypervisor holds the cursors.

    ``defects`` are the hypervisor's (``host_info().defects``): with H1 the
    writer reads the uuids first and begins the save again (module doc).
    """

    def __init__(self, hv: Hypervisor, domid: int, live: bool,
                 progress: Optional[Callable[[int], None]] = None,
                 defects: Sequence[str] = ()) -> None:
        self.hv = hv
        self.progress = progress
        self.domid = domid
        self.live = live
        self.defects = tuple(defects)
        self.version: Optional[int] = None
        self.max_pools = xen.MAX_POOLS
        self.attempted = False    # SAVE_BEGIN was issued (the tmem phase ran)
        self.begun = False        # SAVE_BEGIN returned 1: SAVE_END owed
        self.started = False      # SAVE_BEGIN said there is something to save
        self.froze_at: Optional[float] = None
        self.inv_sent = 0
        self.pages = 0
        self.bytes = 0
        self.chunk_written = False
        self.uuids: Optional[Dict[int, Tuple[int, int]]] = None   # read before the save (H1)
        self.page_log: Optional[PageLog] = None   # when the save keeps page checksums

    def begin(self) -> bool:
        """SAVE_BEGIN; only a True answer makes SAVE_END owed (a raise or a 0 does not)."""
        hv, domid = self.hv, self.domid
        self.attempted = True
        self.started = bool(hv.save_begin(domid, self.live))
        self.begun = self.started
        if self.started and "H1" in self.defects:
            self._begin_around_h1()
        if self.started:
            self.froze_at = time.monotonic()
        return self.started

    def _begin_around_h1(self) -> None:
        """H1: the first SAVE_GET_POOL_UUID ends the save. Ask every uuid now,
        before a byte is written (that SAVE_END restores the frozen state this
        SAVE_BEGIN remembered, so nothing is lost), then begin again."""
        hv, domid = self.hv, self.domid
        uuids: Dict[int, Tuple[int, int]] = {}
        for pool_id in range(min(hv.save_get_maxpools(domid), xen.MAX_POOLS)):
            if hv.save_get_pool_flags(domid, pool_id) is not None:
                u0, u1 = hv.save_get_pool_uuid(domid, pool_id)
                uuids[pool_id] = (u0, u1)
        # SAVE_END stays owed whatever this answers: after either SAVE_BEGIN it
        # restores the frozen state remembered before anything was frozen
        self.started = bool(hv.save_begin(domid, self.live))
        self.uuids = uuids

    def _uuid(self, pool_id: int) -> Tuple[int, int]:
        if self.uuids is None:
            u0, u1 = self.hv.save_get_pool_uuid(self.domid, pool_id)
            return (u0, u1)
        if pool_id not in self.uuids:
            raise SaveError(f"domain {self.domid} created tmem pool {pool_id} while the save "
                            f"was begun again around hypervisor defect H1 (its uuid cannot "
                            f"be read without ending the save): try the save again")
        return self.uuids[pool_id]

    def write_tmem(self, w: StreamWriter) -> None:
        hv, domid = self.hv, self.domid
        start = w.offset
        version = hv.save_get_version(domid)
        if version not in xen.TMEM_SPEC_VERSIONS:
            raise ValueError(f"hypervisor reports tmem spec version {version}")
        self.version = version
        max_pools = hv.save_get_maxpools(domid)
        self.max_pools = max_pools
        client = tc.ClientRecord(version, max_pools, hv.save_get_client_flags(domid),
                                 hv.save_get_client_weight(domid), hv.save_get_client_cap(domid))
        tc.write_client(w, client)
        for pool_id in range(min(max_pools, xen.MAX_POOLS)):
            flags = hv.save_get_pool_flags(domid, pool_id)
            if flags is None:
                continue
            if version == 1 and not flags >> xen.POOL_VERSION_SHIFT:
                flags |= 1 << xen.POOL_VERSION_SHIFT       # H4: report the version bits
            persistent = bool(flags & xen.POOL_PERSIST)
            n_pages = hv.save_get_pool_npages(domid, pool_id) if persistent else 0
            pool = tc.PoolRecord(pool_id, flags, n_pages, self._uuid(pool_id))
            tc.write_pool(w, pool)
            self._write_pages(w, pool)
        tc.write_pool_list_end(w)
        self.chunk_written = True
        self.bytes += w.offset - start

    def _write_pages(self, w: StreamWriter, pool: tc.PoolRecord) -> None:
        """The pool's pages, batch by batch, two batches in flight: while this
        thread writes batch k, a helper thread asks the hypervisor for batch k+1
        (the hypervisor's copy and the round trip overlap the file write).

        The helper makes the same calls, in the same order, with the same
        counts as a plain loop would: each request is issued only after the
        previous one answered, and never for more than the pages announced, so
        the walk cursor advances only by calls this toolstack made (H3). The one
        difference: a save that fails or is cancelled while writing batch k has
        already asked for batch k+1 (Xen's toolstack may do the same); SAVE_END
        follows either way.

        Where the hypervisor lends its batches (``save_pages_lending``, then
        ``save_get_pages_held``), they are written from the lent buffer with no
        copy in this process, in the batch size the backend serves best: a
        process's client leaves each batch in a connection's shared buffer
        (two held at once, so a second request queues behind the one in
        flight); an in-process simulator lends views of its store, a
        segment's run of records, which cost nothing to hand out: there is
        then nothing for a helper thread to overlap (unless it computes page
        checksums), so the calls are the plain loop's. With requests queued
        the calls are still one at a time, in order, none after the walk's end
        and none past the pages announced, but a request queued behind a batch
        that came back short asks for fewer pages than the plain loop would
        have. A backend that declines to lend is asked ``save_get_pages``."""
        version = self.version
        assert version is not None           # write_tmem read it before the pools
        hv, domid, pool_id, n_pages = self.hv, self.domid, pool.pool_id, pool.n_pages
        lending = hv.save_pages_lending()
        per_batch = max(1, (lending.batch_bytes if lending is not None else tc.BATCH_BYTES)
                        // tc.record_size(version, pool.page_size))
        # one batch has nothing to overlap, nor has a free loan without checksums
        # to compute: no helper thread then
        fetcher = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="tmem-walk")
                   if n_pages > per_batch
                   and not (lending is not None and lending.immediate and self.page_log is None)
                   else None)

        # with page checksums the hypervisor computes each page's CRC32 as it
        # copies the batch (on its own core): one array per batch in flight
        crc_batches: Dict[int, array[int]] = {}
        held: Dict[int, Callable[[], None]] = {}

        def get(n: int) -> Tuple[int, Buffer]:
            crcs = array("I", bytes(4 * n)) if self.page_log is not None else None
            records: Buffer
            if lending is not None:
                count, records, release = hv.save_get_pages_held(domid, pool_id, n, crcs=crcs)
                held[id(records)] = release
            elif crcs is None:
                count, records = hv.save_get_pages(domid, pool_id, n)
            else:
                count, records = hv.save_get_pages(domid, pool_id, n, crcs=crcs)
            if crcs is not None:
                crc_batches[id(records)] = crcs
            return count, records

        sent = 0
        # lent batches: up to ``in_flight`` requests queued (the hypervisor fills
        # the next ones while this thread writes one), each for no more than the
        # pages announced and neither received nor asked; the helper skips a
        # request queued behind an answer of 0 (the walk ended: no call after
        # it). Otherwise one in flight: the plain loop's calls.
        depth = max(1, lending.in_flight) if lending is not None and fetcher is not None else 1
        ended = [False]

        def get_queued(n: int) -> Tuple[int, Buffer]:
            if ended[0]:
                return 0, b""
            count, records = get(n)
            if not count:
                ended[0] = True
            return count, records

        queue: Deque[Tuple["Future[Tuple[int, Buffer]]", int]] = deque()
        outstanding = 0                         # pages asked, not answered yet

        def ask_more() -> None:
            nonlocal outstanding
            while len(queue) < depth and n_pages - sent - outstanding > 0:
                n = min(per_batch, n_pages - sent - outstanding)
                outstanding += n
                if fetcher is not None:
                    queue.append((fetcher.submit(get_queued, n), n))
                else:
                    done: "Future[Tuple[int, Buffer]]" = Future()
                    done.set_result(get_queued(n))
                    queue.append((done, n))
        # a frozen client's private pool lent in place stays as it is until the
        # save ends: its pages may go into a pipe by reference (StreamWriter.stable)
        in_place = lending is not None and lending.in_place and not pool.shared
        try:
            ask_more()
            with w.stable() if in_place else contextlib.nullcontext():
                while queue:
                    future, n = queue.popleft()
                    count, records = future.result()
                    outstanding -= n
                    release = held.pop(id(records), None)
                    if not count:
                        if release is not None:
                            release()
                        break
                    try:
                        sent += count
                        ask_more()                  # before writing: the fetch overlaps it
                        if self.page_log is not None:
                            # (write_page_records checks the records (T4) before they
                            # go out; a batch that fails fails the save, log and all)
                            crcs = crc_batches.pop(id(records))
                            self.page_log.tmem(pool_id, version, records, count,
                                               pool.page_size, w.offset, crcs=crcs[:count])
                        tc.write_page_records(w, version, records, count, pool.page_size,
                                              pool_id)
                    finally:
                        if release is not None:
                            release()
                    if self.progress is not None:
                        self.progress(w.offset)
        finally:
            if fetcher is not None:
                fetcher.shutdown(wait=True)  # requests in flight end before SAVE_END
            for left in held.values():      # batches fetched but not written (a failure)
                left()
        if sent < pool.n_pages:
            self._check_short_walk(pool, sent)
            tc.write_pages_end(w, version)       # T3: end the list, keep the stream in step
        self.pages += sent

    def _check_short_walk(self, pool: tc.PoolRecord, sent: int) -> None:
        """A walk may run short only by pages deleted since SAVE_BEGIN, which a
        live save logs (and ``-6`` carries). More missing means the hypervisor
        skipped pages (H2, H3): fail rather than write a stream that lacks them.
        A shared pool is not checked: another sharer's deletions go unlogged."""
        if pool.flags & xen.POOL_SHARED:
            return
        deleted = 0
        start = 0
        while True:
            batch = self.hv.save_get_invs(self.domid, start, INV_BATCH)
            if not batch:
                break
            start += len(batch)
            deleted += sum(1 for e in batch if e[0] == pool.pool_id)
        if sent + deleted >= pool.n_pages:
            return
        missing = pool.n_pages - sent - deleted
        what = {"H2": "H2 (the walk never returns a pool's first page)",
                "H3": "H3 (a walk cursor left over from an earlier save)"}
        known = [what[d] for d in self.defects if d in what]
        which = ("defect " + " and ".join(known) if known else
                 "defect " + " or ".join(what.values()))
        raise SaveError(f"the hypervisor's page walk of tmem pool {pool.pool_id} of domain "
                        f"{self.domid} returned {sent} of {pool.n_pages} pages with {deleted} "
                        f"deleted meanwhile: {missing} pages skipped, hypervisor {which}; "
                        f"not writing a stream without them")

    def write_extra(self, w: StreamWriter, *, always: bool) -> int:
        """Send the log entries not sent yet as one ``-6`` chunk (if any, or ``always``)."""
        hv, domid = self.hv, self.domid
        first = hv.save_get_invs(domid, self.inv_sent, INV_BATCH)
        if not first and not always:
            return 0
        start = w.offset

        def entries() -> Iterator[Tuple[int, tc.OID, int]]:
            batch = first
            while batch:
                yield from batch
                self.inv_sent += len(batch)
                batch = hv.save_get_invs(domid, self.inv_sent, INV_BATCH)

        n = tc.write_extra(w, self.version if self.version is not None else 1, entries())
        self.bytes += w.offset - start
        return n

    def end(self) -> None:
        """SAVE_END, only after a SAVE_BEGIN that returned True (and once)."""
        if self.begun:
            self.begun = False
            self.hv.save_end(self.domid)


class TmemSaveJob:
    """The tmem side of one save, phase by phase, following the chosen plan.

    The plan comes from :func:`policy.choose_plan` over the host's limits
    (``session.limits``) and rates; ``auto`` without a configured bandwidth is
    re-estimated after every round from the rates the host measured, while the
    plan is still open (tmem not sent). Late-freeze sends tmem when
    :func:`policy.late_freeze_now` says so.
    """

    def __init__(self, session: SaveSession, settings: TmemSettings) -> None:
        self.session = session
        self.settings = settings
        self.sizes = TmemSizes(session.hv, session.domid)
        check_movable(session.hv, session.domid, self.sizes.persistent_pages)
        self.writer = TmemWriter(session.hv, session.domid, session.live, self._progress,
                                 defects=session.hv.host_info().defects)
        self.writer.page_log = session.page_log
        self._tmem_end: Optional[int] = None
        self.choice: Optional[policy.PlanChoice] = None
        self.plan = "non-live"
        self.reason = "the guest is suspended for the whole save"
        self.sent_ram_pages = 0
        self.started = time.monotonic()
        self.suspended_at: Optional[float] = None
        self.late_reason = ""
        self.est_freeze_ms: Optional[float] = None
        self._last_stats: Optional[RoundStats] = None
        self.report: Dict[str, Any] = session.report.setdefault("tmem", {})
        if session.live:
            self.choice = policy.choose_plan(
                self.sizes.persistent_bytes, session.p2m_size, self._initial_rates(),
                session.limits, settings.plan)
            self.plan, self.reason = self.choice.plan, self.choice.reason
            self.est_freeze_ms = self.choice.estimate().est_freeze_ms
        if settings.layout == "seed":
            self.plan = "precopy" if session.live else "non-live"
            if session.live:
                self.reason = "seed layout: tmem goes before p2m_size"
        if self.choice is not None and settings.layout != "seed":
            session.log.info("domain %d: %s", session.domid, self.choice.log_line())
        else:
            session.log.info("domain %d: tmem plan %s: %s", session.domid, self.plan,
                             self.reason)
        self._update_report()

    def _initial_rates(self) -> policy.Rates:
        """Before round 1: the configured bandwidth hint, else the host's rates
        (assumed, or bounded by its rate cap)."""
        s = self.session
        if s.rates is not None:
            return s.rates
        hint = self.settings.bandwidth_bps
        rates = policy.RoundWindow().rates(hint or policy.DEFAULT_BANDWIDTH, s.overhead_ms,
                                           cap_bps=s.rate_cap_bps)
        return replace(rates, source="configured") if hint else rates

    def _rates(self, stats: RoundStats) -> policy.Rates:
        """The rates the host measured through this round, with this save's own
        invalidation rate (the host knows nothing of tmem)."""
        s = self.session
        rates = s.rates
        if rates is None:           # a host that measures nothing: this round's bandwidth
            bw = stats.bandwidth_bps or policy.DEFAULT_BANDWIDTH
            rates = policy.Rates(min(bw, s.rate_cap_bps) if s.rate_cap_bps else bw, 0.0, 0.0,
                                 s.overhead_ms, "measured")
        wr = self.writer
        if wr.froze_at is not None and wr.inv_sent:
            rates = replace(rates, inv_per_s=wr.inv_sent / max(time.monotonic() - wr.froze_at,
                                                               1e-3))
        return rates

    def _progress_now(self, stats: RoundStats) -> policy.Progress:
        """Where the save stands after this round, RAM's side, as the host weighs it."""
        if self.session.round_progress is not None:
            return self.session.round_progress
        return policy.Progress(rounds=stats.number, elapsed_s=time.monotonic() - self.started,
                               pages_sent=self.sent_ram_pages, dirty_pages=stats.dirty_pages,
                               ram_pages=stats.ram_pages, last_round_pages=stats.pages_sent,
                               last_round_s=stats.elapsed_s)

    # -- phases ---------------------------------------------------------------
    def _progress(self, offset: int) -> None:
        """Per page batch: report, and stop promptly if the save was cancelled."""
        self.session.check_cancel()
        self.session.progress("tmem", offset, self._tmem_end)

    def _send_tmem(self) -> None:
        w = self.session.out
        self._tmem_end = w.offset + self.sizes.persistent_bytes
        self._progress(w.offset)
        self.session.journal_note("tmem", {"save_begin": "issued"})
        started = self.writer.begin()
        # SAVE_END owed if True (around H1 it is owed even if the second SAVE_BEGIN said 0)
        self.session.journal_note("tmem", {"save_begin": self.writer.begun})
        if started:
            self.writer.write_tmem(w)
        self._progress(w.offset)

    def before_header(self) -> None:
        if self.settings.layout == "seed":
            self._send_tmem()

    def before_rounds(self) -> None:
        if self.settings.layout == "seed":
            return
        if not self.session.live or self.plan == "precopy":
            self._send_tmem()

    def _revise_plan(self, stats: RoundStats, rates: policy.Rates,
                     progress: policy.Progress) -> None:
        """``auto`` without a configured bandwidth decided on an assumed one;
        once rounds have measured the rates, decide again after every round
        among the plans still open (tmem not sent yet, so not precopy)."""
        if (self.settings.plan != "auto" or self.settings.bandwidth_bps is not None
                or self.settings.layout == "seed" or self.writer.attempted
                or self.plan not in ("late-freeze", "after-suspend")):
            return
        c = policy.choose_plan(self.sizes.persistent_bytes, stats.ram_pages, rates,
                               self.session.limits, "auto",
                               plans=("after-suspend", "late-freeze"), start=progress)
        if c.plan != self.plan:
            self.session.log.info("domain %d: after round %d: %s", self.session.domid,
                                  stats.number, c.log_line())
        self.choice, self.plan, self.reason = c, c.plan, c.reason

    def _estimate_freeze(self, rates: policy.Rates, progress: policy.Progress) -> float:
        """The freeze window expected now: frozen so far plus the rounds the
        host's stop rule is expected to run before the suspend."""
        wr, limits = self.writer, self.session.limits
        if self.plan == "after-suspend" and not wr.attempted:
            return 0.0
        if wr.froze_at is None:
            if not self.sizes.persistent_bytes or wr.attempted:
                return 0.0          # SAVE_BEGIN found nothing to freeze
            waiting = replace(progress, before_bytes=self.sizes.persistent_bytes)
            if policy.should_stop(waiting, rates, limits).stop:
                return 0.0          # the rounds end now: tmem goes after the suspend
            return policy.simulate("late-freeze", self.sizes.persistent_bytes,
                                   progress.ram_pages, rates, limits,
                                   start=progress).est_freeze_ms
        so_far = (time.monotonic() - wr.froze_at) * 1000.0
        if policy.should_stop(progress, rates, limits).stop:
            return so_far
        e = policy.simulate("after-suspend", 0, progress.ram_pages, rates, limits,
                            start=progress)
        remaining = e.est_total_ms - e.est_downtime_ms - progress.elapsed_s * 1000.0
        return so_far + max(0.0, remaining)

    def after_round(self, stats: RoundStats) -> None:
        self.sent_ram_pages += stats.pages_sent
        self._last_stats = stats
        rates = self._rates(stats)
        progress = self._progress_now(stats)
        self._revise_plan(stats, rates, progress)
        if self.plan == "late-freeze" and not self.writer.attempted:
            why = policy.late_freeze_now(progress, rates, self.session.limits)
            if why:
                self.late_reason = f"tmem sent after round {stats.number} ({why})"
                self.session.log.info("domain %d: %s", self.session.domid, self.late_reason)
                self._send_tmem()
        if self.writer.started and self.session.live:
            self.writer.write_extra(self.session.out, always=False)

    def pending(self) -> Pending:
        if self.session.live and self._last_stats is not None:
            # after a round: the host has its dirty log read, re-estimate the freeze
            stats = self._last_stats
            self._last_stats = None
            self.est_freeze_ms = self._estimate_freeze(self._rates(stats),
                                                       self._progress_now(stats))
            self.session.log.info("domain %d: tmem plan %s after round %d: expected freeze "
                                  "window %.1f ms", self.session.domid, self.plan,
                                  stats.number, self.est_freeze_ms)
            self._update_report()
        if self.writer.attempted:
            return Pending(0, 0)
        if self.plan == "late-freeze":
            return Pending(self.sizes.persistent_bytes, 0)
        return Pending(0, self.sizes.persistent_bytes)

    def after_suspend(self) -> None:
        self.suspended_at = time.monotonic()
        if not self.writer.attempted and self.session.live:
            if self.plan == "late-freeze":
                self.late_reason = "tmem sent after suspend (rounds ended first)"
            self._send_tmem()
        if self.writer.started and self.session.live:
            # Xen writes -6 after a -5 on every live save, empty or not.
            self.writer.write_extra(self.session.out, always=True)

    def done(self, outcome: object) -> None:
        try:
            self.writer.end()     # T10: SAVE_END on every path, live or not
        finally:
            self._update_report()

    def _update_report(self) -> None:
        wr = self.writer
        frozen = 0.0
        if wr.froze_at is not None:
            until = self.suspended_at if (self.session.live and self.suspended_at) else wr.froze_at
            frozen = max(0.0, until - wr.froze_at)
        reason = self.reason + (f"; {self.late_reason}" if self.late_reason else "")
        self.report.update({
            "plan": self.plan,
            "reason": reason,
            "tmem_bytes": wr.bytes,
            "pages": wr.pages,
            "invalidations": wr.inv_sent,
            # the window the running guest's tmem puts failed (SAVE_BEGIN -> suspend)
            "freeze_ms": round(frozen * 1000.0, 3),
            "persistent_pages_at_start": self.sizes.persistent_pages,
            "pools": self.sizes.pools,
        })
        if self.est_freeze_ms is not None:
            self.report["est_freeze_ms"] = round(self.est_freeze_ms, 1)
        if self.choice is not None:
            self.report["policy"] = self.choice.to_dict()
