"""Building the checkpoint plugin manager, and the typed facade the host calls.

The manager is made by :func:`get_plugin_manager` (never at import time) from
the entry-point names the toolstack configuration enables. The rest of the
code calls hooks only through :class:`CheckpointHooks`, which also runs every
done-phase implementation in its own ``try`` so one broken plugin cannot keep
another from releasing what it holds.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import pluggy

from xend_tmem.hooks import PROJECT, hookspecs

from .codec.legacy import HOST_CHUNK_IDS, MarkerRegistry
from .binio import StreamReader
from .errors import ConfigError, PluginError, StreamError
from .hypervisor.interface import Hypervisor
from .session import Outcome, Pending, RestoreSession, RoundStats, SaveSession

ENTRY_POINT_GROUP = "xend_tmem.checkpoint"

# Chunk ids the host parses itself (SPEC §2.2) are HOST_CHUNK_IDS (codec.legacy):
# a plugin may not claim them.


def installed_plugins() -> Dict[str, metadata.EntryPoint]:
    """Entry points of the checkpoint plugin group, by name."""
    if sys.version_info >= (3, 10):
        group = metadata.entry_points(group=ENTRY_POINT_GROUP)
    else:  # Python 3.9: a dict of groups
        group = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in group}


class CheckpointHooks:
    """Typed calls into the plugin manager; keywords only, as pluggy wants."""

    def __init__(self, pm: pluggy.PluginManager, settings: Mapping[str, Mapping[str, Any]],
                 enabled: Sequence[str]) -> None:
        self.pm = pm
        self.settings = settings
        self.enabled = list(enabled)
        self.registry = self._collect_markers()

    # -- manager facts ------------------------------------------------------
    def _collect_markers(self) -> MarkerRegistry:
        """The marker registry: each declared marker and the plugin that owns it.

        A plugin that declares markers must read them: the stream has no chunk
        lengths, so a chunk nobody parses ends every restore.
        """
        declared: List[Tuple[str, List[int]]] = []
        readers = {impl.plugin_name
                   for impl in self.pm.hook.checkpoint_restore_chunk.get_hookimpls()}
        for impl in reversed(self.pm.hook.checkpoint_restore_markers.get_hookimpls()):
            name = impl.plugin_name
            markers = impl.function() or []
            if not isinstance(markers, (list, tuple, set, frozenset)):
                raise PluginError(f"checkpoint plugin '{name}' returned {markers!r} from "
                                  "checkpoint_restore_markers, not a list of markers")
            declared.append((name, list(markers)))
        registry = MarkerRegistry.from_declarations(declared)
        for name, markers in declared:
            if markers and name not in readers:
                raise PluginError(f"checkpoint plugin '{name}' declares marker {markers[0]} but "
                                  "does not implement checkpoint_restore_chunk")
        return registry

    def restore_markers(self) -> Set[int]:
        return set(self.registry.markers)

    def _owner_impl(self, hook_name: str, marker: int) -> Optional[pluggy.HookImpl]:
        """The ``hook_name`` implementation of the plugin that owns ``marker``, or None."""
        owner = self.registry.owner(marker)
        caller: pluggy.HookCaller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == owner:
                return impl
        return None

    def inspect_chunk(self, marker: int, reader: StreamReader,
                      offset: int) -> Optional[Dict[str, Any]]:
        """Describe a plugin's chunk for ``inspect`` through its owner's
        ``checkpoint_inspect_chunk``; PluginError when the owner cannot (then
        nothing after the chunk can be read: the stream has no chunk lengths)."""
        owner = self.registry.owner(marker)
        impl = self._owner_impl("checkpoint_inspect_chunk", marker)
        if impl is None:
            raise PluginError(f"chunk {marker} at offset {offset} belongs to checkpoint plugin "
                              f"'{owner}', which cannot describe its chunks (it does not "
                              "implement checkpoint_inspect_chunk)")
        kwargs = {"marker": marker, "reader": reader, "offset": offset}
        info = impl.function(**{a: kwargs[a] for a in impl.argnames})
        if info is not None and not isinstance(info, dict):
            raise PluginError(f"checkpoint plugin '{owner}' described chunk {marker} as "
                              f"{type(info).__name__}, not a mapping")
        return info

    # -- save ---------------------------------------------------------------
    def save_setup(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_setup(session=session)

    def save_before_header(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_before_header(session=session)

    def save_before_rounds(self, session: SaveSession) -> None:
        self.pm.hook.checkpoint_save_before_rounds(session=session)

    def save_after_round(self, session: SaveSession, round: RoundStats) -> None:
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

    def restore_chunk(self, session: RestoreSession, marker: int, reader: StreamReader,
                      offset: int) -> bool:
        """Hand the chunk to the plugin that owns ``marker``, and to no other."""
        impl = self._owner_impl("checkpoint_restore_chunk", marker)
        if impl is None:
            raise self.registry.unowned(marker, offset)
        kwargs = {"session": session, "marker": marker, "reader": reader, "offset": offset}
        if not impl.function(**{a: kwargs[a] for a in impl.argnames}):
            raise StreamError(f"checkpoint plugin '{impl.plugin_name}' declares marker {marker} "
                              f"but did not read the chunk at offset {offset}", offset=offset,
                              field="chunk id", value=marker)
        return True

    def restore_done(self, session: RestoreSession,
                     outcome: Outcome) -> List[Tuple[str, BaseException]]:
        return self._call_each("checkpoint_restore_done", session=session, outcome=outcome)

    # -- migration ------------------------------------------------------------
    def migrate_offer(self, hv: Hypervisor, domid: int) -> Dict[str, Any]:
        offer: Dict[str, Any] = {}
        for part in self.pm.hook.checkpoint_migrate_offer(hv=hv, domid=domid):
            if part:
                offer.update(part)
        return offer

    def migrate_check(self, hv: Hypervisor, offer: Mapping[str, Any]) -> List[str]:
        """Reasons to refuse; a section for a plugin this host lacks is one."""
        reasons = [f"this host has no '{name}' checkpoint plugin enabled"
                   for name in offer if name not in self.enabled]
        reasons += [r for r in self.pm.hook.checkpoint_migrate_check(hv=hv, offer=offer) if r]
        return reasons

    def migrate_restore_cost(self, hv: Hypervisor, offer: Mapping[str, Any]) -> float:
        """The enabled plugins' expected restore-finishing work for ``offer``, in ms."""
        return float(sum(c for c in self.pm.hook.checkpoint_migrate_restore_cost(
            hv=hv, offer=offer) if c))

    # -- crash recovery -------------------------------------------------------
    def recover(self, hv: Hypervisor, domid: int,
                notes: Mapping[str, Mapping[str, Any]]) -> List[Tuple[str, BaseException]]:
        """``checkpoint_recover`` of every plugin with its own notes; errors collected."""
        errors: List[Tuple[str, BaseException]] = []
        for impl in reversed(self.pm.hook.checkpoint_recover.get_hookimpls()):
            mine = notes.get(impl.plugin_name) or {}
            kwargs = {"hv": hv, "domid": domid, "notes": dict(mine)}
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except BaseException as exc:  # noqa: BLE001 - reported by the host
                errors.append((impl.plugin_name, exc))
        _reraise_interrupt(errors)
        return errors

    # -- reports --------------------------------------------------------------
    def report_lines(self, report: Mapping[str, Any]) -> Dict[str, List[str]]:
        """Each plugin's ``checkpoint_report_lines``, keyed by plugin name, in the
        configured order. The operation has already succeeded, so a plugin that
        raises or returns something other than lines gets one line saying so
        instead of costing the whole report."""
        out: Dict[str, List[str]] = {}
        for impl in reversed(self.pm.hook.checkpoint_report_lines.get_hookimpls()):
            name = impl.plugin_name
            try:
                lines = impl.function(**dict.fromkeys(impl.argnames, report))
                if lines is not None and (not isinstance(lines, list)
                                          or not all(isinstance(ln, str) for ln in lines)):
                    raise TypeError(f"returned {type(lines).__name__}, not a list of str")
                out[name] = list(lines or [])
            except Exception as exc:  # noqa: BLE001 - reported in the report itself
                out[name] = [f"{name}: report not rendered ({type(exc).__name__}: {exc})"]
        order = {n: i for i, n in enumerate(self.enabled)}
        return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    # -- helpers ------------------------------------------------------------
    def _call_each(self, hook_name: str, **kwargs: Any) -> List[Tuple[str, BaseException]]:
        """Call every implementation (in pluggy's LIFO order), each in its own try."""
        errors: List[Tuple[str, BaseException]] = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except BaseException as exc:  # noqa: BLE001 - collected, re-raised by the host
                errors.append((impl.plugin_name, exc))
        _reraise_interrupt(errors)
        return errors


def _reraise_interrupt(errors: List[Tuple[str, BaseException]]) -> None:
    """Every cleanup has run; a Ctrl-C (or exit) caught among them is not the
    plugins' error to report but the user's request: raise it now, with the
    other failures noted on it."""
    for _, exc in errors:
        if not isinstance(exc, Exception):
            others = [f"{n}: {e!r}" for n, e in errors if e is not exc]
            if others and hasattr(exc, "add_note"):
                exc.add_note("other cleanup failures: " + "; ".join(others))
            raise exc


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
        raise PluginError("checkpoint plugin configuration failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return hooks


__all__ = ["CheckpointHooks", "get_plugin_manager", "installed_plugins", "ENTRY_POINT_GROUP",
           "HOST_CHUNK_IDS"]
