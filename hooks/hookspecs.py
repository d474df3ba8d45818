"""The checkpoint hook contract: the only thing the host and its plugins share.

Save-side phase order (the host owns it, ``xend_tmem/checkpoint.py``)::

    checkpoint_save_setup            before anything is written
    checkpoint_save_before_header    first bytes of the stream (seed layout writers only)
      -- host: p2m_size, PV extended info, p2m frame list --
    checkpoint_save_before_rounds    after the header, before the first page batch
      -- live: rounds of RAM pages, each followed by --
    checkpoint_save_after_round      between rounds
    checkpoint_save_pending          when the host decides whether to stop iterating
      -- host: suspend the guest --
    checkpoint_save_after_suspend    guest suspended, before the last round
      -- host: last round, VCPU_INFO, 0, tail --
    checkpoint_save_done             always, exactly once per setup (host's ``finally``)

Restore side: ``checkpoint_restore_markers`` (when the manager is built),
``checkpoint_restore_setup``, ``checkpoint_restore_chunk`` of the owning plugin
for each declared marker met in the stream (before ``p2m_size`` in the seed
layout, or in the body), and ``checkpoint_restore_done`` always.
``checkpoint_inspect_chunk`` lets ``xend-tmem inspect`` describe a plugin's chunk.
``checkpoint_report_lines`` renders a plugin's own section of a finished
operation's report (the host knows none of its keys).

Hooks report failure by raising; they never swallow errors. Implementations
must not give parameters default values (pluggy never fills them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional

import pluggy

from . import PROJECT

if TYPE_CHECKING:                       # annotations only: the host imports this module
    from xend_tmem.binio import StreamReader
    from xend_tmem.hypervisor.interface import Hypervisor
    from xend_tmem.session import Outcome, Pending, RestoreSession, RoundStats, SaveSession

_hookspec = pluggy.HookspecMarker(PROJECT)


@_hookspec
def checkpoint_configure(settings: Mapping[str, Mapping[str, Any]]) -> None:
    """Validate this plugin's configuration when the plugin manager is built.

    :param settings: the toolstack configuration's plugin sections, keyed by
        entry-point name (the tmem plugin reads ``settings["tmem"]``).
    Raise :class:`~xend_tmem.errors.ConfigError` naming the bad key. Returns nothing.
    """


# -- save ----------------------------------------------------------------------

@_hookspec
def checkpoint_save_setup(session: SaveSession) -> None:
    """Before anything is written: size up the state, choose a plan.

    :param session: the :class:`~xend_tmem.session.SaveSession` (hypervisor,
        domain id, live flag, stream writer, settings, plugin_state, report).
    Must not freeze or change the guest. Returns nothing.
    """


@_hookspec
def checkpoint_save_before_header(session: SaveSession) -> None:
    """The very first bytes of the libxc stream, before ``p2m_size``.

    Only a plugin configured for the seed layout (SPEC §3) writes here.
    :param session: the save session.
    """


@_hookspec
def checkpoint_save_before_rounds(session: SaveSession) -> None:
    """After the stream header and p2m frame list, before the first page batch.

    Xen's place for the ``-5`` chunk. For a non-live save the guest is already
    suspended. :param session: the save session.
    """


@_hookspec
def checkpoint_save_after_round(session: SaveSession, round: RoundStats) -> None:
    """Between live page rounds, with the guest running.

    :param session: the save session.
    :param round: :class:`~xend_tmem.session.RoundStats` of the round just sent.
    A plugin may write chunks here; the host does not stop iterating after a
    round in which plugins wrote more than its convergence threshold.
    """


@_hookspec
def checkpoint_save_pending(session: SaveSession) -> Optional[Pending]:
    """How much this plugin still has to send, when the host decides whether to stop.

    :param session: the save session.
    :return: a :class:`~xend_tmem.session.Pending`, or ``None`` for nothing.
        The host keeps iterating while any plugin has bytes ``before_suspend``
        (within Xen's iteration limits); ``after_suspend`` feeds estimates only.
    """


@_hookspec
def checkpoint_save_after_suspend(session: SaveSession) -> None:
    """The guest is suspended; the last RAM round has not been sent yet.

    Everything still owed must be written now. :param session: the save session.
    """


@_hookspec
def checkpoint_save_done(session: SaveSession, outcome: Outcome) -> None:
    """Always, exactly once for every save whose setup ran: success, error or cancel.

    Release whatever the plugin acquired (thaw, drop logs). The host calls
    every implementation even if another one raised.
    :param session: the save session.
    :param outcome: :class:`~xend_tmem.session.Outcome` (``ok``, ``error``, ``cancelled``).
    """


# -- restore -------------------------------------------------------------------

@_hookspec
def checkpoint_restore_markers() -> Optional[List[int]]:
    """The chunk markers this plugin reads (tmem: ``[-5, -6]``).

    The host refuses a marker claimed by two plugins or one it parses itself.
    :return: a list of negative ints, or ``None``/empty for none.
    """


@_hookspec
def checkpoint_restore_setup(session: RestoreSession) -> None:
    """Before the libxc stream is read; the (paused, empty) domain exists.

    :param session: the :class:`~xend_tmem.session.RestoreSession`.
    """


@_hookspec(firstresult=True)
def checkpoint_restore_chunk(session: RestoreSession, marker: int, reader: StreamReader,
                             offset: int) -> Optional[bool]:
    """A chunk with a marker this plugin declared was met; its marker int is consumed.

    The host calls only the plugin that owns the marker (its marker registry,
    built from ``checkpoint_restore_markers``); a plugin that declares markers
    must implement this hook.
    :param session: the restore session.
    :param marker: the chunk id (e.g. -5).
    :param reader: the :class:`~xend_tmem.binio.StreamReader`; consume exactly the chunk.
    :param offset: stream offset of the marker, for error messages.
    :return: ``True`` when read; anything else is an error naming the plugin.
    """


@_hookspec(firstresult=True)
def checkpoint_inspect_chunk(marker: int, reader: StreamReader,
                             offset: int) -> Optional[Dict[str, Any]]:
    """``xend-tmem inspect`` met a chunk with a marker this plugin declared.

    Optional, but without it ``inspect`` cannot read past this plugin's chunks
    (the stream has no chunk lengths). Called only for the owning plugin, with
    no hypervisor and no session: describe, never restore.
    :param marker: the chunk id; its int is consumed.
    :param reader: the :class:`~xend_tmem.binio.StreamReader`; consume exactly the chunk.
    :param offset: stream offset of the marker, for error messages.
    :return: a small JSON-able mapping shown as the chunk's ``info`` (``None``: nothing to say).
    """


@_hookspec
def checkpoint_restore_done(session: RestoreSession, outcome: Outcome) -> None:
    """Always, exactly once for every restore whose setup ran.

    On success finish what must come last (freeze a client saved FROZEN); on
    failure remove what the restore created. :param session: the restore
    session. :param outcome: :class:`~xend_tmem.session.Outcome`.
    """


# -- migration pre-flight ---------------------------------------------------------

@_hookspec
def checkpoint_migrate_offer(hv: Hypervisor, domid: int) -> Optional[Dict[str, Any]]:
    """Sender, before anything is frozen: what the receiver must accept.

    :param hv: the hypervisor backend. :param domid: the domain to migrate.
    :return: a JSON-able mapping ``{plugin_name: facts}``, or ``None``.
    """


@_hookspec
def checkpoint_migrate_check(hv: Hypervisor, offer: Mapping[str, Any]) -> Optional[str]:
    """Receiver: can this host take the domain described by ``offer``?

    :param hv: the receiver's hypervisor backend.
    :param offer: the merged offers of the sender's plugins.
    :return: a one-line refusal reason, or ``None`` to accept.
    """


@_hookspec
def checkpoint_migrate_restore_cost(hv: Hypervisor, offer: Mapping[str, Any]) -> Optional[float]:
    """Receiver: the milliseconds this plugin's restore-finishing work (between
    the end of the image and the domain restored, paused) is expected to take
    for the domain ``offer`` describes. The pre-flight answer carries the sum so
    the sender's downtime estimate includes it. ``None``: no such work.
    """


# -- crash recovery -------------------------------------------------------------------

@_hookspec
def checkpoint_recover(hv: Hypervisor, domid: int, notes: Mapping[str, Any]) -> None:
    """``xend start`` after a xend that died during a save of ``domid``: undo it.

    Called for every plugin, with only the notes this plugin recorded through
    :meth:`~xend_tmem.session.SaveSession.journal_note` during that save (empty
    if it recorded none), before the host resumes (or destroys) the domain.
    The save's done phase may or may not have run; recover only what the notes
    prove is still held (tmem: SAVE_END only after a SAVE_BEGIN that returned 1).
    :param hv: the hypervisor backend. :param domid: the source domain.
    :param notes: this plugin's journaled facts.
    Raise to report a failure; the host logs it and goes on with the others.
    """


# -- reports ---------------------------------------------------------------------------

@_hookspec
def checkpoint_report_lines(report: Mapping[str, Any]) -> Optional[List[str]]:
    """Render this plugin's part of a finished save, restore or migration report.

    Called by the daemon (which has the plugins that wrote the report) when the
    operation has succeeded, to build the human report ``xm`` prints; only the
    plugin knows what its keys mean. The host shows the section of a plugin that
    does not implement this hook as ``key=value``.
    :param report: the operation's result: ``op`` ("save", "restore" or
        "migrate"), ``domain``, ... and ``plugins``, each plugin's section keyed
        by its name (read your own; do not change it).
    :return: lines without trailing newline, each starting ``<plugin name>: ``;
        ``None`` when this plugin has nothing to say about this report (e.g. no
        section in it). Raising costs only this plugin's lines.
    """
