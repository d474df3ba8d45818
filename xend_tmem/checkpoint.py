"""The checkpoint path: the phase order of a save and of a restore.

This host knows the xend image, the libxc legacy stream and page rounds with
log-dirty; it knows nothing about tmem. Plugins join only through the hooks of
:mod:`xend_tmem.hooks.hookspecs`. Every phase that acquires something (a
suspended guest, log-dirty mode, a partly restored domain, the plugins' setup)
is released in a ``finally`` on success, error and cancel alike.

Live rounds follow Xen 4.0's ``xc_domain_save``: round 1 sends every page,
later rounds re-send pages dirtied meanwhile. When to stop is the policy's
(:func:`xend_tmem.tmem.policy.should_stop`, re-estimated after every round from
measured rates): while the expected downtime exceeds the host's limit, within
``max-iters``, ``max-total-s`` and 3 x p2m_size pages; with no limit Xen's own
rule (a round under 50 pages, 29 rounds, 3 x p2m_size pages).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .binio import Sink, Source, StreamReader, StreamWriter
from .codec import image, legacy, sxp
from .errors import Cancelled, PluginError, SaveError, StreamError, XendTmemError
from .hypervisor.interface import DomainInfo, Hypervisor
from .integrity import PageCheck, PageLog, RamCheck
from .plugins import CheckpointHooks
from .tmem import policy
from .xen import (EXTV_SIZE, MAX_BATCH, MAX_XSAVE, NO_DATA_TYPES, PAGE_SIZE, VCPU_CTX_SIZES,
                  VCPU_CTX_X32, VCPU_CTX_X64, XEN_MAX_FACTOR)
from .session import (JournalFn, Outcome, ProgressFn, RestoreSession, RoundStats, SaveSession,
                      _no_progress)



def _raise_done_errors(phase: str, errors: List[Tuple[str, BaseException]],
                       outcome: Outcome) -> None:
    """A done phase that failed: surface it unless an earlier error is on its way."""
    if not errors:
        return
    if outcome.ok:
        name, exc = errors[0]
        if isinstance(exc, XendTmemError):
            raise exc
        raise PluginError(f"checkpoint plugin '{name}' failed in {phase}: "
                          f"{type(exc).__name__}: {exc}") from exc
    # the original error wins; note the cleanup failures on it
    notes = "; ".join(f"{n}: {e}" for n, e in errors)
    if outcome.error is not None and hasattr(outcome.error, "add_note"):   # Python 3.11+
        outcome.error.add_note(f"also failed during {phase}: {notes}")


def domain_sxp(info: DomainInfo) -> str:
    """The domain's configuration as xend's SXP ``(domain ...)`` text."""
    config = dict(info.config or {})
    config.setdefault("name", info.name)
    config.setdefault("memory", info.memory_mib)
    config.setdefault("vcpus", info.vcpus)
    config.setdefault("image", {"linux": {}} if info.guest == "pv" else {"hvm": {}})
    return sxp.to_string(sxp.from_mapping("domain", config))


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------

class _Saver:
    """State of one save while it runs (rounds, counters); not shared."""

    def __init__(self, session: SaveSession, hooks: CheckpointHooks) -> None:
        self.s = session
        self.hooks = hooks
        self.hv = session.hv
        self.w = session.out
        self.rounds = 0
        self.pages_sent = 0
        self.last_round_pages = 0            # RAM pages sent after the suspend
        self.ram_bytes = 0
        self.started = time.monotonic()
        self.sink: Optional[Any] = None      # the raw output, when it can drain (a socket)
        self.suspended_at: Optional[float] = None
        self.stream_end: Optional[float] = None
        self.total_estimate: Optional[int] = None
        self.est_downtime_ms: Optional[float] = None   # the stop rule's last estimate
        self.est_freeze_ms: Optional[float] = None     # plugins' last estimate before suspend
        self.committed_at: Optional[float] = None
        self.ctx_size = VCPU_CTX_X64   # set from the domain when the header is written
        self.xsave_size: Optional[int] = None  # the xcnt size, None when no vcpu has xsave

    def progress(self, phase: str) -> None:
        self.s.progress(phase, self.w.offset, self.total_estimate)

    def send_pages(self, pfns: Sequence[int], phase: str) -> None:
        hv, domid = self.hv, self.s.domid
        # a backend with a foreign mapping of its own hands out views of a
        # contiguous batch: the image is written straight from guest RAM, no
        # copy. With a page log only while the guest is suspended: the log's CRC
        # must be of the bytes written, and a running guest may change a mapped
        # page between the two.
        map_range = (hv.map_foreign_range
                     if self.s.page_log is None or self.s.suspended else None)
        # with a page log while the guest is suspended, the hypervisor computes
        # the CRCs of batch k+1 (on its own core) while this thread writes batch k
        log = self.s.page_log
        helper = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-crcs")
                  if log is not None and self.s.suspended and len(pfns) else None)

        def ask_crcs(k: int) -> Optional[Tuple[Future[None], array[int]]]:
            if helper is None or k >= len(pfns):
                return None
            batch = pfns[k:k + MAX_BATCH]
            crcs = array("I", bytes(4 * len(batch)))
            return helper.submit(hv.ram_page_crcs, domid, batch, crcs), crcs
        try:
            self._send_batches(pfns, phase, map_range, ask_crcs)
        finally:
            if helper is not None:
                helper.shutdown(wait=True)

    def _send_batches(self, pfns: Sequence[int], phase: str,
                      map_range: Optional[Callable[[int, Sequence[int]], Optional[memoryview]]],
                      ask_crcs: Callable[[int], Optional[Tuple[Future[None], array[int]]]]
                      ) -> None:
        hv, domid, w, width = self.hv, self.s.domid, self.w, self.s.width
        log = self.s.page_log
        pending = ask_crcs(0)
        for i in range(0, len(pfns), MAX_BATCH):
            self.s.check_cancel()
            batch = pfns[i:i + MAX_BATCH]
            mine, pending = pending, ask_crcs(i + MAX_BATCH)
            view = map_range(domid, batch) if map_range is not None else None
            data = view if view is not None else hv.read_pages(domid, batch)
            before = w.offset
            if log is not None:
                crcs = None
                if mine is not None:
                    mine[0].result()
                    crcs = mine[1]
                # the page data follows the batch's count and pfn list
                log.ram(batch, data, before + 4 + len(batch) * width, crcs=crcs)
            try:
                legacy.write_page_batch(w, width, batch, None, data)
            finally:
                if view is not None:
                    view.release()
            if (self.s.page_log is not None
                    and w.offset != before + 4 + (width + PAGE_SIZE) * len(batch)):
                raise AssertionError(f"a RAM batch of {len(batch)} pages took "
                                     f"{w.offset - before} bytes: page log offsets are wrong")
            self.pages_sent += len(batch)
            self.ram_bytes += w.offset - before
            self.progress(phase)

    def rounds_live(self) -> List[int]:
        """Iterate until the policy's stop rule says go; returns the pages still dirty.

        After every round the rates are re-measured over the latest rounds
        (:class:`~xend_tmem.tmem.policy.RoundWindow`: bandwidth, RAM dirty
        rate) and :func:`~xend_tmem.tmem.policy.should_stop` weighs the
        downtime expected if the guest were suspended now. ``strict`` over the
        limit raises :class:`SaveError` before anything is suspended (the done
        phase thaws what plugins froze); ``best-effort`` logs its warning.
        """
        s, hv, hooks = self.s, self.hv, self.hooks
        p2m = s.p2m_size
        to_send: Sequence[int] = range(p2m)
        sent_total = 0
        window = policy.RoundWindow(3)
        best: Optional[float] = None
        # each window entry runs from one dirty-log read to the next: every byte
        # written (RAM and plugins' after-round chunks) and every second counts once
        mark_t, mark_b = time.monotonic(), self.w.offset     # log-dirty was just enabled
        carried = 0           # pages read early (after plugins' chunks): the next entry's
        drained = 0.0         # seconds spent draining since the mark: no sending time
        while True:
            self.rounds += 1
            t0 = time.monotonic()
            b0 = self.w.offset
            self.send_pages(to_send, "rounds")
            # the round ends when the receiver has taken it, so nothing it has
            # not read is left for the downtime (a socket queue of MBs would be,
            # unseen by the estimate); the wait is no sending time: the rate is
            # the sender's, which the receiver keeps up with once warm
            sent_at = time.monotonic()
            in_flight = self.drain()
            drained += time.monotonic() - sent_at
            sent_total += len(to_send)
            pages = len(to_send)
            now = time.monotonic()
            elapsed = max(sent_at - t0, 1e-6)
            if self.w.offset > b0:
                s.bandwidth_bps = (self.w.offset - b0) / elapsed
            dirty = hv.read_and_clear_dirty(s.domid)
            window.add(self.w.offset - mark_b, now - mark_t - drained, len(dirty) + carried,
                       now - mark_t)
            mark_t, mark_b, carried, drained = now, self.w.offset, 0, 0.0
            s.rates = window.rates(policy.DEFAULT_BANDWIDTH, s.overhead_ms,
                                   cap_bps=s.rate_cap_bps)
            # RAM's side, for plugins to weigh their own steps by the host's rule
            s.round_progress = policy.Progress(
                rounds=self.rounds, elapsed_s=now - self.started, pages_sent=sent_total,
                dirty_pages=len(dirty), ram_pages=p2m, last_round_pages=pages,
                last_round_s=elapsed)
            stats = RoundStats(number=self.rounds, pages_sent=pages,
                               bytes_sent=self.w.offset - b0, elapsed_s=elapsed,
                               bandwidth_bps=s.bandwidth_bps or 0.0, ram_pages=p2m,
                               max_rounds=s.limits.max_iters, max_pages=XEN_MAX_FACTOR * p2m,
                               dirty_pages=len(dirty))
            before_hooks = self.w.offset
            hooks.save_after_round(s, stats)
            if self.w.offset != before_hooks:
                # plugins sent something (tmem, its log): what the guest dirtied
                # meanwhile is owed too, and weighs on the decision now
                sent_at = time.monotonic()
                in_flight = self.drain()
                drained += time.monotonic() - sent_at
                more = set(hv.read_and_clear_dirty(s.domid)).difference(dirty)
                carried = len(more)
                dirty = sorted(more.union(dirty))
                s.round_progress = dataclasses.replace(
                    s.round_progress, dirty_pages=len(dirty),
                    elapsed_s=time.monotonic() - self.started)
            pending = hooks.save_pending(s)
            progress = dataclasses.replace(s.round_progress,
                                           tmem_after_bytes=pending.after_suspend,
                                           before_bytes=pending.before_suspend,
                                           in_flight_bytes=in_flight)
            to_send = dirty
            d = policy.should_stop(progress, s.rates, s.limits, best)
            best = d.expected_downtime_ms if best is None else min(best, d.expected_downtime_ms)
            self.est_downtime_ms = d.expected_downtime_ms
            s.log.info("domain %d: round %d: %d pages in %.1f ms, %d dirty; %.1f MB/s, "
                       "%.0f dirty pages/s; expected downtime %.1f ms; %s", s.domid,
                       self.rounds, pages, elapsed * 1000, len(dirty), s.rates.bw() / 1e6,
                       s.rates.dirty_pages_per_s, d.expected_downtime_ms, d.why)
            if not d.stop:
                continue
            if d.action == "abort":
                raise SaveError(f"domain {s.domid} not suspended: {d.why}")
            if d.warning:
                s.log.warning("domain %d: %s", s.domid, d.warning)
                s.warnings.append(d.warning)
            s.log.info("domain %d: stopping after round %d (%d pages sent this round, "
                       "%d dirty): %s", s.domid, self.rounds, pages, len(dirty), d.why)
            self.drain(settle=True)      # the receiver catches up while the guest runs
            return list(dirty)

    def drain(self, settle: bool = False) -> int:
        """Flush, and wait for the receiver to take what was written (a sink
        with ``drain``: a migration's socket; ``settle`` before the suspend);
        the bytes still in flight."""
        sink = self.sink
        if sink is None or not hasattr(sink, "drain"):
            return 0
        self.w.flush()
        sink.drain(settle=settle)
        return int(sink.in_flight())

    def suspend(self) -> None:
        self.progress("suspend")
        t0 = time.monotonic()        # the guest stops inside the call: count from its start
        self.hv.suspend(self.s.domid)
        self.s.suspended = True
        self.suspended_at = t0

    def tail(self) -> None:
        s, hv, w = self.s, self.hv, self.w
        vcpus = hv.online_vcpus(s.domid)
        legacy.write_vcpu_info(w, max(vcpus) if vcpus else 0, vcpus)
        legacy.write_end(w)
        contexts = [hv.get_vcpu_context(s.domid, v) for v in vcpus]
        # extv, as Xen 4.0's xc_domain_save always wrote it: a restored domain
        # keeps the extended context its image brought (DOMCTL_get_ext_vcpucontext)
        ext = [hv.get_ext_vcpu_context(s.domid, v) for v in vcpus]
        for v, c, e in zip(vcpus, contexts, ext):
            if len(c) != self.ctx_size or len(e) != EXTV_SIZE:
                raise StreamError(f"vcpu {v} of domain {s.domid} has a {len(c)}-byte context "
                                  f"and a {len(e)}-byte extended context; the image announced "
                                  f"{self.ctx_size} and {EXTV_SIZE}", field="vcpu context")
        if self.xsave_size is not None:
            # xcnt: each record is extv + the vcpu's xsave (DOMCTL_getvcpuextstate)
            xsave = _vcpu_xsaves(hv, s.domid, vcpus)
            if any(len(x) != self.xsave_size for x in xsave.values()):
                raise SaveError(f"domain {s.domid}'s vcpu xsave records changed size during the "
                                f"save: the image announced {self.xsave_size} bytes, the vcpus "
                                f"have {_sizes(xsave)}")
            ext = [e + xsave[v] for v, e in zip(vcpus, ext)]
        legacy.write_pv_tail(w, s.width, [], contexts, hv.get_shared_info(s.domid), ext_ctx=ext)
        self.progress("tail")


def _vcpu_context_size(hv: Hypervisor, domid: int) -> int:
    """The guest's vcpu context size (5168 x86-64, 2800 x86-32): it sets the
    ``vcpu`` block, and through it the guest width of the p2m frame list."""
    vcpus = hv.online_vcpus(domid)
    size = len(hv.get_vcpu_context(domid, vcpus[0] if vcpus else 0))
    if size not in VCPU_CTX_SIZES:
        raise StreamError(f"domain {domid}'s vcpu context is {size} bytes, neither an x86-64 "
                          f"({VCPU_CTX_X64}) nor an x86-32 ({VCPU_CTX_X32}) one",
                          field="vcpu context")
    return size


def _vcpu_xsaves(hv: Hypervisor, domid: int, vcpus: Sequence[int]) -> Dict[int, bytes]:
    """Each online vcpu's xsave record (empty when it has none)."""
    return {v: bytes(hv.get_vcpu_xsave(domid, v)) for v in vcpus}


def _sizes(xsave: Dict[int, bytes]) -> str:
    return ", ".join(f"vcpu {v}: {len(x)}" for v, x in xsave.items())


def _vcpu_xsave_size(hv: Hypervisor, domid: int) -> Optional[int]:
    """The ``xcnt`` size, or None when no vcpu has an xsave record.

    Xen's stream carries one size for every vcpu, so a domain whose vcpus'
    records differ in size (some restored from an ``xcnt`` image, some not)
    cannot be written without losing state: refused rather than truncated.
    """
    xsave = _vcpu_xsaves(hv, domid, hv.online_vcpus(domid))
    sizes = {len(x) for x in xsave.values()}
    if sizes <= {0}:
        return None
    if len(sizes) > 1:
        raise SaveError(f"domain {domid}'s vcpus have xsave records of different sizes "
                        f"({_sizes(xsave)}); an xcnt block announces one size for all vcpus")
    size = sizes.pop()
    if size > MAX_XSAVE:
        raise SaveError(f"domain {domid}'s xsave records are {size} bytes; the xcnt block "
                        f"allows at most {MAX_XSAVE}")
    return size


def save_domain(hv: Hypervisor, domid: int, out: Union[Sink, StreamWriter], *,
                hooks: CheckpointHooks,
                live: bool, checkpoint: bool = False, progress: Optional[ProgressFn] = None,
                cancel: Optional[threading.Event] = None, width: int = 8,
                name: Optional[str] = None, journal: Optional[JournalFn] = None,
                commit: Optional[Callable[[], None]] = None,
                page_log: Optional[PageLog] = None,
                limits: Optional[policy.Limits] = None,
                rate_cap_bps: Optional[float] = None,
                overhead_ms: float = 0.0,
                settings: Optional[Mapping[str, Mapping[str, object]]] = None
                ) -> Dict[str, object]:
    """Write ``domid`` as a xend image to ``out``; returns the report.

    On success the domain is left suspended (the caller destroys it) unless
    ``checkpoint`` asks for it to keep running. On any failure it is resumed
    and the error re-raised; plugins' done phase runs in every case.

    ``name``: the name the image carries (xend renames the source
    ``migrating-NAME`` for the save; the image keeps NAME). ``journal``:
    where plugins' :meth:`~xend_tmem.session.SaveSession.journal_note` goes.
    ``commit``: a migration's commit handshake, called once the stream is
    complete and before the done phase (so the done phase delays nothing). If
    it raises, the save failed and the domain is resumed; once it returned,
    the domain belongs to the destination: it is never resumed here, and a
    done-phase failure is logged and reported (``done_errors``) instead of
    raised. ``page_log``: an :class:`~xend_tmem.integrity.PageLog` collecting
    each page's CRC32 in stream order (the sidecar, a migration's checksums).

    ``limits``: the host's stop rule (``config.migration.limits()``, with
    ``xm migrate``'s overrides; default :class:`~xend_tmem.tmem.policy.Limits`);
    ``rate_cap_bps`` the sender's rate cap (bounds the measured bandwidth the
    estimates use); ``overhead_ms`` the expected fixed cost from suspend to
    the destination running (restore end, handshake). ``settings``: plugin
    sections replacing the configured ones for this save (``xm migrate --plan``).

    Report times are measured on this host's monotonic clock: ``downtime_ms``
    suspend -> image complete (a migration adds its handshake from
    ``suspended_mono``), ``freeze_ms`` the longest window a plugin froze
    guest-visible state while the guest ran (plugins' ``freeze_ms``),
    ``total_ms`` start -> stream complete (and committed), ``est_downtime_ms``
    / ``est_freeze_ms`` the last estimates before suspend.
    """
    info = hv.domain_info(domid)
    if name is not None and name != info.name:
        config = dict(info.config or {})
        config["name"] = name
        info = dataclasses.replace(info, name=name, config=config)
    w = out if isinstance(out, StreamWriter) else StreamWriter(out)
    session = SaveSession(hv=hv, domid=domid, live=live, out=w, p2m_size=hv.p2m_size(domid),
                          width=width,
                          settings={**hooks.settings, **settings} if settings else hooks.settings,
                          progress=progress or _no_progress, cancel=cancel, journal=journal,
                          page_log=page_log,
                          limits=limits if limits is not None else policy.Limits(),
                          rate_cap_bps=rate_cap_bps, overhead_ms=overhead_ms)
    saver = _Saver(session, hooks)
    saver.sink = out if not isinstance(out, StreamWriter) else None   # drain(): see rounds_live
    outcome = Outcome()
    logdirty = False
    setup_ran = False
    committed = False
    done_errors: List[str] = []
    try:
        if not live:
            saver.suspend()
        setup_ran = True
        hooks.save_setup(session)
        pending = hooks.save_pending(session)
        saver.total_estimate = (session.p2m_size * (PAGE_SIZE + width) + pending.before_suspend
                                + pending.after_suspend)
        image.write_header(w, domain_sxp(info))
        hooks.save_before_header(session)
        legacy.write_p2m_size(w, session.p2m_size, width, markers=sorted(hooks.restore_markers()))
        ctx_size = saver.ctx_size = _vcpu_context_size(hv, domid)
        saver.xsave_size = _vcpu_xsave_size(hv, domid)
        legacy.write_pv_ext_info(w, width, ctx_size, extv=True, xcnt_size=saver.xsave_size)
        frames = legacy.p2m_frame_count(session.p2m_size, VCPU_CTX_SIZES[ctx_size])
        legacy.write_p2m_frame_list(w, width, range(frames))
        hooks.save_before_rounds(session)
        if live:
            hv.enable_logdirty(domid)
            logdirty = True
            dirty = saver.rounds_live()
            saver.est_freeze_ms = _plugin_max(session.report, "est_freeze_ms")
            saver.suspend()
            hooks.save_after_suspend(session)
            legacy.write_tsc_info(w, 0, 0, 0, 0)
            # what the guest dirtied during the last live round and until it
            # acknowledged the suspend (a guest process keeps writing while
            # this thread copies pages, so this is rarely empty under load)
            last = sorted(set(dirty).union(hv.read_and_clear_dirty(domid)))
            saver.rounds += 1
            saver.send_pages(last, "rounds")
            saver.last_round_pages = len(last)
        else:
            legacy.write_tsc_info(w, 0, 0, 0, 0)
            hooks.save_after_suspend(session)
            saver.rounds = 1
            saver.send_pages(range(session.p2m_size), "rounds")
            saver.last_round_pages = session.p2m_size
        saver.tail()
        w.flush()
        saver.stream_end = time.monotonic()
        if commit is not None:
            commit()
            committed = True
        saver.committed_at = time.monotonic()
    except BaseException as exc:
        outcome = Outcome(exc)
        raise
    finally:
        errors: List[Tuple[str, BaseException]] = []
        try:
            if setup_ran:
                errors = hooks.save_done(session, outcome)
        finally:
            if logdirty:
                _quietly(hv.disable_logdirty, domid)
            if not committed and (not outcome.ok or errors or checkpoint):
                _quietly(hv.resume, domid)
                session.suspended = False
        if committed:
            # the destination owns the domain now: a release step that failed
            # here is this host's problem, not the migration's
            for plugin, err in errors:
                session.log.error("domain %d: checkpoint plugin '%s' failed in "
                                  "checkpoint_save_done after the commit: %s", domid, plugin, err)
                done_errors.append(f"{plugin}: {err}")
        else:
            _raise_done_errors("checkpoint_save_done", errors, outcome)
    now = time.monotonic()
    end = saver.stream_end or now
    sus = saver.suspended_at
    return {
        "bytes": w.offset,
        "rounds": saver.rounds,
        "pages_sent": saver.pages_sent,
        "last_round_pages": saver.last_round_pages,
        # suspend until the image was complete (a migration's handshake is added
        # by its caller from suspended_mono, the same clock)
        "downtime_ms": round((end - sus) * 1000.0, 3) if sus is not None else 0.0,
        "suspended_mono": sus,
        "freeze_ms": _plugin_max(session.report, "freeze_ms") or 0.0,
        "total_ms": round(((saver.committed_at or end) - saver.started) * 1000.0, 3),
        "est_downtime_ms": (round(saver.est_downtime_ms, 1)
                            if saver.est_downtime_ms is not None else None),
        "est_freeze_ms": (round(saver.est_freeze_ms, 1)
                          if saver.est_freeze_ms is not None else None),
        "elapsed_s": round(now - saver.started, 6),
        "live": live,
        "plugins": session.report,
        **({"warnings": list(session.warnings)} if session.warnings else {}),
        **({"done_errors": done_errors} if done_errors else {}),
    }


def _plugin_max(report: Mapping[str, Mapping[str, object]], key: str) -> Optional[float]:
    """The largest ``key`` any plugin put in its report section (None: none did).

    A plugin that freezes guest-visible state while the guest runs reports the
    window as ``freeze_ms`` and its estimate as ``est_freeze_ms``; the host
    lifts them to the top of the report without knowing what was frozen.
    """
    values = [float(v) for sec in report.values() if isinstance(sec, Mapping)
              for v in [sec.get(key)]
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(values) if values else None


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """Release steps must not mask the error that is already propagating."""
    try:
        fn(*args)
    except XendTmemError:
        pass


# ---------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------

def _config_int(config: Dict[str, object], key: str, default: int, header_offset: int) -> int:
    value: Any = config.get(key, default)   # any config value: int() refuses a non-number
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise StreamError(f"domain config has {key} {value!r}, not a number",
                          offset=header_offset, field=f"config {key}") from None
    if out <= 0:
        raise StreamError(f"domain config has {key} {out}", offset=header_offset,
                          field=f"config {key}")
    return out


def restore_domain(hv: Hypervisor, inp: Source, *, hooks: CheckpointHooks,
                   paused: bool = False,
                   name: Optional[str] = None, progress: Optional[ProgressFn] = None,
                   width: Optional[int] = None, cancel: Optional[threading.Event] = None,
                   on_created: Optional[Callable[[int], None]] = None,
                   page_check: Optional[PageCheck] = None) -> Tuple[int, Dict[str, object]]:
    """Read a xend image and build the domain; returns ``(domid, report)``.

    ``width`` is the saving tools' ``unsigned long`` (4 or 8); None infers it
    from the stream (:func:`~xend_tmem.codec.legacy.detect_width`, with the
    config's memory as the expected ``p2m_size``), so images of 32-bit and
    64-bit toolstacks both restore. Each vcpu's tail record goes to the
    hypervisor as Xen's ``xc_domain_restore`` sent it: the context to
    ``set_vcpu_context``, the ``extv`` 128 bytes to ``set_ext_vcpu_context``,
    an ``xcnt`` xsave record to ``set_vcpu_xsave``.

    A failure removes the half-built domain (plugins remove what they made in
    their done phase first) and re-raises.

    ``page_check``: an :class:`~xend_tmem.integrity.PageCheck` every page is
    checked against as it arrives (and, at the end, before the domain can be
    unpaused); a mismatch fails the restore naming the page.
    """
    if width not in (None, 4, 8):
        raise ValueError(f"the tools' unsigned long is 4 or 8 bytes, not {width!r}")
    progress = progress or _no_progress
    r = inp if isinstance(inp, StreamReader) else StreamReader(inp)
    started = time.monotonic()
    header = image.read_header(r)
    config = sxp.to_mapping(header.config)
    dom_name = name or str(config.get("name") or "restored")
    memory = _config_int(config, "memory", 0, 16)
    vcpus = _config_int(config, "vcpus", 1, 16)
    if header.guest != "pv":
        raise StreamError("HVM images are readable but this hypervisor restores PV guests only",
                          offset=16, field="config image")
    domid = hv.create_domain_shell(dom_name, memory * 256, vcpus, config)
    if on_created is not None:      # xend journals the id before anything can fail
        try:
            on_created(domid)
        except BaseException:
            _quietly(hv.destroy_domain, domid)
            raise
    session = RestoreSession(hv=hv, domid=domid, reader=r, settings=hooks.settings,
                             progress=progress, page_check=page_check)
    outcome = Outcome()
    p2m_expected = memory * 256
    counters = {"pages": 0}
    # the hypervisor computes the CRCs of the RAM pages it was given (issue 8 #4)
    ram_check = RamCheck(hv, domid, page_check) if page_check is not None else None

    def on_pages(pfns: Sequence[int], types: Sequence[int], data: memoryview,
                 offset: int) -> None:
        # the reader has checked every pfn against p2m_size, checked below against
        # the config; ``data`` is valid only during this call (write_pages copies)
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        if data.nbytes != len(pfns) * PAGE_SIZE:
            # XTAB/XALLOC/BROKEN entries name a pfn but carry no page
            pfns = [p for p, t in zip(pfns, types) if t not in NO_DATA_TYPES]
        token = None
        if pfns and ram_check is not None:
            token = ram_check.expect(pfns, data, offset)
        elif pfns and page_check is not None:
            page_check.ram(pfns, data, offset)
        if pfns:
            hv.write_pages(domid, pfns, data)
        if token is not None and ram_check is not None:
            ram_check.written(token)
        counters["pages"] += len(pfns)
        progress("restore", r.offset, None)

    def dispatch(reader: StreamReader, marker: int, offset: int) -> None:
        if not hooks.restore_chunk(session, marker, reader, offset):
            raise StreamError(f"no checkpoint plugin handled chunk {marker}", offset=offset,
                              field="chunk id", value=marker)

    handlers = {m: dispatch for m in hooks.restore_markers()}
    try:
        hooks.restore_setup(session)
        reader = legacy.LegacyReader(r, width=width, guest="pv", handlers=handlers,
                                     on_pages=on_pages, p2m_hint=p2m_expected,
                                     registry=hooks.registry)
        stream_header = reader.read_header()
        if stream_header.p2m_size != p2m_expected:
            hint = (f"; read with {reader.width}-byte tools' words as inferred, give the "
                    "width (xm restore --width 4|8) if that is wrong"
                    if stream_header.width_inferred else "")
            raise StreamError(f"p2m_size {stream_header.p2m_size} does not match the config's "
                              f"memory ({memory} MiB = {p2m_expected} pages){hint}",
                              offset=stream_header.offset, field="p2m_size",
                              value=stream_header.p2m_size)
        body = reader.read_body()
        tail = reader.read_tail(body)
        _restore_vcpus(hv, domid, vcpus, stream_header, tail)
        hv.set_shared_info(domid, tail.shared_info)
        if not r.at_eof():
            raise StreamError("data after the end of the image", offset=r.offset)
        if ram_check is not None:
            ram_check.finish()
        if page_check is not None:
            page_check.finish()
    except BaseException as exc:
        outcome = Outcome(exc)
        better = page_check.explain(exc) if page_check is not None else None
        if better is not None:
            raise better from exc
        raise
    finally:
        if ram_check is not None:
            ram_check.close()
        try:
            errors = hooks.restore_done(session, outcome)
        finally:
            if not outcome.ok:
                _quietly(hv.destroy_domain, domid)
        if errors and outcome.ok:
            _quietly(hv.destroy_domain, domid)
        _raise_done_errors("checkpoint_restore_done", errors, outcome)
    if not paused:
        hv.unpause(domid)
    return domid, {
        "bytes": r.offset,
        "pages": counters["pages"],
        "elapsed_s": round(time.monotonic() - started, 6),
        "domid": domid,
        "name": dom_name,
        "width": reader.width,
        "width_inferred": stream_header.width_inferred,
        "layout": stream_header.layout,
        "plugins": session.report,
    }


def _restore_vcpus(hv: Hypervisor, domid: int, vcpus: int, header: legacy.StreamHeader,
                   tail: legacy.Tail) -> None:
    """Each tail record split as Xen's restore did: context, ``extv``, xsave."""
    for vcpu, record in tail.vcpu_contexts:
        if vcpu >= vcpus:
            raise StreamError(f"vcpu {vcpu} context for a domain with {vcpus} vcpus",
                              field="vcpu context", value=vcpu)
        ctx, ext, xsave = header.split_vcpu_record(record)
        hv.set_vcpu_context(domid, vcpu, ctx)
        if ext is not None:
            hv.set_ext_vcpu_context(domid, vcpu, ext)
        if xsave:
            hv.set_vcpu_xsave(domid, vcpu, xsave)
