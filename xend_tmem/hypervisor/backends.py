"""Hypervisor backends by name: the entry-point group ``xend_tmem.hypervisor``.

A backend is a factory ``factory(settings, state_dir) -> Hypervisor`` where
``settings`` is the configuration's ``hypervisor:`` section
(:class:`~xend_tmem.config.HypervisorSettings`) and ``state_dir`` the daemon's
state directory (where a process backend finds or starts its hypervisor).
xend names the backend in its configuration and never asks which one it got,
so a libxenctrl backend is one more entry point, not an edit of xend.
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import TYPE_CHECKING, Callable, Dict, Iterable

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import HypervisorSettings
    from .interface import Hypervisor

GROUP = "xend_tmem.hypervisor"

Factory = Callable[["HypervisorSettings", str], "Hypervisor"]


def _entry_points() -> Iterable[metadata.EntryPoint]:
    if sys.version_info >= (3, 10):
        return metadata.entry_points(group=GROUP)
    else:  # pragma: no cover - Python 3.9: a dict of groups
        return metadata.entry_points().get(GROUP, [])


def installed_backends() -> Dict[str, metadata.EntryPoint]:
    """Entry-point name -> entry point, for every installed backend."""
    return {ep.name: ep for ep in _entry_points()}


def load_backend(settings: "HypervisorSettings", state_dir: str) -> "Hypervisor":
    """Connect to (or start) the configured backend's hypervisor."""
    eps = installed_backends()
    ep = eps.get(settings.backend)
    if ep is None:
        raise ConfigError(f"hypervisor.backend: unknown backend {settings.backend!r} "
                          f"(installed: {', '.join(sorted(eps)) or 'none'})")
    try:
        factory: Factory = ep.load()
    except Exception as exc:  # noqa: BLE001 - a backend's import may fail any way: one line
        raise ConfigError(f"hypervisor backend {settings.backend!r} ({ep.value}) cannot be "
                          f"loaded: {type(exc).__name__}: {exc}") from None
    return factory(settings, state_dir)


def inprocess(settings: "HypervisorSettings", state_dir: str) -> "Hypervisor":
    """``sim-inprocess``: the simulated hypervisor inside the calling process
    (unit tests, the engine benchmark); its domains die with that process."""
    from .sim import SimHypervisor
    return SimHypervisor(release=settings.xen_release, defects=settings.defects,
                         tmem_capacity_pages=settings.tmem_capacity_mb * 256,
                         seed=settings.seed,
                         tmem_prealloc_mib=min(settings.tmem_prealloc_mb,
                                               settings.tmem_capacity_mb))
