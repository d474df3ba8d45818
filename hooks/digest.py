"""The ``tmem-digest`` checkpoint plugin: proof that tmem arrived intact.

Records a digest of the domain's persistent tmem (per pool: page count and a
sha256 over pages in (OID, index) order) at the two moments that must agree: on the
source once the guest is suspended, and on the destination when the restore is
complete and before the guest runs again. The reports carry it as
``plugins["tmem-digest"]``; ``xend-tmem demo`` compares the two. Uses the
interface's ``tmem_digest`` (Inspection), which every backend provides.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Mapping, Optional

from xend_tmem.hypervisor.interface import Hypervisor
from xend_tmem.hypervisor.pagestore import PageStore
from xend_tmem.session import Outcome, RestoreSession, SaveSession
from xend_tmem.xend.progress import plural
from xend_tmem.xen import PAGE_SIZE

from . import hookimpl

NAME = "tmem-digest"
# a sample (32 MiB: more than the caches hold, as a restored domain's tmem is)
# hashed once per process while nothing was measured
CALIBRATION_PAGES = 8192
CALIBRATION_RUNS = 3
MEASURED_KEPT = 5                 # restores whose digest rate the estimate weighs
MEASURED_MIN_PAGES = 1024
# s per page: this host's last few restore digests as measured; the least is
# the rate (preemption only adds)
_per_page_s: List[float] = []
_measured = [False]
_calibration: List[float] = []


def _digest(hv: Hypervisor, domid: int) -> Dict[str, Any]:
    return {str(pool): {"pages": count, "sha256": sha}
            for pool, (count, sha) in hv.tmem_digest(domid).items()}


def _report(at: str, pools: Dict[str, Any]) -> Dict[str, Any]:
    pages = sum(p.get("pages", 0) for p in pools.values() if isinstance(p, dict))
    return {"at": at, "persistent_pages": pages, "pools": pools}


@hookimpl
def checkpoint_save_done(session: SaveSession, outcome: Outcome) -> None:
    # The guest has been suspended since before the last round and is resumed
    # only after the done phase, so this is its state at suspend, taken after
    # the image was sent (the digest costs no stream time).
    if outcome.ok and session.suspended:
        session.report[NAME] = _report("suspend", _digest(session.hv, session.domid))


@hookimpl
def checkpoint_restore_done(session: RestoreSession, outcome: Outcome) -> None:
    if outcome.ok:
        t0 = time.monotonic()
        pools = _digest(session.hv, session.domid)
        session.report[NAME] = _report("restore", pools)
        pages = session.report[NAME]["persistent_pages"]
        if pages >= MEASURED_MIN_PAGES:    # big enough to measure the rate, not the call
            rate = (time.monotonic() - t0) / pages
            kept = _per_page_s[-(MEASURED_KEPT - 1):] if _measured[0] else []
            _per_page_s[:] = kept + [rate]
            _measured[0] = True


def _sample_per_page_s(n: int) -> float:
    """The page store's own digest (the simulator's ``tmem_digest`` is that
    code, run by the hypervisor process on this host) over ``n`` distinct pages
    laid out as a restore lays them: in the stream's order, objects in no
    particular order but each one's pages in runs (a save walks the put order,
    and a guest puts a swap cluster's pages together); the least of a few runs
    (a preemption is no rate)."""
    store = PageStore(1, PAGE_SIZE)
    objects = -(-n // 64)
    for o in sorted(range(objects), key=lambda o: (o * 7919) % objects):
        for i in range(o * 64, min(n, o * 64 + 64)):
            store.put(store.make_key((o, 7, 0), i % 64), os.urandom(PAGE_SIZE))
    best = float("inf")
    for _ in range(CALIBRATION_RUNS):
        t0 = time.monotonic()
        store.digest()
        best = min(best, time.monotonic() - t0)
    return best / n


def _calibrated_per_page_s() -> float:
    """Seconds per page of a restore digest: the least of this host's last
    few measured ones, else the calibration on a sample."""
    if _per_page_s:
        return min(_per_page_s)
    if not _calibration:
        _calibration.append(_sample_per_page_s(CALIBRATION_PAGES))
    return _calibration[0]


@hookimpl
def checkpoint_migrate_restore_cost(hv: Hypervisor, offer: Mapping[str, Any]) -> Optional[float]:
    # the destination hashes every persistent tmem page before the guest runs:
    # downtime the sender must expect (measured by the last restore here, else
    # calibrated on a sample)
    tmem = offer.get("tmem")
    pages = tmem.get("persistent_pages") if isinstance(tmem, Mapping) else None
    if not isinstance(pages, int) or isinstance(pages, bool) or pages <= 0:
        return None
    return pages * _calibrated_per_page_s() * 1000.0


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
