"""Test-only framer: whole xend PV images as Xen 4.0's ``xc_domain_save`` framed them.

Written from SPEC §1-§4 alone; it imports nothing from ``xend_tmem``, so a
misreading shared by the project's writer and reader cannot hide here. Given a
golden vector directory (``chunks.bin``: the ``-5`` chunk and, for live saves,
the ``-6`` chunk Xen wrote) it builds the image around those exact bytes:

    "LinuxGuestRecord", BE s32 config length, SXP config,
    [seed layout: -5 chunk]
    p2m_size (ulong), ~0, u32 ext length, "vcpu" ctx, "extv", ["xcnt"],
    p2m frame list (ceil(p2m_size / (4096 / guest word)) ulongs),
    [released layout: -5 chunk]
    non-live: -7, page batches          | live: rounds of page batches, suspend,
                                        |       -6, -7, last round's batches
    -2 (4.0: one bitmap word), 0,
    tail: u32 unmapped count + ulongs, per vcpu context + 128 extv [+ xsave],
          4096-byte shared info.

``ulong`` is the saving tools' word (``width`` 4 or 8). The expected guest
state (RAM as last sent, vcpu records, shared info) comes back with the image
so a test can compare what the restore built.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

SIGNATURE = b"LinuxGuestRecord"
QEMU_SIGNATURE = b"QemuDeviceModelRecord"
PAGE = 4096
CTX_X64, CTX_X32 = 5168, 2800
EXTV = 128
# page types in bits 28-31 of a batch entry (XEN_DOMCTL_PFINFO_*)
NOTAB, L1TAB, L2TAB, L3TAB, L4TAB, LPINTAB, XTAB = 0x0, 0x1, 0x2, 0x3, 0x4, 0x8, 0xF
TMEM, TMEM_EXTRA, TSC_INFO, VCPU_INFO = -5, -6, -7, -2
BATCH = 1024


# -- chunks.bin ------------------------------------------------------------------

def split_chunks(data: bytes) -> Tuple[bytes, bytes]:
    """``chunks.bin`` as (the ``-5`` chunk, the ``-6`` chunk or b"").

    The ``-5`` chunk has no length field: walk it per SPEC §4 (header, pool
    records each followed by up to n_pages page records or an all-ones OID,
    then the u32 0xFFFFFFFF pool-list terminator).
    """
    def u32(at: int) -> int:
        if at + 4 > len(data):
            raise ValueError(f"chunks.bin ends inside the -5 chunk at offset {at}")
        return struct.unpack_from("<I", data, at)[0]

    marker, version = struct.unpack_from("<iI", data, 0)
    if marker != TMEM:
        raise ValueError(f"chunks.bin starts with {marker}, not the -5 chunk")
    if version not in (0, 1):
        raise ValueError(f"-5 chunk version {version}")
    oid_len = 8 if version == 0 else 24
    pos = 32                  # marker, version, max_pools, sep, flags, weight, cap, sep
    while True:
        pool_id = u32(pos)
        if pool_id == 0xFFFFFFFF:
            pos += 4
            break
        flags, n_pages = u32(pos + 4), u32(pos + 8)
        pos += 28             # id, flags, n_pages, uuid[2]
        page_size = PAGE << ((flags >> 4) & 0xF)
        for _ in range(n_pages):
            if data[pos:pos + oid_len] == b"\xff" * oid_len:
                pos += oid_len
                break
            pos += oid_len + 4 + page_size
        if pos > len(data):
            raise ValueError("chunks.bin ends inside a pool's page records")
    rest = data[pos:]
    if rest and struct.unpack_from("<i", rest, 0)[0] != TMEM_EXTRA:
        raise ValueError(f"after the -5 chunk comes {rest[:4].hex()}, not the -6 chunk")
    return data[:pos], rest


# -- guest state ---------------------------------------------------------------------

def _page(tag: str) -> bytes:
    return hashlib.blake2b(tag.encode(), digest_size=64).digest() * (PAGE // 64)


@dataclass
class Guest:
    """What the source domain held; the image carries it and a restore must rebuild it."""

    name: str
    memory_mib: int
    vcpus: int
    ctx_size: int
    ram: Dict[int, bytes] = field(default_factory=dict)       # pfn -> page as last sent
    contexts: List[bytes] = field(default_factory=list)
    ext: List[bytes] = field(default_factory=list)
    xsave: List[bytes] = field(default_factory=list)
    shared_info: bytes = b""
    unmapped: List[int] = field(default_factory=list)

    @property
    def p2m_size(self) -> int:
        return self.memory_mib * 256

    def ram_bytes(self) -> bytes:
        """The whole RAM as a restore must leave it (unsent pages are zero)."""
        zero = bytes(PAGE)
        return b"".join(self.ram.get(p, zero) for p in range(self.p2m_size))


@dataclass
class Framed:
    data: bytes
    guest: Guest
    width: int
    layout: str
    live: bool


def _ulongs(width: int, values) -> bytes:
    return struct.pack(f"<{len(values)}{'I' if width == 4 else 'Q'}", *values)


def sxp_config(name: str, memory_mib: int, vcpus: int, hvm: bool = False) -> bytes:
    image = ("(image (hvm (kernel /usr/lib/xen/boot/hvmloader) (device_model "
             "/usr/lib/xen/bin/qemu-dm)))" if hvm else
             "(image (linux (kernel /boot/vmlinuz-2.6.32-5-xen-amd64) (args root=/dev/xvda1)))")
    return (f"(domain (domid 3) (uuid 6c3b0a8e-1f1e-4b9a-9f3e-0d2b2f7a5c11) (name {name}) "
            f"(memory {memory_mib}) (maxmem {memory_mib}) (vcpus {vcpus}) "
            f"(on_poweroff destroy) (on_reboot restart) (on_crash restart) {image} "
            f"(device (vbd (uname file:/srv/{name}.img) (dev xvda1) (mode w))))").encode()


def _batches(width: int, entries: List[Tuple[int, int]], pages: Dict[int, bytes]) -> bytes:
    """Page batches of at most 100 entries (Xen's were up to 1024): count,
    ``type << 28 | pfn`` ulongs, then 4096 bytes per entry that is not XTAB."""
    out = []
    for i in range(0, len(entries), 100):
        part = entries[i:i + 100]
        out.append(struct.pack("<i", len(part)))
        out.append(_ulongs(width, [(t << 28) | p for p, t in part]))
        out.extend(pages[p] for p, t in part if t != XTAB)
    return b"".join(out)


def frame(vector: Path, *, layout: str = "released", width: int = 8, live: bool = False,
          ctx_size: int = CTX_X64, xcnt: Optional[int] = None, name: str = "xenvm",
          memory_mib: int = 3, vcpus: int = 2) -> Framed:
    """A whole xend PV image around ``vector/chunks.bin``.

    ``live`` frames a live save (rounds, then ``-6`` after suspend: the
    vector's own, or the empty list Xen wrote when nothing was invalidated);
    a vector that carries ``-6`` can only be framed live. ``xcnt`` adds a 4.1
    xsave record of that many bytes per vcpu.
    """
    if layout not in ("released", "seed"):
        raise ValueError(layout)
    if width not in (4, 8) or ctx_size not in (CTX_X64, CTX_X32):
        raise ValueError((width, ctx_size))
    tmem, extra = split_chunks((vector / "chunks.bin").read_bytes())
    if extra and not live:
        raise ValueError(f"{vector} carries a -6 chunk: Xen wrote it only in live saves")
    if live and not extra:
        extra = struct.pack("<iI", TMEM_EXTRA, 0xFFFFFFFF)
    g = Guest(name, memory_mib, vcpus, ctx_size)
    p2m = g.p2m_size
    key = f"{vector.parent.name}/{vector.name}:{layout}:{width}:{live}:{ctx_size}"
    g.contexts = [hashlib.shake_256(f"{key}:ctx{v}".encode()).digest(ctx_size) for v in range(vcpus)]
    g.ext = [hashlib.shake_256(f"{key}:extv{v}".encode()).digest(EXTV) for v in range(vcpus)]
    g.xsave = ([hashlib.shake_256(f"{key}:xsave{v}".encode()).digest(xcnt) for v in range(vcpus)]
               if xcnt is not None else [])
    g.shared_info = hashlib.shake_256(f"{key}:shinfo".encode()).digest(PAGE)

    # page types: some page-table pages (pinned or not), invalid pages as XTAB
    types = {p: (XTAB if p % 97 == 13 else L1TAB if p % 11 == 1 else L2TAB if p % 53 == 2
                 else L4TAB | LPINTAB if p == 5 else NOTAB) for p in range(p2m)}
    g.unmapped = [p for p in range(p2m) if types[p] == XTAB]

    out = [SIGNATURE]
    cfg = sxp_config(name, memory_mib, vcpus)
    out += [struct.pack(">i", len(cfg)), cfg]
    if layout == "seed":
        out.append(tmem)
    out.append(_ulongs(width, [p2m]))
    blocks = struct.pack("<4sI", b"vcpu", ctx_size) + g.contexts[0]
    blocks += struct.pack("<4sI", b"extv", 0)
    if xcnt is not None:
        blocks += struct.pack("<4sIII", b"xcnt", 8, xcnt, 0)
    out += [_ulongs(width, [(1 << (8 * width)) - 1]), struct.pack("<I", len(blocks)), blocks]
    per_frame = PAGE // (8 if ctx_size == CTX_X64 else 4)
    frames = -(-p2m // per_frame)
    out.append(_ulongs(width, [0x1a2b0 + i for i in range(frames)]))
    if layout == "released":
        out.append(tmem)
    tsc = struct.pack("<iIQII", TSC_INFO, 0, 0, 0, 0)

    def send(pfns: List[int], gen: str) -> bytes:
        pages = {p: _page(f"{key}:{gen}:{p}") for p in pfns if types[p] != XTAB}
        g.ram.update(pages)
        return _batches(width, [(p, types[p]) for p in pfns], pages)

    if live:
        out.append(send(list(range(p2m)), "round1"))
        out.append(send([p for p in range(p2m) if p % 7 == 3], "round2"))
        out += [extra, tsc]                               # suspended
        out.append(send([p for p in range(p2m) if p % 29 == 4], "last"))
    else:
        out.append(tsc)
        out.append(send(list(range(p2m)), "round1"))
    out.append(struct.pack("<iiQ", VCPU_INFO, vcpus - 1, (1 << vcpus) - 1))
    out.append(struct.pack("<i", 0))
    out += [struct.pack("<I", len(g.unmapped)), _ulongs(width, g.unmapped)]
    for v in range(vcpus):
        out += [g.contexts[v], g.ext[v]] + ([g.xsave[v]] if xcnt is not None else [])
    out.append(g.shared_info)
    return Framed(b"".join(out), g, width, layout, live)


def frame_hvm(name: str = "hvmvm", memory_mib: int = 1, width: int = 8) -> bytes:
    """A small HVM image: no extended info, one batch, HVM tail, qemu record."""
    p2m = memory_mib * 256
    cfg = sxp_config(name, memory_mib, 1, hvm=True)
    out = [SIGNATURE, struct.pack(">i", len(cfg)), cfg, _ulongs(width, [p2m])]
    out.append(struct.pack("<iIQ", -3, 0, 0xFEFFC))          # HVM_IDENT_PT
    out.append(_batches(width, [(0, NOTAB)], {0: _page("hvm:0")}))
    out.append(struct.pack("<i", 0))
    ctx = b"\x01" * 64
    out += [struct.pack("<3QI", 0xFEFFE, 0xFEFFF, 0xFEFFD, len(ctx)), ctx, QEMU_SIGNATURE,
            b"qemu device model state"]
    return b"".join(out)


def tmem_chunk(version: int, pools: List[Tuple[int, int, List[Tuple[int, int, bytes]]]],
               client_flags: int = 0, weight: int = 0, cap: int = 0) -> bytes:
    """A ``-5`` chunk per SPEC §4: ``pools`` = [(pool_id, flags, [(oid, index, data)])]
    (for tests of what Xen wrote but x86 cannot hold, e.g. 64 KiB pages)."""
    out = [struct.pack("<iIIIIIII", TMEM, version, 16, 0xFFFFFFFF, client_flags, weight, cap,
                       0xFFFFFFFF)]
    for pool_id, flags, pages in pools:
        out.append(struct.pack("<IIIQQ", pool_id, flags, len(pages), 0, 0))
        for oid, index, data in pages:
            out.append(struct.pack("<Q", oid) if version == 0 else struct.pack("<QQQ", oid, 0, 0))
            out += [struct.pack("<I", index), data]
    out.append(struct.pack("<I", 0xFFFFFFFF))
    return b"".join(out)
