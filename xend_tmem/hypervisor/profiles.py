"""What each Xen release's tmem accepted and reported, and the defect switches.

One :class:`Profile` per configured ``hypervisor: xen-release`` (4.0.0 to
4.5.x). The simulated hypervisor consults it on every sub-op whose behaviour
changed between releases (SPEC §7); nothing else in the simulator branches on
a release. The defects H1-H3 are opt-in switches (a hypervisor with those
fixes is the default); H4, H7 and H8 follow from the release.

What the switches do in the simulator, as Xen's code did it:

* H1: SAVE_GET_POOL_UUID falls through into SAVE_END's body (stop logging,
  drop the invalidation log, restore the remembered frozen state), leaving
  the walk cursors alone; with a save running, the first such query ends it.
* H2: a walk whose cursor is NULL moves it to the pool's first page and
  returns the page after it: the first page (put order) is never returned.
* H3: SAVE_END does not reset the cursors; the next save's walk continues
  after the page the earlier one returned last (nothing, if it got to the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

SWITCHABLE_DEFECTS = ("H1", "H2", "H3")


def _key(release: str) -> Tuple[int, int, int]:
    parts = str(release).split(".")
    bad = ValueError(f"Xen release {release!r} is not 4.0.0 to 4.5.x")
    if len(parts) != 3 or parts[0] != "4" or not parts[1].isdigit():
        raise bad
    minor = int(parts[1])
    if parts[2] == "x":
        patch = 99
    elif parts[2].isdigit():
        patch = int(parts[2])
    else:
        raise bad
    if not 0 <= minor <= 5:
        raise bad
    return 4, minor, patch


@dataclass(frozen=True)
class Profile:
    """The behaviour of one Xen release's tmem, plus the defects switched on."""

    release: str
    defects: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _key(self.release)
        bad = [d for d in self.defects if d not in SWITCHABLE_DEFECTS]
        if bad:
            raise ValueError(f"unknown defect {bad[0]!r} (switchable: "
                             f"{', '.join(SWITCHABLE_DEFECTS)})")

    @property
    def version_tuple(self) -> Tuple[int, int, int]:
        """``(4, minor, patch)``; ``4.5.x`` sorts after every 4.5 release."""
        return _key(self.release)

    @property
    def spec_version(self) -> int:
        """tmem spec version: 0 on 4.0.0-4.0.1, 1 from 4.0.2 on."""
        return 0 if self.version_tuple < (4, 0, 2) else 1

    @property
    def reports_pool_version(self) -> bool:
        """SAVE_GET_POOL_FLAGS carries bits 24-31: not on 4.0.2-4.1.3 and 4.2.0 (H4)."""
        v = self.version_tuple
        if self.spec_version == 0:
            return True            # version 0: the bits are 0 either way
        return not ((4, 0, 2) <= v <= (4, 1, 3) or v == (4, 2, 0))

    @property
    def copies_pages(self) -> bool:
        """SAVE_GET_NEXT_PAGE/RESTORE_PUT_PAGE move uncompressed pages: not from 4.4.0 (H8)."""
        return self.version_tuple < (4, 4, 0)

    def has(self, defect: str) -> bool:
        """Whether the switchable defect (``"H1"``, ``"H2"``, ``"H3"``) is on."""
        return defect in self.defects


def make_profile(release: str, defects: Iterable[str] = ()) -> Profile:
    """The profile of ``release`` with ``defects`` switched on (any case, once each)."""
    return Profile(release, tuple(sorted({str(d).upper() for d in defects})))
