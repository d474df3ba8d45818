"""The live-migration policy: when tmem goes and when to stop iterating, as pure
functions of measured rates.

Plans (ARCHITECTURE.md "Migration policy"):

- ``after-suspend``: all tmem during the downtime; the running guest's tmem is
  never frozen. Only when it fits the downtime budget.
- ``precopy``: Xen's order; freeze and send tmem before round 1.
- ``late-freeze``: RAM rounds first with tmem writable; freeze and send tmem
  once RAM has converged, then catch-up rounds.

Policy v2 (issue 7):

* :func:`should_stop` is the stop-iterating decision the host calls after every
  round: iterate while the downtime expected if the guest were suspended now
  (dirty RAM + tmem still to go after suspend + pending invalidations, at the
  bandwidth of the latest rounds) exceeds the limit, within ``max-iters``,
  ``max-total-s`` and Xen's 3 x p2m pages; when the limit cannot be met, go
  with a warning (``best-effort``) or abort naming a limit that would have
  worked (``strict``). With no limit it is Xen's rule (< 50 pages, 29 rounds,
  3 x p2m).
* :func:`choose_plan` (``auto``) runs every plan through a round-by-round model
  that uses :func:`should_stop` itself, so estimate and execution share one
  rule: meet the limit, then the smallest freeze window (the time the running
  guest's tmem puts fail), then the shortest total time. Late-freeze is never
  chosen where it does not shorten the freeze window (tmem >> RAM with a
  heavy guest: its catch-up rounds re-send what precopy sends, and its early
  rounds only add time). The result carries its inputs and every plan's
  estimates (:meth:`PlanChoice.to_dict`) for the log and the JSON report.

The RAM model: a guest dirtying ``D`` pages/s at random over ``P`` pages has
``P * (1 - exp(-D t / P))`` distinct dirty pages after ``t`` seconds (a
never-converging guest saturates at its working set instead of growing
without bound).

What the downtime estimate counts (issue 7's grid found each one missing):
everything still to go after suspend, what the receiver has not taken yet
(``Progress.in_flight_bytes``; the host drains the socket before it weighs a
suspend, so this is what a drain left), and ``Rates.overhead_ms``: the
handshake and the destination's own restore-finishing work, which it announces
at pre-flight (e.g. tmem-digest hashing all tmem before the guest runs). A
go warns whenever the estimate plus its margin (:meth:`Rates.margin`) passes
the limit, not only when the estimate does; while another round still shrinks
RAM's part by 5 % or more the rounds go on until the estimate fits with its
margin, and past a limit that cannot hold (the destination's restore alone
exceeds it) best-effort still runs the rounds that cut the downtime by much.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Deque, Dict, NamedTuple, Optional, Sequence, Tuple

from ..xen import (INV_RECORD_BYTES, RAM_RECORD_BYTES, XEN_MAX_FACTOR, XEN_MAX_ITERS,
                   XEN_MIN_ROUND_PAGES)

TAIL_BYTES = 64 * 1024                 # vcpu contexts, shared info, the end of the stream
PLANS = ("after-suspend", "late-freeze", "precopy")
ON_LIMIT_MISS = ("best-effort", "strict")
# Freeze windows this close count as equal, and total time decides (kept inside
# issue 7's acceptance bound of 10 % or 50 ms).
FREEZE_TIE_FRACTION = 0.05
FREEZE_TIE_MS = 25.0
TOTAL_TIE_FRACTION = 0.01
# Late-freeze always takes longer in all than precopy (its early rounds), and
# measured it lost where the model saw it win by a few per cent (1 GiB of tmem,
# a heavy guest: 1.05 x precopy's freeze window): it must shorten precopy's
# freeze window by more than this to be chosen.
LATE_FREEZE_MIN_GAIN = 0.10
NOT_CONVERGING = 0.95                  # the next round's pages >= 95 % of this one's
# An estimate this far (relatively) below a limit may still miss it: actual
# downtimes landed up to 17 % above the estimates in the policy grid on a quiet
# host (more on a busy one: scheduling of the two hypervisor processes and the
# guests), and issue 7 holds estimates to 25 %; so a go warns once the estimate
# plus this margin (or twice the rates' measured spread, if larger) passes the
# limit, and the rounds go on while they can bring it under.
MIN_MARGIN = 0.25

DEFAULT_BANDWIDTH = 100e6        # bytes/s when neither configured nor measured yet


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """What the host measured over the latest rounds (or configured/assumed before
    round 1). Re-measured every round, so every decision is re-estimated."""

    bandwidth_bps: float               # bytes/s the sender achieved (after any rate cap)
    dirty_pages_per_s: float = 0.0     # RAM pages the guest dirties per second
    inv_per_s: float = 0.0             # persistent tmem invalidations per second
    overhead_ms: float = 0.0           # fixed suspend-to-running cost (restore end, handshake)
    source: str = "measured"           # measured | configured | assumed
    # the estimate's measured spread: the relative scatter of the bandwidth over
    # the window's rounds (0 when every round ran at the cap)
    spread: float = 0.0

    def bw(self) -> float:
        return max(float(self.bandwidth_bps or 0.0), 1.0)

    def margin(self) -> float:
        """How far above its estimate a downtime may land: twice the measured
        spread of the rates, and never less than :data:`MIN_MARGIN`."""
        return max(MIN_MARGIN, 2.0 * self.spread)


@dataclass(frozen=True)
class Limits:
    """The host's stop rule (``migration:`` section, or ``xm migrate`` options)."""

    downtime_limit_ms: Optional[float] = 300.0   # None: Xen's rule alone
    on_limit_miss: str = "best-effort"           # best-effort | strict
    max_iters: int = XEN_MAX_ITERS
    max_total_s: float = 0.0                     # 0: no cap on total time

    def __post_init__(self) -> None:
        if self.on_limit_miss not in ON_LIMIT_MISS:
            raise ValueError(f"on_limit_miss must be one of {', '.join(ON_LIMIT_MISS)}, "
                             f"not {self.on_limit_miss!r}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be at least 1, not {self.max_iters}")


@dataclass(frozen=True)
class Progress:
    """Where a live migration stands after a round (what :func:`should_stop` weighs)."""

    rounds: int                    # rounds done
    elapsed_s: float               # since the migration started
    pages_sent: int                # RAM pages sent so far (Xen's 3 x p2m ceiling)
    dirty_pages: int               # RAM pages dirty now: the next round, or the last one
    ram_pages: int                 # p2m_size
    last_round_pages: int = 0      # pages sent in the round just done (Xen's < 50 rule)
    last_round_s: float = 0.0      # how long it took
    tmem_after_bytes: int = 0      # tmem the plugins send after suspend (Pending.after_suspend)
    before_bytes: int = 0          # bytes the plugins still send before suspend
    pending_invs: int = 0          # invalidations logged and not yet sent
    in_flight_bytes: int = 0       # written, not yet taken by the receiver (its socket queue)


class StopDecision(NamedTuple):
    """:func:`should_stop`'s answer. ``action``: ``iterate``, ``go`` or ``abort``."""

    stop: bool
    why: str
    expected_downtime_ms: float
    action: str
    warning: Optional[str] = None           # best-effort over the limit: log before suspend
    workable_limit_ms: Optional[int] = None  # over the limit: a limit that would have held


# ---------------------------------------------------------------------------
# the stop-iterating decision
# ---------------------------------------------------------------------------

def dirtied_pages(ram_pages: int, dirty_pages_per_s: float, seconds: float) -> float:
    """Distinct pages a guest dirtying at random has dirtied after ``seconds``."""
    if ram_pages <= 0 or dirty_pages_per_s <= 0 or seconds <= 0:
        return 0.0
    return ram_pages * -math.expm1(-dirty_pages_per_s * seconds / ram_pages)


def expected_downtime_ms(p: Progress, rates: Rates, include_before: bool = True) -> float:
    """Downtime if the guest were suspended now: everything still to go, at the
    bandwidth of the latest rounds, plus the fixed handover cost."""
    nbytes = (p.dirty_pages * RAM_RECORD_BYTES + p.tmem_after_bytes
              + p.pending_invs * INV_RECORD_BYTES + TAIL_BYTES + p.in_flight_bytes
              + (p.before_bytes if include_before else 0))
    return nbytes / rates.bw() * 1000.0 + rates.overhead_ms


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v < 10_000 else f"{v / 1000:.1f} s"


def _workable(ms: float) -> int:
    """A limit that would have held: the expected downtime plus a 10 % margin,
    rounded up to 10 ms."""
    return int(math.ceil(round(ms * 1.1 / 10.0, 6)) * 10)


def should_stop(p: Progress, rates: Rates, limits: Limits,
                best_expected_ms: Optional[float] = None) -> StopDecision:
    """Stop iterating after this round? Called by the host after every round.

    ``best_expected_ms`` (the smallest expected downtime of earlier rounds)
    makes a strict abort name the limit that would have held at the best
    moment. Ceilings: ``max_iters`` rounds, ``max_total_s`` (counting the
    round that would come next), 3 x p2m pages sent.
    """
    expected = expected_downtime_ms(p, rates)
    limit = limits.downtime_limit_ms
    bw = rates.bw()
    next_round_s = p.dirty_pages * RAM_RECORD_BYTES / bw
    ceiling = ""
    if p.rounds >= limits.max_iters:
        ceiling = f"{p.rounds} rounds (max-iters {limits.max_iters})"
    elif p.ram_pages and p.pages_sent >= XEN_MAX_FACTOR * p.ram_pages:
        ceiling = f"{p.pages_sent} pages sent ({XEN_MAX_FACTOR} x p2m_size)"
    elif limits.max_total_s and p.elapsed_s + next_round_s > limits.max_total_s:
        ceiling = (f"{p.elapsed_s:.1f} s elapsed, another round would pass max-total-s "
                   f"{limits.max_total_s:g}")

    if limit is None:                              # Xen's rule
        if ceiling:
            return StopDecision(True, f"Xen's rule: {ceiling}", expected, "go")
        if p.last_round_pages < XEN_MIN_ROUND_PAGES and p.before_bytes == 0:
            return StopDecision(True, f"Xen's rule: the last round sent {p.last_round_pages} "
                                f"pages (< {XEN_MIN_ROUND_PAGES})", expected, "go")
        return StopDecision(False, "Xen's rule: RAM has not converged", expected, "iterate")

    if expected <= limit:
        high = expected * (1.0 + rates.margin())
        if high <= limit:
            return StopDecision(True, f"expected downtime {_ms(expected)} fits the "
                                f"{_ms(limit)} limit", expected, "go")
        if not ceiling and p.before_bytes == 0 and _shrinks(p, rates, expected):
            # it fits, but not with the estimate's margin: while a round still
            # shrinks RAM's part by much, one more makes the limit hold for sure
            return StopDecision(False, f"expected downtime {_ms(expected)} fits the "
                                f"{_ms(limit)} limit, not with the estimate's margin of "
                                f"{rates.margin():.0%}", expected, "iterate")
        return StopDecision(True, f"expected downtime {_ms(expected)} fits the "
                            f"{_ms(limit)} limit, without margin", expected, "go",
                            f"expected downtime {_ms(expected)} may exceed the {_ms(limit)} "
                            f"limit: the estimate's margin of {rates.margin():.0%} "
                            f"reaches {_ms(high)}")

    hopeless = ""
    floor = (p.tmem_after_bytes + TAIL_BYTES) / bw * 1000.0 + rates.overhead_ms
    next_pages = dirtied_pages(p.ram_pages, rates.dirty_pages_per_s, next_round_s)
    ram_ms = expected - floor - (p.before_bytes / bw * 1000.0)
    if floor > limit and (limits.on_limit_miss == "strict"
                          or (p.before_bytes == 0 and not _ram_worth_a_round(
                              p, rates, next_pages, ram_ms, floor))):
        # best-effort still iterates while a round shrinks the downtime by much
        # (the limit is lost either way; the least downtime is the goal then)
        hopeless = (f"what goes after suspend besides RAM needs {_ms(floor)} alone "
                    f"({p.tmem_after_bytes / 2**20:.1f} MiB of tmem, "
                    f"{rates.overhead_ms:.0f} ms of handover and restore)")
    elif p.before_bytes == 0 and p.dirty_pages < XEN_MIN_ROUND_PAGES:
        hopeless = f"RAM has converged ({p.dirty_pages} dirty pages)"
    elif p.before_bytes == 0 and next_pages >= NOT_CONVERGING * p.dirty_pages:
        hopeless = (f"RAM is not converging (the guest dirties {rates.dirty_pages_per_s:.0f} "
                    f"pages/s, the link sends {bw / RAM_RECORD_BYTES:.0f} pages/s)")
    if not (ceiling or hopeless):
        why = f"expected downtime {_ms(expected)} exceeds the {_ms(limit)} limit"
        if p.before_bytes:
            why += f"; {p.before_bytes / 2**20:.1f} MiB still to send before suspend"
        return StopDecision(False, why, expected, "iterate")

    cause = ceiling or hopeless
    best = min(expected, best_expected_ms) if best_expected_ms is not None else expected
    workable = _workable(best)
    if limits.on_limit_miss == "strict":
        return StopDecision(True, f"the {_ms(limit)} downtime limit cannot be met: {cause}; "
                            f"expected downtime {_ms(expected)}; a limit of {workable} ms "
                            f"would have held (on-limit-miss: strict)",
                            expected, "abort", None, workable)
    warning = (f"expected downtime {_ms(expected)} exceeds the {_ms(limit)} limit ({cause}); "
               f"suspending anyway (on-limit-miss: best-effort)")
    return StopDecision(True, f"{cause}; going over the limit", expected, "go", warning,
                        workable)


def _shrinks(p: Progress, rates: Rates, expected_ms: float) -> bool:
    """Would another round cut the expected downtime by 5 % or more? (RAM
    converging: the next round leaves clearly fewer dirty pages.)"""
    if p.dirty_pages < XEN_MIN_ROUND_PAGES:
        return False
    bw = rates.bw()
    nxt = dirtied_pages(p.ram_pages, rates.dirty_pages_per_s,
                        p.dirty_pages * RAM_RECORD_BYTES / bw)
    gain_ms = (p.dirty_pages - nxt) * RAM_RECORD_BYTES / bw * 1000.0
    return nxt < NOT_CONVERGING * p.dirty_pages and gain_ms >= 0.05 * expected_ms


def _ram_worth_a_round(p: Progress, rates: Rates, next_pages: float, ram_ms: float,
                       floor: float) -> bool:
    """Over the limit anyway: would another round still cut the downtime by
    much? RAM is a tenth of it or more and the next round would leave clearly
    fewer pages (not a guest that never converges)."""
    return (ram_ms >= 0.1 * floor and p.dirty_pages >= XEN_MIN_ROUND_PAGES
            and next_pages < NOT_CONVERGING * p.dirty_pages)


def late_freeze_now(p: Progress, rates: Rates, limits: Limits) -> Optional[str]:
    """Late-freeze: send tmem after this round? (None = not yet.) When RAM alone
    would stop now, or one round before the iteration ceiling so a catch-up
    round remains."""
    d = should_stop(replace(p, tmem_after_bytes=0, before_bytes=0), rates, limits)
    if d.stop:
        limit = limits.downtime_limit_ms
        if d.action == "abort" or (limit is not None and d.expected_downtime_ms > limit):
            return f"RAM will not get better ({d.why.split(';')[0]})"
        return f"RAM is ready ({d.why})"
    if p.rounds >= limits.max_iters - 1:
        return f"round {p.rounds} of at most {limits.max_iters}"
    return None


class RoundWindow:
    """The rates over the latest rounds, from what the host sees per round.

    ``add`` once per round: stream bytes and seconds of the round, the dirty
    pages found after it (``read_and_clear_dirty``) and the seconds they
    accumulated over, and the invalidations logged meanwhile.
    """

    def __init__(self, rounds: int = 3) -> None:
        self._w: Deque[Tuple[int, float, int, float, int]] = deque(maxlen=max(1, rounds))

    def add(self, bytes_sent: int, seconds: float, dirty_pages: int,
            dirty_window_s: float, invalidations: int = 0) -> None:
        self._w.append((max(0, bytes_sent), max(seconds, 1e-6), max(0, dirty_pages),
                        max(dirty_window_s, 1e-6), max(0, invalidations)))

    def rates(self, fallback_bps: float = DEFAULT_BANDWIDTH, overhead_ms: float = 0.0,
              cap_bps: Optional[float] = None) -> Rates:
        """``Rates`` over the window; before any round, ``fallback_bps`` (assumed),
        and never above the rate cap ``cap_bps``."""
        if not self._w:
            bw = min(fallback_bps, cap_bps) if cap_bps else fallback_bps
            return Rates(bw, 0.0, 0.0, overhead_ms, "configured" if cap_bps else "assumed")
        nbytes = sum(r[0] for r in self._w)
        secs = sum(r[1] for r in self._w)
        bw = nbytes / secs if nbytes else fallback_bps
        if cap_bps:
            bw = min(bw, cap_bps)
        dirty = sum(r[2] for r in self._w) / sum(r[3] for r in self._w)
        invs = sum(r[4] for r in self._w) / sum(r[3] for r in self._w)
        return Rates(bw, dirty, invs, overhead_ms, "measured", self.spread(cap_bps))

    def spread(self, cap_bps: Optional[float] = None) -> float:
        """The relative standard deviation of the rounds' bandwidths (each under
        the cap), weighted by their seconds; 0 with fewer than two rounds."""
        rounds = [(min(b / s, cap_bps) if cap_bps else b / s, s) for b, s, *_ in self._w if b]
        if len(rounds) < 2:
            return 0.0
        secs = sum(s for _, s in rounds)
        mean = sum(r * s for r, s in rounds) / secs
        var = sum(s * (r - mean) ** 2 for r, s in rounds) / secs
        return math.sqrt(var) / mean if mean > 0 else 0.0


# ---------------------------------------------------------------------------
# auto v2: the plan from a cost model
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanEstimate:
    plan: str
    est_downtime_ms: float
    est_freeze_ms: float
    est_total_ms: float
    rounds: int
    meets_limit: bool
    stop: str                    # why the model's rounds stopped

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("est_downtime_ms", "est_freeze_ms", "est_total_ms"):
            d[k] = round(d[k], 1)
        return d


@dataclass(frozen=True)
class PlanChoice:
    """The decision, its inputs and every alternative's estimates."""

    plan: str
    reason: str
    requested: str
    inputs: Dict[str, Any]
    alternatives: Tuple[PlanEstimate, ...] = field(default_factory=tuple)

    def estimate(self, plan: Optional[str] = None) -> PlanEstimate:
        want = plan or self.plan
        for e in self.alternatives:
            if e.plan == want:
                return e
        raise KeyError(want)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the report's ``policy`` object."""
        chosen = self.estimate()
        return {"plan": self.plan, "requested": self.requested, "reason": self.reason,
                "est_downtime_ms": round(chosen.est_downtime_ms, 1),
                "est_freeze_ms": round(chosen.est_freeze_ms, 1),
                "est_total_ms": round(chosen.est_total_ms, 1),
                "inputs": dict(self.inputs),
                "alternatives": {e.plan: e.to_dict() for e in self.alternatives}}

    def log_line(self) -> str:
        alts = "; ".join(f"{e.plan}: downtime {e.est_downtime_ms:.0f} ms, freeze "
                         f"{e.est_freeze_ms:.0f} ms, total {e.est_total_ms:.0f} ms"
                         for e in self.alternatives)
        return f"tmem plan {self.plan}: {self.reason} [{alts}]"


def simulate(plan: str, tmem_bytes: int, ram_pages: int, rates: Rates, limits: Limits,
             start: Optional[Progress] = None) -> PlanEstimate:
    """One plan through the round model, stopped by :func:`should_stop`.

    ``start``: the state after rounds already done (re-estimation during a
    migration); for precopy that means tmem went before round 1.
    """
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}")
    bw = rates.bw()
    P = max(0, ram_pages)
    D = rates.dirty_pages_per_s
    t_tmem = tmem_bytes / bw
    rounds, t, sent = (start.rounds, start.elapsed_s, start.pages_sent) if start else (0, 0.0, 0)
    to_send = float(start.dirty_pages if start else P)
    last_dt = start.last_round_s if start else 0.0
    last_pages = start.last_round_pages if start else 0
    freeze_at: Optional[float] = None
    tmem_sent = False
    if plan == "precopy":
        # from the start: round 1 re-sends all RAM anyway; mid-migration
        # (``start``): tmem went before round 1 and has been frozen since
        freeze_at, tmem_sent = 0.0, True
        if not start:
            t = t_tmem
    invs = 0.0
    best: Optional[float] = None
    # bounded: every pass is a round, and should_stop ends at max_iters rounds
    # (or 3 x p2m pages); the extra passes cover late-freeze's catch-up
    decision: Optional[StopDecision] = None
    for _ in range(limits.max_iters + 2):
        dt = to_send * RAM_RECORD_BYTES / bw
        if freeze_at is not None and rates.inv_per_s:
            dt += invs * INV_RECORD_BYTES / bw        # the log sent at the round boundary
            invs = 0.0
        t += dt
        rounds += 1
        sent += int(to_send)
        last_pages, last_dt = int(to_send), dt
        to_send = dirtied_pages(P, D, dt)
        if freeze_at is not None:
            invs += rates.inv_per_s * dt
        if plan == "late-freeze" and not tmem_sent:
            prog = Progress(rounds, t, sent, int(to_send), P, last_pages, last_dt)
            if late_freeze_now(prog, rates, limits) is not None:
                freeze_at, tmem_sent = t, True
                t += t_tmem
                to_send = dirtied_pages(P, D, dt + t_tmem)
                invs = rates.inv_per_s * t_tmem
                continue                              # at least one catch-up round
            continue
        prog = Progress(rounds, t, sent, int(math.ceil(to_send)), P, last_pages, last_dt,
                        tmem_after_bytes=tmem_bytes if not tmem_sent else 0,
                        pending_invs=int(invs))
        decision = should_stop(prog, rates, limits, best)
        best = decision.expected_downtime_ms if best is None else \
            min(best, decision.expected_downtime_ms)
        if decision.stop:
            break
        decision = None
    if decision is None:        # out of passes (at a ceiling): go from where it stands
        prog = Progress(rounds, t, sent, int(math.ceil(to_send)), P, last_pages, last_dt,
                        tmem_after_bytes=tmem_bytes if not tmem_sent else 0,
                        pending_invs=int(invs))
        decision = should_stop(replace(prog, rounds=max(rounds, limits.max_iters)), rates,
                               limits, best)
    downtime = decision.expected_downtime_ms
    freeze = (t - freeze_at) * 1000.0 if freeze_at is not None else 0.0
    limit = limits.downtime_limit_ms
    meets = decision.action != "abort" and (limit is None or downtime <= limit)
    return PlanEstimate(plan, downtime, freeze, t * 1000.0 + downtime, rounds, meets,
                        decision.why)


def _least_freeze_then_total(pool: Sequence[PlanEstimate],
                             by: Dict[str, PlanEstimate]) -> PlanEstimate:
    """The smallest freeze window (within the tie tolerance), then the shortest
    total; late-freeze only where it clearly shortens precopy's freeze window."""
    pre = by.get("precopy")
    if pre is not None and pre in pool:
        pool = [e for e in pool if e.plan != "late-freeze"
                or e.est_freeze_ms < pre.est_freeze_ms * (1 - LATE_FREEZE_MIN_GAIN)]
    fmin = min(e.est_freeze_ms for e in pool)
    near = [e for e in pool
            if e.est_freeze_ms <= fmin + max(fmin * FREEZE_TIE_FRACTION, FREEZE_TIE_MS)]
    tmin = min(e.est_total_ms for e in near)
    near = [e for e in near if e.est_total_ms <= tmin * (1 + TOTAL_TIE_FRACTION) + 1.0]
    return min(near, key=lambda e: (e.est_freeze_ms, e.est_total_ms, PLANS.index(e.plan)))


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def choose_plan(tmem_bytes: int, ram_pages: int, rates: Rates, limits: Limits,
                requested: str = "auto", plans: Sequence[str] = PLANS,
                start: Optional[Progress] = None) -> PlanChoice:
    """The plan for a live migration (``requested`` "auto" or a fixed plan).

    ``plans`` limits ``auto`` to what is still possible (once rounds have
    started, not precopy); ``start`` re-estimates from the state after them.
    """
    inputs: Dict[str, Any] = {
        "tmem_bytes": int(tmem_bytes), "ram_pages": int(ram_pages),
        "bandwidth_bps": round(rates.bw(), 1), "bandwidth_source": rates.source,
        "dirty_pages_per_s": round(rates.dirty_pages_per_s, 1),
        "inv_per_s": round(rates.inv_per_s, 1), "overhead_ms": round(rates.overhead_ms, 1),
        "margin": round(rates.margin(), 3),
        "downtime_limit_ms": limits.downtime_limit_ms, "on_limit_miss": limits.on_limit_miss,
        "max_iters": limits.max_iters, "max_total_s": limits.max_total_s}
    if start is not None:
        inputs.update(rounds_done=start.rounds, elapsed_s=round(start.elapsed_s, 3),
                      dirty_pages=start.dirty_pages)
    open_plans = [p for p in PLANS if p in plans and not (p == "precopy" and start)]
    if requested != "auto" and requested not in open_plans:
        open_plans.append(requested)
    ests = tuple(simulate(p, tmem_bytes, ram_pages, rates, limits, start) for p in open_plans)
    link = f"{rates.source} {rates.bw() / 1e6:.0f} MB/s"
    limit = limits.downtime_limit_ms
    lim = _ms(limit) if limit is not None else "no"
    if tmem_bytes == 0:
        if "after-suspend" not in open_plans:
            ests += (simulate("after-suspend", 0, ram_pages, rates, limits, start),)
        return PlanChoice("after-suspend", "no persistent tmem to send; nothing is frozen "
                          "while the guest runs", requested, inputs, ests)
    by = {e.plan: e for e in ests}
    if requested != "auto":
        e = by[requested]
        return PlanChoice(requested, f"configured plan {requested} (est. downtime "
                          f"{_ms(e.est_downtime_ms)}, freeze {_ms(e.est_freeze_ms)} at {link})",
                          requested, inputs, ests)
    meeting = [e for e in ests if e.meets_limit]
    if meeting:
        best = _least_freeze_then_total(meeting, by)
    else:
        # no plan meets the limit: least downtime (near-equal ones count as equal),
        # then the same order as when the limit is met
        dmin = min(e.est_downtime_ms for e in ests)
        near = [e for e in ests
                if e.est_downtime_ms <= dmin + max(dmin * FREEZE_TIE_FRACTION, FREEZE_TIE_MS)]
        best = _least_freeze_then_total(near, by)
        why = (f"no plan meets the {lim} downtime limit at {link}; {best.plan} has the "
               f"least downtime (~{_ms(best.est_downtime_ms)}) and freezes tmem for "
               f"~{_ms(best.est_freeze_ms)}")
        return PlanChoice(best.plan, why, requested, inputs, ests)
    after = by.get("after-suspend")
    if best.plan == "after-suspend":
        why = (f"{_mib(tmem_bytes)} of tmem fits the {lim} downtime limit "
               f"(~{_ms(best.est_downtime_ms)} at {link}); tmem stays writable while the "
               "guest runs")
    else:
        need = (f"after-suspend would need ~{_ms(after.est_downtime_ms)} of downtime"
                if after is not None else "tmem cannot wait for the suspend")
        why = (f"{need} (limit {lim} at {link}); {best.plan} freezes tmem for "
               f"~{_ms(best.est_freeze_ms)}")
        other = by.get("late-freeze" if best.plan == "precopy" else "precopy")
        if other is not None and not other.meets_limit:
            why += (f"; {other.plan} would miss the limit "
                    f"(~{_ms(other.est_downtime_ms)} of downtime)")
        elif other is not None:
            if best.plan == "precopy":
                gain = 1 - other.est_freeze_ms / best.est_freeze_ms if best.est_freeze_ms else 0
                short = (f"would shorten that by only {gain:.0%} (~{_ms(other.est_freeze_ms)})"
                         if gain > 0 else
                         f"would not shorten that (~{_ms(other.est_freeze_ms)})")
                why += (f"; late-freeze {short} and takes ~{_ms(other.est_total_ms)} in all "
                        f"against ~{_ms(best.est_total_ms)}")
            else:
                why += f" against precopy's ~{_ms(other.est_freeze_ms)}"
    return PlanChoice(best.plan, why, requested, inputs, ests)
