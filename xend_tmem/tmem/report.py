"""The tmem plugin's report lines: its section of a save, restore or migration report in words.

The section's keys are the plugin's own (written by :mod:`.save` and the
restore hook), so the plugin, not the host, says what they mean: the plan and
why, how much tmem went over, how many pages were invalidated while the guest
ran, how long the guest's tmem was frozen -- the numbers an administrator tunes
the plan by.
"""
from __future__ import annotations

from typing import Any, FrozenSet, List, Mapping

from ..xend.progress import human_bytes, plural

SAVE_KEYS = frozenset(["plan", "reason", "tmem_bytes", "pages", "invalidations", "freeze_ms",
                       "est_freeze_ms", "persistent_pages_at_start", "pools"])
RESTORE_KEYS = frozenset(["tmem_bytes", "pages", "invalidations", "frozen"])


def _num(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _amount(section: Mapping[str, Any]) -> List[str]:
    """``8.0 MiB of tmem (2048 pages)``, or the page count alone."""
    tmem_bytes, pages = _num(section.get("tmem_bytes")), _num(section.get("pages"))
    if tmem_bytes is not None:
        text = f"{human_bytes(tmem_bytes)} of tmem"
        if pages is not None:
            text += f" ({plural(pages, 'page')}"
            start = _num(section.get("persistent_pages_at_start"))
            if start is not None and int(start) != int(pages):
                text += f"; {int(start)} at the start"
            text += ")"
        return [text]
    return [plural(pages, "tmem page")] if pages is not None else []


def _others(section: Mapping[str, Any], known: FrozenSet[str]) -> List[str]:
    """Keys this version does not describe in words (a newer writer's): as ``key=value``."""
    out = []
    for key in sorted(section):
        value = section[key]
        if key in known or isinstance(value, (dict, list, tuple)) or value is None:
            continue
        out.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return out


def report_lines(name: str, op: Any, section: Mapping[str, Any]) -> List[str]:
    """Lines for the tmem section ``section`` of an ``op`` ("save", "restore", "migrate")."""
    lines: List[str] = []
    if op == "restore":
        facts = _amount(section)
        if facts:
            facts[0] += " restored"
        inv = _num(section.get("invalidations"))
        if inv is not None:
            facts.append(f"{plural(inv, 'invalidation')} replayed")
        if section.get("frozen") is True:
            facts.append("frozen again, as it was saved")
        facts += _others(section, RESTORE_KEYS)
        return [f"{name}: " + ", ".join(facts)] if facts else []
    plan = section.get("plan")
    if plan:
        reason = section.get("reason")
        lines.append(f"{name}: plan {plan}" + (f" ({reason})" if reason else ""))
    facts = _amount(section)
    inv = _num(section.get("invalidations"))
    if inv is not None:
        facts.append(f"{plural(inv, 'page')} invalidated")
    frozen = _num(section.get("freeze_ms"))
    if frozen is not None:
        est = _num(section.get("est_freeze_ms"))
        facts.append(f"guest tmem frozen {frozen:.1f} ms"
                     + (f" (expected {est:.1f} ms)" if est or (frozen and est is not None)
                        else ""))
    pools = _num(section.get("pools"))
    if pools is not None:
        facts.append(plural(pools, "pool"))
    facts += _others(section, SAVE_KEYS)
    if facts:
        lines.append(f"{name}: " + ", ".join(facts))
    return lines


__all__ = ["report_lines"]
