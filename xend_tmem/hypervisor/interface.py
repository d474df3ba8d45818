"""What the toolstack needs from a hypervisor: domain memory and tmem control.

Two protocols: :class:`DomainControl` for the host's checkpoint path (pages,
log-dirty, suspend, vcpu state) and :class:`TmemControl` for the tmem plugin
(Xen's ``XEN_SYSCTL_TMEM_OP`` control sub-ops, one method each). Backends: the
simulated hypervisor (``sim.py``) and, later, libxenctrl. Refusals raise
:class:`~xend_tmem.errors.HypervisorError`; an unknown domain raises
:class:`~xend_tmem.errors.NoSuchDomain`.

OIDs are always a tuple of three ints (Xen 4.0.2+ layout); a spec-version-0
client uses only the first (the others are 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

OID = Tuple[int, int, int]

EFROZEN = 1000
MAX_POOLS = 16

# pool flag bits (SPEC §4)
POOL_PERSIST = 1 << 0
POOL_SHARED = 1 << 1
POOL_PRECOMPRESSED = 1 << 2
POOL_PAGEBITS_SHIFT = 4
POOL_PAGEBITS_MASK = 0xF << POOL_PAGEBITS_SHIFT
POOL_VERSION_SHIFT = 24
POOL_VERSION_MASK = 0xFF << POOL_VERSION_SHIFT
# client flag bits
CLIENT_COMPRESS = 1 << 0
CLIENT_FROZEN = 1 << 1


@dataclass
class DomainInfo:
    domid: int
    name: str
    memory_mib: int
    vcpus: int
    running: bool = False
    blocked: bool = False
    paused: bool = False
    shutdown: bool = False
    crashed: bool = False
    dying: bool = False
    cpu_time: float = 0.0
    guest: str = "pv"
    config: Dict[str, object] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """xm's six state flags ``rbpscd``."""
        flags = (self.running, self.blocked, self.paused, self.shutdown, self.crashed, self.dying)
        return "".join(c if on else "-" for c, on in zip("rbpscd", flags))


class DomainControl(Protocol):
    """Domain lifecycle and memory, as the checkpoint path uses them."""

    def domain_info(self, domid: int) -> DomainInfo: ...
    def list_domains(self) -> List[DomainInfo]: ...
    def create_domain_shell(self, name: str, p2m_size: int, vcpus: int,
                            config: Optional[Dict[str, object]] = None) -> int:
        """An empty, paused domain for a restore to fill (RAM zero, no tmem client)."""
    def destroy_domain(self, domid: int) -> None: ...
    def rename_domain(self, domid: int, name: str) -> None: ...
    def pause(self, domid: int) -> None: ...
    def unpause(self, domid: int) -> None: ...
    def suspend(self, domid: int) -> None:
        """Stop the guest for the last round (guest cooperation in real Xen)."""
    def resume(self, domid: int) -> None:
        """Undo :meth:`suspend` after a failed save; a no-op if not suspended."""
    def p2m_size(self, domid: int) -> int: ...
    def read_pages(self, domid: int, pfns: Sequence[int]) -> bytes:
        """The pages' contents concatenated, 4096 bytes each, in ``pfns`` order."""
    def write_pages(self, domid: int, pfns: Sequence[int], data: bytes) -> None: ...
    def enable_logdirty(self, domid: int) -> None: ...
    def disable_logdirty(self, domid: int) -> None: ...
    def read_and_clear_dirty(self, domid: int) -> List[int]:
        """Sorted pfns written since the last call (or since enable)."""
    def online_vcpus(self, domid: int) -> List[int]: ...
    def get_vcpu_context(self, domid: int, vcpu: int) -> bytes: ...
    def set_vcpu_context(self, domid: int, vcpu: int, data: bytes) -> None: ...
    def get_shared_info(self, domid: int) -> bytes: ...
    def set_shared_info(self, domid: int, data: bytes) -> None: ...


class TmemControl(Protocol):
    """Xen's tmem control sub-ops, one method each (names follow ``tmem.h``).

    The save cursors (page walk per pool, invalidation log) live in the
    hypervisor, as in Xen; :meth:`save_end` resets all of them.
    """

    # -- save ---------------------------------------------------------------
    def save_begin(self, domid: int, live: bool) -> bool:
        """Freeze the client for a save; ``False`` = nothing to save (no client/pools)."""
    def save_get_version(self, domid: int) -> int: ...
    def save_get_maxpools(self, domid: int) -> int: ...
    def save_get_client_weight(self, domid: int) -> int: ...
    def save_get_client_cap(self, domid: int) -> int: ...
    def save_get_client_flags(self, domid: int) -> int:
        """COMPRESS, FROZEN: the frozen state from *before* save_begin froze it."""
    def save_get_pool_flags(self, domid: int, pool_id: int) -> Optional[int]:
        """Flags incl. spec version bits 24-31; ``None`` for an empty slot."""
    def save_get_pool_npages(self, domid: int, pool_id: int) -> int: ...
    def save_get_pool_uuid(self, domid: int, pool_id: int) -> Tuple[int, int]: ...
    def save_get_next_page(self, domid: int, pool_id: int) -> Optional[Tuple[OID, int, bytes]]:
        """Next page of the walk (put order): (oid, index, data); ``None`` at the end."""
    def save_get_pages(self, domid: int, pool_id: int, max_pages: int) -> Tuple[int, bytes]:
        """Batched walk: ``(count, records)``; each record is the wire layout
        OID (8 bytes in spec version 0, 24 in 1) + u32 index + page data.
        ``count == 0`` at the end. Shares the cursor with save_get_next_page."""
    def save_get_next_inv(self, domid: int) -> Optional[Tuple[int, OID, int]]:
        """Next logged deletion (pool_id, oid, index); ``None`` after the last,
        and the call after that starts again from the head (Xen semantics)."""
    def save_get_invs(self, domid: int, start: int, max_count: int) -> List[Tuple[int, OID, int]]:
        """Batched log read: entries ``start .. start+max_count-1`` (fewer at the end)."""
    def save_end(self, domid: int) -> None:
        """Stop logging, drop the log, restore the pre-save frozen state, reset cursors.
        Safe to call when no save is running."""

    # -- restore ------------------------------------------------------------
    def restore_begin(self, domid: int) -> None:
        """Create the domain's tmem client; refused if it already has one."""
    def restore_new_pool(self, domid: int, pool_id: int, flags: int, uuid: Tuple[int, int]) -> int: ...
    def restore_put_page(self, domid: int, pool_id: int, oid: OID, index: int, data: bytes) -> None: ...
    def restore_put_pages(self, domid: int, pool_id: int, records, count: int) -> None:
        """Batched put of ``count`` records in the wire layout of save_get_pages."""
    def restore_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> None:
        """Delete one page; a missing page is not an error."""

    # -- client settings and admin ops -----------------------------------------
    def set_weight(self, domid: int, weight: int) -> None: ...
    def set_cap(self, domid: int, cap: int) -> None: ...
    def set_compress(self, domid: int, compress: bool) -> None: ...
    def freeze(self, domid: int) -> None: ...
    def thaw(self, domid: int) -> None: ...
    def destroy(self, domid: int) -> None:
        """Remove the domain's tmem client and all its pools (restore cleanup)."""
    def flush(self, domid: int, pages: int) -> int: ...
    def tmem_list(self, domid: Optional[int], long: bool = False) -> str: ...
    def query_freeable_mb(self) -> int: ...
    def tmem_version(self) -> int:
        """The hypervisor's tmem spec version (what RESTORE_NEW requires)."""
    def tmem_free_pages(self) -> int:
        """How many more tmem pages the hypervisor can hold (pre-flight check)."""
