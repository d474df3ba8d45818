"""The live-migration policy: when tmem goes, as a pure function of measurements.

Plans (ARCHITECTURE.md "Migration policy"):

- ``after-suspend``: all tmem during the downtime; the running guest's tmem is
  never frozen. Only when it fits the downtime budget.
- ``precopy``: Xen's order; freeze and send tmem before round 1.
- ``late-freeze``: RAM rounds first with tmem writable; freeze and send tmem
  once RAM has converged, then catch-up rounds.

``auto`` meets the downtime limit first, then minimises the freeze window (the
time the running guest's tmem puts fail), then total time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# What the host needs after suspend besides tmem: the last RAM round (Xen stops
# below 50 dirty pages) plus VCPU state and the tail.
FINAL_ROUND_BYTES = 50 * 4104 + 64 * 1024
DEFAULT_BANDWIDTH = 100e6        # bytes/s when neither configured nor measured yet


@dataclass(frozen=True)
class PolicyInputs:
    tmem_bytes: int                 # persistent tmem the -5 chunk will carry
    ram_bytes: int                  # p2m_size * 4 KiB
    downtime_limit_s: float
    bandwidth_bps: Optional[float]  # configured, else measured, else None
    invalidation_rate: float = 0.0  # persistent deletions per second, if known
    dirty_rate_bps: float = 0.0     # RAM dirtying, bytes/s, if known


@dataclass(frozen=True)
class Decision:
    plan: str
    reason: str
    est_downtime_s: float
    est_freeze_s: float
    est_total_s: float


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def estimate(plan: str, inp: PolicyInputs) -> Decision:
    """Cost of one plan: (downtime, freeze window, total time), in seconds."""
    bw = inp.bandwidth_bps or DEFAULT_BANDWIDTH
    t_tmem = inp.tmem_bytes / bw
    t_ram = inp.ram_bytes / bw
    # RAM dirtied while something else is sent must be re-sent in later rounds.
    redirty = min(inp.dirty_rate_bps / bw, 0.9) if bw else 0.0
    t_rounds = t_ram / (1.0 - redirty)
    t_final = FINAL_ROUND_BYTES / bw
    inv_bytes = inp.invalidation_rate * 40 / bw
    if plan == "after-suspend":
        downtime = t_tmem + t_final
        return Decision(plan, "", downtime, 0.0, t_rounds + downtime)
    if plan == "precopy":
        freeze = t_tmem + t_rounds * (1.0 + redirty * t_tmem / max(t_ram, 1e-9))
        downtime = t_final + inv_bytes * freeze
        return Decision(plan, "", downtime, freeze, freeze + downtime)
    if plan == "late-freeze":
        catch_up = t_tmem * redirty
        freeze = t_tmem + catch_up
        downtime = t_final + inv_bytes * freeze
        return Decision(plan, "", downtime, freeze, t_rounds + freeze + downtime)
    raise ValueError(f"unknown plan {plan!r}")


def decide(inp: PolicyInputs, requested: str = "auto",
           plans: Sequence[str] = ("after-suspend", "late-freeze", "precopy"),
           measured: bool = False) -> Decision:
    """The plan for a live save, and a one-line reason a user can read.

    ``plans`` limits ``auto`` to what is still possible (once rounds have
    started, precopy is not); ``measured`` says the bandwidth was measured.
    """
    if inp.tmem_bytes == 0:
        d = estimate("after-suspend", inp)
        return Decision("after-suspend", "no persistent tmem to send; nothing is frozen "
                        "while the guest runs", d.est_downtime_s, 0.0, d.est_total_s)
    if requested != "auto":
        d = estimate(requested, inp)
        return Decision(requested, f"configured plan {requested}", d.est_downtime_s,
                        d.est_freeze_s, d.est_total_s)
    bw = inp.bandwidth_bps or DEFAULT_BANDWIDTH
    source = "measured" if measured else "configured" if inp.bandwidth_bps else "assumed"
    candidates = [estimate(p, inp) for p in plans]
    fitting = [c for c in candidates if c.est_downtime_s <= inp.downtime_limit_s]
    pool = fitting or [min(candidates, key=lambda c: c.est_downtime_s)]
    best = min(pool, key=lambda c: (c.est_freeze_s, c.est_total_s))
    limit_ms = inp.downtime_limit_s * 1000
    after = estimate("after-suspend", inp)
    if best.plan == "after-suspend":
        why = (f"{_mib(inp.tmem_bytes)} of tmem fits the {limit_ms:.0f} ms downtime limit "
               f"(~{after.est_downtime_s * 1000:.0f} ms at {source} {bw / 1e6:.0f} MB/s); "
               "tmem stays writable while the guest runs")
    elif not fitting:
        why = (f"no plan meets the {limit_ms:.0f} ms downtime limit; {best.plan} has the "
               f"least downtime (~{best.est_downtime_s * 1000:.0f} ms)")
    else:
        why = (f"{_mib(inp.tmem_bytes)} of tmem needs ~{after.est_downtime_s * 1000:.0f} ms "
               f"after suspend (limit {limit_ms:.0f} ms at {source} {bw / 1e6:.0f} MB/s); "
               f"{best.plan} freezes tmem for ~{best.est_freeze_s:.2f} s")
    return Decision(best.plan, why, best.est_downtime_s, best.est_freeze_s, best.est_total_s)


def late_freeze_due(converged: bool, round_number: int, sent_pages: int,
                    max_rounds: int, max_pages: int) -> Optional[str]:
    """Late-freeze: the round after which tmem must go, with why (None = not yet).

    Goes once RAM has converged, or early enough before the host's iteration
    limits (``max_rounds`` rounds, ``max_pages`` RAM pages sent) to leave a
    catch-up round.
    """
    if converged:
        return "RAM converged"
    if round_number >= max_rounds - 2:
        return f"round {round_number} of at most {max_rounds}"
    if max_pages and sent_pages >= max_pages * 5 // 6:
        return f"RAM is not converging ({sent_pages} pages sent, the limit is {max_pages})"
    return None
