"""The simulated hypervisor: the embedded default backend of the toolstack.

Implements :class:`~xend_tmem.hypervisor.interface.DomainControl` and
:class:`~xend_tmem.hypervisor.interface.TmemControl` in pure Python with the
tmem semantics of SPEC §7 as the configured Xen release had them
(:mod:`~xend_tmem.hypervisor.profiles`): RESTORE_NEW requires the release's
spec version in bits 24-31, SAVE_GET_POOL_FLAGS leaves them out on
4.0.2-4.1.3 and 4.2.0 (H4), restore ops on a frozen client answer EFROZEN
(a flush deletes all the same, H7), SAVE_END without a save restores the
frozen state the last SAVE_BEGIN remembered, and from 4.4.0 no page moves
(H8). The defects H1-H3 are off unless switched on; off, the walk returns
every page in put order and SAVE_END resets every cursor.

Guest RAM is one memfd per domain, mapped shared (committed lazily by the OS;
:meth:`SimHypervisor.memory_fd` hands it to a hypervisor process's clients,
whose mapping of it is their foreign mapping); tmem pages live in
:class:`~xend_tmem.hypervisor.pagestore.PageStore` segments in wire layout, so
GiBs of tmem cost no Python object per page. A guest side
(``guest_*`` methods and a seeded workload played by :meth:`tick`) lets tests
and the demo exercise the freeze / invalidation rules while a save runs.

Shared pools: a pool created shared with the uuid of another domain's shared
pool *joins* it: both clients reference the same storage. The freeze and
live-save rules are applied per pool over all its sharers (a new page is
refused while any sharer is frozen; an overwrite fails while any sharer runs
a live save), and a deletion is logged for every sharer running a live save,
so each sharer's save stays exact. Xen looked only at the acting client; for
a private pool (the common case) both rules coincide.

Every public method takes one re-entrant lock: the daemon calls in from
several threads and the workload thread ticks domains concurrently.

Guest process model (``guest_processes=True``, the hypervisor process): a
domain with an active workload runs as a process of its own
(:mod:`xend_tmem.hypervisor.guest`), started when the domain first runs and
reaped by pid at destroy and :meth:`SimHypervisor.close`. It writes its RAM
memfd and marks a shared dirty bitmap (an epoch flip it acknowledges keeps
:meth:`~SimHypervisor.read_and_clear_dirty` exact), obeys a shared control
page (pause and suspend are barriers it acknowledges), asks for its tmem ops
with one small message per tick, played here on the ``sim-guest-io`` thread,
and exits when its hypervisor goes away. So the workload never waits for the
interpreter lock of whoever copies its pages. Without guest processes (the
default, unit tests) :meth:`~SimHypervisor.tick` plays the same workload
in-process, deterministically.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import random
import select
import struct
import threading
import time
import zlib
from array import array
from collections import deque
from typing import (Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple,
                    Union)

from ..domconfig import (DomainConfig, TmemSpec, WorkloadSpec, parse_domain_config,
                         workload_from_image)
from ..crc import crc32 as fast_crc32
from ..errors import ConfigError, HypervisorError, NoSuchDomain
from .guest import (ACK_TIMEOUT_S, CMD_RUN, CMD_STOP, SLOT_RAM_WRITES, GuestError, GuestLog,
                    GuestProcess, read_heartbeat)
from ..xen import (ALL_CLIENTS, CLIENT_COMPRESS, CLIENT_FROZEN, EFROZEN, EXTV_SIZE, MAX_POOLS,
                   MAX_XSAVE, PAGE_SIZE, PAGES_PER_MIB, POOL_PAGEBITS_MASK, POOL_PAGEBITS_SHIFT,
                   POOL_PERSIST, POOL_PRECOMPRESSED, POOL_RESERVED, POOL_SHARED,
                   POOL_VERSION_MASK, POOL_VERSION_SHIFT, SHARED_INFO_SIZE, SHUTDOWN_REASONS,
                   VCPU_CTX_SIZES, VCPU_CTX_X32, VCPU_CTX_X64)
from .interface import OID, Buffer, DomainInfo, PageLending
from .pagestore import SEGMENT_BYTES, PageStore, SegmentHeap, first_crc_mismatch, record_crcs
from .pfnruns import pfn_runs
from .profiles import make_profile
from .interface import HostInfo, crc_mismatch_message

log = logging.getLogger("xend_tmem.hypervisor.sim")

MAX_P2M = 1 << 28                 # 1 TiB of guest pages
MAX_SHELL_VCPUS = 512
DOM0_MEMORY_MIB = 1024
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_TICK_OPS = 10_000             # per kind and tick: a late tick cannot stall the host
WORKLOAD_OID_BASE = 1 << 48       # workload objects, clear of config and bulk OIDs
WORKLOAD_OBJECT_PAGES = 64

_STAMP = struct.Struct("<QQ")
CONSOLE_LINES = 200               # per guest console log (xenconsoled keeps a file; bounded here)
CONRING_LINES = 1000              # the hypervisor's console ring (Xen's conring: 16 KiB)
# A configured domain's RAM is stamped in full at creation: prefault it in one
# go where the platform can (several times cheaper than a fault per page). A
# restore shell stays lazy: its size comes from a stream, and memory should be
# committed only as the stream's pages arrive.
# (Measured on a memfd: 64 MiB 47 -> 43 ms, 512 MiB 647 -> 523 ms.)
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _host_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _nothing_held() -> None:
    """The ``release`` of a batch lent as a view of the store: nothing to give back."""


def _fmt_oid(version: int, oid: Sequence[int]) -> str:
    if version == 0:
        return f"0x{oid[0]:016x}"
    return f"0x{oid[0]:016x}:0x{oid[1]:016x}:0x{oid[2]:016x}"


class _Pool:
    __slots__ = ("persistent", "shared", "precompressed", "pagebits", "uuid", "store",
                 "sharers", "announce_pages")

    def __init__(self, version: int, persistent: bool, shared: bool, pagebits: int,
                 uuid: Tuple[int, int], precompressed: bool = False,
                 heap: Optional[SegmentHeap] = None) -> None:
        self.persistent = persistent
        self.shared = shared
        self.precompressed = precompressed
        self.pagebits = pagebits
        self.uuid = uuid
        self.store = PageStore(version, PAGE_SIZE << pagebits, heap=heap)
        self.sharers: List[_Client] = []
        self.announce_pages: Optional[int] = None

    @property
    def version(self) -> int:
        return self.store.version

    @property
    def units(self) -> int:
        """4 KiB units one page occupies (capacity accounting)."""
        return 1 << self.pagebits

    def flags(self) -> int:
        return ((POOL_PERSIST if self.persistent else 0) | (POOL_SHARED if self.shared else 0)
                | (POOL_PRECOMPRESSED if self.precompressed else 0)
                | (self.pagebits << POOL_PAGEBITS_SHIFT)
                | (self.version << POOL_VERSION_SHIFT))


class _Client:
    __slots__ = ("domid", "version", "weight", "cap", "compress", "frozen", "pools",
                 "saving", "live", "pre_frozen", "walks", "invlog", "inv_pos")

    def __init__(self, domid: int, version: int) -> None:
        self.domid = domid
        self.version = version
        self.weight = 0
        self.cap = 0
        self.compress = False
        self.frozen = False
        self.pools: List[Optional[_Pool]] = [None] * MAX_POOLS
        self.saving = False
        self.live = False
        self.pre_frozen = False
        self.walks: Dict[int, List[Any]] = {}       # pool id -> [key snapshot, position]
        self.invlog: List[Tuple[int, OID, int]] = []
        self.inv_pos = 0

    def slot_of(self, pool: _Pool) -> int:
        for i, p in enumerate(self.pools):
            if p is pool:
                return i
        return -1


class _Domain:
    __slots__ = ("domid", "name", "memory_mib", "vcpus", "p2m", "ram", "paused", "suspended",
                 "dirty", "vcpu_ctx", "shared_info", "config", "cpu_time", "client", "stats",
                 "workload", "rng", "acc", "wl_next", "ram_gen", "is_dom0", "ext_ctx", "xsave",
                 "ram_fd", "log", "guest", "started", "console", "shutdown_reason",
                 "shutdown_pending", "arrived")

    def __init__(self, domid: int, name: str, memory_mib: int, vcpus: int, p2m: int,
                 ram: Optional[mmap.mmap], config: Dict[str, object]) -> None:
        self.domid = domid
        self.name = name
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.p2m = p2m
        self.ram = ram
        self.paused = False
        self.suspended = False
        self.dirty = False                  # log-dirty mode (the bitmaps are in ``log``)
        self.ram_fd = -1                    # the RAM memfd (-1: domain 0)
        self.log: Optional[GuestLog] = None
        self.guest: Optional[GuestProcess] = None
        self.vcpu_ctx: List[bytes] = []
        # DOMCTL_{get,set}_ext_vcpucontext and setvcpuextstate, per vcpu
        self.ext_ctx: List[bytes] = [bytes(EXTV_SIZE)] * vcpus
        self.xsave: List[bytes] = [b""] * vcpus
        self.shared_info = bytes(SHARED_INFO_SIZE)
        self.config = config
        self.cpu_time = 0.0
        self.client: Optional[_Client] = None
        self.stats = {"swap_fallbacks": 0, "tmem_puts": 0, "tmem_gets": 0, "tmem_flushes": 0,
                      "ram_writes": 0}
        self.workload: Optional[WorkloadSpec] = None
        self.rng = random.Random(0)
        self.acc = [0.0, 0.0, 0.0, 0.0]
        self.wl_next = 0
        self.ram_gen = 0
        self.is_dom0 = False
        self.started = time.monotonic()     # xm uptime counts from here
        self.console: Deque[str] = deque(maxlen=CONSOLE_LINES)   # what the guest printed
        self.shutdown_reason = ""           # SCHEDOP_shutdown's reason once acknowledged
        self.shutdown_pending = ""          # control/shutdown written, not yet acknowledged
        self.arrived = False                # built for a restore: says so when it first runs

    @property
    def running(self) -> bool:
        return not (self.paused or self.suspended or self.shutdown_reason)


class SimHypervisor:
    """Pure-Python hypervisor with domains, guest RAM and tmem (see module doc).

    ``tmem_version`` is the hypervisor's tmem spec version (0: Xen 4.0.0-4.0.1,
    1: 4.0.2+); ``tmem_capacity_pages`` bounds the tmem held by all clients in
    4 KiB pages; ``trace`` (a list) receives one line per tmem control op in the
    vectors' ``xen-restore.trace`` format; ``seed`` varies every workload;
    ``tmem_prealloc_mib`` commits that much tmem memory up front (a resident
    heap, as Xen's), kept for reuse when pages are freed.
    ``guest_processes`` runs every domain's active workload as a guest
    process (module doc) instead of in :meth:`tick`; :meth:`close` stops them.
    """

    def __init__(self, release: str = "4.0.2", defects: Sequence[str] = (),
                 tmem_capacity_pages: int = 1 << 22, trace: Optional[List[str]] = None,
                 seed: Optional[int] = None, tmem_prealloc_mib: int = 0,
                 tmem_version: Optional[int] = None, guest_processes: bool = False) -> None:
        if tmem_version is not None:          # deprecated: 0 = 4.0.0, 1 = 4.0.2
            if tmem_version not in (0, 1):
                raise ValueError(f"tmem_version must be 0 or 1, not {tmem_version!r}")
            release = "4.0.0" if tmem_version == 0 else "4.0.2"
        self.profile = make_profile(release, defects)
        self._version = self.profile.spec_version
        self._capacity = tmem_capacity_pages
        self._heap = SegmentHeap()
        if tmem_prealloc_mib:
            self._heap.reserve(tmem_prealloc_mib << 20)
        self._trace = trace
        self._seed = 0 if seed is None else seed
        self._lock = threading.RLock()
        self._used = 0                       # tmem held, in 4 KiB units
        dom0 = _Domain(0, "Domain-0", DOM0_MEMORY_MIB, 1, 0, None,
                       {"name": "Domain-0", "memory": DOM0_MEMORY_MIB, "vcpus": 1})
        dom0.is_dom0 = True
        self._domains: Dict[int, _Domain] = {0: dom0}
        self._next_domid = 1
        self._wl_thread: Optional[threading.Thread] = None
        self._wl_stop = threading.Event()
        self._guest_processes = bool(guest_processes)
        self.guest_ack_timeout = ACK_TIMEOUT_S   # a guest slower than this to stop is hung
        self._io_thread: Optional[threading.Thread] = None
        self._freeing: List[threading.Thread] = []     # RAM of destroyed domains being freed
        self._io_wake: Optional[Tuple[int, int]] = None     # pipe: guest set changed
        self._closed = False
        self._t0 = time.monotonic()
        self._conring: Deque[str] = deque(maxlen=CONRING_LINES)
        self._printk(f"Xen version {self.profile.release} (xend-tmem simulated hypervisor)")
        self._printk(f"tmem: transcendent memory enabled, spec version {self._version}, "
                     f"capacity {tmem_capacity_pages // PAGES_PER_MIB} MiB"
                     + (f", defects {','.join(defects)}" if defects else ""))

    # =====================================================================
    # internals
    # =====================================================================
    def _t(self, line: str) -> None:
        if self._trace is not None:         # callers check first; nothing to trace otherwise
            self._trace.append(line)

    def _dom(self, domid: int) -> _Domain:
        d = self._domains.get(domid) if isinstance(domid, int) else None
        if d is None:
            raise NoSuchDomain(domid)
        return d

    @staticmethod
    def _mem(d: _Domain) -> mmap.mmap:
        """``d``'s guest RAM (domain 0 has none; a destroyed domain's is released)."""
        if d.ram is None:
            raise HypervisorError("ram", f"domain {d.domid} has no guest memory")
        return d.ram

    def _guest_dom(self, domid: int, op: str) -> _Domain:
        """A domain with guest memory (not domain 0)."""
        d = self._dom(domid)
        if d.is_dom0:
            raise HypervisorError(op, "domain 0 is the control domain")
        return d

    def _client(self, domid: int, op: str) -> _Client:
        c = self._dom(domid).client
        if c is None:
            raise HypervisorError(op, f"domain {domid} has no tmem client")
        return c

    def _clients(self, domid: int, op: str) -> List[_Client]:
        if domid == ALL_CLIENTS:
            return [d.client for _, d in sorted(self._domains.items()) if d.client is not None]
        return [self._client(domid, op)]

    @staticmethod
    def _slot(pool_id: int, op: str) -> int:
        if (isinstance(pool_id, bool) or not isinstance(pool_id, int)
                or not 0 <= pool_id < MAX_POOLS):
            raise HypervisorError(op, f"pool id {pool_id!r} is not a slot 0..{MAX_POOLS - 1}")
        return pool_id

    def _pool(self, c: _Client, pool_id: int, op: str) -> _Pool:
        p = c.pools[self._slot(pool_id, op)]
        if p is None:
            raise HypervisorError(op, f"domain {c.domid} has no pool {pool_id}")
        return p

    @staticmethod
    def _key(pool: _Pool, oid: Sequence[int], index: int, op: str) -> bytes:
        try:
            a, b, c = oid
            ok = all(isinstance(w, int) and 0 <= w <= U64_MAX for w in (a, b, c))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise HypervisorError(op, f"OID {oid!r} is not three u64")
        if not isinstance(index, int) or not 0 <= index <= U32_MAX:
            raise HypervisorError(op, f"index {index!r} is not a u32")
        if pool.version == 0 and (b or c):
            raise HypervisorError(op, f"a spec-version-0 client takes one-word OIDs, got "
                                      f"{_fmt_oid(1, oid)}")
        return pool.store.make_key((a, b, c), index)

    @staticmethod
    def _check_data(pool: _Pool, data: Buffer, op: str) -> None:
        if len(data) != pool.store.page_size:
            raise HypervisorError(op, f"page data is {len(data)} bytes, the pool's pages are "
                                      f"{pool.store.page_size}")

    def _room(self, units: int, op: str) -> None:
        if self._used + units > self._capacity:
            raise HypervisorError(op, f"tmem is full ({self._used} of {self._capacity} pages "
                                      f"used, {units} more needed)", code=-errno.ENOMEM)

    def _delete(self, pool: _Pool, key: bytes) -> bool:
        """Delete one page; log it for every sharer running a live save (SPEC §7)."""
        if not pool.store.delete(key):
            return False
        self._used -= pool.units
        if pool.persistent:
            for c in pool.sharers:
                if c.saving and c.live:
                    oid, index = pool.store.parse_key(key)
                    c.invlog.append((c.slot_of(pool), oid, index))
        return True

    @staticmethod
    def _any_frozen(pool: _Pool) -> bool:
        return any(c.frozen for c in pool.sharers)

    @staticmethod
    def _any_live(pool: _Pool) -> bool:
        return any(c.saving and c.live for c in pool.sharers)

    def _attach_pool(self, c: _Client, slot: int, persistent: bool, shared: bool, pagebits: int,
                     uuid: Tuple[int, int], precompressed: bool, op: str) -> _Pool:
        """Put a pool into ``c``'s empty ``slot``: a new one, or the existing shared
        pool of another domain with the same uuid."""
        pool: Optional[_Pool] = None
        if shared:
            for d in self._domains.values():
                oc = d.client
                if oc is None:
                    continue
                for i, p in enumerate(oc.pools):
                    if p is None or not p.shared or p.uuid != uuid:
                        continue
                    if oc is c:
                        raise HypervisorError(op, f"shared pool uuid {uuid[0]:#x},{uuid[1]:#x} is "
                                                  f"already this client's pool {i}")
                    if (p.persistent, p.pagebits, p.version) != (persistent, pagebits, c.version):
                        raise HypervisorError(op, f"shared pool uuid {uuid[0]:#x},{uuid[1]:#x} "
                                                  f"exists with other attributes (domain "
                                                  f"{oc.domid} pool {i})")
                    pool = p
                    break
                if pool is not None:
                    break
        if pool is None:
            pool = _Pool(c.version, persistent, shared, pagebits, uuid, precompressed, self._heap)
        c.pools[slot] = pool
        pool.sharers.append(c)
        return pool

    def _detach_pool(self, c: _Client, slot: int) -> None:
        pool = c.pools[slot]
        if pool is None:
            return
        c.pools[slot] = None
        c.walks.pop(slot, None)
        pool.sharers.remove(c)
        if not pool.sharers:
            self._used -= pool.store.clear() * pool.units

    def _drop_client(self, d: _Domain) -> None:
        c = d.client
        if c is None:
            return
        for slot in range(MAX_POOLS):
            self._detach_pool(c, slot)
        d.client = None

    def _put(self, d: _Domain, c: _Client, pool: _Pool, key: bytes, data: Buffer) -> bool:
        """A guest put under SPEC §7's rules; False = the guest keeps the page itself."""
        d.stats["tmem_puts"] += 1
        if key in pool.store:
            if pool.persistent and self._any_live(pool):
                self._delete(pool, key)          # only shrinks during a live save
            else:
                pool.store.put(key, data)
                return True
        elif not (self._any_frozen(pool) or self._used + pool.units > self._capacity):
            pool.store.put(key, data)
            self._used += pool.units
            return True
        d.stats["swap_fallbacks"] += 1
        return False

    def _walk(self, domid: int, pool_id: int, op: str) -> Tuple[_Pool, Optional[List[Any]]]:
        c = self._client(domid, op)
        if not c.saving and pool_id not in c.walks:
            # Xen walked without a save too; a cursor left open by H1/H3 still walks
            raise HypervisorError(op, f"no save of domain {domid} is running")
        pool = self._pool(c, pool_id, op)
        return pool, c.walks.get(pool_id)

    def _alloc_ram(self, p2m: int, op: str, populate: bool) -> Tuple[int, mmap.mmap, GuestLog]:
        """The RAM memfd of a new domain, its mapping and its (lazy) dirty log."""
        if isinstance(p2m, bool) or not isinstance(p2m, int) or not 1 <= p2m <= MAX_P2M:
            raise HypervisorError(op, f"p2m size {p2m!r} is not 1..{MAX_P2M} pages")
        host = _host_memory()
        if host is not None and p2m * PAGE_SIZE > host:
            raise HypervisorError(op, f"{p2m * PAGE_SIZE >> 20} MiB of guest RAM exceeds the "
                                      f"host's {host >> 20} MiB")
        domid = self._next_domid
        fd = -1
        ram: Optional[mmap.mmap] = None
        try:
            fd = os.memfd_create(f"xen-dom{domid}-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, p2m * PAGE_SIZE)
            ram = mmap.mmap(fd, p2m * PAGE_SIZE, flags=_POPULATE if populate else mmap.MAP_SHARED)
            return fd, ram, GuestLog.create(domid, p2m)
        except (OSError, ValueError, OverflowError) as e:
            if ram is not None:
                ram.close()
            if fd >= 0:
                os.close(fd)
            raise HypervisorError(op, f"cannot allocate {p2m} pages of guest RAM: {e}") from None

    @staticmethod
    def _release_ram(d: _Domain) -> None:
        """Unmap and close what :meth:`_alloc_ram` made (the guest is stopped)."""
        if d.log is not None:
            d.log.close()
            d.log = None
        if d.ram is not None:
            d.ram.close()
            d.ram = None
        if d.ram_fd >= 0:
            os.close(d.ram_fd)
            d.ram_fd = -1

    def _check_name(self, name: str, op: str, exclude: Optional[int] = None) -> None:
        if not isinstance(name, str) or not name:
            raise HypervisorError(op, f"bad domain name {name!r}")
        for d in self._domains.values():
            if d.name == name and d.domid != exclude:
                raise HypervisorError(op, f"a domain named '{name}' already exists (id {d.domid})")

    def _new_domain(self, name: str, memory_mib: int, vcpus: int, p2m: int,
                    ram: Tuple[int, mmap.mmap, GuestLog], config: Dict[str, object]) -> _Domain:
        d = _Domain(self._next_domid, name, memory_mib, vcpus, p2m, ram[1], config)
        d.ram_fd, d.log = ram[0], ram[2]
        self._next_domid += 1
        self._domains[d.domid] = d
        return d

    @staticmethod
    def _runs(pfns: Sequence[int], limit: int, op: str) -> List[Tuple[int, int]]:
        """Contiguous runs ``(first_pfn, count)`` of ``pfns``, range-checked."""
        return pfn_runs(pfns, limit, op)

    # =====================================================================
    # domains built from configuration, lookup, workloads
    # =====================================================================
    def create_domain(self, config: Union[Mapping[str, object], DomainConfig]) -> int:
        """Build a running domain from a domain config mapping (the YAML form, or
        :meth:`DomainConfig.to_dict`) or a loaded :class:`DomainConfig`: RAM,
        vcpus, tmem, workload (its guest process starts here when enabled)."""
        op = "create_domain"
        if not isinstance(config, DomainConfig):
            if not isinstance(config, Mapping):
                raise HypervisorError(op, f"a domain config is a mapping, not "
                                          f"{type(config).__name__}", code=errno.EINVAL)
            try:
                config = parse_domain_config(dict(config), source="create_domain config")
            except ConfigError as e:
                raise HypervisorError(op, str(e), code=errno.EINVAL) from None
        with self._lock:
            self._check_name(config.name, op)
            p2m = config.memory * PAGES_PER_MIB
            ram = self._alloc_ram(p2m, op, populate=True)
            d = self._new_domain(config.name, config.memory, config.vcpus, p2m, ram,
                                 config.to_dict())
            try:
                tag = zlib.crc32(config.name.encode())
                with memoryview(self._mem(d)) as raw, raw.cast("Q") as words:
                    step = PAGE_SIZE // 8
                    words[0::step] = array("Q", range(p2m))
                    words[1::step] = array("Q", [tag]) * p2m
                d.vcpu_ctx = [hashlib.shake_256(f"{config.name}:vcpu{i}".encode())
                              .digest(VCPU_CTX_X64) for i in range(config.vcpus)]
                d.shared_info = hashlib.shake_256(f"{config.name}:shared_info".encode()) \
                    .digest(SHARED_INFO_SIZE)
                self._set_workload(d, config.workload)
                if config.tmem is not None:
                    self._build_tmem(d, config.tmem, op)
                self._sync_guest(d, op)
            except BaseException:
                self._stop_guest(d)
                self._drop_client(d)
                del self._domains[d.domid]
                self._release_ram(d)
                raise
            self._boot_console(d)
            return d.domid

    def _build_tmem(self, d: _Domain, spec: TmemSpec, op: str) -> None:
        self._room(sum(p.total_pages << p.pagebits for p in spec.pools), op)
        c = _Client(d.domid, spec.version)
        c.compress, c.weight, c.cap = spec.client.compress, spec.client.weight, spec.client.cap
        d.client = c
        for ps in spec.pools:
            pool = self._attach_pool(c, ps.id, ps.persistent, ps.shared, ps.pagebits, ps.uuid,
                                     False, op)
            if ps.announce_pages is not None:
                pool.announce_pages = ps.announce_pages
            store = pool.store
            for page in ps.pages:
                if store.put(store.make_key(page.oid, page.index), page.data(store.page_size)):
                    self._used += pool.units
            if ps.bulk is not None:
                for count, records in ps.bulk.records(ps.id, c.version, store.page_size):
                    self._used += store.put_records(records, count) * pool.units
        c.frozen = spec.client.frozen            # pages first, freeze last (T2)

    def _set_workload(self, d: _Domain, spec: Optional[WorkloadSpec]) -> None:
        d.workload = spec if spec is not None and spec.active else None
        seed = spec.seed if spec is not None else 0
        d.rng = random.Random(f"xend-tmem workload sim={self._seed} seed={seed} name={d.name}")
        d.acc = [0.0, 0.0, 0.0, 0.0]
        if d.log is not None:
            w = d.workload
            d.log.set_rates((w.ram_dirty_pages_per_s, w.tmem_puts_per_s, w.tmem_gets_per_s,
                             w.tmem_flushes_per_s) if w is not None else (0, 0, 0, 0))

    def set_workload(self, domid: int, spec: Optional[WorkloadSpec]) -> None:
        """Give a domain (e.g. a restored one) a workload; None stops it."""
        with self._lock:
            d = self._guest_dom(domid, "set_workload")
            self._set_workload(d, spec)
            self._sync_guest(d, "set_workload")

    # -- guest processes (guest_processes=True; see guest.py) -----------------
    def memory_fd(self, domid: int) -> int:
        """The RAM memfd of a guest domain, for a client's own (foreign) mapping.

        The fd stays the hypervisor's: a receiver gets its own copy
        (``socket.send_fds``) or dups it; it is closed at destroy.
        """
        with self._lock:
            return self._guest_dom(domid, "memory_fd").ram_fd

    def guest_pid(self, domid: int) -> Optional[int]:
        """The pid of the domain's guest process, ``None`` without one (tests, ``ps``)."""
        with self._lock:
            g = self._guest_dom(domid, "guest_pid").guest
            return g.pid if g is not None and g.alive() else None

    def _sync_guest(self, d: _Domain, op: str) -> None:
        """Bring the domain's guest process in line with its state: start it when
        the domain first runs with a workload, release it on unpause/resume,
        and stop it (a barrier) on pause/suspend; stop it when the workload ends."""
        if not self._guest_processes or d.log is None:
            return
        g = d.guest
        if g is not None and not g.alive():
            # a guest that died (a crash, or a source file edited under a starting
            # guest) ran with no writes and no heartbeat: said here, or a
            # migration's missing guest_downtime_ms has no explanation in any log
            log.warning("domain %d (%s): its guest process %d exited on its own (status "
                        "%s); a new one starts when the domain runs", d.domid, d.name,
                        g.pid, g.proc.returncode)
            self._stop_guest(d)                  # died on its own: reap it, start afresh
            g = None
        if d.workload is None:
            self._stop_guest(d)
            return
        if g is None:
            # a shell built for a restore starts its guest at once, stopped as a
            # paused guest is, so unpause only releases it (no process start
            # inside the downtime)
            if d.running or d.arrived:
                if self._closed:
                    raise HypervisorError(op, "the hypervisor is shut down")
                try:
                    d.guest = GuestProcess.spawn(d.ram_fd, d.log, d.rng.getrandbits(64),
                                                 d.running)
                except OSError as e:
                    raise HypervisorError(op, f"cannot start the guest process of domain "
                                              f"{d.domid} ({d.name}): {e}") from None
                self._start_guest_io()
            return
        if d.running:
            g.command(CMD_RUN, wait=False)
            return
        try:
            g.command(CMD_STOP, wait=True, timeout=self.guest_ack_timeout)
        except GuestError as e:
            raise HypervisorError(op, f"domain {d.domid} ({d.name}): {e}",
                                  code=errno.ETIMEDOUT) from None
        self._drain_guest(d)                     # ops it asked for before it stopped

    def _stop_guest(self, d: _Domain) -> None:
        g, d.guest = d.guest, None
        if g is not None:
            g.stop()
            self._wake_guest_io()

    def _drain_guest(self, d: _Domain) -> None:
        """Play the tmem ops the guest asked for (caller holds the lock)."""
        g = d.guest
        if g is None:
            return
        for puts, gets, flushes, micros in g.receive():
            d.cpu_time += micros / 1e6
            self._play_tmem(d, min(puts, MAX_TICK_OPS), min(gets, MAX_TICK_OPS),
                            min(flushes, MAX_TICK_OPS))

    def _start_guest_io(self) -> None:
        if self._io_thread is not None:
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._io_wake = (r, w)
        t = threading.Thread(target=self._guest_io_loop, name="sim-guest-io", daemon=True)
        self._io_thread = t
        t.start()

    def _wake_guest_io(self) -> None:
        if self._io_wake is not None:
            try:
                os.write(self._io_wake[1], b"!")
            except (BlockingIOError, OSError):
                pass                             # a wake-up is pending already

    def _guest_io_loop(self) -> None:
        """Receive the guests' tmem requests and play them (the thread's only job).

        Requests are received under the hypervisor lock, so a pause/suspend
        barrier (which drains the socket under the same lock once the guest
        acknowledged) plays every request sent before it returns.
        """
        assert self._io_wake is not None
        wake = self._io_wake[0]
        while True:
            with self._lock:
                if self._closed:
                    return
                fds = {d.guest.sock.fileno(): d.domid for d in self._domains.values()
                       if d.guest is not None and not d.guest.eof}
            poller = select.poll()
            poller.register(wake, select.POLLIN)
            for fd in fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(1000):
                if fd == wake:
                    try:
                        os.read(wake, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    d = self._domains.get(fds.get(fd, -1))
                    if d is not None and d.guest is not None and d.guest.sock.fileno() == fd:
                        self._drain_guest(d)

    def lookup(self, dom: Union[str, int]) -> int:
        """Domain id from an id or a name (``xm``'s DOM argument)."""
        with self._lock:
            if isinstance(dom, int) and not isinstance(dom, bool):
                return self._dom(dom).domid
            if isinstance(dom, str):
                if dom.isdigit():
                    d = self._domains.get(int(dom))
                    if d is not None:
                        return d.domid
                for d in self._domains.values():
                    if d.name == dom:
                        return d.domid
            raise NoSuchDomain(dom)

    def tick(self, domid: int, seconds: float) -> None:
        """Play ``seconds`` of the domain's workload (only while it runs).

        Rates accumulate fractional operations across ticks; each kind is capped
        at MAX_TICK_OPS per call so one late tick cannot stall the host. A
        domain whose workload runs in a guest process is not ticked.
        """
        with self._lock:
            d = self._dom(domid)
            if d.is_dom0 or not d.running or seconds <= 0 or d.guest is not None:
                return
            d.cpu_time += seconds
            w = d.workload
            if w is None:
                return
            counts = []
            rates = (w.ram_dirty_pages_per_s, w.tmem_puts_per_s, w.tmem_gets_per_s,
                     w.tmem_flushes_per_s)
            for i, rate in enumerate(rates):
                d.acc[i] += rate * seconds
                n = int(d.acc[i])
                d.acc[i] -= n
                counts.append(min(n, MAX_TICK_OPS))
            rng = d.rng
            ram = self._mem(d)
            bitmap = d.log.current_bitmap() if d.dirty and d.log is not None else None
            for _ in range(counts[0]):
                pfn = rng.randrange(d.p2m)
                d.ram_gen += 1
                _STAMP.pack_into(ram, pfn * PAGE_SIZE + 16, d.ram_gen, rng.getrandbits(64))
                if bitmap is not None:
                    bitmap[pfn] = 1
            d.stats["ram_writes"] += counts[0]
            self._play_tmem(d, counts[1], counts[2], counts[3])

    def _play_tmem(self, d: _Domain, puts: int, gets: int, flushes: int) -> None:
        """The workload's tmem ops on random pools/keys (from :meth:`tick` or a
        guest process's request); the caller holds the lock."""
        rng = d.rng
        c = d.client
        if c is None:
            return
        pools = [p for p in c.pools if p is not None]
        if not pools:
            return
        for _ in range(puts):
            pool = rng.choice(pools)
            key = pool.store.random_key(rng) if rng.random() < 0.5 else None
            if key is None:
                k = d.wl_next
                d.wl_next += 1
                key = pool.store.make_key(
                    (WORKLOAD_OID_BASE + k // WORKLOAD_OBJECT_PAGES, 0, 0),
                    k % WORKLOAD_OBJECT_PAGES)
            self._put(d, c, pool, key, rng.randbytes(pool.store.page_size))
        for _ in range(gets):
            pool = rng.choice(pools)
            d.stats["tmem_gets"] += 1
            key = pool.store.random_key(rng)
            if key is not None:
                pool.store.get(key)
        for _ in range(flushes):
            pool = rng.choice(pools)
            d.stats["tmem_flushes"] += 1
            key = pool.store.random_key(rng)
            if key is not None:
                self._delete(pool, key)

    def start_workloads(self, interval: float = 0.01) -> None:
        """Tick every running domain from a daemon thread with real elapsed time."""
        with self._lock:
            if self._wl_thread is not None and self._wl_thread.is_alive():
                return
            self._wl_stop.clear()
            t = threading.Thread(target=self._workload_loop, args=(interval,),
                                 name="sim-workload", daemon=True)
            self._wl_thread = t
            t.start()

    def stop_workloads(self) -> None:
        t = self._wl_thread
        self._wl_stop.set()
        if t is not None:
            t.join(timeout=5)
        self._wl_thread = None

    def _workload_loop(self, interval: float) -> None:
        last = time.monotonic()
        while not self._wl_stop.wait(interval):
            now = time.monotonic()
            elapsed, last = now - last, now
            with self._lock:
                ids = [d.domid for d in self._domains.values()
                       if not d.is_dom0 and d.running and d.workload is not None]
            for domid in ids:
                try:
                    self.tick(domid, elapsed)
                except NoSuchDomain:
                    pass                         # destroyed meanwhile

    def guest_stats(self, domid: int) -> Dict[str, int]:
        """Guest-side counters: tmem_puts (attempts), swap_fallbacks (puts refused,
        the guest kept the page itself), tmem_gets, tmem_flushes, ram_writes
        (:meth:`tick`'s and the guest process's, which counts them in its
        control page)."""
        with self._lock:
            d = self._dom(domid)
            stats = dict(d.stats)
            if d.log is not None:
                stats["ram_writes"] += d.log.ctl[SLOT_RAM_WRITES]
            return stats

    def guest_heartbeat(self, domid: int) -> Tuple[int, int]:
        """The guest's heartbeat as its RAM holds it (guest.py): ``(CLOCK_MONOTONIC
        ns of the last beat, beats so far)``, ``(0, 0)`` if it never beat."""
        with self._lock:
            d = self._guest_dom(domid, "guest_heartbeat")
            return read_heartbeat(self._mem(d), d.p2m)

    def ram_page_crcs(self, domid: int, pfns: Sequence[int],
                      out: Union[bytearray, memoryview, array[int]]) -> None:
        op = "ram_page_crcs"
        with self._lock:
            d = self._guest_dom(domid, op)
            self._runs(pfns, d.p2m, op)                 # every pfn within p2m_size
            with memoryview(out) as raw, raw.cast("B") as flat, flat.cast("I") as dst, \
                    memoryview(self._mem(d)) as ram:
                if dst.nbytes < 4 * len(pfns):
                    raise HypervisorError(op, f"a CRC buffer of {dst.nbytes} bytes cannot "
                                              f"hold {len(pfns)} CRCs")
                crc32 = fast_crc32
                dst[:len(pfns)] = array("I", [crc32(ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
                                              for p in pfns])

    def ram_digest(self, domid: int) -> str:
        """sha256 of the domain's whole RAM (save/restore verification)."""
        with self._lock:
            d = self._guest_dom(domid, "ram_digest")
            h = hashlib.sha256()
            step = 16 << 20
            ram = self._mem(d)
            for off in range(0, d.p2m * PAGE_SIZE, step):
                h.update(ram[off:off + step])
            return h.hexdigest()

    # =====================================================================
    # DomainControl
    # =====================================================================
    def domain_info(self, domid: int) -> DomainInfo:
        with self._lock:
            d = self._dom(domid)
            return DomainInfo(domid=d.domid, name=d.name, memory_mib=d.memory_mib, vcpus=d.vcpus,
                              running=d.running, paused=d.paused,
                              shutdown=d.suspended or bool(d.shutdown_reason),
                              cpu_time=d.cpu_time, config=dict(d.config),
                              shutdown_reason=d.shutdown_reason)

    def list_domains(self) -> List[DomainInfo]:
        with self._lock:
            return [self.domain_info(i) for i in sorted(self._domains)]

    def create_domain_shell(self, name: str, p2m_size: int, vcpus: int,
                            config: Optional[Mapping[str, object]] = None) -> int:
        op = "create_domain_shell"
        with self._lock:
            self._check_name(name, op)
            if isinstance(vcpus, bool) or not isinstance(vcpus, int) \
                    or not 1 <= vcpus <= MAX_SHELL_VCPUS:
                raise HypervisorError(op, f"vcpu count {vcpus!r} is not 1..{MAX_SHELL_VCPUS}")
            memory = -(-p2m_size // PAGES_PER_MIB) if isinstance(p2m_size, int) else 0
            cfg: Dict[str, object] = {"memory": memory, "vcpus": vcpus}
            cfg.update(config or {})
            cfg["name"] = name
            workload = (workload_from_image(cfg["workload"], f"domain {name} config")
                        if "workload" in cfg else None)
            # lazy: no RAM is committed before the stream's pages arrive, and
            # the guest process starts when the domain first runs (unpause)
            ram = self._alloc_ram(p2m_size, op, populate=False)
            d = self._new_domain(name, memory, vcpus, p2m_size, ram, cfg)
            d.paused = True
            d.arrived = True
            self._printk(f"domain {d.domid} ({name}) built for a restore: {memory} MiB, "
                         f"{vcpus} vcpus")
            d.vcpu_ctx = [bytes(VCPU_CTX_X64)] * vcpus
            self._set_workload(d, workload)
            try:
                self._sync_guest(d, op)          # its guest process, stopped
            except BaseException:
                self._stop_guest(d)
                del self._domains[d.domid]
                self._release_ram(d)
                raise
            return d.domid

    def destroy_domain(self, domid: int) -> None:
        """Stop the guest process (reaped by pid), drop tmem, free the RAM."""
        with self._lock:
            d = self._guest_dom(domid, "destroy_domain")
            self._stop_guest(d)
            self._drop_client(d)
            del self._domains[domid]
            self._release_ram_later(d)
            self._printk(f"domain {domid} ({d.name}) destroyed")

    def _release_ram_later(self, d: _Domain) -> None:
        """Free a destroyed domain's RAM on a helper thread: the kernel's freeing of
        a GiB-scale memfd takes ~0.15 s per 512 MiB, and Xen too returns from a
        domain's destruction before its memory is relinquished (``domain_kill``
        goes on as a continuation while the domain is a zombie). The domain is
        gone at once (no id, name or mapping is left); :meth:`close` waits for it.
        The descriptor closes now (a toolstack's stale fd must stop working with the
        domain); the mapping, whose unmap is the costly part, goes on the thread."""
        if d.ram_fd >= 0:
            os.close(d.ram_fd)
            d.ram_fd = -1
        self._freeing = [t for t in self._freeing if t.is_alive()]
        t = threading.Thread(target=self._release_ram, args=(d,), name="sim-free-ram",
                             daemon=True)
        t.start()
        self._freeing.append(t)

    def close(self) -> None:
        """Stop every guest process (reaped by pid) and this hypervisor's
        threads and free every domain's RAM: for the in-process simulator the
        domains end here (a process backend's close leaves them running)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for d in self._domains.values():
                self._stop_guest(d)
        self.stop_workloads()
        self._wake_guest_io()
        if self._io_thread is not None:
            self._io_thread.join(timeout=5)
        for t in self._freeing:
            t.join()
        with self._lock:
            for domid in [i for i, d in self._domains.items() if not d.is_dom0]:
                d = self._domains.pop(domid)
                self._drop_client(d)
                self._release_ram(d)
            if self._io_wake is not None:
                for fd in self._io_wake:
                    os.close(fd)
                self._io_wake = None

    def rename_domain(self, domid: int, name: str) -> None:
        with self._lock:
            d = self._guest_dom(domid, "rename_domain")
            self._check_name(name, "rename_domain", exclude=domid)
            d.name = name
            d.config["name"] = name

    def _set_run_state(self, domid: int, op: str, *, paused: Optional[bool] = None,
                       suspended: Optional[bool] = None) -> None:
        """Change the state and make the guest process obey it (a barrier when it
        stops); on failure the domain keeps its former state."""
        called = time.monotonic()        # a suspend stops the guest inside the call
        with self._lock:
            d = self._guest_dom(domid, op)
            before = (d.paused, d.suspended)
            if paused is not None:
                d.paused = paused
            if suspended is not None:
                d.suspended = suspended
            try:
                self._sync_guest(d, op)
            except BaseException:
                d.paused, d.suspended = before
                if d.running and d.guest is not None:
                    d.guest.command(CMD_RUN, wait=False)
                raise
            self._run_state_events(d, before)
            if op in ("suspend", "unpause", "resume"):
                # one host, one clock: a migration's downtime can be read off
                # two hypervisors' logs (source suspend -> destination unpause)
                log.info("domain %d %s at mono=%.6f", domid,
                         "suspended" if op == "suspend" else op + "d",
                         called if op == "suspend" else time.monotonic())
                if op == "suspend":
                    # the guest runs on until it acknowledges the barrier: the
                    # gap in its own heartbeat starts up to here, not at the call
                    log.info("domain %d stopped at mono=%.6f", domid, time.monotonic())

    def pause(self, domid: int) -> None:
        """Returns once the guest has stopped writing (its acknowledgement)."""
        self._set_run_state(domid, "pause", paused=True)

    def unpause(self, domid: int) -> None:
        """Run the domain; a restored domain with a workload starts its guest here."""
        self._set_run_state(domid, "unpause", paused=False)

    def suspend(self, domid: int) -> None:
        """Returns once the guest has stopped writing (its acknowledgement)."""
        self._set_run_state(domid, "suspend", suspended=True)

    def resume(self, domid: int) -> None:
        self._set_run_state(domid, "resume", suspended=False)

    def p2m_size(self, domid: int) -> int:
        with self._lock:
            return self._guest_dom(domid, "p2m_size").p2m

    def read_pages(self, domid: int, pfns: Sequence[int]) -> bytes:
        with self._lock:
            d = self._guest_dom(domid, "read_pages")
            ram = self._mem(d)
            parts = [ram[s * PAGE_SIZE:(s + n) * PAGE_SIZE]
                     for s, n in self._runs(pfns, d.p2m, "read_pages")]
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def map_foreign_range(self, domid: int, pfns: Sequence[int]) -> Optional[memoryview]:
        """Declines (``None``) for a domain that exists: in-process, guest RAM is
        the simulator's own mapping, which a domain's destruction unmaps (a view
        handed out would keep it from closing); :meth:`read_pages` copies it."""
        with self._lock:
            self._guest_dom(domid, "read_pages")
        return None

    def write_pages(self, domid: int, pfns: Sequence[int], data: Buffer) -> None:
        op = "write_pages"
        with self._lock:
            d = self._guest_dom(domid, op)
            if len(data) != len(pfns) * PAGE_SIZE:
                raise HypervisorError(op, f"{len(data)} bytes of data for {len(pfns)} pages")
            runs = self._runs(pfns, d.p2m, op)
            ram = self._mem(d)
            with memoryview(data) as src:
                pos = 0
                for s, n in runs:
                    ram[s * PAGE_SIZE:(s + n) * PAGE_SIZE] = src[pos:pos + n * PAGE_SIZE]
                    pos += n * PAGE_SIZE

    def enable_logdirty(self, domid: int) -> None:
        """Start log-dirty mode with both bitmaps clean (two epoch flips)."""
        op = "enable_logdirty"
        with self._lock:
            d = self._guest_dom(domid, op)
            self._collect_dirty(d, op)
            self._collect_dirty(d, op)
            d.dirty = True

    def disable_logdirty(self, domid: int) -> None:
        with self._lock:
            self._guest_dom(domid, "disable_logdirty").dirty = False

    def read_and_clear_dirty(self, domid: int) -> List[int]:
        op = "read_and_clear_dirty"
        with self._lock:
            d = self._guest_dom(domid, op)
            if not d.dirty:
                raise HypervisorError(op, f"log-dirty mode is off for domain {domid}")
            return self._collect_dirty(d, op)

    def _collect_dirty(self, d: _Domain, op: str) -> List[int]:
        """Flip the dirty epoch and return (and clear) the old bitmap's pfns.

        With a live guest process the flip waits for its acknowledgement (see
        :meth:`GuestProcess.flip_epoch` for why no write is lost); without one
        the writers (:meth:`tick`) run under the lock held here.
        """
        log = d.log
        assert log is not None
        g = d.guest
        if g is not None and g.alive():
            try:
                old = g.flip_epoch(self.guest_ack_timeout)
            except GuestError as e:
                raise HypervisorError(op, f"domain {d.domid} ({d.name}): {e}",
                                      code=errno.ETIMEDOUT) from None
        else:
            old = log.flip_unattended()
        return log.collect_and_clear(old)

    def online_vcpus(self, domid: int) -> List[int]:
        with self._lock:
            return list(range(self._guest_dom(domid, "online_vcpus").vcpus))

    def _vcpu(self, d: _Domain, vcpu: int, op: str) -> int:
        if not isinstance(vcpu, int) or not 0 <= vcpu < d.vcpus:
            raise HypervisorError(op, f"domain {d.domid} has no vcpu {vcpu!r}")
        return vcpu

    def _get_vcpu_state(self, domid: int, vcpu: int, op: str, attr: str) -> bytes:
        """One vcpu's ``attr`` list entry (context, extended context, xsave)."""
        with self._lock:
            d = self._guest_dom(domid, op)
            state: List[bytes] = getattr(d, attr)
            return state[self._vcpu(d, vcpu, op)]

    def _set_vcpu_state(self, domid: int, vcpu: int, op: str, attr: str, data: Buffer,
                        fits: bool, size_rule: str) -> None:
        """Set one vcpu's ``attr`` entry; ``fits`` False refuses ``data``, saying
        ``size_rule`` (checked after the domain and the vcpu, as Xen's domctl)."""
        with self._lock:
            d = self._guest_dom(domid, op)
            i = self._vcpu(d, vcpu, op)
            if not fits:
                raise HypervisorError(op, f"{size_rule}, got {len(data)}")
            state: List[bytes] = getattr(d, attr)
            state[i] = bytes(data)

    def get_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        return self._get_vcpu_state(domid, vcpu, "get_vcpu_context", "vcpu_ctx")

    def set_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._set_vcpu_state(domid, vcpu, "set_vcpu_context", "vcpu_ctx", data,
                             len(data) in VCPU_CTX_SIZES,
                             f"a vcpu context is {VCPU_CTX_X64} or {VCPU_CTX_X32} bytes")

    def get_ext_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        return self._get_vcpu_state(domid, vcpu, "get_ext_vcpu_context", "ext_ctx")

    def set_ext_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._set_vcpu_state(domid, vcpu, "set_ext_vcpu_context", "ext_ctx", data,
                             len(data) == EXTV_SIZE,
                             f"an extended vcpu context is {EXTV_SIZE} bytes")

    def get_vcpu_xsave(self, domid: int, vcpu: int) -> bytes:
        return self._get_vcpu_state(domid, vcpu, "get_vcpu_xsave", "xsave")

    def set_vcpu_xsave(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._set_vcpu_state(domid, vcpu, "set_vcpu_xsave", "xsave", data,
                             len(data) <= MAX_XSAVE,
                             f"an xsave record is at most {MAX_XSAVE} bytes")

    def get_shared_info(self, domid: int) -> bytes:
        with self._lock:
            return self._guest_dom(domid, "get_shared_info").shared_info

    def set_shared_info(self, domid: int, data: Buffer) -> None:
        op = "set_shared_info"
        with self._lock:
            d = self._guest_dom(domid, op)
            if len(data) != SHARED_INFO_SIZE:
                raise HypervisorError(op, f"shared info is {SHARED_INFO_SIZE} bytes, "
                                          f"got {len(data)}")
            d.shared_info = bytes(data)

    # =====================================================================
    # TmemControl: save
    # =====================================================================
    def save_begin(self, domid: int, live: bool) -> bool:
        op = "SAVE_BEGIN"
        with self._lock:
            c = self._dom(domid).client
            if c is None or not any(p is not None for p in c.pools):
                if self._trace is not None:
                    self._t(f"{op} cli={domid} arg1={int(bool(live))} rc=0")
                return False
            if c.saving:
                raise HypervisorError(op, f"a save of domain {domid} is already running")
            c.pre_frozen = c.frozen
            c.frozen = True
            c.saving = True
            c.live = bool(live)
            c.invlog = []
            c.inv_pos = 0
            c.walks = {i: self._new_walk(p, c.walks.get(i)) for i, p in enumerate(c.pools)
                       if p is not None and p.persistent}
            if self._trace is not None:
                self._t(f"{op} cli={domid} arg1={int(c.live)} rc=1")
            return True

    # A walk is ``[put-order snapshot, position, last key returned, fresh]``:
    # Xen's per-pool ``cur_pgp`` with the put order taken at SAVE_BEGIN.
    def _new_walk(self, pool: _Pool, old: Optional[List[Any]]) -> List[Any]:
        keys = pool.store.snapshot()
        if self.profile.has("H3") and old is not None and old[2] is not None:
            # H3: the cursor survived SAVE_END; Xen continues after the page it
            # returned last (a page gone since leaves nothing to continue from)
            return [keys, pool.store.walk_after(keys, old[2]), old[2], False]
        return [keys, 0, None, True]

    def _walk_collect(self, pool: _Pool, walk: List[Any], max_pages: int,
                      out: Optional[memoryview] = None,
                      in_place: bool = False) -> Tuple[int, Any]:
        """Advance a walk by up to ``max_pages`` pages, as Xen's cursor did; with
        ``out`` the records are copied straight into it (a view of it is returned),
        with ``in_place`` a batch in one run of the store is a read-only view of it."""
        store = pool.store
        if walk[3]:
            walk[3] = False
            if self.profile.has("H2"):
                # H2: a NULL cursor is set to the first page, then the walk
                # returns the page *after* it: the first page is never returned
                walk[1], _, _ = store.collect(walk[0], walk[1], 1)
        if out is not None:
            walk[1], count = store.collect_into(walk[0], walk[1], max_pages, out)
            records: Any = out[:count * store.record_size]
        else:
            walk[1], count, records = store.collect(walk[0], walk[1], max_pages, view=in_place)
        if count:
            rs, hl = store.record_size, store.header_len
            with memoryview(records) as mv:
                walk[2] = bytes(mv[(count - 1) * rs:(count - 1) * rs + hl])
        return count, records

    def _h8_refuse(self, op: str, pool_id: int, domid: int) -> HypervisorError:
        return HypervisorError(op, f"Xen {self.profile.release} copies tmem pages to or from a "
                                   f"toolstack buffer only on its compression path (H8): pool "
                                   f"{pool_id} of domain {domid}", code=errno.EINVAL)

    def save_get_version(self, domid: int) -> int:
        with self._lock:
            c = self._dom(domid).client
            rc = c.version if c is not None else self._version
            if self._trace is not None:
                self._t(f"SAVE_GET_VERSION cli={domid} rc={rc}")
            return rc

    def save_get_maxpools(self, domid: int) -> int:
        with self._lock:
            self._dom(domid)
            if self._trace is not None:
                self._t(f"SAVE_GET_MAXPOOLS cli={domid} rc={MAX_POOLS}")
            return MAX_POOLS

    def _client_answer(self, domid: int, op: str, answer: Callable[[_Client], int]) -> int:
        """A SAVE_GET_* answer about the client, traced as Xen's tmem trace is."""
        with self._lock:
            rc = answer(self._client(domid, op))
            if self._trace is not None:
                self._t(f"{op} cli={domid} rc={rc}")
            return rc

    def save_get_client_weight(self, domid: int) -> int:
        return self._client_answer(domid, "SAVE_GET_CLIENT_WEIGHT", lambda c: c.weight)

    def save_get_client_cap(self, domid: int) -> int:
        return self._client_answer(domid, "SAVE_GET_CLIENT_CAP", lambda c: c.cap)

    def save_get_client_flags(self, domid: int) -> int:
        def flags(c: _Client) -> int:
            frozen = c.pre_frozen if c.saving else c.frozen
            return (CLIENT_COMPRESS if c.compress else 0) | (CLIENT_FROZEN if frozen else 0)
        return self._client_answer(domid, "SAVE_GET_CLIENT_FLAGS", flags)

    def save_get_pool_flags(self, domid: int, pool_id: int) -> Optional[int]:
        op = "SAVE_GET_POOL_FLAGS"
        with self._lock:
            # as Xen: no client, or no pool in the slot, is the same "-1"
            c = self._dom(domid).client
            p = c.pools[self._slot(pool_id, op)] if c is not None else None
            rc = p.flags() if p is not None else None
            if rc is not None and not self.profile.reports_pool_version:
                rc &= ~POOL_VERSION_MASK          # H4: 4.0.2-4.1.3 and 4.2.0 leave them out
            if self._trace is not None:
                self._t(f"{op} pool={pool_id} cli={domid} "
                        f"rc={'-1' if rc is None else f'0x{rc:08x}'}")
            return rc

    def save_get_pool_npages(self, domid: int, pool_id: int) -> int:
        op = "SAVE_GET_POOL_NPAGES"
        with self._lock:
            p = self._pool(self._client(domid, op), pool_id, op)
            if not p.persistent:
                rc = 0
            elif p.announce_pages is not None:
                rc = p.announce_pages
            else:
                rc = len(p.store)
            if self._trace is not None:
                self._t(f"{op} pool={pool_id} cli={domid} rc={rc}")
            return rc

    def save_get_pool_uuid(self, domid: int, pool_id: int) -> Tuple[int, int]:
        op = "SAVE_GET_POOL_UUID"
        with self._lock:
            c = self._client(domid, op)
            p = self._pool(c, pool_id, op)
            if self._trace is not None:
                self._t(f"{op} pool={pool_id} cli={domid} "
                        f"uuid=0x{p.uuid[0]:016x},0x{p.uuid[1]:016x} rc=0")
            if self.profile.has("H1"):
                # H1: a missing ``break`` falls through into SAVE_END's body (as
                # the code of that era: the walk cursors are left alone)
                self._end_save(c, reset_walks=False)
            return p.uuid

    def save_get_next_page(self, domid: int, pool_id: int) -> Optional[Tuple[OID, int, bytes]]:
        op = "SAVE_GET_NEXT_PAGE"
        with self._lock:
            pool, walk = self._walk(domid, pool_id, op)
            count = 0
            if walk is not None:
                if not self.profile.copies_pages and self._walk_has_more(pool, walk):
                    e = self._h8_refuse(op, pool_id, domid)
                    self._trace_refusal(f"{op} pool={pool_id} cli={domid}", e)
                    raise e
                count, record = self._walk_collect(pool, walk, 1)
            if not count:
                if self._trace is not None:
                    self._t(f"{op} pool={pool_id} cli={domid} rc=0")
                return None
            hl = pool.store.header_len
            oid, index = pool.store.parse_key(record[:hl])
            data = record[hl:]
            if self._trace is not None:
                self._t(f"{op} pool={pool_id} cli={domid} oid={_fmt_oid(pool.version, oid)} "
                        f"index={index} len={len(data)} crc32=0x{zlib.crc32(data):08x} rc=1")
            return oid, index, data

    def save_get_pages(self, domid: int, pool_id: int, max_pages: int,
                       out: Optional[Union[bytearray, memoryview]] = None,
                       crcs: Optional[Union[bytearray, memoryview, array[int]]] = None
                       ) -> Tuple[int, Buffer]:
        return self._save_get_pages(domid, pool_id, max_pages, out, crcs, False)

    def save_pages_lending(self) -> Optional[PageLending]:
        """The store itself is lent: a segment's run of records at a time, as
        many at once as asked, each free to hand out (no copy, no round trip),
        and unchanged while the client is frozen: a frozen client puts nothing,
        a flush leaves the slot's bytes as they are, and a store emptied during
        a walk keeps its memory from reuse (a shared pool's other clients may
        still put: the toolstack copies those, see ``in_place``)."""
        return PageLending(batch_bytes=SEGMENT_BYTES, in_flight=1, immediate=True,
                           in_place=True)

    def save_get_pages_held(self, domid: int, pool_id: int, max_pages: int,
                            crcs: Optional["array[int]"] = None
                            ) -> Tuple[int, Any, Callable[[], None]]:
        """As the interface: records in one run of the store come as a
        read-only view of it (the in-process save writes them with no copy of
        its own), valid until the pool next changes (a save writes them at
        once; the frozen client puts nothing, and a store emptied meanwhile
        keeps its memory from reuse while a walk is open); a batch across runs
        is a copy. ``release`` has nothing to give back: the view holds no
        buffer of a connection's, and it ends with the pool's next change."""
        count, records = self._save_get_pages(domid, pool_id, max_pages, None, crcs, True)
        return count, records, _nothing_held

    def _save_get_pages(self, domid: int, pool_id: int, max_pages: int,
                        out: Optional[Union[bytearray, memoryview]],
                        crcs: Optional[Union[bytearray, memoryview, "array[int]"]],
                        in_place: bool) -> Tuple[int, Any]:
        op = "SAVE_GET_PAGES"
        with self._lock:
            pool, walk = self._walk(domid, pool_id, op)
            if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 0:
                raise HypervisorError(op, f"max_pages {max_pages!r} is not a count")
            rs = pool.store.record_size
            if out is not None and len(memoryview(out).cast("B")) < max_pages * rs:
                raise HypervisorError(op, f"buffer of {len(memoryview(out).cast('B'))} bytes "
                                          f"cannot hold {max_pages} records of {rs} bytes")
            if walk is None or not max_pages:
                return 0, (memoryview(out)[:0] if out is not None else b"")
            if not self.profile.copies_pages and self._walk_has_more(pool, walk):
                e = self._h8_refuse("SAVE_GET_NEXT_PAGE", pool_id, domid)
                self._trace_refusal(f"SAVE_GET_NEXT_PAGE pool={pool_id} cli={domid}", e)
                raise e
            view = memoryview(out).cast("B") if out is not None else None
            count, records = self._walk_collect(pool, walk, max_pages, view,
                                                in_place=in_place and view is None)
            if crcs is not None and count:
                try:
                    record_crcs(records, count, rs, rs - pool.store.header_len, crcs)
                except ValueError as exc:
                    raise HypervisorError(op, str(exc)) from None
            if self._trace is not None:
                self._trace_records("SAVE_GET_NEXT_PAGE", pool, pool_id, domid, records, count)
                if not count:
                    self._t(f"SAVE_GET_NEXT_PAGE pool={pool_id} cli={domid} rc=0")
            return count, records

    def _walk_has_more(self, pool: _Pool, walk: List[Any]) -> bool:
        """Whether the walk would hand out a page now (H2's skip included)."""
        left = pool.store.walk_left(walk[0], walk[1])
        return left > (1 if walk[3] and self.profile.has("H2") else 0)

    def _trace_records(self, op: str, pool: _Pool, pool_id: int, domid: int, records: Buffer,
                       count: int) -> None:
        store = pool.store
        rs, hl = store.record_size, store.header_len
        with memoryview(records) as mv:
            for i in range(count):
                rec = mv[i * rs:(i + 1) * rs]
                oid, index = store.parse_key(bytes(rec[:hl]))
                self._t(f"{op} pool={pool_id} cli={domid} oid={_fmt_oid(pool.version, oid)} "
                        f"index={index} len={store.page_size} "
                        f"crc32=0x{zlib.crc32(rec[hl:]):08x} rc=1")

    def save_get_next_inv(self, domid: int) -> Optional[Tuple[int, OID, int]]:
        op = "SAVE_GET_NEXT_INV"
        with self._lock:
            c = self._client(domid, op)
            if c.inv_pos >= len(c.invlog):
                c.inv_pos = 0                    # Xen: the call after the last restarts
                if self._trace is not None:
                    self._t(f"{op} cli={domid} rc=0")
                return None
            entry = c.invlog[c.inv_pos]
            c.inv_pos += 1
            if self._trace is not None:
                self._t(f"{op} pool={entry[0]} cli={domid} oid={_fmt_oid(c.version, entry[1])} "
                        f"index={entry[2]} rc=1")
            return entry

    def save_get_invs(self, domid: int, start: int, max_count: int) -> List[Tuple[int, OID, int]]:
        op = "SAVE_GET_INVS"
        with self._lock:
            c = self._client(domid, op)
            if not isinstance(start, int) or start < 0 or not isinstance(max_count, int) \
                    or max_count < 0:
                raise HypervisorError(op, f"bad range start={start!r} max={max_count!r}")
            out = c.invlog[start:start + max_count]
            if self._trace is not None:
                self._t(f"{op} cli={domid} start={start} max={max_count} rc={len(out)}")
            return out

    def save_end(self, domid: int) -> None:
        """SAVE_END, as Xen: also without a running save it restores the frozen
        state the last SAVE_BEGIN remembered (stale or not; not frozen if no
        save ever began) -- which is why a toolstack owes it only after a
        SAVE_BEGIN that returned 1."""
        with self._lock:
            c = self._dom(domid).client
            if c is None:
                if self._trace is not None:
                    self._t(f"SAVE_END cli={domid} rc=-1")
                return
            self._end_save(c, reset_walks=not self.profile.has("H3"))
            if self._trace is not None:
                self._t(f"SAVE_END cli={domid} rc=0")

    @staticmethod
    def _end_save(c: _Client, reset_walks: bool) -> None:
        c.frozen = c.pre_frozen
        c.saving = c.live = False
        c.invlog = []
        c.inv_pos = 0
        if reset_walks:
            c.walks = {}

    # =====================================================================
    # TmemControl: restore
    # =====================================================================
    # Each op builds its trace line only when tracing and logs the outcome:
    # rc as Xen would return it, or -code for a refusal (-1000 for EFROZEN).

    def _trace_refusal(self, line: str, e: HypervisorError) -> None:
        if self._trace is not None:
            self._t(f"{line} rc={-e.code if e.code > 0 else e.code}")

    def _oid_text(self, domid: int, oid: Any) -> str:   # any value: repr() when bad
        c = self._domains[domid].client
        try:
            return _fmt_oid(c.version if c is not None else self._version, oid)
        except (TypeError, IndexError, ValueError):
            return repr(oid)

    def restore_begin(self, domid: int) -> None:
        op = "RESTORE_BEGIN"
        with self._lock:
            d = self._dom(domid)
            if d.client is not None:
                e = HypervisorError(op, f"domain {domid} already has a tmem client")
                self._trace_refusal(f"{op} cli={domid}", e)
                raise e
            d.client = _Client(domid, self._version)
            if self._trace is not None:
                self._t(f"{op} cli={domid} rc=1")

    def restore_new_pool(self, domid: int, pool_id: int, flags: int, uuid: Tuple[int, int]) -> int:
        op = "RESTORE_NEW"
        with self._lock:
            self._dom(domid)
            try:
                pool_id = self._new_pool_checked(domid, pool_id, flags, uuid, op)
            except HypervisorError as e:
                if self._trace is not None:
                    self._trace_refusal(self._new_pool_line(domid, pool_id, flags, uuid), e)
                raise
            if self._trace is not None:
                self._t(f"{self._new_pool_line(domid, pool_id, flags, uuid)} rc={pool_id}")
            return pool_id

    @staticmethod
    def _new_pool_line(domid: int, pool_id: object, flags: Any, uuid: Any) -> str:
        try:
            u = f"0x{uuid[0] & U64_MAX:016x},0x{uuid[1] & U64_MAX:016x}"
            f = f"0x{flags & 0xFFFFFFFF:08x}"
        except (TypeError, IndexError, KeyError):
            u, f = repr(uuid), repr(flags)
        return f"RESTORE_NEW pool={pool_id} cli={domid} flags={f} uuid={u}"

    def _new_pool_checked(self, domid: int, pool_id: int, flags: int, uuid: object,
                          op: str) -> int:
        c = self._client(domid, op)
        if c.saving:
            raise HypervisorError(op, f"a save of domain {domid} is running")
        self._slot(pool_id, op)
        if c.pools[pool_id] is not None:
            raise HypervisorError(op, f"pool slot {pool_id} is in use")
        if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= U32_MAX:
            raise HypervisorError(op, f"pool flags {flags!r} are not a u32")
        version = (flags & POOL_VERSION_MASK) >> POOL_VERSION_SHIFT
        if version != c.version:          # every release, 0 included (what H4 streams carry)
            raise HypervisorError(op, f"pool flags {flags:#010x} carry spec version {version}; "
                                      f"Xen {self.profile.release} requires {c.version}")
        if flags & POOL_RESERVED:
            raise HypervisorError(op, f"pool flags {flags:#010x} set reserved bits "
                                      f"{flags & POOL_RESERVED:#010x}")
        pagebits = (flags & POOL_PAGEBITS_MASK) >> POOL_PAGEBITS_SHIFT
        if pagebits:
            raise HypervisorError(op, f"pool page size {PAGE_SIZE << pagebits} bytes (pagebits "
                                      f"{pagebits}): x86 holds {PAGE_SIZE}-byte pages only")
        u0, u1 = self._uuid(op, uuid)
        self._attach_pool(c, pool_id, bool(flags & POOL_PERSIST), bool(flags & POOL_SHARED), 0,
                          (u0, u1), bool(flags & POOL_PRECOMPRESSED), op)
        return pool_id

    def _restore_pool(self, domid: int, pool_id: int, op: str) -> _Pool:
        """The pool a restore op targets; EFROZEN while the client is frozen
        (a flush checks :meth:`_frozen_refusal` itself: H7 flushed anyway)."""
        c = self._client(domid, op)
        if c.frozen:
            raise self._frozen_refusal(domid, op)
        return self._pool(c, pool_id, op)

    def _page_op_line(self, op: str, domid: int, pool_id: int, oid: OID, index: int) -> str:
        """A one-page restore op's trace line ("" when not tracing), once the
        domain is known to exist."""
        self._dom(domid)
        if self._trace is None:
            return ""
        return f"{op} pool={pool_id} cli={domid} oid={self._oid_text(domid, oid)} index={index}"

    @staticmethod
    def _frozen_refusal(domid: int, op: str) -> HypervisorError:
        return HypervisorError(op, f"domain {domid}'s tmem client is frozen", code=EFROZEN)

    def restore_put_page(self, domid: int, pool_id: int, oid: OID, index: int,
                         data: Buffer) -> None:
        op = "RESTORE_PUT_PAGE"
        with self._lock:
            line = self._page_op_line(op, domid, pool_id, oid, index)
            if line:
                line += f" len={len(data)} crc32=0x{zlib.crc32(data):08x}"
            try:
                pool = self._restore_pool(domid, pool_id, op)
                key = self._key(pool, oid, index, op)
                self._check_data(pool, data, op)
                if not self.profile.copies_pages:
                    raise self._h8_refuse(op, pool_id, domid)
                if key not in pool.store:
                    self._room(pool.units, op)
            except HypervisorError as e:
                self._trace_refusal(line, e)
                raise
            if pool.store.put(key, data):
                self._used += pool.units
            if self._trace is not None:
                self._t(f"{line} rc=1")

    def restore_put_pages(self, domid: int, pool_id: int, records: Buffer, count: int,
                          crcs: Optional[Union[Buffer, array[int]]] = None) -> None:
        op = "RESTORE_PUT_PAGE"
        with self._lock:
            self._dom(domid)
            with memoryview(records) as raw, raw.cast("B") as flat:
                try:
                    pool = self._restore_pool(domid, pool_id, op)
                    store = pool.store
                    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                        raise HypervisorError(op, f"record count {count!r} is not a count")
                    need = count * store.record_size
                    if flat.nbytes < need:
                        raise HypervisorError(op, f"{count} records of {store.record_size} bytes "
                                                  f"need {need} bytes, got {flat.nbytes}")
                    if count and not self.profile.copies_pages:
                        raise self._h8_refuse(op, pool_id, domid)
                    bad = None
                    if crcs is not None and count:
                        try:
                            bad = first_crc_mismatch(flat, count, store.record_size,
                                                     store.record_size - store.header_len, crcs)
                        except ValueError as exc:
                            raise HypervisorError(op, str(exc)) from None
                        if bad is not None:     # store the good ones before it, then refuse
                            count, need = bad[0], bad[0] * store.record_size
                    with flat[:need] as body:
                        self._used += store.put_records(
                            body, count, room=lambda new: self._room(new * pool.units, op),
                            commit_ahead=True) * pool.units
                        if self._trace is not None:
                            self._trace_records(op, pool, pool_id, domid, body, count)
                    if bad is not None:
                        raise HypervisorError(op, crc_mismatch_message(*bad), code=errno.EILSEQ)
                except HypervisorError as e:
                    self._trace_refusal(f"{op} pool={pool_id} cli={domid} count={count}", e)
                    raise

    def restore_lend_slots(self, domid: int, pool_id: int,
                           max_pages: int) -> Optional[memoryview]:
        """As the interface (Xen's hypercall reads the caller's buffer; here
        the buffer is the store): a writable view of up to ``max_pages`` record slots of
        the pool's store (fewer at a segment's end) for the restore stream to be
        read into in place (no copy of its own); :meth:`restore_put_lent` then
        stores them as :meth:`restore_put_pages` would. None where that does not
        apply (e.g. the store reuses freed slots, or H8): use the batched put."""
        with self._lock:
            try:
                pool = self._restore_pool(domid, pool_id, "RESTORE_PUT_PAGE")
            except HypervisorError:
                return None              # restore_put_pages refuses it, as usual
            if not self.profile.copies_pages:
                return None
            return pool.store.lend_slots(max_pages, commit_ahead=True)

    def restore_put_lent(self, domid: int, pool_id: int, count: int) -> None:
        """Store the first ``count`` records read into the view
        :meth:`restore_lend_slots` handed out; refused as :meth:`restore_put_pages`
        (then nothing of them is stored)."""
        op = "RESTORE_PUT_PAGE"
        with self._lock:
            try:
                self._dom(domid)
                pool = self._restore_pool(domid, pool_id, op)
                store = pool.store
                lent = store.lent_view
                if lent is None:
                    raise HypervisorError(op, f"no slots of pool {pool_id} are lent")
                traced = (bytes(lent[:count * store.record_size])
                          if count and self._trace is not None else None)
                try:
                    self._used += store.put_lent(
                        count, room=lambda new: self._room(new * pool.units, op)) * pool.units
                except ValueError as exc:
                    raise HypervisorError(op, str(exc)) from None
                if traced is not None:
                    self._trace_records(op, pool, pool_id, domid, traced, count)
            except HypervisorError as e:
                self._trace_refusal(f"{op} pool={pool_id} cli={domid} count={count}", e)
                raise

    def restore_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> None:
        op = "RESTORE_FLUSH_PAGE"
        with self._lock:
            line = self._page_op_line(op, domid, pool_id, oid, index)
            try:
                c = self._client(domid, op)
                pool = self._pool(c, pool_id, op)
                key = self._key(pool, oid, index, op)
            except HypervisorError as e:
                self._trace_refusal(line, e)
                raise
            self._delete(pool, key)              # a missing page is fine
            if c.frozen:                         # H7: deleted, and EFROZEN all the same
                refusal = self._frozen_refusal(domid, op)
                self._trace_refusal(line, refusal)
                raise refusal
            if self._trace is not None:
                self._t(f"{line} rc=1")

    def restore_flush_pages(self, domid: int, entries: Sequence[Tuple[int, OID, int]]) -> None:
        """As the interface: the RESTORE_FLUSH_PAGE loop under one lock, each
        sub-op checked and traced as its own call."""
        if not isinstance(entries, (list, tuple)):
            raise HypervisorError("RESTORE_FLUSH_PAGE", f"entries {type(entries).__name__} "
                                  "is not a sequence of (pool_id, oid, index)")
        with self._lock:
            for entry in entries:
                try:
                    pool_id, oid, index = entry
                except (TypeError, ValueError):
                    raise HypervisorError("RESTORE_FLUSH_PAGE", f"entry {entry!r} is not "
                                          "(pool_id, oid, index)") from None
                self.restore_flush_page(domid, pool_id, oid, index)

    # =====================================================================
    # TmemControl: client settings and admin ops (domid -1 = every client)
    # =====================================================================
    def _set(self, op: str, domid: int, value: int, attr: str, traced_arg: bool = True) -> None:
        """Set ``attr`` of the client(s); ``traced_arg``: the op takes ``value`` as arg1."""
        with self._lock:
            for c in self._clients(domid, op):
                setattr(c, attr, value)
            if self._trace is not None:
                arg = f" arg1={int(value)}" if traced_arg else ""
                self._t(f"{op} cli={domid}{arg} rc=0")

    @staticmethod
    def _uuid(op: str, uuid: Any) -> Tuple[int, int]:
        """A pool uuid from a caller: two u64, or refused."""
        try:
            u0, u1 = uuid
            ok = all(isinstance(u, int) and 0 <= u <= U64_MAX for u in (u0, u1))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise HypervisorError(op, f"uuid {uuid!r} is not two u64")
        return u0, u1

    @staticmethod
    def _u32(op: str, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
            raise HypervisorError(op, f"{value!r} is not a u32")
        return value

    def set_weight(self, domid: int, weight: int) -> None:
        self._set("SET_WEIGHT", domid, self._u32("SET_WEIGHT", weight), "weight")

    def set_cap(self, domid: int, cap: int) -> None:
        self._set("SET_CAP", domid, self._u32("SET_CAP", cap), "cap")

    def set_compress(self, domid: int, compress: bool) -> None:
        self._set("SET_COMPRESS", domid, bool(compress), "compress")

    def freeze(self, domid: int) -> None:
        self._set("FREEZE", domid, True, "frozen", traced_arg=False)

    def thaw(self, domid: int) -> None:
        self._set("THAW", domid, False, "frozen", traced_arg=False)

    def destroy(self, domid: int) -> None:
        """Drop the client(s) and their pools; a domain without a client is fine."""
        with self._lock:
            if domid == ALL_CLIENTS:
                doms = [d for d in self._domains.values() if d.client is not None]
            else:
                doms = [self._dom(domid)]
            for d in doms:
                self._drop_client(d)
            if self._trace is not None:
                self._t(f"DESTROY cli={domid} rc=0")

    def flush(self, domid: int, pages: int) -> int:
        """Drop up to ``pages`` ephemeral pages, oldest first; returns how many."""
        with self._lock:
            left = max(0, pages)
            done = 0
            for c in self._clients(domid, "FLUSH"):
                for pool in c.pools:
                    if pool is None or pool.persistent or not left:
                        continue
                    for key in pool.store.oldest(left):
                        self._delete(pool, key)
                        done += 1
                        left -= 1
            if self._trace is not None:
                self._t(f"FLUSH cli={domid} arg1={pages} rc={done}")
            return done

    def tmem_list(self, domid: Optional[int], long: bool = False) -> str:
        """A readable account of tmem, as ``xm tmem-list``; ``long`` adds pools."""
        with self._lock:
            if domid is None or domid == ALL_CLIENTS:
                doms = [d for _, d in sorted(self._domains.items()) if d.client is not None]
                lines = [f"tmem: spec version {self._version}, {self._used} of {self._capacity} "
                         f"pages used, {self.tmem_free_pages()} free"]
            else:
                doms = [self._dom(domid)]
                lines = []
            for d in doms:
                c = d.client
                if c is None:
                    lines.append(f"client {d.domid} ({d.name}): no tmem client")
                    continue
                pools = [(i, p) for i, p in enumerate(c.pools) if p is not None]
                s = d.stats
                lines.append(
                    f"client {d.domid} ({d.name}): version={c.version} weight={c.weight} "
                    f"cap={c.cap} compress={int(c.compress)} frozen={int(c.frozen)} "
                    f"saving={'live' if c.saving and c.live else int(c.saving)} "
                    f"pools={len(pools)} pages={sum(len(p.store) for _, p in pools)} "
                    f"puts={s['tmem_puts']} gets={s['tmem_gets']} flushes={s['tmem_flushes']} "
                    f"swap_fallbacks={s['swap_fallbacks']}")
                if long:
                    for i, p in pools:
                        kind = "persistent" if p.persistent else "ephemeral"
                        share = (f"shared uuid=0x{p.uuid[0]:016x},0x{p.uuid[1]:016x} "
                                 f"sharers={len(p.sharers)}" if p.shared else "private")
                        lines.append(f"  pool {i}: {kind} {share} flags=0x{p.flags():08x} "
                                     f"page_size={p.store.page_size} pages={len(p.store)}")
            if self._trace is not None:
                self._t(f"LIST cli={-1 if domid is None else domid} arg1={int(long)} rc=0")
            return "\n".join(lines) + "\n"

    def query_freeable_mb(self) -> int:
        """MiB tmem could give back at once: the ephemeral pages (droppable by design)."""
        with self._lock:
            seen = set()
            units = 0
            for d in self._domains.values():
                if d.client is None:
                    continue
                for p in d.client.pools:
                    if p is not None and not p.persistent and id(p) not in seen:
                        seen.add(id(p))
                        units += len(p.store) * p.units
            rc = units * PAGE_SIZE >> 20
            if self._trace is not None:
                self._t(f"QUERY_FREEABLE_MB cli=-1 rc={rc}")
            return rc

    def tmem_version(self) -> int:
        """The profile's spec version: what RESTORE_NEW requires in bits 24-31."""
        return self.profile.spec_version

    # What host_info() names as the backend; the hypervisor process sets its
    # own name, pid and start time on its instance.
    backend_name = "sim-inprocess"
    host_pid: Optional[int] = None
    host_started: Optional[float] = None

    def op_trace(self, start: int = 0) -> List[str]:
        """Trace lines from ``start`` on (``xen-restore.trace`` format); empty
        when this hypervisor was made without a trace list."""
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise HypervisorError("op_trace", f"start {start!r} is not a line number")
        with self._lock:
            return list(self._trace[start:]) if self._trace is not None else []

    def host_info(self, backend: Optional[str] = None) -> HostInfo:
        """``xm info``'s view: release, spec version, tmem room, whether pages can
        move (False from 4.4.0 on, H8), and the defect switches that are on."""
        with self._lock:
            prof = self.profile
            return HostInfo(backend=backend or self.backend_name, xen_release=prof.release,
                            tmem_spec_version=prof.spec_version,
                            tmem_capacity_pages=self._capacity,
                            tmem_free_pages=max(0, self._capacity - self._used),
                            can_move_tmem=prof.copies_pages, defects=tuple(prof.defects),
                            pid=self.host_pid, started=self.host_started)

    def tmem_free_pages(self) -> int:
        with self._lock:
            return max(0, self._capacity - self._used)

    # =====================================================================
    # guest side (what a guest's frontswap / cleancache would do)
    # =====================================================================
    def guest_new_pool(self, domid: int, persistent: bool, shared: bool = False,
                       uuid: Tuple[int, int] = (0, 0), pagebits: int = 0) -> int:
        """Create a pool in the lowest free slot (creating the client on first use).

        pagebits other than 0 is allowed here (a non-x86 guest), so the format's
        other page sizes can be saved; RESTORE_NEW refuses them like x86 Xen.
        """
        op = "guest_new_pool"
        with self._lock:
            d = self._dom(domid)
            c = d.client
            if c is not None and c.saving:
                raise HypervisorError(op, f"a save of domain {domid} is running: no new pools")
            if (isinstance(pagebits, bool) or not isinstance(pagebits, int)
                    or not 0 <= pagebits <= 15):
                raise HypervisorError(op, f"pagebits {pagebits!r} is not 0..15")
            u0, u1 = self._uuid(op, uuid)
            pools = c.pools if c is not None else [None]
            slot = next((i for i, p in enumerate(pools) if p is None), None)
            if slot is None:
                raise HypervisorError(op, f"domain {domid} already has {MAX_POOLS} pools")
            created = c is None
            if c is None:
                c = d.client = _Client(domid, self._version)
            try:
                self._attach_pool(c, slot, bool(persistent), bool(shared), pagebits,
                                  (u0, u1), False, op)
            except HypervisorError:
                if created:
                    d.client = None
                raise
            return slot

    def guest_destroy_pool(self, domid: int, pool_id: int) -> None:
        """Destroy a pool; refused (and nothing changed) while a save runs."""
        op = "guest_destroy_pool"
        with self._lock:
            c = self._client(domid, op)
            self._pool(c, pool_id, op)
            if c.saving:
                raise HypervisorError(op, f"a save of domain {domid} is running: pool "
                                          f"{pool_id} stays")
            self._detach_pool(c, pool_id)

    def _guest(self, domid: int, pool_id: int, op: str) -> Tuple[_Domain, _Client, _Pool]:
        d = self._dom(domid)
        c = d.client
        if c is None:
            raise HypervisorError(op, f"domain {domid} has no tmem client")
        return d, c, self._pool(c, pool_id, op)

    def guest_put(self, domid: int, pool_id: int, oid: OID, index: int, data: Buffer) -> bool:
        """Put a page; False when refused (frozen, overwrite during a live save, full)."""
        op = "guest_put"
        with self._lock:
            d, c, pool = self._guest(domid, pool_id, op)
            key = self._key(pool, oid, index, op)
            self._check_data(pool, data, op)
            return self._put(d, c, pool, key, data)

    def guest_get(self, domid: int, pool_id: int, oid: OID, index: int) -> Optional[bytes]:
        op = "guest_get"
        with self._lock:
            d, _, pool = self._guest(domid, pool_id, op)
            d.stats["tmem_gets"] += 1
            return pool.store.get(self._key(pool, oid, index, op))

    def guest_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> bool:
        """Delete a page (True if it existed); logged during a live save if persistent."""
        op = "guest_flush_page"
        with self._lock:
            d, _, pool = self._guest(domid, pool_id, op)
            d.stats["tmem_flushes"] += 1
            return self._delete(pool, self._key(pool, oid, index, op))

    def guest_flush_object(self, domid: int, pool_id: int, oid: OID) -> int:
        """Delete every page of an object, in put order; returns how many."""
        op = "guest_flush_object"
        with self._lock:
            d, _, pool = self._guest(domid, pool_id, op)
            d.stats["tmem_flushes"] += 1
            self._key(pool, oid, 0, op)
            keys = pool.store.keys_with_oid(oid)
            for key in keys:
                self._delete(pool, key)
            return len(keys)

    # =====================================================================
    # inspection for tests and the demo's verification
    # =====================================================================
    def tmem_state(self, domid: int) -> Dict[str, object]:
        """Everything about a domain's tmem, page data as zlib crc32 (small pools only)."""
        with self._lock:
            c = self._dom(domid).client
            if c is None:
                return {"version": self._version, "client": None, "pools": {}}
            frozen = c.pre_frozen if c.saving else c.frozen
            return {
                "version": c.version,
                "client": {"compress": c.compress, "frozen": frozen, "weight": c.weight,
                           "cap": c.cap},
                "pools": {i: {"flags": p.flags(), "uuid": p.uuid, "persistent": p.persistent,
                              "shared": p.shared, "pages": p.store.crc_map()}
                          for i, p in enumerate(c.pools) if p is not None},
            }

    def tmem_digest(self, domid: int) -> Dict[int, Tuple[int, str]]:
        """Per persistent pool ``(count, sha256 hex)`` over pages in (OID, index) order
        (see :meth:`PageStore.digest`), streaming: fit for GiB-scale checks."""
        with self._lock:
            c = self._dom(domid).client
            if c is None:
                return {}
            return {i: p.store.digest() for i, p in enumerate(c.pools)
                    if p is not None and p.persistent}

    # =====================================================================
    # xm's everyday commands: shutdown, balloon, vcpus, uptime, consoles
    # =====================================================================
    def _printk(self, message: str) -> None:
        """A line in the hypervisor's console ring (``xm dmesg``), Xen's format."""
        self._conring.append(f"(XEN) [{time.monotonic() - self._t0:12.6f}] {message}")

    @staticmethod
    def _say(d: _Domain, message: str) -> None:
        """A line on the guest's console, stamped like a Linux kernel message."""
        d.console.append(f"[{time.monotonic() - d.started:12.6f}] {message}")

    def _boot_console(self, d: _Domain) -> None:
        """What a PV Linux guest prints while it boots (the simulated guest's kernel)."""
        self._printk(f"domain {d.domid} ({d.name}) built: {d.memory_mib} MiB, {d.vcpus} vcpus")
        for line in ("Booting paravirtualized kernel on Xen",
                     f"Xen version: {self.profile.release} (simulated)",
                     f"Memory: {d.memory_mib} MiB available to the guest ({d.p2m} pages)",
                     f"SMP: brought up {d.vcpus} vcpu{'s' if d.vcpus != 1 else ''}",
                     "Initialising Xen virtual ethernet driver",
                     "xen_balloon: Initialising balloon driver",
                     "Xen tmem: frontend enabled (cleancache, frontswap)"
                     if d.client is not None else "Xen tmem: no tmem pools configured",
                     "Freeing unused kernel memory"):
            self._say(d, line)
        d.console.append(f"{d.name} login:")     # getty's prompt: user space, no stamp

    def _run_state_events(self, d: _Domain, before: Tuple[bool, bool]) -> None:
        """Console lines for suspend/resume/arrival, and a shutdown request the
        guest acknowledges now that it runs again (caller holds the lock)."""
        _, was_suspended = before
        if d.suspended and not was_suspended:
            self._say(d, "xen: control/shutdown=suspend: suspending (save or migration)")
        elif was_suspended and not d.suspended:
            self._say(d, "xen: resumed in place (the save was a checkpoint or did not finish)")
        if d.running and d.arrived:
            d.arrived = False
            self._say(d, f"xen: resumed after save/migration: now domain {d.domid} on this host")
        if d.running and d.shutdown_pending:
            self._acknowledge_shutdown(d)

    def _acknowledge_shutdown(self, d: _Domain) -> None:
        """The guest's side of a shutdown: it prints, stops, and calls SCHEDOP_shutdown."""
        reason, d.shutdown_pending = d.shutdown_pending, ""
        self._say(d, f"xen: control/shutdown={reason}: shutting down")
        self._say(d, "Restarting system." if reason == "reboot" else "System halted.")
        d.shutdown_reason = reason
        self._sync_guest(d, "shutdown_domain")       # the guest process stops (a barrier)
        self._printk(f"domain {d.domid} ({d.name}) shut down: reason {reason}")

    def shutdown_domain(self, domid: int, reason: str) -> None:
        """Ask the guest to shut down; a running guest acknowledges at once, a
        paused or suspended one when it runs again (see the interface)."""
        op = "shutdown_domain"
        if reason not in SHUTDOWN_REASONS:
            raise HypervisorError(op, f"shutdown reason {reason!r} is not one of "
                                      f"{', '.join(SHUTDOWN_REASONS)}", code=errno.EINVAL)
        with self._lock:
            d = self._guest_dom(domid, op)
            if d.shutdown_reason:
                return                            # already shut down: xend will finish it
            d.shutdown_pending = reason
            if d.running:
                self._acknowledge_shutdown(d)

    def set_memory_target(self, domid: int, target_mib: int) -> None:
        """The balloon driver reaches the target at once (the simulated guest
        always cooperates); bounded by the domain's maximum (its memory)."""
        op = "set_memory_target"
        with self._lock:
            d = self._dom(domid)
            maximum = DOM0_MEMORY_MIB if d.is_dom0 else -(-d.p2m // PAGES_PER_MIB)
            if isinstance(target_mib, bool) or not isinstance(target_mib, int) \
                    or not 1 <= target_mib <= maximum:
                raise HypervisorError(op, f"memory target {target_mib!r} MiB for domain {domid} "
                                          f"({d.name}) is outside 1..{maximum} MiB (its maximum)",
                                      code=errno.EINVAL)
            old, d.memory_mib = d.memory_mib, target_mib
            if not d.is_dom0:
                self._say(d, f"xen_balloon: memory target {target_mib} MiB (was {old} MiB)")

    def vcpu_info(self, domid: int) -> List[Dict[str, Any]]:
        """Per vcpu: ``vcpu``, ``cpu`` (physical), ``online``, ``running``,
        ``blocked``, ``cpu_time`` (s), ``affinity``. The domain's cpu time is
        shared evenly; a running domain's vcpus run, a paused one's block."""
        with self._lock:
            d = self._dom(domid)
            cpus = os.cpu_count() or 1
            return [{"vcpu": i, "cpu": (d.domid + i) % cpus, "online": True,
                     "running": d.running, "blocked": not d.running,
                     "cpu_time": d.cpu_time / d.vcpus, "affinity": "any cpu"}
                    for i in range(d.vcpus)]

    def domain_uptime(self, domid: int) -> float:
        """Seconds since the domain was built (domain 0: since the hypervisor started)."""
        with self._lock:
            d = self._dom(domid)
            return time.monotonic() - (self._t0 if d.is_dom0 else d.started)

    def console_output(self, domid: int) -> str:
        """What the guest printed on its console (the last CONSOLE_LINES lines)."""
        with self._lock:
            d = self._guest_dom(domid, "console_output")
            return "".join(line + "\n" for line in d.console)

    def read_console_ring(self, clear: bool = False) -> str:
        """The hypervisor's console ring; ``clear`` empties it after reading."""
        with self._lock:
            text = "".join(line + "\n" for line in self._conring)
            if clear:
                self._conring.clear()
            return text
