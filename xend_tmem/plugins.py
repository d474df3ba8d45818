"""Building the checkpoint plugin manager, and the typed facade the host calls.

The manager is made by :func:`get_plugin_manager` (never at import time) from
the entry-point names the toolstack configuration enables. The rest of the
code calls hooks only through :class:`CheckpointHooks`, which also runs every
done-phase implementation in its own ``try`` so one broken plugin cannot keep
another from releasing what it holds.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import pluggy

from xend_tmem.hooks import PROJECT, hookspecs

from .errors import ConfigError, PluginError
from .session import Outcome, Pending, RestoreSession, SaveSession

ENTRY_POINT_GROUP = "xend_tmem.checkpoint"

# Chunk ids the host parses itself (SPEC §2.2): a plugin may not claim them.
HOST_CHUNK_IDS = frozenset([-1, -2, -3, -4, -7, -8, -9, -10, -11, -12, -13, -14, -15,
                            -16, -17, -18, -19, -20])


def installed_plugins() -> Dict[str, Any]:
    """Entry points of the checkpoint plugin group, by name."""
    from importlib import metadata
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        group = eps.select(group=ENTRY_POINT_GROUP)
    else:  # Python 3.9
        group = eps.get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in group}


class CheckpointHooks:
    """Typed calls into the plugin manager; keywords only, as pluggy wants."""

    def __init__(self, pm: pluggy.PluginManager, settings: Mapping[str, Mapping[str, Any]],
                 enabled: Sequence[str]) -> None:
        self.pm = pm
        self.settings = settings
        self.enabled = list(enabled)
        self._markers = self._collect_markers()

    # -- manager facts ------------------------------------------------------
    def _collect_markers(self) -> Dict[int, str]:
        owners: Dict[int, str] = {}
        for impl in self.pm.hook.checkpoint_restore_markers.get_hookimpls():
            name = impl.plugin_name
            declared = impl.function() or []
            for marker in declared:
                if not isinstance(marker, int) or marker >= 0:
                    raise PluginError(f"checkpoint plugin '{name}' declares marker {marker!r}: "
                                      "markers are negative chunk ids")
                if marker in HOST_CHUNK_IDS:
                    raise PluginError(f"checkpoint plugin '{name}' declares marker {marker}, "
                                      "a chunk id the host parses itself")
                if marker in owners:
                    raise PluginError(f"checkpoint plugins '{owners[marker]}' and '{name}' "
                                      f"both declare marker {marker}")
                owners[marker] = name
        return owners

    def restore_markers(self) -> Set[int]:
        return set(self._markers)

    # -- save ---------------------------------------------------------------
    def save_setup(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_setup(session=session)

    def save_before_header(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_before_header(session=session)

    def save_before_rounds(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_before_rounds(session=session)

    def save_after_round(self, session: SaveSession, round) -> None:
        self.pm.hook.checkpoint_save_after_round(session=session, round=round)

    def save_pending(self, session: SaveSession) -> Pending:
        before = after = 0
        for p in self.pm.hook.checkpoint_save_pending(session=session):
            if p is not None:
                before += p.before_suspend
                after += p.after_suspend
        return Pending(before, after)

    def save_after_suspend(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_after_suspend(session=session)

    def save_done(self, session: SaveSession, outcome: Outcome) -> List[Tuple[str, BaseException]]:
        return self._call_each("checkpoint_save_done", session=session, outcome=outcome)

    # -- restore ------------------------------------------------------------
    def restore_setup(self, session: RestoreSession) -> None:
        self.pm.hook.checkpoint_restore_setup(session=session)

    def restore_chunk(self, session: RestoreSession, marker: int, reader, offset: int) -> bool:
        return bool(self.pm.hook.checkpoint_restore_chunk(session=session, marker=marker,
                                                          reader=reader, offset=offset))

    def restore_done(self, session: RestoreSession, outcome: Outcome) -> List[Tuple[str, BaseException]]:
        return self._call_each("checkpoint_restore_done", session=session, outcome=outcome)

    # -- migration ------------------------------------------------------------
    def migrate_offer(self, hv, domid: int) -> Dict[str, Any]:
        offer: Dict[str, Any] = {}
        for part in self.pm.hook.checkpoint_migrate_offer(hv=hv, domid=domid):
            if part:
                offer.update(part)
        return offer

    def migrate_check(self, hv, offer: Mapping[str, Any]) -> List[str]:
        """Reasons to refuse; a section for a plugin this host lacks is one."""
        reasons = [f"this host has no '{name}' checkpoint plugin enabled"
                   for name in offer if name not in self.enabled]
        reasons += [r for r in self.pm.hook.checkpoint_migrate_check(hv=hv, offer=offer) if r]
        return reasons

    # -- crash recovery -------------------------------------------------------
    def recover(self, hv, domid: int,
                notes: Mapping[str, Mapping[str, Any]]) -> List[Tuple[str, BaseException]]:
        """``checkpoint_recover`` of every plugin with its own notes; errors collected."""
        errors: List[Tuple[str, BaseException]] = []
        for impl in reversed(self.pm.hook.checkpoint_recover.get_hookimpls()):
            mine = notes.get(impl.plugin_name) or {}
            kwargs = {"hv": hv, "domid": domid, "notes": dict(mine)}
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except BaseException as exc:  # noqa: B902 - reported by the host
                errors.append((impl.plugin_name, exc))
        return errors

    # -- helpers ------------------------------------------------------------
    def _call_each(self, hook_name: str, **kwargs: Any) -> List[Tuple[str, BaseException]]:
        """Call every implementation (in pluggy's LIFO order), each in its own try."""
        errors: List[Tuple[str, BaseException]] = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except BaseException as exc:  # noqa: B902 - collected, re-raised by the host
                errors.append((impl.plugin_name, exc))
        return errors


def get_plugin_manager(enabled: Iterable[str] = ("tmem",),
                       settings: Optional[Mapping[str, Mapping[str, Any]]] = None,
                       *, extra: Sequence[object] = ()) -> CheckpointHooks:
    """A fresh plugin manager with the named entry-point plugins enabled.

    :param enabled: entry-point names (group ``xend_tmem.checkpoint``) from the
        toolstack configuration's ``checkpoint-plugins``.
    :param settings: plugin sections of the configuration, keyed by name.
    :param extra: plugin objects registered directly (tests, embedding).
    Raises :class:`PluginError` naming a plugin that is unknown or broken.
    """
    enabled = list(enabled)
    settings = dict(settings or {})
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    available = installed_plugins()
    for name in enabled:
        if pm.has_plugin(name):
            raise PluginError(f"checkpoint plugin '{name}' is enabled twice")
        ep = available.get(name)
        if ep is None:
            known = ", ".join(sorted(available)) or "none"
            raise PluginError(f"checkpoint plugin '{name}' is not installed (installed: {known})")
        try:
            plugin = ep.load()
            pm.register(plugin, name=name)
        except Exception as exc:
            raise PluginError(f"checkpoint plugin '{name}' failed to load: "
                              f"{type(exc).__name__}: {exc}") from exc
    for plugin in extra:
        try:
            pm.register(plugin)
        except Exception as exc:
            raise PluginError(f"checkpoint plugin {plugin!r} failed to register: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(f"checkpoint plugin '{name}' implements an unknown hook: {exc}") from exc
    hooks = CheckpointHooks(pm, settings, enabled)
    try:
        pm.hook.checkpoint_configure(settings=settings)
    except ConfigError:
        raise
    except Exception as exc:
        raise PluginError(f"checkpoint plugin configuration failed: {type(exc).__name__}: {exc}") from exc
    return hooks


__all__ = ["CheckpointHooks", "get_plugin_manager", "installed_plugins", "ENTRY_POINT_GROUP",
           "HOST_CHUNK_IDS"]
