"""The ``tmem-digest`` checkpoint plugin: proof that tmem arrived intact.

Records a digest of the domain's persistent tmem (per pool: page count and a
sha256 over pages sorted by key) at the two moments that must agree: on the
source once the guest is suspended, and on the destination when the restore is
complete and before the guest runs again. The reports carry it as
``plugins["tmem-digest"]``; ``xend-tmem demo`` compares the two. Uses the
interface's ``tmem_digest`` (Inspection), which every backend provides.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from xend_tmem.hypervisor.interface import Hypervisor
from xend_tmem.xend.progress import plural

from . import hookimpl

NAME = "tmem-digest"


def _digest(hv: Hypervisor, domid: int) -> Dict[str, Any]:
    return {str(pool): {"pages": count, "sha256": sha}
            for pool, (count, sha) in hv.tmem_digest(domid).items()}


def _report(at: str, pools: Dict[str, Any]) -> Dict[str, Any]:
    pages = sum(p.get("pages", 0) for p in pools.values() if isinstance(p, dict))
    return {"at": at, "persistent_pages": pages, "pools": pools}


@hookimpl
def checkpoint_save_done(session, outcome) -> None:
    # The guest has been suspended since before the last round and is resumed
    # only after the done phase, so this is its state at suspend, taken after
    # the image was sent (the digest costs no stream time).
    if outcome.ok and session.suspended:
        session.report[NAME] = _report("suspend", _digest(session.hv, session.domid))


@hookimpl
def checkpoint_restore_done(session, outcome) -> None:
    if outcome.ok:
        session.report[NAME] = _report("restore", _digest(session.hv, session.domid))


@hookimpl
def checkpoint_report_lines(report: Mapping[str, Any]) -> Optional[List[str]]:
    mine = (report.get("plugins") or {}).get(NAME)
    if not isinstance(mine, Mapping) or not isinstance(mine.get("pools"), Mapping):
        return None
    pages = mine.get("persistent_pages")
    pages = pages if isinstance(pages, int) and not isinstance(pages, bool) else 0
    return [f"{NAME}: {plural(pages, 'persistent tmem page')} in "
            f"{plural(len(mine['pools']), 'pool')} hashed at {mine.get('at', '?')} "
            "(sha256 per pool)"]
