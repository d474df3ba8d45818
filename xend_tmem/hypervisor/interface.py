"""The whole contract between the toolstack and a hypervisor backend.

xend, the checkpoint path and every plugin reach the hypervisor only through
:class:`Hypervisor` (no ``getattr`` probing, no backend-specific call). It is
shaped after Xen's hypercalls:

* :class:`DomainControl` -- domctls: create, destroy, pause, suspend, vcpu
  state (``setvcpucontext``, ``set_ext_vcpucontext``, ``setvcpuextstate``).
* :class:`MemoryAccess` -- guest RAM as the toolstack's foreign mapping, and
  log-dirty (``shadow_op``).
* :class:`TmemControl` -- ``XEN_SYSCTL_TMEM_OP`` control sub-ops, one method
  each, with Xen's argument conventions and results. The batched methods
  (``save_get_pages``, ``save_get_invs``, ``restore_put_pages``,
  ``restore_flush_pages``) are each
  documented as the loop of single sub-ops they stand for; a backend on real
  Xen implements them as that loop into a caller-supplied buffer. Where a
  backend has a buffer of its own to lend (a process's shared memory, an
  in-process store), ``save_get_pages_held`` and ``restore_lend_slots`` /
  ``restore_put_lent`` spare the toolstack its copy; each has a documented
  way to decline (``save_pages_lending`` or ``restore_lend_slots`` answer
  ``None``), and the caller then uses the copying call.
* :class:`GuestTmem` -- the guest-side tmem ops (``HYPERVISOR_tmem_op``) that
  a guest kernel issues: the simulated guests and the tests use them.
* :class:`Inspection` -- read-only facts for ``xm info``/``xm list``, the
  digest plugin and tests.

Backends are found by name in the entry-point group ``xend_tmem.hypervisor``
(``hypervisor: backend:`` in the toolstack configuration). The simulated
hypervisor is a process of its own (``sim``); the same model runs in-process
(``sim-inprocess``) for unit tests and the engine benchmark.

Errors: a refusal raises :class:`~xend_tmem.errors.HypervisorError` whose
``code`` is Xen's positive error number where Xen had one (``EFROZEN`` 1000,
``EEMPTY`` 1001 in :mod:`xend_tmem.xen`, ``errno.EINVAL`` ...); an unknown domain raises
:class:`~xend_tmem.errors.NoSuchDomain`. A backend that lost its hypervisor
(the process died) raises :class:`~xend_tmem.errors.HypervisorError` with
``op`` naming the call and ``code`` ``errno.ECONNRESET``.

OIDs are always a tuple of three ints (Xen 4.0.2+ layout); a spec-version-0
client uses only the first (the others are 0).
"""
from __future__ import annotations

import re
from array import array
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple,
                    Union)

from ..binio import Buffer as Buffer   # bytes-like page data (re-exported for the backends)

OID = Tuple[int, int, int]

_CRC_MISMATCH = re.compile(r": record (\d+): page CRC32 ")


def crc_mismatch_message(index: int, got: int, want: int) -> str:
    """The message of a ``restore_put_pages(crcs=)`` refusal (code EILSEQ)."""
    return f"record {index}: page CRC32 {got:08x}, expected {want:08x}; nothing stored from it on"


def crc_mismatch_index(exc: BaseException) -> Optional[int]:
    """The record a ``restore_put_pages(crcs=)`` refusal names, else None."""
    import errno
    if getattr(exc, "code", None) != errno.EILSEQ:
        return None
    m = _CRC_MISMATCH.search(str(exc))
    return int(m.group(1)) if m else None


@dataclass
class DomainInfo:
    """``getdomaininfo`` plus what xend keeps with a domain (its config)."""

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
    shutdown_reason: str = ""    # "poweroff", "reboot", "halt" once the guest shut down

    @property
    def state(self) -> str:
        """xm's six state flags ``rbpscd``."""
        flags = (self.running, self.blocked, self.paused, self.shutdown, self.crashed, self.dying)
        return "".join(c if on else "-" for c, on in zip("rbpscd", flags))


@dataclass(frozen=True)
class HostInfo:
    """What ``xm info`` shows of the hypervisor (``xc_physinfo``/``xc_version``)."""

    backend: str                 # entry-point name of the backend
    xen_release: str             # the Xen release imitated or found, e.g. "4.0.2"
    tmem_spec_version: int       # 0 or 1 (what RESTORE_NEW requires)
    tmem_capacity_pages: int
    tmem_free_pages: int
    can_move_tmem: bool          # False where SAVE_GET_NEXT_PAGE cannot hand out pages (H8)
    defects: Tuple[str, ...] = ()  # hypervisor defects switched on (H1-H3), if any
    pid: Optional[int] = None    # the hypervisor process, for a process backend
    started: Optional[float] = None  # wall-clock start of the hypervisor


@dataclass(frozen=True)
class PageLending:
    """How a backend lends save batches (:meth:`TmemControl.save_get_pages_held`),
    so the toolstack sizes and overlaps its requests without knowing the backend."""

    batch_bytes: int     # records per request, in bytes, the backend serves best
    in_flight: int       # batches it can hold lent at once (requests queue behind them)
    immediate: bool      # lending costs no copy or round trip: nothing to overlap
    # a batch lent from a frozen client's private pool stays unchanged until the
    # save ends, released or not (the store itself is lent), so the toolstack may
    # hand its pages on by reference (StreamWriter.stable); else only until released
    in_place: bool = False


class DomainControl(Protocol):
    """Domain lifecycle and vcpu state (Xen's domctls)."""

    def list_domains(self) -> List[DomainInfo]: ...
    def domain_info(self, domid: int) -> DomainInfo: ...
    def create_domain(self, config: Mapping[str, object]) -> int:
        """Build and boot a domain from a validated domain config mapping
        (:meth:`~xend_tmem.domconfig.DomainConfig.to_dict`): RAM, vcpus, the
        guest's tmem pools and its workload. The domain runs when this returns."""
    def create_domain_shell(self, name: str, p2m_size: int, vcpus: int,
                            config: Optional[Mapping[str, object]] = None) -> int:
        """An empty, paused domain for a restore to fill (RAM zero, no tmem client)."""
    def destroy_domain(self, domid: int) -> None: ...
    def rename_domain(self, domid: int, name: str) -> None: ...
    def pause(self, domid: int) -> None: ...
    def unpause(self, domid: int) -> None: ...
    def suspend(self, domid: int) -> None:
        """Stop the guest for the last round; returns once the guest has stopped
        (a barrier the guest acknowledges, as its suspend event channel in Xen)."""
    def resume(self, domid: int) -> None:
        """Undo :meth:`suspend` after a failed save; a no-op if not suspended."""
    def online_vcpus(self, domid: int) -> List[int]: ...
    def get_vcpu_context(self, domid: int, vcpu: int) -> bytes: ...
    def set_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        """``DOMCTL_setvcpucontext``: 5168 (x86-64 guest) or 2800 (x86-32) bytes."""
    def get_ext_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        """``DOMCTL_get_ext_vcpucontext``: 128 bytes, as the ``extv`` tail carries."""
    def set_ext_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        """``DOMCTL_set_ext_vcpucontext``: the 128 bytes after a vcpu context
        when the image's extended info has ``extv``."""
    def get_vcpu_xsave(self, domid: int, vcpu: int) -> bytes:
        """``DOMCTL_getvcpuextstate``: the vcpu's xsave record (empty when it has
        none), so a re-save carries what an ``xcnt`` image restored."""
    def set_vcpu_xsave(self, domid: int, vcpu: int, data: Buffer) -> None:
        """``DOMCTL_setvcpuextstate``: the per-vcpu xsave record of ``xcnt``."""
    def get_shared_info(self, domid: int) -> bytes: ...
    def set_shared_info(self, domid: int, data: Buffer) -> None: ...
    def shutdown_domain(self, domid: int, reason: str) -> None:
        """Ask the guest to shut down (``reason`` "poweroff", "reboot" or "halt"):
        xend's ``XendDomainInfo.shutdown`` writes ``control/shutdown`` in xenstore;
        the guest acknowledges and calls ``SCHEDOP_shutdown``, after which
        :meth:`domain_info` shows ``shutdown`` with ``shutdown_reason``. A paused
        guest acknowledges only when it runs again. The toolstack then destroys
        the domain or restarts it (xend's on_poweroff / on_reboot)."""
    def set_memory_target(self, domid: int, target_mib: int) -> None:
        """The balloon target (xend's ``setMemoryTarget``: ``memory/target`` in
        xenstore, within ``XEN_DOMCTL_max_mem``): 1 MiB .. the domain's maximum;
        :meth:`domain_info` reports the memory the guest then holds."""
    def vcpu_info(self, domid: int) -> List[Dict[str, Any]]:
        """``XEN_DOMCTL_getvcpuinfo`` per vcpu, for ``xm vcpu-list``: dicts with
        ``vcpu``, ``cpu``, ``online``, ``running``, ``blocked``, ``cpu_time`` (s),
        ``affinity``."""


class MemoryAccess(Protocol):
    """Guest RAM as the toolstack's foreign mapping, and log-dirty mode."""

    def p2m_size(self, domid: int) -> int: ...
    def read_pages(self, domid: int, pfns: Sequence[int]) -> bytes:
        """The pages' contents concatenated, 4096 bytes each, in ``pfns`` order
        (copied from the toolstack's mapping of guest RAM)."""
    def map_foreign_range(self, domid: int, pfns: Sequence[int]) -> Optional[memoryview]:
        """``xc_map_foreign_range``: a read-only view of the toolstack's mapping
        of ``pfns`` when they are one contiguous run, so a save writes the image
        straight from guest RAM (no copy, as ``xc_domain_save`` did). ``None``
        declines (not one run, or no mapping in this process): the caller uses
        :meth:`read_pages`. The view sees the guest's later writes, as Xen's
        mapping did; the caller releases it once written."""
    def write_pages(self, domid: int, pfns: Sequence[int], data: Buffer) -> None: ...
    def enable_logdirty(self, domid: int) -> None: ...
    def disable_logdirty(self, domid: int) -> None: ...
    def read_and_clear_dirty(self, domid: int) -> List[int]:
        """Sorted pfns written since the last call (or since enable)."""


class TmemControl(Protocol):
    """Xen's tmem control sub-ops, one method each (names follow ``tmem.h``).

    The save cursors (page walk per pool, invalidation log) live in the
    hypervisor, as in Xen; a successful :meth:`save_end` resets them.
    """

    # -- save ---------------------------------------------------------------
    def save_begin(self, domid: int, live: bool) -> bool:
        """SAVE_BEGIN: freeze the client for a save; ``False`` = nothing to save
        (no client/pools; Xen's return 0). Only a ``True`` makes a
        :meth:`save_end` owed."""
    def save_get_version(self, domid: int) -> int: ...
    def save_get_maxpools(self, domid: int) -> int: ...
    def save_get_client_weight(self, domid: int) -> int: ...
    def save_get_client_cap(self, domid: int) -> int: ...
    def save_get_client_flags(self, domid: int) -> int:
        """COMPRESS, FROZEN: the frozen state from *before* save_begin froze it."""
    def save_get_pool_flags(self, domid: int, pool_id: int) -> Optional[int]:
        """Flags as the release reports them (spec version bits 24-31 are 0 on
        releases with defect H4); ``None`` for an empty slot (Xen's -1)."""
    def save_get_pool_npages(self, domid: int, pool_id: int) -> int: ...
    def save_get_pool_uuid(self, domid: int, pool_id: int) -> Tuple[int, int]: ...
    def save_get_next_page(self, domid: int, pool_id: int) -> Optional[Tuple[OID, int, bytes]]:
        """SAVE_GET_NEXT_PAGE: next page of the walk (put order): (oid, index,
        data); ``None`` at the end (Xen's 0)."""
    def save_get_pages(self, domid: int, pool_id: int, max_pages: int,
                       out: Optional[Union[bytearray, memoryview]] = None,
                       crcs: Optional[Union[bytearray, memoryview, array[int]]] = None
                       ) -> Tuple[int, Buffer]:
        """A loop of up to ``max_pages`` SAVE_GET_NEXT_PAGE calls: ``(count,
        records)``; each record is the wire layout OID (8 bytes in spec version
        0, 24 in 1) + u32 index + page data. ``count == 0`` at the end. With
        ``out`` the records are copied into it (it must hold ``max_pages``
        records) and the second item is a view of it; shares the cursor with
        :meth:`save_get_next_page`. With ``crcs`` (a writable buffer of at
        least ``max_pages`` native u32) the backend stores the CRC32 of record
        ``i``'s page in ``crcs[i]`` (the sidecar's page checksums, issue 8 #4,
        computed off the toolstack's thread). Xen has no such op: a backend on
        real Xen computes them in the toolstack from the records it copied."""
    def save_pages_lending(self) -> Optional[PageLending]:
        """Whether, and how, :meth:`save_get_pages_held` lends batches; ``None``
        declines: the backend has no buffer of its own to lend, and the caller
        uses :meth:`save_get_pages` with a buffer of its own (a backend on real
        Xen, whose hypercall copies into the caller's buffer, may answer so)."""
    def save_get_pages_held(self, domid: int, pool_id: int, max_pages: int,
                            crcs: Optional[array[int]] = None
                            ) -> Tuple[int, Buffer, Callable[[], None]]:
        """:meth:`save_get_pages` into a buffer the backend lends rather than
        one of the caller's (as the hypercall copies into the toolstack's
        buffer, here one shared with or owned by the hypervisor): ``(count,
        records, release)``, the same loop of SAVE_GET_NEXT_PAGE calls, the
        same cursor, the same ``crcs``. ``count`` may be less than
        ``max_pages`` before the walk's end (what one lent buffer holds: a
        shared buffer, a run of the store), 0 at the end. ``records`` stay
        valid until ``release()`` (idempotent), which the caller owes on
        every path; up to :attr:`PageLending.in_flight` batches may be held at
        once, a further request waits for a release. Only for a backend whose
        :meth:`save_pages_lending` is not ``None``; another refuses it
        (:class:`HypervisorError`, ``errno.EOPNOTSUPP``)."""
    def save_get_next_inv(self, domid: int) -> Optional[Tuple[int, OID, int]]:
        """SAVE_GET_NEXT_INV: next logged deletion (pool_id, oid, index);
        ``None`` after the last, and the call after that starts again from the
        head (Xen semantics)."""
    def save_get_invs(self, domid: int, start: int, max_count: int) -> List[Tuple[int, OID, int]]:
        """Log entries ``start .. start+max_count-1`` (fewer at the end): the
        SAVE_GET_NEXT_INV loop with the caller remembering how far it got."""
    def save_end(self, domid: int) -> None:
        """SAVE_END: stop logging, drop the log, restore the frozen state the
        last SAVE_BEGIN remembered, reset cursors."""

    # -- restore ------------------------------------------------------------
    def restore_begin(self, domid: int) -> None:
        """RESTORE_BEGIN: create the domain's tmem client; refused if it has one."""
    def restore_new_pool(self, domid: int, pool_id: int, flags: int, uuid: Tuple[int, int]) -> int:
        """RESTORE_NEW: create a pool in slot ``pool_id``; returns the slot."""
    def restore_put_page(self, domid: int, pool_id: int, oid: OID, index: int,
                         data: Buffer) -> None: ...
    def restore_put_pages(self, domid: int, pool_id: int, records: Buffer, count: int,
                          crcs: Optional[Union[Buffer, array[int]]] = None) -> None:
        """A loop of ``count`` RESTORE_PUT_PAGE calls over records in the wire
        layout of :meth:`save_get_pages`; stops at the first refusal. With
        ``crcs`` (``count`` native u32, the sidecar's page checksums) each
        page's CRC32 is checked before it is stored: a mismatch in record ``i``
        stores records ``0..i-1`` only and raises :class:`HypervisorError` with
        code ``errno.EILSEQ`` and the message ``record i: ...`` (see
        :func:`crc_mismatch_index`). Xen has no such op: a backend on real Xen
        checks them in the toolstack before its RESTORE_PUT_PAGE loop."""
    def restore_lend_slots(self, domid: int, pool_id: int,
                           max_pages: int) -> Optional[memoryview]:
        """The first half of :meth:`restore_put_pages` without the copy: a
        writable buffer of up to ``max_pages`` record slots (fewer at the end
        of what the backend can lend at once) for the caller to read records
        into, in the wire layout, as a hypercall reads them from the caller's
        buffer; :meth:`restore_put_lent` then stores them. ``None`` declines
        (the backend lends nothing here: no such buffer, a store that reuses
        freed slots, a pool a put would refuse, H8): the caller uses
        :meth:`restore_put_pages`, which then refuses what it must. At most
        one lending per pool is open; a new one, or any other put to the
        pool, gives the previous one back unstored."""
    def restore_put_lent(self, domid: int, pool_id: int, count: int) -> None:
        """The loop of ``count`` RESTORE_PUT_PAGE calls over the first ``count``
        records read into the slots :meth:`restore_lend_slots` lent (0 gives
        them back), with :meth:`restore_put_pages`'s checks and refusals; if
        it refuses, nothing of them is stored. Refused when no slots of the
        pool are lent."""
    def restore_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> None:
        """RESTORE_FLUSH_PAGE: delete one page; a missing page is not an error."""
    def restore_flush_pages(self, domid: int, entries: Sequence[Tuple[int, OID, int]]) -> None:
        """A loop of RESTORE_FLUSH_PAGE over ``entries`` ((pool_id, oid, index)
        each: a ``-6`` chunk's invalidations), in order, in one call rather
        than one per page (thousands of them arrive while the guest is
        suspended); stops at the first refusal and raises it as
        :meth:`restore_flush_page` would, the entries before it flushed."""

    # -- client settings and admin ops (domid ALL_CLIENTS = every client) ------
    def set_weight(self, domid: int, weight: int) -> None: ...
    def set_cap(self, domid: int, cap: int) -> None: ...
    def set_compress(self, domid: int, compress: bool) -> None: ...
    def freeze(self, domid: int) -> None: ...
    def thaw(self, domid: int) -> None: ...
    def destroy(self, domid: int) -> None:
        """Remove the domain's tmem client and all its pools."""
    def flush(self, domid: int, pages: int) -> int: ...
    def tmem_list(self, domid: Optional[int], long: bool = False) -> str: ...
    def query_freeable_mb(self) -> int: ...


class GuestTmem(Protocol):
    """What a guest kernel's tmem frontend does (``HYPERVISOR_tmem_op``)."""

    def guest_new_pool(self, domid: int, persistent: bool, shared: bool = False,
                       uuid: Tuple[int, int] = (0, 0), pagebits: int = 0) -> int: ...
    def guest_destroy_pool(self, domid: int, pool_id: int) -> None: ...
    def guest_put(self, domid: int, pool_id: int, oid: OID, index: int, data: Buffer) -> bool:
        """Put a page; ``False`` when refused (frozen, overwrite during a live
        save, full): the guest keeps the page itself (swap)."""
    def guest_get(self, domid: int, pool_id: int, oid: OID, index: int) -> Optional[bytes]: ...
    def guest_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> bool: ...
    def guest_flush_object(self, domid: int, pool_id: int, oid: OID) -> int: ...


class Inspection(Protocol):
    """Read-only facts: ``xm info``, the digest plugin, tests and benchmarks."""

    def host_info(self) -> HostInfo: ...
    def tmem_version(self) -> int:
        """The hypervisor's tmem spec version (what RESTORE_NEW requires)."""
    def tmem_free_pages(self) -> int:
        """How many more tmem pages the hypervisor can hold (pre-flight check)."""
    def guest_stats(self, domid: int) -> Dict[str, int]:
        """Guest-side counters: tmem_puts, swap_fallbacks, tmem_gets,
        tmem_flushes, ram_writes."""
    def tmem_state(self, domid: int) -> Dict[str, Any]:
        """Everything about a domain's tmem, page data as crc32 (small pools)."""
    def tmem_digest(self, domid: int) -> Dict[int, Tuple[int, str]]:
        """Per persistent pool ``(page count, sha256 hex)`` over pages in (OID,
        index) order, streaming (GiB-scale). A backend on real Xen computes it from a
        non-live save walk."""
    def ram_digest(self, domid: int) -> str:
        """sha256 of the domain's whole RAM."""
    def ram_page_crcs(self, domid: int, pfns: Sequence[int],
                      out: Union[bytearray, memoryview, array[int]]) -> None:
        """The CRC32 of RAM page ``pfns[i]`` into ``out[i]`` (a writable buffer
        of at least ``len(pfns)`` native u32): the sidecar's RAM page checksums
        (issue 8 #4), computed off the toolstack's thread while it writes the
        previous batch. Meaningful only while the domain cannot write (paused
        or suspended). Xen has no such op: a backend on real Xen computes them
        in the toolstack from its foreign mapping."""
    def guest_heartbeat(self, domid: int) -> Tuple[int, int]:
        """``(last beat ns, beats)``: the heartbeat the running guest writes into
        its own RAM at least every millisecond (CLOCK_MONOTONIC of this host;
        ``(0, 0)`` before its first beat). It moves with the RAM, so the gap
        across a migration is the downtime the guest itself saw
        (:func:`xend_tmem.heartbeat.guest_gap_ms`)."""
    def op_trace(self, start: int = 0) -> List[str]:
        """The tmem control-op trace lines from ``start`` on (the vectors'
        ``xen-restore.trace`` format); empty where the backend keeps none."""
    def domain_uptime(self, domid: int) -> float:
        """Seconds since the domain was built (domain 0: since the hypervisor
        started), for ``xm uptime``. Xen keeps no such counter: xend computed it
        from the domain's ``start_time``; a backend on Xen does the same."""
    def console_output(self, domid: int) -> str:
        """What the guest printed on its console (the PV console ring as
        xenconsoled logs it), for ``xm console``; bounded to the last lines."""
    def read_console_ring(self, clear: bool = False) -> str:
        """The hypervisor's console ring (``XEN_SYSCTL_readconsole``, ``xm dmesg``);
        ``clear`` empties it after reading (``xm dmesg -c``)."""


class Hypervisor(DomainControl, MemoryAccess, TmemControl, GuestTmem, Inspection, Protocol):
    """Everything a backend provides; what xend and the plugins are typed against."""

    def close(self) -> None:
        """Release the toolstack's side (connections, mappings); domains stay."""
