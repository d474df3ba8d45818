"""Xen's constants and wire numbers: the single home of every number taken from Xen.

Flag bits, chunk ids, error numbers, record sizes and the live saver's stop rule are
Xen's (its public headers, ``xc_domain_save``/``xc_domain_restore``, ``xc_tmem``) as
restated in ``SPEC.md``; the section is named beside each. Every module imports them from
here and defines none of them again, so a number cannot drift between the codec, the
engine and the simulated hypervisor. (``tests/xenframer.py`` restates some on purpose: it
is an independent framer that checks this project against Xen's layout.)
"""
from __future__ import annotations

from typing import Dict

# ---------------------------------------------------------------------------
# Pages (SPEC §2.2, §4)

PAGE_SIZE = 4096                  # an x86 page: a page record's data, tmem's base page size
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE

# ---------------------------------------------------------------------------
# The legacy stream (SPEC §2)

LAYOUTS = ("released", "seed")    # §2 the tmem chunks as Xen 4.0.x wrote them, or as the
                                  # 2009 proposal did

MAX_BATCH = 1024                  # §2.2 MAX_BATCH_SIZE in xc_domain_save: pages per batch
PFN_MASK = 0x0FFFFFFF             # §2.2 a batch entry: bits 0-27 pfn ...
TYPE_SHIFT = 28                   # ... bits 28-31 type
TYPE_BROKEN, TYPE_XALLOC, TYPE_XTAB = 0xD, 0xE, 0xF   # §2.2 entry types that carry no data
NO_DATA_TYPES = (TYPE_BROKEN, TYPE_XALLOC, TYPE_XTAB)
RAM_RECORD_BYTES = PAGE_SIZE + 8  # §2.2 one page in a batch with its 64-bit pfn entry
MAX_UNMAPPED = 1 << 28            # §2.3 Xen refuses more unmapped pfns in the tail
MAX_VCPUS = 4096                  # XC_SR_MAX_VCPUS
VCPU_CTX_X64 = 5168               # §2.1 sizeof(vcpu_guest_context_x86_64_t)
VCPU_CTX_X32 = 2800               # §2.1 sizeof(vcpu_guest_context_x86_32_t)
VCPU_CTX_SIZES: Dict[int, int] = {VCPU_CTX_X64: 8, VCPU_CTX_X32: 4}   # size -> guest word
EXTV_SIZE = 128                   # §2.1/§2.3 extended vcpu context per vcpu when "extv"
SHARED_INFO_SIZE = 4096           # §2.3 the shared-info page closing a PV tail
MAX_XSAVE = 1 << 16               # §2.1 "xcnt": the per-vcpu xsave record size we accept

# Chunk ids (XC_SAVE_ID_*), SPEC §2.2: a chunk starts with a signed 32-bit int n; n in
# 1..MAX_BATCH is a page batch, 0 ends the body, these negative values are Xen's markers.
END = 0
ENABLE_VERIFY_MODE = -1
VCPU_INFO = -2
HVM_IDENT_PT = -3
HVM_VM86_TSS = -4
TMEM = -5                         # §4
TMEM_EXTRA = -6                   # §5
TSC_INFO = -7
HVM_CONSOLE_PFN = -8
LAST_CHECKPOINT = -9
HVM_ACPI_IOPORTS_LOCATION = -10
HVM_VIRIDIAN = -11
COMPRESSED_DATA = -12
ENABLE_COMPRESSION = -13
HVM_GENERATION_ID_ADDR = -14
HVM_PAGING_RING_PFN = -15
HVM_ACCESS_RING_PFN = -16
HVM_SHARING_RING_PFN = -17
TOOLSTACK = -18
HVM_IOREQ_SERVER_PFN = -19
HVM_NR_IOREQ_SERVER_PAGES = -20

TMEM_MARKERS = (TMEM, TMEM_EXTRA)
HVM_PARAM_IDS = frozenset({HVM_IDENT_PT, HVM_VM86_TSS, HVM_CONSOLE_PFN,
                           HVM_ACPI_IOPORTS_LOCATION, HVM_VIRIDIAN, HVM_GENERATION_ID_ADDR,
                           HVM_PAGING_RING_PFN, HVM_ACCESS_RING_PFN, HVM_SHARING_RING_PFN,
                           HVM_IOREQ_SERVER_PFN, HVM_NR_IOREQ_SERVER_PAGES})
CHUNK_NAMES: Dict[int, str] = {
    END: "END", ENABLE_VERIFY_MODE: "ENABLE_VERIFY_MODE", VCPU_INFO: "VCPU_INFO",
    HVM_IDENT_PT: "HVM_IDENT_PT", HVM_VM86_TSS: "HVM_VM86_TSS", TMEM: "TMEM",
    TMEM_EXTRA: "TMEM_EXTRA", TSC_INFO: "TSC_INFO", HVM_CONSOLE_PFN: "HVM_CONSOLE_PFN",
    LAST_CHECKPOINT: "LAST_CHECKPOINT", HVM_ACPI_IOPORTS_LOCATION: "HVM_ACPI_IOPORTS_LOCATION",
    HVM_VIRIDIAN: "HVM_VIRIDIAN", COMPRESSED_DATA: "COMPRESSED_DATA",
    ENABLE_COMPRESSION: "ENABLE_COMPRESSION", HVM_GENERATION_ID_ADDR: "HVM_GENERATION_ID_ADDR",
    HVM_PAGING_RING_PFN: "HVM_PAGING_RING_PFN", HVM_ACCESS_RING_PFN: "HVM_ACCESS_RING_PFN",
    HVM_SHARING_RING_PFN: "HVM_SHARING_RING_PFN", TOOLSTACK: "TOOLSTACK",
    HVM_IOREQ_SERVER_PFN: "HVM_IOREQ_SERVER_PFN",
    HVM_NR_IOREQ_SERVER_PAGES: "HVM_NR_IOREQ_SERVER_PAGES",
}
# Chunks Xen defined but this project leaves to a plugin: which plugin an unclaimed one needs.
XEN_PLUGIN_MARKERS: Dict[int, str] = {TMEM: "tmem", TMEM_EXTRA: "tmem"}

# ---------------------------------------------------------------------------
# The -5 TMEM and -6 TMEM_EXTRA chunks (SPEC §4, §5)

TMEM_SPEC_VERSIONS = (0, 1)       # §4 version 0: Xen 4.0.0-4.0.1; 1: 4.0.2-4.5.x
MAX_POOLS = 16                    # §4/§7 pools per client
SEPARATOR = 0xFFFFFFFF            # §4 separators and list terminators
OID_BYTES_V0 = 8                  # §4 one u64
OID_BYTES_V1 = 24                 # §4 three u64
INV_RECORD_BYTES = 4 + OID_BYTES_V1 + 4   # §5 pool id, OID, index (spec version 1)

# pool flags (§4)
POOL_PERSIST = 1 << 0
POOL_SHARED = 1 << 1
POOL_PRECOMPRESSED = 1 << 2       # v1
POOL_PAGEBITS_SHIFT = 4           # bits 4-7: page size = PAGE_SIZE << pagebits
POOL_PAGEBITS_MASK = 0xF << POOL_PAGEBITS_SHIFT
POOL_VERSION_SHIFT = 24           # bits 24-31: the spec version (H4: 0 before 4.1.4/4.2.1)
POOL_VERSION_MASK = 0xFF << POOL_VERSION_SHIFT
POOL_RESERVED = 0xFFFFFFFF & ~(POOL_PERSIST | POOL_SHARED | POOL_PRECOMPRESSED
                               | POOL_PAGEBITS_MASK | POOL_VERSION_MASK)   # bit 3, bits 8-23
# client flags (§4)
CLIENT_COMPRESS = 1 << 0
CLIENT_FROZEN = 1 << 1
CLIENT_RESERVED = ~(CLIENT_COMPRESS | CLIENT_FROZEN) & 0xFFFFFFFF

# ---------------------------------------------------------------------------
# The hypervisor (SPEC §7)

EFROZEN = 1000                    # a put (or restore put/flush) on a frozen client
EEMPTY = 1001
ALL_CLIENTS = -1                  # TMEM_CLI_ID_NULL: an admin op on every client
DOM0 = 0
SHUTDOWN_REASONS = ("poweroff", "reboot", "halt")   # SHUTDOWN_* a guest may ask for (xm shutdown)

# ---------------------------------------------------------------------------
# xc_domain_save's live stop rule (SPEC §2.4): the last round starts once a round sent
# fewer than XEN_MIN_ROUND_PAGES pages, after XEN_MAX_ITERS rounds, or once
# XEN_MAX_FACTOR x p2m_size pages were sent.

XEN_MIN_ROUND_PAGES = 50
XEN_MAX_ITERS = 29
XEN_MAX_FACTOR = 3
