"""What ``xm save | restore | migrate`` show: progress while they run, and the final report.

Progress is one bar per phase (connecting, tmem, memory rounds, ...): each counts
its own bytes against its own end, so no bar ever goes backwards -- the daemon
reports the tmem phase against the end of the tmem chunk and the RAM rounds
against the estimated end of the stream, and one shared percentage jumped back
(tmem 87 %, then RAM 66 %). On a terminal the current phase's line is
rewritten in place and stays, completed, when the next phase begins; off a
terminal (a log) a line is written when a phase ends and every
:data:`LOG_INTERVAL_S` within a long one, never a carriage return.

The report says what the host did (bytes, rounds, downtime); each checkpoint
plugin renders its own section through the ``checkpoint_report_lines`` hook,
because only the plugin knows what its keys mean. The daemon, which has the
plugins, renders the report into the job result (``report_lines``); ``xm``
prints those lines.
"""
from __future__ import annotations

import time
from collections import deque
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, List, Mapping, Optional, TextIO,
                    Tuple)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..plugins import CheckpointHooks

RATE_WINDOW_S = 3.0          # rate = bytes moved over the last few seconds
MIN_REDRAW_S = 0.1           # a terminal line is redrawn at most this often
LOG_INTERVAL_S = 3.0         # off a terminal: a line at most this often within a phase

# phases that begin once the whole stream is written (their byte counter restarts)
STREAM_WRITTEN = frozenset(["commit", "ack"])

PHASE_NAMES = {
    "connect": "connecting",
    "preflight": "pre-flight",
    "rounds": "memory rounds",
    "suspend": "suspending",
    "tmem": "tmem",
    "tail": "final state",
    "commit": "confirming",
    "restore": "restoring",
    "ack": "awaiting ack",
    "queued": "starting",
}


def plural(count: float, word: str, words: Optional[str] = None) -> str:
    """``1 round``, ``2 rounds``, ``0 pages``: the count and the noun that agrees."""
    n = int(count)
    return f"{n} {word if n == 1 else (words or word + 's')}"


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units, as memory sizes are."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


def human_duration(seconds: float) -> str:
    """``75`` -> ``1:15``: elapsed times and ETAs."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def human_secs(seconds: float) -> str:
    """A short span: ``231.4 ms``, ``1.250 s``, ``1:15``."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.3f} s" if seconds < 60 else human_duration(seconds)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # no such method, or a closed stream
        return False


class _Phase:
    """One phase's bar: its bytes count from ``start`` (the stream offset where it began)."""

    def __init__(self, name: str, start: int, started: float) -> None:
        self.name = name
        self.start = start
        self.started = started
        self.done = start
        self.total: Optional[int] = None
        self.pct = -1                      # the highest percentage shown (never less)
        self.logged_at = started           # off a terminal: when its last line was written
        self.reported_start: Optional[int] = None   # the daemon's phase_start, if it sent one


class ProgressDisplay:
    """Progress of one job: a bar per phase, rewritten in place on a terminal,
    or lines for a log (``tty`` False; by default whatever ``stream`` is).

    ``update`` may be called as often as the caller polls; a terminal line is
    redrawn at most every :data:`MIN_REDRAW_S` unless the phase changes.
    """

    def __init__(self, stream: TextIO, label: str,
                 clock: Callable[[], float] = time.monotonic,
                 tty: Optional[bool] = None) -> None:
        self.stream = stream
        self.label = label
        self.clock = clock
        self.tty = _isatty(stream) if tty is None else tty
        self.started = clock()
        self._samples: Deque[Tuple[float, int]] = deque()
        self._last_draw = -1.0
        self._phase: Optional[_Phase] = None
        self._width = 0
        self.drawn = 0            # how many progress frames were written (tests, diagnostics)

    # -- numbers ---------------------------------------------------------------
    def rate(self) -> Optional[float]:
        """Bytes per second of the current phase over the recent window; ``None``
        until measurable."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (b1 - b0) / (t1 - t0))

    def _progress_text(self, ph: _Phase) -> str:
        """``12.0 MiB / 70.0 MiB  17%`` for a phase with an end, else its bytes ('' for none)."""
        moved = max(0, ph.done - ph.start)
        span = ph.total - ph.start if ph.total is not None and ph.total > ph.start else None
        if span is None:
            return human_bytes(moved) if moved else ""
        pct = max(ph.pct, min(100, 100 * moved // span))
        ph.pct = pct
        # past an estimated end (live rounds re-send what the guest dirtied): the
        # end moves with the bytes rather than show more than 100 %
        return f"{human_bytes(moved)} / {human_bytes(max(span, moved))} {pct:3d}%"

    def _frame(self, ph: _Phase, now: float) -> str:
        parts = [f"{self.label}: {PHASE_NAMES.get(ph.name, ph.name):<13}"]
        amount = self._progress_text(ph)
        if amount:
            parts.append(amount)
        rate = self.rate()
        if rate is not None and (amount or rate > 0):
            parts.append(f"{human_bytes(rate)}/s")
            remaining = (ph.total - ph.done) if ph.total is not None else 0
            if rate > 0 and remaining > 0 and ph.total is not None and ph.total > ph.start:
                parts.append(f"ETA {human_duration(remaining / rate)}")
        parts.append(human_duration(now - self.started))
        return "  ".join(parts)

    def _end_frame(self, ph: _Phase, now: float, stopped: bool = False) -> str:
        """A phase's last line: what it moved, its average rate, how long it took."""
        parts = [f"{self.label}: {PHASE_NAMES.get(ph.name, ph.name):<13}"]
        amount = self._progress_text(ph)
        secs = max(0.0, now - ph.started)
        if amount:
            parts.append(amount)
            moved = max(0, ph.done - ph.start)
            if secs > 0 and moved:
                parts.append(f"{human_bytes(moved / secs)}/s")
        parts.append(f"{'stopped after' if stopped else 'in'} {human_secs(secs)}")
        return "  ".join(parts)

    # -- events ----------------------------------------------------------------
    def update(self, phase: str, done: int, total: Optional[int],
               phase_start: Optional[int] = None) -> None:
        """The job's latest status: its phase, stream bytes so far, that phase's end,
        and (when the daemon says) the bytes at which the phase began."""
        now = self.clock()
        done = int(done)
        ph = self._phase
        changed = (ph is None or phase != ph.name
                   or (phase_start is not None and phase_start != ph.reported_start))
        if ph is None or changed:         # (changed is True when ph is None; for mypy)
            start = done if phase_start is None else int(phase_start)
            if ph is not None:
                boundary = start if phase_start is not None else done
                if phase in STREAM_WRITTEN and ph.total is not None:
                    ph.done = max(ph.done, ph.total)      # everything before it was sent
                elif boundary >= ph.done:
                    # the same byte counter went on: the old phase ended where the
                    # new one began, or at its own end if it had one and the new
                    # phase was first seen past it (those bytes are the new phase's)
                    if ph.total is not None and max(ph.start, ph.done) <= ph.total < boundary:
                        boundary = ph.total
                    ph.done = start = boundary
                self._close(ph, now)
            ph = self._phase = _Phase(phase, start, now)
            ph.reported_start = phase_start
            self._samples.clear()
        elif done < ph.done:           # a counter that restarted within a phase
            ph.start = min(ph.start, done)
            self._samples.clear()
        ph.done = done
        if total is not None:
            ph.total = int(total)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        if self.tty:
            if not changed and now - self._last_draw < MIN_REDRAW_S:
                return
            self._last_draw = now
            self._draw(self._frame(ph, now))
            self.drawn += 1
        elif not changed and now - ph.logged_at >= LOG_INTERVAL_S:
            ph.logged_at = now
            self._line(self._frame(ph, now))
            self.drawn += 1

    def _close(self, ph: _Phase, now: float, stopped: bool = False) -> None:
        """End a phase's bar: on a terminal its line stays, completed; in a log, one line."""
        text = self._end_frame(ph, now, stopped)
        if self.tty:
            self._draw(text)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
        else:
            self._line(text)

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self, summary: Optional[str] = None) -> None:
        """End the display: with ``summary`` (success) the last phase is completed and
        the summary follows; without (failure, Ctrl-C) a terminal's unfinished line is
        cleared and a log says where it stopped."""
        now = self.clock()
        ph, self._phase = self._phase, None
        if summary is not None:
            if ph is not None:
                self._close(ph, now)
            if self.tty:
                self._draw(summary)
                self.stream.write("\n")
            else:
                self.stream.write(summary + "\n")
        elif self.tty:
            if self._width:
                self.stream.write("\r" + " " * self._width + "\r")
        elif ph is not None:
            self._close(ph, now, stopped=True)
        self.stream.flush()
        self._width = 0


# -- the report ------------------------------------------------------------------------

def _num(value: Any) -> Optional[float]:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def section_lines(name: str, section: Any) -> List[str]:
    """A section of a plugin that renders none itself: its plain values as
    ``key=value`` (the host knows no plugin's keys)."""
    if not isinstance(section, Mapping):
        return []
    facts = []
    for key in sorted(section):
        value = section[key]
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, (dict, list, tuple)) or value is None:
            continue
        facts.append(f"{key}={value}")
    return [f"{name}: " + ", ".join(facts)] if facts else []


def report_lines(result: Mapping[str, Any],
                 hooks: Optional["CheckpointHooks"] = None) -> List[str]:
    """The human report of a finished save, restore or migration.

    :param result: as the daemon returns it (``op``, ``domain``, ... and
        ``plugins``, each plugin's section keyed by its name).
    :param hooks: the plugins that wrote the report; each renders its own
        section (``checkpoint_report_lines``). Sections no plugin here renders
        are shown as ``key=value``.
    """
    op = result.get("op")
    name = result.get("domain", "?")
    size = human_bytes(_num(result.get("bytes")) or 0)
    secs = _num(result.get("elapsed_s")) or 0.0
    if op == "save":
        verb = "Checkpointed" if result.get("checkpoint") else "Saved"
        head = f"{verb} domain {name} to {result.get('path')}"
    elif op == "restore":
        head = f"Restored domain {name} (id={result.get('domid')}) from {result.get('path')}"
    elif op == "migrate":
        kind = "live" if result.get("live") else "non-live"
        head = f"Migrated domain {name} to {result.get('host')}:{result.get('port')} ({kind})"
        if result.get("peer_domid") is not None:
            head += f", now id={result.get('peer_domid')} there"
    else:
        head = f"{op} of {name}"
    detail = [f"{size} in {secs:.2f} s"]
    if secs > 0 and _num(result.get("bytes")):
        detail.append(f"{human_bytes(result['bytes'] / secs)}/s")
    rounds = _num(result.get("rounds"))
    if op != "restore" and rounds:
        detail.append(plural(rounds, "round"))
    pages = _num(result.get("pages_sent", result.get("pages")))
    if pages is not None:
        detail.append(plural(pages, "RAM page"))
    lines = [f"{head}: " + ", ".join(detail)]
    plugins: Dict[str, Any] = dict(result.get("plugins") or {})
    rendered = hooks.report_lines(result) if hooks is not None else {}
    for plines in rendered.values():
        lines.extend(plines)
    for pname in sorted(plugins):
        if pname not in rendered:
            lines.extend(section_lines(pname, plugins[pname]))
    if op != "restore" and not plugins:
        lines.append("tmem: not carried (no checkpoint plugin handled this domain)")
    downtime = _num(result.get("downtime_ms"))
    if op != "restore" and downtime is not None:
        if op != "migrate":
            until = "until the image was complete"
        elif result.get("handshake_ms") is not None:
            until = "until the destination ran it"
        else:                       # a stock xend's peer: no handshake to time
            until = "until the image was sent"
        parts = [f"downtime: {human_secs(downtime / 1000.0)} {until}"]
        guest = _num(result.get("guest_downtime_ms"))
        if guest is not None:
            parts.append(f"the guest noticed {human_secs(guest / 1000.0)}")
        est = _num(result.get("est_downtime_ms"))
        if est is not None:
            parts.append(f"expected {human_secs(est / 1000.0)}")
        lines.append(", ".join(parts))
    for warning in result.get("warnings") or ():
        if isinstance(warning, str):
            lines.append(f"warning: {warning}")
    return lines


def shown_lines(result: Mapping[str, Any]) -> List[str]:
    """What a client prints: the report the daemon rendered with its plugins
    (``report_lines``), or, from a result without one, the host's part with the
    plugins' sections as ``key=value``."""
    lines = result.get("report_lines")
    if isinstance(lines, list) and all(isinstance(ln, str) for ln in lines):
        return list(lines)
    return report_lines(result)


def summary_line(result: Mapping[str, Any]) -> str:
    """The progress display's last line: how much moved, how fast."""
    total = _num(result.get("bytes")) or 0
    secs = _num(result.get("elapsed_s")) or 0.0
    rate = f", {human_bytes(total / secs)}/s" if secs > 0 else ""
    return f"{result.get('op', 'done')}: done  {human_bytes(total)} in {secs:.2f} s{rate}"


__all__ = ["ProgressDisplay", "report_lines", "shown_lines", "section_lines", "summary_line",
           "plural", "human_bytes", "human_duration", "human_secs", "PHASE_NAMES",
           "LOG_INTERVAL_S"]
