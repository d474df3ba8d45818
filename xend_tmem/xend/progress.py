"""What ``xm save | restore | migrate`` show: a live status line and the final report.

The status line is for a person at a terminal: phase, bytes moved, rate, ETA,
rewritten in place. Off a terminal ``xm`` prints only the report, so scripts and
logs get a stable text (or ``--json``). The report says what the tmem plugin did
-- its plan and why, how much tmem went over, how many pages were invalidated
while the guest ran, how long the guest's tmem was frozen -- because those are
the numbers an administrator tunes the plan by.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, TextIO, Tuple

RATE_WINDOW_S = 3.0          # rate = bytes moved over the last few seconds
MIN_REDRAW_S = 0.1

PHASE_NAMES = {
    "connect": "connecting",
    "preflight": "pre-flight",
    "rounds": "memory rounds",
    "suspend": "suspending",
    "tmem": "tmem",
    "tail": "final state",
    "restore": "restoring",
    "ack": "awaiting ack",
    "queued": "starting",
}


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; binary units, as memory sizes are."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns


def human_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressDisplay:
    """One status line rewritten in place with ``\\r``; :meth:`finish` ends it.

    ``update`` may be called as often as the caller polls; the line is redrawn at
    most every :data:`MIN_REDRAW_S` unless the phase changes.
    """

    def __init__(self, stream: TextIO, label: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label
        self.clock = clock
        self.started = clock()
        self._samples: Deque[Tuple[float, int]] = deque()
        self._last_draw = -1.0
        self._phase: Optional[str] = None
        self._done = 0
        self._width = 0
        self.drawn = 0            # how many frames were drawn (tests, diagnostics)

    def rate(self) -> Optional[float]:
        """Bytes per second over the recent window; ``None`` until measurable."""
        if len(self._samples) < 2:
            return None
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (b1 - b0) / (t1 - t0))

    def line(self, phase: str, done: int, total: Optional[int]) -> str:
        parts = [f"{self.label}: {PHASE_NAMES.get(phase, phase):<13}", human_bytes(done)]
        if total:
            shown_total = max(total, done)
            parts[-1] += f" / {human_bytes(shown_total)} {min(100, 100 * done // shown_total):3d}%"
        rate = self.rate()
        if rate is not None:
            parts.append(f"{human_bytes(rate)}/s")
            if total and rate > 0 and total > done:
                parts.append(f"ETA {human_duration((total - done) / rate)}")
        parts.append(human_duration(self.clock() - self.started))
        return "  ".join(parts)

    def update(self, phase: str, done: int, total: Optional[int]) -> None:
        now = self.clock()
        if done < self._done:          # a new byte counter (e.g. a new phase): restart the rate
            self._samples.clear()
        self._done = done
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        if phase == self._phase and now - self._last_draw < MIN_REDRAW_S:
            return
        self._phase = phase
        self._last_draw = now
        self._draw(self.line(phase, done, total))

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)
        self.drawn += 1

    def finish(self, summary: Optional[str] = None) -> None:
        """Replace the status line by ``summary`` (or clear it) and end the line."""
        if summary is None:
            if self._width:
                self.stream.write("\r" + " " * self._width + "\r")
        else:
            self._draw(summary)
            self.stream.write("\n")
        self.stream.flush()
        self._width = 0


def _num(value: Any) -> Optional[float]:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _secs(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def plugin_lines(name: str, rep: Mapping[str, Any]) -> List[str]:
    """A plugin's report as lines; known tmem facts in words, the rest as key=value."""
    lines: List[str] = []
    plan = rep.get("plan")
    if plan:
        reason = rep.get("reason")
        lines.append(f"{name}: plan {plan}" + (f" ({reason})" if reason else ""))
    facts: List[str] = []
    tmem_bytes = _num(rep.get("tmem_bytes"))
    pages = _num(rep.get("pages"))
    if tmem_bytes is not None:
        facts.append(f"{human_bytes(tmem_bytes)} of tmem"
                     + (f" ({int(pages)} pages)" if pages is not None else ""))
    elif pages is not None:
        facts.append(f"{int(pages)} tmem pages")
    inv = _num(rep.get("invalidations"))
    if inv is not None:
        facts.append(f"{int(inv)} pages invalidated")
    frozen = _num(rep.get("frozen_s"))
    if frozen is not None:
        facts.append(f"guest tmem frozen {frozen:.3f} s")
    shown = {"plan", "reason", "tmem_bytes", "pages", "invalidations", "frozen_s"}
    for key in sorted(rep):
        if key in shown:
            continue
        value = rep[key]
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, (dict, list)):
            continue
        facts.append(f"{key}={value}")
    if facts:
        lines.append(f"{name}: " + ", ".join(facts))
    return lines


def report_lines(result: Mapping[str, Any]) -> List[str]:
    """The human report of a finished save, restore or migration (``result`` as the
    daemon returns it: ``op``, ``domain``, ... plus the checkpoint report)."""
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
    if op != "restore" and _num(result.get("rounds")):
        detail.append(f"{int(result['rounds'])} rounds")
    pages = _num(result.get("pages_sent", result.get("pages")))
    if pages is not None:
        detail.append(f"{int(pages)} RAM pages")
    lines = [f"{head}: " + ", ".join(detail)]
    plugins: Dict[str, Any] = dict(result.get("plugins") or {})
    for pname in sorted(plugins):
        lines.extend(plugin_lines(pname, plugins[pname] or {}))
    if op != "restore" and not plugins:
        lines.append("tmem: not carried (no checkpoint plugin handled this domain)")
    downtime = _num(result.get("downtime_s"))
    if op != "restore" and downtime is not None:
        resumed = _num(result.get("resumed_after_s"))
        lines.append(f"downtime: {_secs(downtime)} until the image was sent"
                     + (f", {_secs(resumed)} until the destination confirmed it runs"
                        if resumed is not None else ""))
    return lines


def summary_line(result: Mapping[str, Any]) -> str:
    """The status line's last frame: how much moved, how fast."""
    total = _num(result.get("bytes")) or 0
    secs = _num(result.get("elapsed_s")) or 0.0
    rate = f", {human_bytes(total / secs)}/s" if secs > 0 else ""
    return f"{result.get('op', 'done')}: done  {human_bytes(total)} in {secs:.2f} s{rate}"


__all__ = ["ProgressDisplay", "report_lines", "plugin_lines", "summary_line", "human_bytes",
           "human_duration", "PHASE_NAMES"]
