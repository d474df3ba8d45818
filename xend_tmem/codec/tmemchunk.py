"""The tmem chunks of Xen's legacy save stream: ``-5`` TMEM and ``-6`` TMEM_EXTRA.

Byte layout (SPEC §4, §5), little-endian, unpadded::

    -5: s32 -5, u32 version, u32 max_pools, u32 ~0, u32 client flags, u32 weight,
        u32 cap, u32 ~0, pool records..., u32 ~0
        pool: u32 pool_id, u32 flags, u32 n_pages, u64 uuid[2],
              up to n_pages x (OID, u32 index, page data), then an all-ones OID
              only if fewer than n_pages were written
    -6: s32 -6, n x (u32 pool_id, OID, u32 index), u32 ~0

OID is one u64 in version 0 and three u64 in version 1. Every validation Xen
skipped (T3, T5) is done here, naming the field, its value and its offset.
Page records travel as opaque wire-layout buffers: the hypervisor's batched
walk produces them and its batched put consumes them, so page data never
becomes one Python object per page.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Iterable, Iterator, List, Optional, Protocol,
                    Sequence, Tuple)

from ..binio import StreamReader, StreamWriter
from ..errors import SaveError, StreamError
from ..xen import (TMEM, TMEM_EXTRA, TMEM_MARKERS, SEPARATOR, MAX_POOLS, TMEM_SPEC_VERSIONS,
                   PAGE_SIZE, OID_BYTES_V0, OID_BYTES_V1, POOL_PERSIST, POOL_SHARED,
                   POOL_PRECOMPRESSED, POOL_PAGEBITS_SHIFT, POOL_VERSION_SHIFT, POOL_RESERVED,
                   CLIENT_COMPRESS, CLIENT_FROZEN, CLIENT_RESERVED)

if TYPE_CHECKING:
    from ..binio import Buffer

OID = Tuple[int, int, int]

_HDR = struct.Struct("<iIIIIIII")
_POOL = struct.Struct("<IIIQQ")
_U32 = struct.Struct("<I")


def oid_len(version: int) -> int:
    return OID_BYTES_V0 if version == 0 else OID_BYTES_V1


def terminator(version: int) -> bytes:
    """The all-ones OID that ends a pool's page list early."""
    return b"\xff" * oid_len(version)


def record_size(version: int, page_size: int) -> int:
    return oid_len(version) + 4 + page_size


def encode_oid(version: int, oid: OID) -> bytes:
    if version == 0:
        if oid[1] or oid[2]:
            raise SaveError(f"OID {format_oid(1, oid)} does not fit a tmem spec version 0 stream")
        return struct.pack("<Q", oid[0])
    return struct.pack("<QQQ", *oid)


def decode_oid(version: int, raw: bytes) -> OID:
    if version == 0:
        return (struct.unpack_from("<Q", raw)[0], 0, 0)
    return struct.unpack_from("<QQQ", raw)


def format_oid(version: int, oid: OID) -> str:
    if version == 0:
        return f"{oid[0]:#018x}"
    return ":".join(f"{part:#018x}" for part in oid)


@dataclass(frozen=True)
class ClientRecord:
    """The ``-5`` chunk's header: the tmem client's settings."""

    version: int
    max_pools: int
    flags: int
    weight: int
    cap: int

    @property
    def compress(self) -> bool:
        return bool(self.flags & CLIENT_COMPRESS)

    @property
    def frozen(self) -> bool:
        return bool(self.flags & CLIENT_FROZEN)


@dataclass(frozen=True)
class PoolRecord:
    pool_id: int
    flags: int
    n_pages: int
    uuid: Tuple[int, int]

    @property
    def persistent(self) -> bool:
        return bool(self.flags & POOL_PERSIST)

    @property
    def shared(self) -> bool:
        return bool(self.flags & POOL_SHARED)

    @property
    def precompressed(self) -> bool:
        return bool(self.flags & POOL_PRECOMPRESSED)

    @property
    def pagebits(self) -> int:
        return (self.flags >> POOL_PAGEBITS_SHIFT) & 0xF

    @property
    def page_size(self) -> int:
        return PAGE_SIZE << self.pagebits

    @property
    def spec_version(self) -> int:
        return (self.flags >> POOL_VERSION_SHIFT) & 0xFF


def describe_pool_flags(flags: int) -> str:
    """Human-readable flags, for ``inspect``."""
    words = ["persistent" if flags & POOL_PERSIST else "ephemeral"]
    if flags & POOL_SHARED:
        words.append("shared")
    if flags & POOL_PRECOMPRESSED:
        words.append("precompressed")
    words.append(f"page={PAGE_SIZE << ((flags >> POOL_PAGEBITS_SHIFT) & 0xF)}")
    words.append(f"specver={(flags >> POOL_VERSION_SHIFT) & 0xFF}")
    return ",".join(words)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------

def write_client(w: StreamWriter, client: ClientRecord) -> None:
    """The ``-5`` marker and client header."""
    w.write(_HDR.pack(TMEM, client.version, client.max_pools, SEPARATOR,
                      client.flags, client.weight, client.cap, SEPARATOR))


def write_pool(w: StreamWriter, pool: PoolRecord) -> None:
    if not pool.persistent and pool.n_pages:
        raise SaveError(f"pool {pool.pool_id} is ephemeral but announces {pool.n_pages} pages")
    w.write(_POOL.pack(pool.pool_id, pool.flags, pool.n_pages, pool.uuid[0], pool.uuid[1]))


def records_before_terminator(buf: Buffer, pos: int, limit: int, rec: int, ones: bytes) -> int:
    """How many of the ``limit`` whole records at ``pos`` precede one whose OID is
    the terminator. A strided slice takes each record's first byte in one C call,
    so only records starting with 0xff are compared in Python."""
    mv = memoryview(buf)
    firsts = mv[pos:pos + limit * rec:rec].tobytes()
    k = firsts.find(0xFF)
    olen = len(ones)
    while k >= 0:
        at = pos + k * rec
        if mv[at:at + olen] == ones:
            return k
        k = firsts.find(0xFF, k + 1)
    return limit


def check_records(version: int, records: Buffer, count: int, page_size: int, pool_id: int) -> None:
    """Refuse a batch holding a real all-ones OID (T4): the format cannot carry it."""
    mv = memoryview(records).cast("B")
    rec = record_size(version, page_size)
    if mv.nbytes != rec * count:
        raise SaveError(f"pool {pool_id}: page batch of {mv.nbytes} bytes is not "
                        f"{count} records of {rec} bytes")
    k = records_before_terminator(mv, 0, count, rec, terminator(version))
    if k < count:
        idx = struct.unpack_from("<I", mv, k * rec + oid_len(version))[0]
        raise SaveError(f"pool {pool_id} holds a page with the all-ones OID (index {idx}); "
                        "the tmem stream format reserves that OID as its terminator")


def write_page_records(w: StreamWriter, version: int, records: Buffer, count: int,
                       page_size: int, pool_id: int) -> None:
    """Write ``count`` wire-layout page records (after the T4 check)."""
    if count:
        check_records(version, records, count, page_size, pool_id)
        w.write(records)


def write_page(w: StreamWriter, version: int, oid: OID, index: int, data: bytes) -> None:
    raw = encode_oid(version, oid)
    if raw == terminator(version):
        raise SaveError(f"page with the all-ones OID (index {index}) cannot be saved: the "
                        "tmem stream format reserves that OID as its terminator")
    w.write(raw + _U32.pack(index))
    w.write(data)


def write_pages_end(w: StreamWriter, version: int) -> None:
    """Terminator for a pool that delivered fewer pages than it announced."""
    w.write(terminator(version))


def write_pool_list_end(w: StreamWriter) -> None:
    w.u32(SEPARATOR)


def encode_invalidation(version: int, pool_id: int, oid: OID, index: int) -> bytes:
    return _U32.pack(pool_id) + encode_oid(version, oid) + _U32.pack(index)


def write_extra(w: StreamWriter, version: int,
                entries: Iterable[Tuple[int, OID, int]]) -> int:
    """A whole ``-6`` chunk; returns how many invalidations it carried."""
    w.s32(TMEM_EXTRA)
    n = 0
    parts: List[bytes] = []
    for pool_id, oid, index in entries:
        parts.append(encode_invalidation(version, pool_id, oid, index))
        n += 1
        if len(parts) >= 4096:
            w.write(b"".join(parts))
            parts.clear()
    if parts:
        w.write(b"".join(parts))
    w.u32(SEPARATOR)
    return n


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

class ChunkVisitor(Protocol):
    """What a reader reports, in stream order. Buffers are valid only during the call.

    Page records go one of two ways. :meth:`pages` hands over records the
    reader buffered. Before a batch the reader first offers the visitor to
    lend it slots (:meth:`page_slots`): a visitor that does (a hypervisor's
    store) has the records read straight into them and is told how many by
    :meth:`pages_lent`; one that declines (``None``) gets :meth:`pages`.
    A visitor subclassing this class inherits the declining
    :meth:`page_slots`."""

    def client(self, rec: ClientRecord, offset: int) -> None: ...
    def pool(self, rec: PoolRecord, offset: int) -> None: ...
    def pages(self, pool: PoolRecord, records: memoryview, count: int, offset: int) -> None: ...
    def pool_end(self, pool: PoolRecord, received: int, terminated: bool) -> None: ...
    def invalidations(self, entries: Sequence[Tuple[int, OID, int]], offset: int) -> None: ...
    def end(self, marker: int, offset: int) -> None: ...

    def page_slots(self, pool: PoolRecord, max_count: int) -> Optional[memoryview]:
        """A writable view of up to ``max_count`` record slots of ``pool`` for the
        next records to be read into, or ``None`` to decline (this default):
        the records then come by :meth:`pages`. A visitor that declines once
        is not asked again in that pool."""
        return None

    def pages_lent(self, pool: PoolRecord, count: int, offset: int) -> None:
        """The first ``count`` records read into the slots :meth:`page_slots`
        lent are complete (0: give them back); ``offset`` is the first one's.
        Called only after :meth:`page_slots` lent slots: a visitor that
        declines never gets it (this default says so if it does)."""
        raise RuntimeError(f"{type(self).__name__} was told of records read into slots "
                           f"it never lent")


class ChunkOrder:
    """Stream-level rules: at most one ``-5``; ``-6`` only after a ``-5``."""

    def __init__(self) -> None:
        self.client: Optional[ClientRecord] = None

    def see(self, marker: int, offset: int) -> None:
        if marker == TMEM and self.client is not None:
            raise StreamError("a second tmem chunk (-5): a stream carries at most one",
                              offset=offset, field="marker", value=marker)
        if marker == TMEM_EXTRA and self.client is None:
            raise StreamError("tmem invalidations (-6) before any tmem chunk (-5)",
                              offset=offset, field="marker", value=marker)

    @property
    def version(self) -> int:
        assert self.client is not None     # see() refuses a -6 before the -5
        return self.client.version

    @property
    def max_pools(self) -> int:
        assert self.client is not None
        return self.client.max_pools


# Page records handed to the visitor at once (a restore's batched put). Through
# the hypervisor process, 4 MiB batches restored 1 GiB with page checks in
# 1.44-1.54 s where 1 MiB batches took 2.15-2.21 s (benchmarks/README.md,
# PERF6f); 8 MiB was no faster.
BATCH_BYTES = 4 << 20


def read_client(r: StreamReader) -> ClientRecord:
    """The client header after the ``-5`` marker (already consumed)."""
    off = r.offset
    version = r.u32("version")
    if version not in TMEM_SPEC_VERSIONS:
        raise StreamError("tmem spec version must be 0 or 1", offset=off, field="version",
                          value=version)
    off = r.offset
    max_pools = r.u32("max_pools")
    if max_pools > MAX_POOLS:
        raise StreamError(f"more than {MAX_POOLS} pools per client", offset=off,
                          field="max_pools", value=max_pools)
    _separator(r, "separator after max_pools")
    off = r.offset
    flags = r.u32("client flags")
    if flags & CLIENT_RESERVED:
        raise StreamError("reserved client flag bits set (only COMPRESS and FROZEN exist)",
                          offset=off, field="client flags", value=flags)
    weight = r.u32("weight")
    cap = r.u32("cap")
    _separator(r, "separator after cap")
    return ClientRecord(version, max_pools, flags, weight, cap)


def _separator(r: StreamReader, field: str) -> None:
    off = r.offset
    v = r.u32(field)
    if v != SEPARATOR:
        raise StreamError("expected 0xffffffff", offset=off, field=field, value=v)


def read_tmem(r: StreamReader, visitor: ChunkVisitor, *, max_page_size: Optional[int] = None,
              marker_offset: Optional[int] = None) -> ClientRecord:
    """Read one ``-5`` chunk whose marker was just consumed, reporting to ``visitor``.

    ``max_page_size`` is what the target can hold (None = any size the format allows).
    """
    start = r.offset - 4 if marker_offset is None else marker_offset
    client = read_client(r)
    visitor.client(client, start)
    version = client.version
    olen = oid_len(version)
    ones = terminator(version)
    last_id = -1
    while True:
        off = r.offset
        pool_id = r.u32("pool_id")
        if pool_id == SEPARATOR:
            break
        if pool_id >= client.max_pools:
            raise StreamError(f"pool id must be below max_pools ({client.max_pools})",
                              offset=off, field="pool_id", value=pool_id)
        if pool_id <= last_id:
            raise StreamError(f"pool ids must be strictly increasing (previous {last_id})",
                              offset=off, field="pool_id", value=pool_id)
        last_id = pool_id
        foff = r.offset
        flags = r.u32("pool flags")
        n_pages = r.u32("n_pages")
        uuid = (r.u64("uuid[0]"), r.u64("uuid[1]"))
        pool = PoolRecord(pool_id, flags, n_pages, uuid)
        _check_pool(pool, version, foff, max_page_size)
        visitor.pool(pool, off)
        received, terminated = _read_pages(r, visitor, pool, olen, ones)
        visitor.pool_end(pool, received, terminated)
    visitor.end(TMEM, start)
    return client


def _check_pool(pool: PoolRecord, version: int, off: int, max_page_size: Optional[int]) -> None:
    flags = pool.flags
    reserved = POOL_RESERVED | (POOL_PRECOMPRESSED if version == 0 else 0)
    if flags & reserved:
        raise StreamError(f"reserved pool flag bits set in pool {pool.pool_id}",
                          offset=off, field="pool flags", value=flags)
    if pool.spec_version not in (0, version):
        raise StreamError(f"pool {pool.pool_id} flags carry spec version {pool.spec_version} "
                          f"in a version {version} chunk", offset=off, field="pool flags",
                          value=flags)
    if max_page_size is not None and pool.page_size > max_page_size:
        raise StreamError(f"pool {pool.pool_id} has {pool.page_size}-byte pages (pagebits "
                          f"{pool.pagebits}); the target holds at most {max_page_size}-byte pages",
                          offset=off, field="pool flags", value=flags)
    if not pool.persistent and pool.n_pages:
        raise StreamError(f"ephemeral pool {pool.pool_id} announces pages (Xen saves none)",
                          offset=off + 4, field="n_pages", value=pool.n_pages)


def _read_pages(r: StreamReader, visitor: ChunkVisitor, pool: PoolRecord, olen: int,
                ones: bytes) -> Tuple[int, bool]:
    """Page records until n_pages or the terminator; batches scanned in place.

    A visitor that lends slots (:meth:`ChunkVisitor.page_slots`, then
    :meth:`ChunkVisitor.pages_lent`) has the records read straight into them
    (a hypervisor's store: no copy in this process); the bytes from a
    terminator or a cut record on are given back to the reader and end the
    list on the path below, so both paths agree on what is stored and what is
    refused."""
    rec = olen + 4 + pool.page_size
    per_batch = max(1, BATCH_BYTES // rec)
    left = pool.n_pages
    received = 0
    lend = True                     # until the visitor declines, or lending ends
    while left:
        if lend and r.available < rec:
            view = visitor.page_slots(pool, left)
            if view is None:
                lend = False
                continue
            off = r.offset
            got = r.read_direct(view)
            whole = got // rec
            k = records_before_terminator(view, 0, whole, rec, ones)
            if k * rec < got:
                # a terminator, or the stream cut inside a record: from there on
                # the bytes are read again below (which ends the list or fails)
                with view[k * rec:got] as tail:
                    r.unread(tail)
                lend = False
            elif got < view.nbytes:
                lend = False                # the stream ended: below says where
            visitor.pages_lent(pool, k, off)
            received += k
            left -= k
            continue
        want = min(left, per_batch)
        # reading in place: only whole records already buffered go this way
        avail = r.available if lend else r.fill(want * rec)
        buf, pos = r.buf, r.pos
        limit = min(want, avail // rec)
        k = records_before_terminator(buf, pos, limit, rec, ones)
        if k:
            mv = memoryview(buf)[pos:pos + k * rec]
            try:
                visitor.pages(pool, mv, k, r.offset)
            finally:
                mv.release()
            r.skip(k * rec)
            received += k
            left -= k
            continue
        # the next record is incomplete in the buffer or is the terminator
        off = r.offset
        if r.fill(olen) < olen:
            raise StreamError(f"stream ends inside pool {pool.pool_id}'s page list after "
                              f"{received} of {pool.n_pages} announced pages",
                              offset=off, field="oid")
        if bytes(r.buf[r.pos:r.pos + olen]) == ones:
            r.skip(olen)
            return received, True
        raise StreamError(f"stream ends inside a page record of pool {pool.pool_id} "
                          f"({received} of {pool.n_pages} announced pages read)",
                          offset=off, field="page record")
    return received, False


def read_extra(r: StreamReader, version: int, visitor: ChunkVisitor, *,
               max_pools: int = MAX_POOLS, marker_offset: Optional[int] = None) -> int:
    """Read one ``-6`` chunk whose marker was just consumed; returns the entry count."""
    start = r.offset - 4 if marker_offset is None else marker_offset
    olen = oid_len(version)
    entry = 4 + olen + 4
    n = 0
    batch: List[Tuple[int, OID, int]] = []
    batch_off = r.offset
    while True:
        off = r.offset
        pool_id = r.u32("invalidation pool_id")
        if pool_id == SEPARATOR:
            break
        if pool_id >= max_pools:
            raise StreamError(f"invalidation names pool {pool_id}, beyond max_pools ({max_pools})",
                              offset=off, field="invalidation pool_id", value=pool_id)
        if r.fill(entry - 4) < entry - 4:
            raise StreamError("stream ends inside an invalidation entry", offset=off,
                              field="invalidation")
        oid = decode_oid(version, bytes(r.buf[r.pos:r.pos + olen]))
        index = _U32.unpack_from(r.buf, r.pos + olen)[0]
        r.skip(olen + 4)
        batch.append((pool_id, oid, index))
        n += 1
        if len(batch) >= 4096:
            visitor.invalidations(batch, batch_off)
            batch = []
            batch_off = r.offset
    if batch:
        visitor.invalidations(batch, batch_off)
    visitor.end(TMEM_EXTRA, start)
    return n


def iter_records(version: int, records: Buffer, count: int,
                 page_size: int) -> Iterator[Tuple[OID, int, memoryview]]:
    """Yield ``(oid, index, data_memoryview)`` for each wire-layout record (slow path:
    inspect, traces, tests)."""
    olen = oid_len(version)
    rec = olen + 4 + page_size
    mv = memoryview(records)
    for i in range(count):
        base = i * rec
        raw = bytes(mv[base:base + olen])
        index: int = _U32.unpack_from(mv, base + olen)[0]
        yield decode_oid(version, raw), index, mv[base + olen + 4:base + rec]


def read_chunk_file(r: StreamReader, visitor: ChunkVisitor, *,
                    max_page_size: Optional[int] = None) -> ChunkOrder:
    """A file of bare tmem chunks: ``-5`` then any ``-6``, and nothing after the last."""
    order = ChunkOrder()
    if r.at_eof():
        raise StreamError("empty file: no tmem chunk", offset=0)
    while not r.at_eof():
        off = r.offset
        marker = r.s32("marker")
        if marker not in TMEM_MARKERS:
            raise StreamError("expected a tmem chunk marker (-5 or -6)", offset=off,
                              field="marker", value=marker)
        order.see(marker, off)
        if marker == TMEM:
            order.client = read_tmem(r, visitor, max_page_size=max_page_size, marker_offset=off)
        else:
            read_extra(r, order.version, visitor, max_pools=order.max_pools,
                       marker_offset=off)
    return order
