"""What a checkpoint hook sees: the save/restore session and per-phase records.

The host creates one session per save or restore and passes it to every hook;
plugins keep their per-session state in ``session.plugin_state[<name>]`` so one
plugin object serves concurrent saves, and put what the user should see in
``session.report[<name>]``.

A plugin that freezes guest-visible state while the guest still runs (tmem's
puts fail while it is frozen) reports that window as ``freeze_ms`` and its
latest estimate as ``est_freeze_ms`` in its section: the host puts the largest
of each at the top of the report without knowing what was frozen. During live
rounds the host publishes what its stop rule weighs (``limits``, ``rates``,
``round_progress``) so plugins plan against the same figures.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

from .binio import StreamReader, StreamWriter
from .errors import Cancelled
from .hypervisor.interface import Hypervisor
from .tmem import policy
from .xen import XEN_MAX_ITERS, XEN_MIN_ROUND_PAGES

if TYPE_CHECKING:
    from .integrity import PageCheck, PageLog

ProgressFn = Callable[[str, int, Optional[int]], None]
# (plugin name, facts) -> written to the job's journal entry before returning
JournalFn = Callable[[str, Mapping[str, Any]], None]

log = logging.getLogger("xend_tmem")


def _no_progress(phase: str, done: int, total: Optional[int]) -> None:
    return None


@dataclass
class Outcome:
    """How a save or restore ended; handed to the done phase."""

    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, (KeyboardInterrupt, Cancelled))


@dataclass(frozen=True)
class RoundStats:
    """One completed live page round, as the host measured it."""

    number: int            # 1-based
    pages_sent: int        # RAM pages sent in this round
    bytes_sent: int        # stream bytes written in this round (RAM only)
    elapsed_s: float       # wall time of this round
    bandwidth_bps: float   # measured stream bandwidth so far (bytes/s)
    ram_pages: int         # p2m_size
    max_rounds: int = XEN_MAX_ITERS   # the host's iteration limit (Xen's)
    max_pages: int = 0     # the host stops once this many RAM pages were sent (3 x p2m)
    dirty_pages: int = 0   # pages the guest dirtied during the round (the next round)

    @property
    def converged(self) -> bool:
        """Xen's own test: fewer than 50 pages sent in this round."""
        return self.pages_sent < XEN_MIN_ROUND_PAGES


@dataclass(frozen=True)
class Pending:
    """Bytes a plugin still has to send (QEMU's ``state_pending``), split by when."""

    before_suspend: int = 0
    after_suspend: int = 0


@dataclass
class SaveSession:
    hv: Hypervisor
    domid: int
    live: bool
    out: StreamWriter
    p2m_size: int
    width: int = 8
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: ProgressFn = _no_progress
    cancel: Optional[threading.Event] = None
    bandwidth_bps: Optional[float] = None   # measured during rounds
    suspended: bool = False
    plugin_state: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    log: logging.Logger = log
    journal: Optional[JournalFn] = None     # the job's journal entry, if xend keeps one
    # the host's stop rule (config.migration.limits(), per-call overrides from
    # xm migrate) and rate cap; plugins plan against the same limits
    limits: policy.Limits = field(default_factory=policy.Limits)
    rate_cap_bps: Optional[float] = None
    overhead_ms: float = 0.0                # expected fixed suspend-to-running cost
    # re-measured after every live round (policy.RoundWindow): what the host's
    # stop rule weighed, for plugins to re-estimate their own plans with
    rates: Optional[policy.Rates] = None
    round_progress: Optional[policy.Progress] = None
    warnings: List[str] = field(default_factory=list)   # goes to the report's ``warnings``
    page_log: Optional[PageLog] = None      # page CRCs as pages are written

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled")

    def journal_note(self, plugin: str, mapping: Mapping[str, Any]) -> None:
        """Record, durably and at once, what ``plugin`` must undo if xend dies now.

        The mapping is merged into the plugin's notes in the job's journal entry
        and handed back to its ``checkpoint_recover`` at the next ``xend start``
        (for example: "SAVE_BEGIN returned 1", so SAVE_END is owed). A save
        without a journal (tests, the engine benchmark) records nothing.
        """
        if self.journal is not None:
            self.journal(plugin, mapping)


@dataclass
class RestoreSession:
    hv: Hypervisor
    domid: int
    reader: StreamReader
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: ProgressFn = _no_progress
    plugin_state: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    log: logging.Logger = log
    page_check: Optional[PageCheck] = None  # page CRCs checked as read
