"""Session-wide fixtures of the unit tests."""
from __future__ import annotations

import functools
from typing import Any, Iterator, List

import pytest

from xend_tmem.hypervisor.sim import SimHypervisor


@pytest.fixture(autouse=True, scope="module")
def _close_simulators() -> Iterator[None]:
    """Close every in-process simulator a test module made and left open.

    A simulator holds two memfds per domain (RAM, dirty log) and a guest process
    per running workload; garbage collection frees neither, so one suite run
    would otherwise end with hundreds of descriptors, committed RAM and guests
    that only the interpreter's exit reaps. Module scope, so that a module-scoped
    fixture's simulator lives as long as that fixture (this one is torn down last).
    """
    made: List[SimHypervisor] = []
    real_init = SimHypervisor.__init__

    @functools.wraps(real_init)
    def init(self: SimHypervisor, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimHypervisor, "__init__", init)
        yield
    for sim in made:
        sim.close()
