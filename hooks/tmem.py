"""The tmem checkpoint plugin (entry point ``tmem``): thin hook implementations.

The work is in :mod:`xend_tmem.tmem`; per-save state lives in
``session.plugin_state["tmem"]`` so one registered plugin serves concurrent
saves and restores.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from xend_tmem.binio import StreamReader
from xend_tmem.hypervisor.interface import Hypervisor
from xend_tmem.session import Outcome, Pending, RestoreSession, RoundStats, SaveSession

from xend_tmem.xen import PAGE_SIZE, TMEM_MARKERS
from xend_tmem.tmem.report import report_lines
from xend_tmem.tmem.restore import TmemRestorer
from xend_tmem.tmem.save import TmemSaveJob, TmemSizes, check_movable
from xend_tmem.tmem.settings import TmemSettings, parse_settings

from . import hookimpl

NAME = "tmem"


def _settings(session: SaveSession) -> TmemSettings:
    return parse_settings(session.settings.get(NAME))


@hookimpl
def checkpoint_configure(settings: Mapping[str, Mapping[str, Any]]) -> None:
    parse_settings(settings.get(NAME))


# -- save -------------------------------------------------------------------------

@hookimpl
def checkpoint_save_setup(session: SaveSession) -> None:
    session.plugin_state[NAME] = TmemSaveJob(session, _settings(session))


@hookimpl
def checkpoint_save_before_header(session: SaveSession) -> None:
    session.plugin_state[NAME].before_header()


@hookimpl
def checkpoint_save_before_rounds(session: SaveSession) -> None:
    session.plugin_state[NAME].before_rounds()


@hookimpl
def checkpoint_save_after_round(session: SaveSession, round: RoundStats) -> None:
    session.plugin_state[NAME].after_round(round)


@hookimpl
def checkpoint_save_pending(session: SaveSession) -> Optional[Pending]:
    job: TmemSaveJob = session.plugin_state[NAME]
    return job.pending()


@hookimpl
def checkpoint_save_after_suspend(session: SaveSession) -> None:
    session.plugin_state[NAME].after_suspend()


@hookimpl
def checkpoint_save_done(session: SaveSession, outcome: Outcome) -> None:
    job = session.plugin_state.pop(NAME, None)
    if job is not None:
        job.done(outcome)
    # Setup failed before the job existed: no SAVE_BEGIN was issued, so no
    # SAVE_END is owed (Xen's would restore a stale frozen state).


@hookimpl
def checkpoint_recover(hv: Hypervisor, domid: int, notes: Mapping[str, Any]) -> None:
    # A xend that died during the save: SAVE_END only if SAVE_BEGIN was issued
    # ("issued": xend died inside the call, the hypervisor may have completed
    # it; then SAVE_END is owed, and it restores the state SAVE_BEGIN kept).
    if notes.get("save_begin") in (True, "issued"):
        hv.save_end(domid)


# -- restore ----------------------------------------------------------------------

@hookimpl
def checkpoint_restore_markers() -> List[int]:
    return list(TMEM_MARKERS)


@hookimpl
def checkpoint_restore_setup(session: RestoreSession) -> None:
    session.plugin_state[NAME] = TmemRestorer(session.hv, session.domid,
                                              page_check=session.page_check)


@hookimpl
def checkpoint_restore_chunk(session: RestoreSession, marker: int, reader: StreamReader,
                             offset: int) -> Optional[bool]:
    if marker not in TMEM_MARKERS:
        return None
    session.plugin_state[NAME].read_chunk(reader, marker, offset)
    return True


@hookimpl
def checkpoint_restore_done(session: RestoreSession, outcome: Outcome) -> None:
    restorer: Optional[TmemRestorer] = session.plugin_state.get(NAME)
    if restorer is None:
        return
    if outcome.ok:
        restorer.finish()
    else:
        restorer.abort()
    session.report[NAME] = {"pages": restorer.page_count,
                            "invalidations": restorer.invalidation_count,
                            "tmem_bytes": restorer.bytes,
                            "frozen": bool(restorer.saved and restorer.saved.frozen)}


# -- report -------------------------------------------------------------------------

@hookimpl
def checkpoint_report_lines(report: Mapping[str, Any]) -> Optional[List[str]]:
    mine = (report.get("plugins") or {}).get(NAME)
    if not isinstance(mine, Mapping):
        return None
    return report_lines(NAME, report.get("op"), mine)


# -- migration pre-flight ------------------------------------------------------------

@hookimpl
def checkpoint_migrate_offer(hv: Hypervisor, domid: int) -> Optional[Dict[str, Any]]:
    sizes = TmemSizes(hv, domid)
    if not sizes.pools:
        return None
    check_movable(hv, domid, sizes.persistent_pages)   # refused before the source is renamed
    return {NAME: {"version": sizes.version, "pools": sizes.pools,
                   "persistent_pages": sizes.persistent_pages, "page_size": PAGE_SIZE}}


@hookimpl
def checkpoint_migrate_check(hv: Hypervisor, offer: Mapping[str, Any]) -> Optional[str]:
    mine = offer.get(NAME)
    if not mine:
        return None
    try:
        version = int(mine["version"])
        pages = int(mine["persistent_pages"])
    except (KeyError, TypeError, ValueError):
        return "malformed tmem pre-flight offer"
    if version != hv.tmem_version():
        return (f"domain's tmem is spec version {version}; this host's hypervisor speaks "
                f"version {hv.tmem_version()}")
    info = hv.host_info()
    if pages and not info.can_move_tmem:
        return (f"this host cannot move tmem (Xen {info.xen_release}: the hypervisor takes "
                f"tmem pages only on its compression path, H8): the domain's {pages} "
                f"persistent tmem pages would be lost")
    free = hv.tmem_free_pages()
    if pages > free:
        return f"domain has {pages} persistent tmem pages; this host has room for {free}"
    return None
