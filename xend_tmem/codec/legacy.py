"""Xen's legacy libxc save stream (Xen 4.0 - 4.5): header, chunk loop, tail.

SPEC §2 and §3. The codec frames the stream and dispatches; it never restores
anything. Page data reaches the caller one batch at a time as a memoryview over
the reader's buffer, and the tmem chunks (``-5``/``-6``) go to handlers the
caller registers, because only the tmem plugin knows their layout — the stream
has no length field that would let a reader skip them.

``width`` is always the *saving tools'* ``unsigned long`` (4 or 8). The stream
does not record it, so it is a parameter here (or, when None, inferred from
the stream by :func:`detect_width`) and never taken from this process's build
(the 2009 patch's ``__X86_64__`` defect, SPEC §3).

Every count read from the stream is checked before it sizes anything, and
large regions (the p2m frame list, unmapped pfns, device-model state) are
consumed in bounded pieces, so a hostile header cannot make the reader
allocate more than the data actually sent.
"""
from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from typing import (TYPE_CHECKING, BinaryIO, Callable, Dict, FrozenSet, Iterable, List, Mapping,
                    Optional, Sequence, Tuple, Union)

from ..binio import CHUNK, StreamReader, StreamWriter, ensure_reader
from ..errors import PluginError, SaveError, StreamError
from .image import QEMU_SIGNATURE

if TYPE_CHECKING:
    from ..hypervisor.interface import Buffer
from ..xen import (PAGE_SIZE, MAX_BATCH, PFN_MASK, TYPE_SHIFT, TYPE_BROKEN, TYPE_XALLOC,
                   TYPE_XTAB, NO_DATA_TYPES, MAX_UNMAPPED, MAX_VCPUS, VCPU_CTX_X64, VCPU_CTX_X32,
                   VCPU_CTX_SIZES, EXTV_SIZE, MAX_XSAVE, END, ENABLE_VERIFY_MODE, VCPU_INFO, TMEM,
                   TMEM_EXTRA, TSC_INFO, LAST_CHECKPOINT, COMPRESSED_DATA, ENABLE_COMPRESSION,
                   TOOLSTACK, TMEM_MARKERS, HVM_PARAM_IDS, CHUNK_NAMES, XEN_PLUGIN_MARKERS,
                   LAYOUTS)

MAX_P2M_SIZE = 1 << 40           # 52-bit guest-physical space in 4 KiB frames
MAX_EXT_INFO = 1 << 20           # extended-info block; Xen's is a few KiB
MAX_HVM_CONTEXT = 64 << 20
MAX_COMPRESSED_CHUNK = 2 * MAX_BATCH * PAGE_SIZE
MAX_CHUNK_RECORDS = 1 << 16      # BodyInfo.chunks keeps at most this many entries

# The ids this codec parses itself (SPEC §2.2 less the tmem markers): reserved.
HOST_CHUNK_IDS = frozenset(CHUNK_NAMES) - frozenset(TMEM_MARKERS)

DM_RECORD_0002 = b"DeviceModelRecord0002"
REMUS_DM_STATE = b"RemusDeviceModelState"
DM_SIGNATURES = (QEMU_SIGNATURE, DM_RECORD_0002, REMUS_DM_STATE)

_BIG_ENDIAN = sys.byteorder == "big"
_TYPECODE = {4: "I", 8: "Q"}
assert array("I").itemsize == 4 and array("Q").itemsize == 8
_TSC = struct.Struct("<IQII")
_EXT_BLOCK = struct.Struct("<4sI")
_HVM_PARAM = struct.Struct("<IQ")

PagesCallback = Callable[[Sequence[int], Sequence[int], memoryview, int], None]
ChunkHandler = Callable[[StreamReader, int, int], None]


class UnencodableError(SaveError, ValueError):
    """A value the legacy stream cannot carry; the save must stop before writing it."""


def _check_width(width: int) -> None:
    if width not in (4, 8):
        raise ValueError(f"the tools' unsigned long is 4 or 8 bytes, not {width!r}")


def _ones(width: int) -> int:
    return (1 << (8 * width)) - 1


def _pack_ulongs(width: int, values: Iterable[int], what: str) -> bytes:
    try:
        arr = array(_TYPECODE[width], values)
    except OverflowError:
        raise UnencodableError(f"a {what} value does not fit the {8 * width}-bit tools' "
                               "unsigned long") from None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def p2m_frame_count(p2m_size: int, guest_width: int) -> int:
    """Entries in the PV p2m frame list: one per page of the guest's p2m table."""
    if guest_width not in (4, 8):
        raise ValueError(f"guest word width is 4 or 8, not {guest_width!r}")
    per_page = PAGE_SIZE // guest_width
    return -(-p2m_size // per_page)


# -- writer -------------------------------------------------------------------

def check_p2m_size(p2m_size: int, width: int, layout: str = "released",
                   markers: Iterable[int] = TMEM_MARKERS) -> None:
    """Refuse a ``p2m_size`` that a seed-layout reader would misread (SPEC §3).

    The check is the same for both layouts: a released-layout stream is also
    read by seed-capable readers, which take a first int equal to a marker for
    a tmem chunk — whatever the high half of a 64-bit ``p2m_size`` holds.
    """
    _check_width(width)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if not isinstance(p2m_size, int) or p2m_size < 1:
        raise UnencodableError(f"p2m_size {p2m_size!r} is not a positive frame count")
    if p2m_size >> (8 * width):
        raise UnencodableError(f"p2m_size {p2m_size:#x} does not fit the {8 * width}-bit "
                               "tools' unsigned long")
    if p2m_size > MAX_P2M_SIZE:
        raise UnencodableError(f"p2m_size {p2m_size:#x} exceeds {MAX_P2M_SIZE:#x} frames, "
                               "more than a guest can address")
    low = p2m_size & 0xFFFFFFFF
    for m in markers:
        if low == m & 0xFFFFFFFF:
            raise UnencodableError(
                f"p2m_size {p2m_size:#x} cannot be written in the {layout} layout: its low "
                f"32 bits {low:#x} equal tmem marker {m}, which a seed-layout reader takes "
                "for a tmem chunk")


def write_p2m_size(w: StreamWriter, p2m_size: int, width: int, layout: str = "released",
                   markers: Iterable[int] = TMEM_MARKERS) -> None:
    """The stream's first field (after a seed-layout ``-5`` chunk, if any)."""
    check_p2m_size(p2m_size, width, layout, markers)
    w.ulong(width, p2m_size)


def write_pv_ext_info(w: StreamWriter, width: int, vcpu_ctx_size: int, extv: bool = False,
                      xcnt_size: Optional[int] = None, vcpu_ctx: Optional[bytes] = None) -> None:
    """PV extended info: ``~0``, total length, ``vcpu`` [, ``extv``] [, ``xcnt``].

    The ``vcpu`` block's size is what tells a restorer the guest's word size;
    its content (``vcpu_ctx``, zeros if None) is not otherwise used by restore.
    """
    _check_width(width)
    if vcpu_ctx_size not in VCPU_CTX_SIZES:
        raise ValueError(f"vcpu context size must be {VCPU_CTX_X64} (64-bit guest) or "
                         f"{VCPU_CTX_X32} (32-bit guest), not {vcpu_ctx_size!r}")
    if vcpu_ctx is None:
        vcpu_ctx = bytes(vcpu_ctx_size)
    elif len(vcpu_ctx) != vcpu_ctx_size:
        raise ValueError(f"vcpu_ctx is {len(vcpu_ctx)} bytes, expected {vcpu_ctx_size}")
    blocks = [_EXT_BLOCK.pack(b"vcpu", vcpu_ctx_size), bytes(vcpu_ctx)]
    if extv:
        blocks.append(_EXT_BLOCK.pack(b"extv", 0))
    if xcnt_size is not None:
        if not 0 <= xcnt_size <= MAX_XSAVE:
            raise ValueError(f"xcnt size must be 0..{MAX_XSAVE}, not {xcnt_size!r}")
        blocks.append(_EXT_BLOCK.pack(b"xcnt", 4) + struct.pack("<I", xcnt_size))
    body = b"".join(blocks)
    w.ulong(width, _ones(width))
    w.u32(len(body))
    w.write(body)


def write_p2m_frame_list(w: StreamWriter, width: int, frames: Sequence[int]) -> None:
    """The PV p2m frame list, ``p2m_frame_count(p2m_size, guest_width)`` ulongs."""
    _check_width(width)
    w.write(_pack_ulongs(width, frames, "p2m frame list"))


def write_page_batch(w: StreamWriter, width: int, pfns: Sequence[int],
                     types: Optional[Sequence[int]] = None, data: Buffer = b"", *,
                     inline: bool = True) -> None:
    """One page batch: count, ``type<<28 | pfn`` entries, then the page data.

    ``data`` holds 4096 bytes for every entry whose type carries data (all but
    XTAB/XALLOC/BROKEN), concatenated in entry order, and is written with one
    call. ``inline=False`` writes a batch after ``-13`` (its data travels in
    ``-12`` chunks), so ``data`` must then be empty.
    """
    _check_width(width)
    n = len(pfns)
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"a page batch holds 1..{MAX_BATCH} pages, not {n}")
    if min(pfns) < 0 or max(pfns) > PFN_MASK:
        raise UnencodableError(f"pfn out of range 0..{PFN_MASK:#x} in a page batch "
                               f"(min {min(pfns):#x}, max {max(pfns):#x})")
    if types is None:
        entries: Sequence[int] = pfns
        ndata = n
    else:
        if len(types) != n:
            raise ValueError(f"{len(types)} page types for {n} pfns")
        if min(types) < 0 or max(types) > 0xF:
            raise ValueError("page types are 4-bit values 0..15")
        entries = [(t << TYPE_SHIFT) | p for p, t in zip(pfns, types)]
        ndata = n - sum(types.count(t) for t in NO_DATA_TYPES)
    mv = memoryview(data).cast("B")
    want = ndata * PAGE_SIZE if inline else 0
    if mv.nbytes != want:
        raise ValueError(f"page data is {mv.nbytes} bytes; this batch needs {want}")
    w.s32(n)
    w.write(_pack_ulongs(width, entries, "pfn entry"))
    if want:
        w.write(mv)


def write_vcpu_info(w: StreamWriter, max_vcpu_id: int, online_vcpus: Iterable[int]) -> None:
    """``-2``: max vcpu id and the bitmap of vcpus whose context the tail carries.

    One u64 word up to 64 vcpus — the Xen 4.0 layout — and ``max_vcpu_id/64+1``
    words beyond (4.2+); both readers agree for ``max_vcpu_id < 64``.
    """
    if not 0 <= max_vcpu_id < MAX_VCPUS:
        raise UnencodableError(f"max_vcpu_id must be 0..{MAX_VCPUS - 1}, not {max_vcpu_id!r}")
    words = [0] * (max_vcpu_id // 64 + 1)
    for v in online_vcpus:
        if not 0 <= v <= max_vcpu_id:
            raise ValueError(f"vcpu {v} is outside 0..{max_vcpu_id}")
        words[v // 64] |= 1 << (v % 64)
    w.write(struct.pack(f"<ii{len(words)}Q", VCPU_INFO, max_vcpu_id, *words))


def write_tsc_info(w: StreamWriter, mode: int, nsec: int, khz: int, incarnation: int) -> None:
    """``-7``: u32 mode, u64 elapsed nsec, u32 kHz, u32 incarnation."""
    try:
        payload = _TSC.pack(mode, nsec, khz, incarnation)
    except struct.error as e:
        raise ValueError(f"TSC info out of range: {e}") from None
    w.s32(TSC_INFO)
    w.write(payload)


def write_hvm_param(w: StreamWriter, chunk_id: int, value: int) -> None:
    """An HVM parameter chunk (``-3``, ``-4``, ``-8`` ...): u32 pad + u64 value."""
    if chunk_id not in HVM_PARAM_IDS:
        raise ValueError(f"chunk {chunk_id} is not an HVM parameter chunk")
    w.s32(chunk_id)
    w.write(_HVM_PARAM.pack(0, value))


def write_toolstack(w: StreamWriter, data: bytes) -> None:
    """``-18``: u32 length + opaque toolstack data."""
    w.s32(TOOLSTACK)
    w.u32(len(data))
    w.write(data)


def write_compressed_data(w: StreamWriter, width: int, data: bytes) -> None:
    """``-12``: ulong size + compressed page data (after ``-13``)."""
    _check_width(width)
    if len(data) > MAX_COMPRESSED_CHUNK:
        raise ValueError(f"compressed chunk of {len(data)} bytes exceeds {MAX_COMPRESSED_CHUNK}")
    w.s32(COMPRESSED_DATA)
    w.ulong(width, len(data))
    w.write(data)


def write_chunk(w: StreamWriter, chunk_id: int, payload: bytes = b"") -> None:
    """A chunk id followed by raw payload bytes (markers without payload, tests)."""
    w.s32(chunk_id)
    if payload:
        w.write(payload)


def write_end(w: StreamWriter) -> None:
    """``0``: end of the body; the tail follows."""
    w.s32(END)


def write_pv_tail(w: StreamWriter, width: int, unmapped_pfns: Sequence[int],
                  vcpu_contexts: Sequence[bytes], shared_info: bytes,
                  ext_ctx: Optional[Sequence[bytes]] = None) -> None:
    """PV tail: unmapped pfns, one context per vcpu in the ``-2`` bitmap, shared info.

    ``ext_ctx[i]`` (the ``extv`` 128 bytes and any ``xcnt`` xsave record) is
    written straight after ``vcpu_contexts[i]``.
    """
    _check_width(width)
    if len(unmapped_pfns) > MAX_UNMAPPED:
        raise UnencodableError(f"{len(unmapped_pfns)} unmapped pfns; Xen accepts at most "
                               f"{MAX_UNMAPPED}")
    if len(shared_info) != PAGE_SIZE:
        raise ValueError(f"shared info is {len(shared_info)} bytes, expected {PAGE_SIZE}")
    if ext_ctx is not None and len(ext_ctx) != len(vcpu_contexts):
        raise ValueError(f"{len(ext_ctx)} extended contexts for {len(vcpu_contexts)} vcpus")
    records = [bytes(c) + (bytes(ext_ctx[i]) if ext_ctx is not None else b"")
               for i, c in enumerate(vcpu_contexts)]
    if len({len(x) for x in records}) > 1:
        raise ValueError("every vcpu record in the tail must have the same size")
    w.u32(len(unmapped_pfns))
    if len(unmapped_pfns):
        w.write(_pack_ulongs(width, unmapped_pfns, "unmapped pfn"))
    for rec in records:
        w.write(rec)
    w.write(shared_info)


def write_hvm_tail(w: StreamWriter, magic_pfns: Sequence[int], hvm_context: bytes,
                   dm_state: bytes = b"", dm_signature: bytes = QEMU_SIGNATURE) -> None:
    """HVM tail: 3 magic pfns, HVM context, device-model record.

    With ``QemuDeviceModelRecord`` the state runs to the end of the stream, so
    nothing may be written after this.
    """
    if len(magic_pfns) != 3:
        raise ValueError(f"HVM tail needs 3 magic pfns, got {len(magic_pfns)}")
    if len(hvm_context) > MAX_HVM_CONTEXT:
        raise UnencodableError(f"HVM context of {len(hvm_context)} bytes exceeds {MAX_HVM_CONTEXT}")
    if dm_signature not in DM_SIGNATURES:
        raise ValueError(f"unknown device-model signature {dm_signature!r}")
    w.write(struct.pack("<3QI", *magic_pfns, len(hvm_context)))
    w.write(hvm_context)
    w.write(dm_signature)
    if dm_signature != QEMU_SIGNATURE:
        w.u32(len(dm_state))
    if len(dm_state):
        w.write(dm_state)


# -- marker registry ------------------------------------------------------------

class MarkerRegistry:
    """Which checkpoint plugin owns which chunk marker: the one table the reader,
    the writer and ``inspect`` consult.

    The stream has no chunk lengths, so a chunk can be skipped only by the code
    that knows its layout: every marker met in a stream must be either one of
    Xen's own ids (:data:`HOST_CHUNK_IDS`, reserved, parsed here) or owned by
    exactly one plugin. Built once per plugin manager; immutable.
    """

    host_ids = HOST_CHUNK_IDS

    def __init__(self, owners: Optional[Mapping[int, str]] = None) -> None:
        self._owners: Dict[int, str] = {}
        for marker, owner in (owners or {}).items():
            self._claim(owner, marker)

    @classmethod
    def from_declarations(cls, declared: Iterable[Tuple[str, Iterable[int]]]) -> "MarkerRegistry":
        """A registry from ``(plugin name, markers)`` pairs; a bad claim raises
        :class:`~xend_tmem.errors.PluginError` naming the plugin and the marker."""
        reg = cls()
        for owner, markers in declared:
            for marker in markers:
                reg._claim(owner, marker)
        return reg

    def _claim(self, owner: str, marker: object) -> None:
        if not isinstance(marker, int) or isinstance(marker, bool) or marker >= 0:
            raise PluginError(f"checkpoint plugin '{owner}' declares marker {marker!r}: "
                              "markers are negative chunk ids")
        if marker in HOST_CHUNK_IDS:
            raise PluginError(f"checkpoint plugin '{owner}' declares marker {marker} "
                              f"({CHUNK_NAMES[marker]}), a chunk id the host parses itself")
        if marker in self._owners:
            raise PluginError(f"checkpoint plugins '{self._owners[marker]}' and '{owner}' "
                              f"both declare marker {marker}")
        self._owners[marker] = owner

    @property
    def markers(self) -> FrozenSet[int]:
        """Every plugin-owned marker (what ``check_p2m_size`` must keep clear of)."""
        return frozenset(self._owners)

    def owner(self, marker: int) -> Optional[str]:
        """The plugin that declared ``marker``, or None."""
        return self._owners.get(marker)

    def describe(self, marker: int) -> str:
        """``-5 TMEM (plugin 'tmem')``, ``-100 (plugin 'stamp')``, ``-7 TSC_INFO``."""
        name = CHUNK_NAMES.get(marker)
        owner = self._owners.get(marker)
        return (f"{marker}" + (f" {name}" if name else "")
                + (f" (plugin '{owner}')" if owner is not None else ""))

    def unowned(self, marker: int, offset: int, *, before_header: bool = False) -> StreamError:
        """The error for a marker no enabled plugin reads: names it, its offset and,
        for a chunk Xen left to a known plugin, which plugin to enable."""
        plugin = XEN_PLUGIN_MARKERS.get(marker)
        if plugin is not None:
            if before_header:
                problem = (f"stream starts with {plugin} chunk {marker} (seed layout) at offset "
                           f"{offset} but no plugin handles {plugin}")
            else:
                problem = (f"{plugin} chunk {marker} at offset {offset} but no plugin "
                           f"handles {plugin}")
            problem += (f": enable the '{plugin}' checkpoint plugin (toolstack configuration "
                        "key checkpoint-plugins)")
        else:
            problem = (f"chunk {marker} at offset {offset}: not a chunk id Xen defined, and no "
                       "checkpoint plugin enabled here declares it")
            if self._owners:
                problem += (" (enabled plugins' markers: "
                            + ", ".join(self.describe(m)
                                        for m in sorted(self._owners, reverse=True))
                            + ")")
        return StreamError(problem, offset=offset, field="first int" if before_header
                           else "chunk id", value=marker)

    def __contains__(self, marker: object) -> bool:
        return marker in self._owners

    def __repr__(self) -> str:
        return f"MarkerRegistry({self._owners!r})"


# -- reader -------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkInfo:
    chunk_id: int
    offset: int              # stream offset of the chunk id
    size: int                # payload bytes after the id

    @property
    def name(self) -> str:
        return CHUNK_NAMES.get(self.chunk_id, str(self.chunk_id))


@dataclass
class StreamHeader:
    layout: str              # "seed" if a -5 chunk preceded p2m_size, else "released"
    p2m_size: int
    width: int               # tools' unsigned long
    guest: str               # "pv" or "hvm"
    ext_info: Dict[str, int]  # PV extended-info tag -> payload length
    vcpu_ctx_size: int       # PV: bytes per vcpu context in the tail (0 for HVM)
    guest_width: int
    p2m_frames: int          # PV frame-list entries read (0 for HVM)
    offset: int              # where the stream began
    end_offset: int          # where the body begins
    extv: bool = False
    xcnt_size: Optional[int] = None
    seed_chunk: Optional[ChunkInfo] = None
    width_inferred: bool = False   # width came from detect_width, not from the caller

    @property
    def vcpu_record_size(self) -> int:
        """Bytes per vcpu in the PV tail: context + extv + xsave record."""
        return self.vcpu_ctx_size + (EXTV_SIZE if self.extv else 0) + (self.xcnt_size or 0)

    def split_vcpu_record(self, record: bytes) -> Tuple[bytes, Optional[bytes], Optional[bytes]]:
        """One tail record as ``(context, extv 128 bytes or None, xsave or None)``.

        Xen's restore handed these to three domctls (setvcpucontext,
        set_ext_vcpucontext, setvcpuextstate); they must not travel as one blob.
        """
        if len(record) != self.vcpu_record_size:
            raise ValueError(f"vcpu record is {len(record)} bytes, the header announces "
                             f"{self.vcpu_record_size}")
        ctx_end = self.vcpu_ctx_size
        ext_end = ctx_end + (EXTV_SIZE if self.extv else 0)
        return (record[:ctx_end], record[ctx_end:ext_end] if self.extv else None,
                record[ext_end:] if self.xcnt_size is not None else None)


@dataclass(frozen=True)
class TscInfo:
    mode: int
    nsec: int
    khz: int
    incarnation: int


@dataclass
class BodyInfo:
    batches: int = 0
    entries: int = 0                 # pfn entries over all batches
    pages: int = 0                   # pages whose data was read inline
    chunks: List[Tuple[int, int]] = field(default_factory=list)   # (id, offset), non-batch
    chunks_omitted: int = 0          # beyond MAX_CHUNK_RECORDS
    vcpu_info: Optional[Tuple[int, Tuple[int, ...]]] = None        # (max_vcpu_id, words)
    tsc: Optional[TscInfo] = None
    hvm_params: Dict[int, int] = field(default_factory=dict)
    compressed: bool = False         # -13 seen: later batches carry no inline data
    compressed_pages: int = 0        # pages announced by batches after -13
    compressed_bytes: int = 0        # bytes of -12 data skipped
    toolstack_len: Optional[int] = None
    verify_mode: bool = False
    last_checkpoint: bool = False
    end_offset: int = 0              # where the tail begins


@dataclass
class Tail:
    guest: str
    unmapped_pfns: array[int] = field(default_factory=lambda: array("Q"))
    vcpus: List[int] = field(default_factory=list)
    contexts: List[bytes] = field(default_factory=list)   # one record per vcpu
    shared_info: bytes = b""
    magic_pfns: Tuple[int, ...] = ()
    hvm_context: bytes = b""
    dm_signature: Optional[bytes] = None
    dm_bytes: int = 0
    end_offset: int = 0

    @property
    def vcpu_contexts(self) -> List[Tuple[int, bytes]]:
        """``(vcpu id, context record)`` pairs, in vcpu order."""
        return list(zip(self.vcpus, self.contexts))


def online_vcpus(vcpu_info: Optional[Tuple[int, Sequence[int]]]) -> List[int]:
    """Vcpus whose context the tail carries: bits 0..max_vcpu_id of the ``-2``
    bitmap, or vcpu 0 alone when the stream had no ``-2`` chunk."""
    if vcpu_info is None:
        return [0]
    max_id, words = vcpu_info
    return [i for i in range(max_id + 1) if (words[i >> 6] >> (i & 63)) & 1]


@lru_cache(maxsize=2 * MAX_BATCH)
def _entries_struct(n: int, width: int) -> struct.Struct:
    return struct.Struct(f"<{n}{_TYPECODE[width]}")


def _need(r: StreamReader, n: int, what: str) -> None:
    if r.fill(n) < n:
        raise StreamError(f"stream ends {r.available} bytes into {what} ({n} bytes)",
                          offset=r.offset, field=what)


def detect_width(low: int, following: bytes, guest: str = "pv",
                 p2m_hint: Optional[int] = None) -> int:
    """The saving tools' ``unsigned long`` (4 or 8), inferred from the stream.

    The stream does not record it (SPEC §1-§3); this is the rule, applied to
    ``low`` (the first u32 of ``p2m_size``) and up to 12 bytes after it:

    1. PV, next u32 is 0xFFFFFFFF: 4. It is the ``~0`` that opens the
       extended info of 32-bit tools (every Xen since 3.3 writes it for PV);
       as the high half of a 64-bit ``p2m_size`` it would exceed any guest.
    2. Next u32 is 0 and, for PV, the 8 bytes after it are all ones: 8 (the
       high half of a 64-bit ``p2m_size``, then 64-bit tools' ``~0``).
    3. Next u32 is neither: 8 if ``low | next << 32`` equals ``p2m_hint``
       (the frame count the domain config's memory implies), else 4 (it is
       a 32-bit tools' first p2m frame, or HVM chunk id / batch count).
    4. Next u32 is 0 without the ext-info marker (no extended info; mfn 0
       is never a guest frame), or the stream is too short to tell: 8, the
       tools of every 64-bit dom0.

    A caller that knows better passes the width (``xm restore --width``).
    """
    if len(following) < 4:
        return 8
    nxt = int.from_bytes(following[:4], "little")
    if guest == "pv" and nxt == 0xFFFFFFFF:
        return 4
    if nxt == 0:
        return 8
    if p2m_hint is not None and (low | nxt << 32) == p2m_hint:
        return 8
    return 4


class LegacyReader:
    """Reads one legacy stream: :meth:`read_header`, :meth:`read_body`, :meth:`read_tail`.

    ``handlers[marker](reader, marker, offset)`` is called for each chunk a
    plugin owns (tmem: ``-5``/``-6``) with the marker already consumed and must
    consume exactly its payload; ``registry`` (the plugin manager's
    :class:`MarkerRegistry`) names owners in errors. Any other marker that is
    not one of Xen's ids is an error naming it and its offset.
    ``on_pages(pfns, types, data, offset)`` gets each batch: entry pfns and 4-bit
    types, a memoryview over the data of the entries that carry data (valid only
    during the call — copy what you keep) and the stream
    offset of that data. ``on_chunk`` sees every other chunk once consumed.
    """

    def __init__(self, r: Union[StreamReader, BinaryIO], width: Optional[int] = 8,
                 guest: str = "pv",
                 handlers: Optional[Mapping[int, ChunkHandler]] = None,
                 on_pages: Optional[PagesCallback] = None,
                 on_chunk: Optional[Callable[[ChunkInfo], None]] = None, *,
                 p2m_hint: Optional[int] = None,
                 registry: Optional[MarkerRegistry] = None) -> None:
        if width is not None:
            _check_width(width)
        if guest not in ("pv", "hvm"):
            raise ValueError(f"guest must be 'pv' or 'hvm', not {guest!r}")
        handlers = dict(handlers or {})
        for marker, fn in handlers.items():
            if not isinstance(marker, int) or marker >= 0 or marker in HOST_CHUNK_IDS:
                raise ValueError(f"chunk {marker!r} cannot have a handler: page batches, the "
                                 "end and Xen's own chunk ids are parsed by the host")
            if not callable(fn):
                raise ValueError(f"handler for chunk {marker} is not callable")
        self.registry = registry if registry is not None else MarkerRegistry()
        self._r = ensure_reader(r)
        # None until read_header() infers it (see detect_width)
        self.width: Optional[int] = width
        self.width_inferred = width is None
        self.p2m_hint = p2m_hint
        self.guest = guest
        self._handlers = handlers
        self._on_pages = on_pages
        self._on_chunk = on_chunk
        self.header: Optional[StreamHeader] = None
        self.body: Optional[BodyInfo] = None

    @property
    def reader(self) -> StreamReader:
        return self._r

    # -- header ----------------------------------------------------------------
    def read_header(self) -> StreamHeader:
        """``p2m_size`` (after a seed-layout ``-5``), PV extended info, p2m frame list."""
        r = self._r
        start = r.offset
        first = r.s32("p2m_size")
        layout = "released"
        seed_chunk = None
        at = start
        # chunks before p2m_size: the seed layout's -5, or any plugin's marker
        # (writers keep p2m_size clear of every plugin marker: check_p2m_size)
        while first in TMEM_MARKERS or first in self._handlers:
            if first == TMEM_EXTRA:
                raise StreamError(f"stream starts with tmem chunk {first}, which only follows "
                                  "the header: the seed layout moves only -5 before p2m_size",
                                  offset=at, field="first int", value=first)
            handler = self._handlers.get(first)
            if handler is None:
                raise self.registry.unowned(first, at, before_header=True)
            handler(r, first, at)
            chunk = ChunkInfo(first, at, r.offset - at - 4)
            if first == TMEM:
                seed_chunk = chunk
                layout = "seed"
            if self._on_chunk is not None:
                self._on_chunk(chunk)
            at = r.offset
            first = r.s32("p2m_size")
        p2m_at = at
        low = first & 0xFFFFFFFF
        if self.width is None:
            self.width = detect_width(low, r.peek(12), self.guest, self.p2m_hint)
        width = self.width
        # two unsigned halves, low first, chosen by the tools' width (SPEC §3)
        p2m_size = low
        if width == 8:
            p2m_size |= r.u32("p2m_size high half") << 32
        if not 1 <= p2m_size <= MAX_P2M_SIZE:
            raise StreamError(f"p2m_size must be 1..{MAX_P2M_SIZE:#x} frames (read as "
                              f"{8 * width}-bit tools' unsigned long: wrong width?)",
                              offset=p2m_at, field="p2m_size", value=p2m_size)

        ext_info: Dict[str, int] = {}
        extv = False
        xcnt_size: Optional[int] = None
        guest_width = width
        vcpu_ctx_size = 0
        frames = 0
        if self.guest == "pv":
            vcpu_ctx_size = VCPU_CTX_X64 if width == 8 else VCPU_CTX_X32
            fl_at = r.offset
            first_entry = r.ulong(width, "p2m frame list")
            have_first = first_entry != _ones(width)
            if not have_first:
                vcpu_ctx_size, extv, xcnt_size = self._read_ext_info(ext_info, vcpu_ctx_size)
                guest_width = VCPU_CTX_SIZES[vcpu_ctx_size]
            frames = p2m_frame_count(p2m_size, guest_width)
            # the list is untrusted-sized: consume it streaming, never allocate by it
            left = frames - (1 if have_first else 0)
            if left:
                try:
                    r.discard(left * width, "p2m frame list")
                except StreamError:
                    raise StreamError(f"stream ends {r.offset - fl_at} bytes into the p2m "
                                      f"frame list of {frames} entries ({frames * width} "
                                      f"bytes for p2m_size {p2m_size:#x})",
                                      offset=fl_at, field="p2m frame list") from None
        self.header = StreamHeader(layout, p2m_size, width, self.guest, ext_info, vcpu_ctx_size,
                                   guest_width, frames, start, r.offset, extv, xcnt_size,
                                   seed_chunk, self.width_inferred)
        return self.header

    def _read_ext_info(self, ext_info: Dict[str, int],
                       vcpu_ctx_size: int) -> Tuple[int, bool, Optional[int]]:
        r = self._r
        tot_at = r.offset
        total = r.u32("extended info length")
        if total > MAX_EXT_INFO:
            raise StreamError(f"extended info longer than {MAX_EXT_INFO} bytes",
                              offset=tot_at, field="extended info length", value=total)
        extv = False
        xcnt_size: Optional[int] = None
        left = total
        while left:
            blk_at = r.offset
            if left < 8:
                raise StreamError(f"{left} bytes left in the extended info, too few for a "
                                  "block header", offset=blk_at, field="extended info")
            _need(r, 8, "extended info block header")
            raw_tag, length = _EXT_BLOCK.unpack_from(r.buf, r.pos)
            r.skip(8)
            left -= 8
            tag = raw_tag.decode("latin-1")
            if length > left:
                raise StreamError(f"block {raw_tag!r} overruns the extended info "
                                  f"({left} bytes left)", offset=blk_at + 4,
                                  field=f"{tag} block length", value=length)
            if raw_tag == b"vcpu":
                if length not in VCPU_CTX_SIZES:
                    raise StreamError(f"vcpu context size must be {VCPU_CTX_X64} (64-bit "
                                      f"guest) or {VCPU_CTX_X32} (32-bit guest)",
                                      offset=blk_at + 4, field="vcpu block length",
                                      value=length)
                vcpu_ctx_size = length
                r.discard(length, "extended info vcpu context")
            elif raw_tag == b"extv":
                extv = True
                r.discard(length, "extended info extv block")
            elif raw_tag == b"xcnt":
                if length < 4:
                    raise StreamError("xcnt block too short for its u32 size",
                                      offset=blk_at + 4, field="xcnt block length",
                                      value=length)
                size_at = r.offset
                xcnt_size = r.u32("xcnt xsave size")
                if xcnt_size > MAX_XSAVE:
                    raise StreamError(f"xsave record larger than {MAX_XSAVE} bytes",
                                      offset=size_at, field="xcnt xsave size", value=xcnt_size)
                r.discard(length - 4, "extended info xcnt block")
            else:
                r.discard(length, f"extended info {tag!r} block")
            ext_info[tag] = length
            left -= length
        return vcpu_ctx_size, extv, xcnt_size

    def _known_width(self) -> int:
        """The tools' width: given, or detected by :meth:`read_header`."""
        assert self.width is not None, "read_header() comes first"
        return self.width

    # -- body ------------------------------------------------------------------
    def read_body(self) -> BodyInfo:
        """The chunk loop up to and including the ``0`` that ends the body."""
        if self.header is None:
            raise RuntimeError("read_header() must come before read_body()")
        r, width = self._r, self._known_width()
        info = BodyInfo()
        self.body = info
        while True:
            at = r.offset
            n = r.s32("chunk id")
            if n > 0:
                if n > MAX_BATCH:
                    raise StreamError(f"page batch of {n} entries; at most {MAX_BATCH} allowed",
                                      offset=at, field="batch count", value=n)
                self._read_batch(n, info)
                continue
            if n == END:
                self._record(info, n, at)
                info.end_offset = r.offset
                return info
            if n in HVM_PARAM_IDS:
                _need(r, 12, CHUNK_NAMES[n])
                info.hvm_params[n] = _HVM_PARAM.unpack_from(r.buf, r.pos)[1]
                r.skip(12)
            elif n in self._handlers:
                self._handlers[n](r, n, at)
            elif n == VCPU_INFO:
                info.vcpu_info = self._read_vcpu_info()
            elif n == TSC_INFO:
                _need(r, _TSC.size, "TSC_INFO")
                info.tsc = TscInfo(*_TSC.unpack_from(r.buf, r.pos))
                r.skip(_TSC.size)
            elif n == ENABLE_VERIFY_MODE:
                info.verify_mode = True
            elif n == LAST_CHECKPOINT:
                info.last_checkpoint = True
            elif n == ENABLE_COMPRESSION:
                info.compressed = True
            elif n == COMPRESSED_DATA:
                size_at = r.offset
                size = r.ulong(width, "compressed data size")
                if size > MAX_COMPRESSED_CHUNK:
                    raise StreamError(f"compressed chunk larger than {MAX_COMPRESSED_CHUNK} bytes",
                                      offset=size_at, field="compressed data size", value=size)
                r.discard(size, "compressed data")
                info.compressed_bytes += size
            elif n == TOOLSTACK:
                length = r.u32("toolstack data length")
                r.discard(length, "toolstack data")
                info.toolstack_len = length
            else:
                raise self.registry.unowned(n, at)
            self._record(info, n, at)

    def _record(self, info: BodyInfo, n: int, at: int) -> None:
        if len(info.chunks) < MAX_CHUNK_RECORDS:
            info.chunks.append((n, at))
        else:
            info.chunks_omitted += 1
        if self._on_chunk is not None:
            self._on_chunk(ChunkInfo(n, at, self._r.offset - at - 4))

    def _read_vcpu_info(self) -> Tuple[int, Tuple[int, ...]]:
        r = self._r
        id_at = r.offset
        max_id = r.s32("max_vcpu_id")
        if not 0 <= max_id < MAX_VCPUS:
            raise StreamError(f"max_vcpu_id must be 0..{MAX_VCPUS - 1}", offset=id_at,
                              field="max_vcpu_id", value=max_id)
        nwords = max_id // 64 + 1
        _need(r, 8 * nwords, "vcpu bitmap")
        words = struct.unpack_from(f"<{nwords}Q", r.buf, r.pos)
        r.skip(8 * nwords)
        return max_id, words

    def _read_batch(self, n: int, info: BodyInfo) -> None:
        r, width = self._r, self._known_width()
        nb = n * width
        _need(r, nb, "page batch pfn entries")
        ents_at = r.offset
        entries = _entries_struct(n, width).unpack_from(r.buf, r.pos)
        r.skip(nb)
        if width == 8 and max(entries) >> 32:
            i = next(i for i, e in enumerate(entries) if e >> 32)
            raise StreamError("pfn entry has bits above 31 set", offset=ents_at + 8 * i,
                              field="pfn entry", value=entries[i])
        pfns = [e & PFN_MASK for e in entries]
        assert self.header is not None     # read_body() refuses to start without it
        p2m_size = self.header.p2m_size
        if max(pfns) >= p2m_size:
            i = next(i for i, p in enumerate(pfns) if p >= p2m_size)
            raise StreamError(f"pfn {pfns[i]:#x} is outside p2m_size {p2m_size:#x}",
                              offset=ents_at + width * i, field="pfn entry", value=entries[i])
        types = [e >> TYPE_SHIFT for e in entries]
        ndata = n - (types.count(TYPE_XTAB) + types.count(TYPE_XALLOC)
                     + types.count(TYPE_BROKEN))
        info.batches += 1
        info.entries += n
        if info.compressed:
            # after -13 the data of these pages arrives in -12 chunks
            info.compressed_pages += ndata
            return
        nbytes = ndata * PAGE_SIZE
        data_at = r.offset
        if nbytes:
            _need(r, nbytes, f"page data of a {n}-entry batch")
        if self._on_pages is not None:
            view = memoryview(r.buf)[r.pos:r.pos + nbytes]
            try:
                self._on_pages(pfns, types, view, data_at)
            finally:
                view.release()
        r.skip(nbytes)
        info.pages += ndata

    # -- tail ------------------------------------------------------------------
    def read_tail(self, body: Optional[BodyInfo] = None,
                  dm_sink: Optional[Callable[[memoryview], None]] = None) -> Tail:
        """The tail after ``0``. For HVM, ``dm_sink`` receives the device-model
        state in pieces (each view valid only during the call)."""
        if self.header is None:
            raise RuntimeError("read_header() must come before read_tail()")
        body = body if body is not None else self.body
        if self.header.guest == "pv":
            return self._read_pv_tail(body)
        return self._read_hvm_tail(dm_sink)

    def _read_pv_tail(self, body: Optional[BodyInfo]) -> Tail:
        r, width, h = self._r, self._known_width(), self.header
        assert h is not None
        count_at = r.offset
        count = r.u32("unmapped pfn count")
        limit = min(MAX_UNMAPPED, h.p2m_size)
        if count > limit:
            raise StreamError(f"more unmapped pfns than {limit} (p2m_size {h.p2m_size:#x}, "
                              f"Xen's limit {MAX_UNMAPPED:#x})", offset=count_at,
                              field="unmapped pfn count", value=count)
        pfns = array("Q")
        left = count
        per = CHUNK // width
        tc = _TYPECODE[width]
        while left:
            step = min(left, per)
            nb = step * width
            _need(r, nb, "unmapped pfns")
            part = array(tc)
            part.frombytes(r.buf[r.pos:r.pos + nb])
            if _BIG_ENDIAN:
                part.byteswap()
            if max(part) >= h.p2m_size:
                i = next(i for i, p in enumerate(part) if p >= h.p2m_size)
                raise StreamError(f"unmapped pfn outside p2m_size {h.p2m_size:#x}",
                                  offset=r.offset + width * i, field="unmapped pfn",
                                  value=part[i])
            if tc == "Q":
                pfns.extend(part)
            else:
                pfns.fromlist(part.tolist())
            r.skip(nb)
            left -= step
        vcpus = online_vcpus(body.vcpu_info if body is not None else None)
        size = h.vcpu_record_size
        contexts = [r.read_exact(size, f"vcpu {v} context") for v in vcpus]
        shared_info = r.read_exact(PAGE_SIZE, "shared info page")
        return Tail("pv", pfns, vcpus, contexts, shared_info, end_offset=r.offset)

    def _read_hvm_tail(self, dm_sink: Optional[Callable[[memoryview], None]]) -> Tail:
        r = self._r
        _need(r, 24, "HVM magic pfns")
        magic = struct.unpack_from("<3Q", r.buf, r.pos)
        r.skip(24)
        len_at = r.offset
        length = r.u32("HVM context length")
        if length > MAX_HVM_CONTEXT:
            raise StreamError(f"HVM context larger than {MAX_HVM_CONTEXT} bytes",
                              offset=len_at, field="HVM context length", value=length)
        context = r.read_exact(length, "HVM context")
        sig_at = r.offset
        sig = r.read_exact(len(QEMU_SIGNATURE), "device-model signature")
        if sig == QEMU_SIGNATURE:
            dm_bytes = self._pump(None, dm_sink)
        elif sig in (DM_RECORD_0002, REMUS_DM_STATE):
            dm_len = r.u32("device-model state length")
            dm_bytes = self._pump(dm_len, dm_sink)
        else:
            raise StreamError(f"unknown device-model signature {sig!r}", offset=sig_at,
                              field="device-model signature")
        return Tail("hvm", magic_pfns=magic, hvm_context=context, dm_signature=sig,
                    dm_bytes=dm_bytes, end_offset=r.offset)

    def _pump(self, length: Optional[int], sink: Optional[Callable[[memoryview], None]]) -> int:
        """Pass ``length`` bytes (None: up to EOF) to ``sink`` in bounded pieces."""
        r = self._r
        start = r.offset
        done = 0
        while length is None or done < length:
            want = CHUNK if length is None else min(CHUNK, length - done)
            got = min(r.fill(want), want)
            if got == 0:
                if length is None:
                    break
                raise StreamError(f"stream ends {done} bytes into {length} bytes of "
                                  "device-model state", offset=start, field="device-model state")
            if sink is not None:
                view = memoryview(r.buf)[r.pos:r.pos + got]
                try:
                    sink(view)
                finally:
                    view.release()
            r.skip(got)
            done += got
        return done


def read_stream(r: Union[StreamReader, BinaryIO], width: Optional[int] = 8, guest: str = "pv",
                handlers: Optional[Mapping[int, ChunkHandler]] = None,
                on_pages: Optional[PagesCallback] = None,
                on_chunk: Optional[Callable[[ChunkInfo], None]] = None,
                dm_sink: Optional[Callable[[memoryview], None]] = None,
                ) -> Tuple[StreamHeader, BodyInfo, Tail]:
    """Header, body and tail of one legacy stream."""
    reader = LegacyReader(r, width, guest, handlers, on_pages, on_chunk)
    header = reader.read_header()
    body = reader.read_body()
    return header, body, reader.read_tail(body, dm_sink)


__all__ = [
    "PAGE_SIZE", "MAX_BATCH", "TMEM_MARKERS", "HOST_CHUNK_IDS", "XEN_PLUGIN_MARKERS",
    "MarkerRegistry", "HVM_PARAM_IDS", "CHUNK_NAMES",
    "DM_SIGNATURES", "UnencodableError", "check_p2m_size", "write_p2m_size", "write_pv_ext_info",
    "write_p2m_frame_list", "p2m_frame_count", "write_page_batch", "write_vcpu_info",
    "write_tsc_info", "write_hvm_param", "write_toolstack", "write_compressed_data",
    "write_chunk", "write_end", "write_pv_tail", "write_hvm_tail", "ChunkInfo", "StreamHeader",
    "TscInfo", "BodyInfo", "Tail", "online_vcpus", "LegacyReader", "read_stream", "detect_width",
    "EXTV_SIZE",
]
