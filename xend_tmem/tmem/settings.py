"""The tmem plugin's section of the toolstack configuration (``tmem:``).

xend had no tmem keys; these are new, named in xend's dashed style.

``downtime-limit-ms`` moved to the host's ``migration:`` section (issue 7: the
stop rule is the host's); here it stays as the old name, which the toolstack
configuration reads as ``migration.downtime-limit-ms`` when that is not set.
For one migration the host hands the plugin its own limit
(:func:`with_host_limit`), so plugin and host never disagree.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional

from ..xen import LAYOUTS
from ..errors import ConfigError

PLANS = ("auto", "precopy", "late-freeze", "after-suspend")

DEFAULTS = {
    "layout": "released",
    "plan": "auto",
    "downtime-limit-ms": 300,           # old name of migration.downtime-limit-ms
    "bandwidth-mbps": 0,
}


class TmemSettings(NamedTuple):
    """(A named tuple, not a dataclass: ``xm`` imports this module for
    :data:`PLANS` on every command, and dataclasses costs it 10 ms.)"""

    layout: str = "released"          # where -5 goes: after the header, or before p2m_size
    plan: str = "auto"                # live-migration plan, or auto (policy.py)
    bandwidth_bps: Optional[float] = None   # None: measure during the rounds


def parse_settings(section: Optional[Mapping[str, Any]], where: str = "tmem") -> TmemSettings:
    """Validate the ``tmem:`` mapping; errors name the key."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(DEFAULTS)})")
    values = {**DEFAULTS, **section}
    layout = values["layout"]
    if layout not in LAYOUTS:
        raise ConfigError(f"{where}.layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    plan = values["plan"]
    if plan not in PLANS:
        raise ConfigError(f"{where}.plan: expected one of {', '.join(PLANS)}, got {plan!r}")
    if layout == "seed" and plan not in ("auto", "precopy"):
        raise ConfigError(f"{where}.plan: the seed layout sends tmem first, so the plan "
                          f"must be precopy (or auto), got {plan!r}")
    # the old key is still checked (the toolstack reads it as the host's limit)
    _number(values["downtime-limit-ms"], f"{where}.downtime-limit-ms", minimum=1)
    bandwidth = _number(values["bandwidth-mbps"], f"{where}.bandwidth-mbps", minimum=0)
    return TmemSettings(layout=layout, plan="precopy" if layout == "seed" else plan,
                        bandwidth_bps=(bandwidth * 1e6 / 8) if bandwidth else None)


def with_host_limit(section: Optional[Mapping[str, Any]],
                    downtime_limit_ms: float) -> Dict[str, Any]:
    """The ``tmem:`` section as the plugin should see it for one migration: the
    host's downtime limit (``migration.downtime-limit-ms`` or ``xm migrate
    --downtime-limit-ms``) in place of the old key."""
    out = dict(section or {})
    out["downtime-limit-ms"] = downtime_limit_ms
    return out


def _number(value: Any, key: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {value}")
    return float(value)
