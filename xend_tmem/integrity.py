"""Page checksums where both ends are this project (issue 8 #4).

Xen's image format has no checksum and a new chunk marker would make a stock
reader reject the image, so the checksums travel beside it:

* ``xm save FILE`` writes ``FILE.crc`` (the *sidecar*) next to the image: a
  header naming the image it belongs to (its size and the CRC32 of its first
  64 KiB), one CRC32 per *run* of image bytes that are not page data (stream
  and chunk headers, pfn lists, config, vcpu contexts, tail), then one record
  per page *in the order the pages appear in the image*: RAM pages by pfn,
  tmem pages by pool, oid and index, each with the CRC32 of its 4096 bytes.
  Every byte of the image is covered once -- by its page's record (a tmem
  record's oid and index by the record's identity) or by its run -- so no pass
  over the whole image is needed. ``xm restore FILE`` uses it when present
  and its header matches the image; a stock reader never opens it.
* A migration between two of these daemons negotiates ``crc32-frames`` in the
  pre-flight: every image frame is followed by the CRC32 of its bytes, and the
  same page records travel in their own frames ahead of the pages they cover.

:class:`PageLog` collects the records while a save writes pages;
:class:`PageCheck` compares them, as pages arrive, with what the restore reads
and raises :class:`IntegrityError` naming the first bad page -- before the
domain is ever unpaused (the restore removes it).
"""
from __future__ import annotations

import functools
import os
import struct
import zlib
from array import array
from collections import deque
from itertools import starmap
from typing import (TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional, Protocol,
                    Sequence, Tuple, Union)

from .binio import Buffer as PageBuffer
from .binio import Sink
from .crc import crc32 as _crc32
from .errors import XendTmemError
from .xen import PAGE_SIZE

if TYPE_CHECKING:
    import io
    from concurrent.futures import Future

# page data (binio.Buffer) or a packed array of CRC words
Buffer = Union[PageBuffer, "array[int]"]

RAM = 0
TMEM = 1
SIDECAR_SUFFIX = ".crc"
SIDECAR_MAGIC = b"XTMCRC02"
OLD_MAGICS = (b"XTMCRC01",)                   # whole-image CRC format: no longer written
HEAD_BYTES = 64 << 10                         # the image prefix the header fingerprints
_HEADER = struct.Struct("<8sQIIQ")            # magic, image size, head crc, run count, count
_RUN = struct.Struct("<QQI")                  # image offset, length, crc of a non-page run
MAX_RUNS = 1 << 22                            # a sane sidecar's bound on non-page runs
_RECORD = struct.Struct("<BIQQQQI")           # kind, pool, oid0..2 (pfn in oid0), index, crc
RECORD_SIZE = _RECORD.size
MAX_RECORDS = 1 << 26                         # 64 Mi pages (256 GiB): a sane sidecar's bound

# (kind, pool, oid0, oid1, oid2, index, crc)
Record = Tuple[int, int, int, int, int, int, int]


class IntegrityError(XendTmemError):
    """A page (or frame) does not match its checksum: the image is corrupt."""


def describe(rec: Record) -> str:
    """``RAM page pfn N`` or ``tmem page pool P oid A:B:C index I``."""
    kind, pool, o0, o1, o2, index, _ = rec
    if kind == RAM:
        return f"RAM page pfn {o0}"
    return f"tmem page pool {pool} oid {o0}:{o1}:{o2} index {index}"


def encode(records: Iterable[Record]) -> bytes:
    return b"".join(starmap(_RECORD.pack, records))


def decode(data: Buffer) -> List[Record]:
    """Records from their wire/file form (a length not a multiple is refused)."""
    check_record_bytes(data)
    return list(_RECORD.iter_unpack(data))


@functools.cache
def _heads(version: int, page_size: int) -> struct.Struct:
    """A tmem record's oid and index, its page skipped: one C call per batch."""
    return struct.Struct(f"<{'Q' if version == 0 else '3Q'}I{page_size}x")


def ram_records(pfns: Sequence[int], data: Buffer) -> List[Record]:
    """The records of a RAM batch (``data``: the pages of ``pfns`` in order)."""
    mv = memoryview(data).cast("B")
    crc32 = _crc32
    crcs = [crc32(mv[o:o + PAGE_SIZE]) for o in range(0, len(pfns) * PAGE_SIZE, PAGE_SIZE)]
    return [(RAM, 0, pfn, 0, 0, 0, c) for pfn, c in zip(pfns, crcs)]


def tmem_ids(pool_id: int, version: int, records: Buffer, count: int,
             page_size: int) -> List[Tuple[int, int, int, int, int, int]]:
    """The identities ``(TMEM, pool, oid0, oid1, oid2, index)`` of a batch of
    wire-layout tmem records, in order."""
    st = _heads(version, page_size)
    mv = memoryview(records).cast("B")[:count * st.size]
    if version == 0:
        return [(TMEM, pool_id, o0, 0, 0, i) for o0, i in st.iter_unpack(mv)]
    return [(TMEM, pool_id, o0, o1, o2, i) for o0, o1, o2, i in st.iter_unpack(mv)]


def tmem_crcs(version: int, records: Buffer, count: int, page_size: int) -> List[int]:
    """The CRC32 of each record's page."""
    rec = _heads(version, page_size).size
    head = rec - page_size
    mv = memoryview(records).cast("B")
    crc32 = _crc32
    return [crc32(mv[o:o + page_size]) for o in range(head, count * rec, rec)]


# -- records as bytes, a batch at a time -----------------------------------------------
#
# A save or restore of a 1.5 GiB image handles ~400 000 records: one Python tuple each
# cost ~0.35 s per operation (building them, then the cyclic GC walking the growing
# list). The records are kept in their file form instead (the sidecar's body, 41 bytes
# each) and a batch's are packed by one struct call: its format repeats the record's
# layout once per record, its arguments are one flat list (a page's CRC, a RAM
# page's pfn, a tmem page's oid and index bytes as they are on the wire, which is
# little-endian too).

_PACKERS: Dict[Tuple[str, int], struct.Struct] = {}
_PACKERS_MAX = 64                      # batch sizes seen: a few per operation


def _packer(unit: str, n: int) -> struct.Struct:
    """``unit`` repeated ``n`` times (little-endian, no padding), compiled once."""
    key = (unit, n)
    st = _PACKERS.get(key)
    if st is None:
        if len(_PACKERS) >= _PACKERS_MAX:
            _PACKERS.clear()
        st = _PACKERS[key] = struct.Struct("<" + unit * n)
    return st


_RAM_UNIT = "5xQ24xI"                  # kind 0, pool 0 | pfn | oid1, oid2, index 0 | crc
_TMEM_UNITS = {0: "BI8s16x4s4xI",      # kind, pool | oid0 | oid1, oid2 0 | index (u32) | crc
               1: "BI28s4xI"}          # kind, pool | oid0..2 and the index's low half | crc
_CRC_UNIT = "37xI"                     # a record's CRC, the rest skipped


@functools.cache
def _tmem_head_bytes(version: int, page_size: int) -> struct.Struct:
    """A wire record's oid (and, for v1, the index after it) as raw bytes."""
    return struct.Struct(f"<{'8s4s' if version == 0 else '28s'}{page_size}x")


def ram_record_bytes(pfns: Sequence[int], crcs: Union[Sequence[int], Buffer]) -> bytes:
    """The file form of a RAM batch's records (``crcs``: its pages' CRC32s)."""
    n = len(pfns)
    if len(crcs) != n:
        raise ValueError(f"{len(crcs)} CRCs for {n} RAM pages")
    flat: List[object] = [0] * (2 * n)
    flat[0::2] = pfns
    flat[1::2] = crcs
    return _packer(_RAM_UNIT, n).pack(*flat)


def tmem_record_bytes(pool_id: int, version: int, records: Buffer, count: int,
                      page_size: int, crcs: Union[Sequence[int], Buffer]) -> bytes:
    """The file form of a batch of wire-layout tmem records' records: the oid
    and index bytes are taken from the wire heads as they are."""
    st = _tmem_head_bytes(version, page_size)
    src = memoryview(records).cast("B")
    if src.nbytes < count * st.size:
        raise ValueError(f"{src.nbytes} bytes do not hold {count} tmem records of {st.size}")
    if len(crcs) != count:
        raise ValueError(f"{len(crcs)} CRCs for {count} tmem pages")
    heads = st.iter_unpack(src[:count * st.size])
    if version == 0:
        flat: List[object] = [TMEM, pool_id, b"", b"", 0] * count
        oids, idxs = (list(x) for x in zip(*heads)) if count else ([], [])
        flat[2::5] = oids
        flat[3::5] = idxs
        flat[4::5] = crcs
    else:
        flat = [TMEM, pool_id, b"", 0] * count
        flat[2::4] = [h for (h,) in heads]
        flat[3::4] = crcs
    return _packer(_TMEM_UNITS[0 if version == 0 else 1], count).pack(*flat)


def record_crcs(data: Buffer, first: int, n: int) -> "array[int]":
    """The CRC fields of records ``first .. first+n`` of the file form ``data``."""
    return array("I", _packer(_CRC_UNIT, n).unpack_from(data, first * RECORD_SIZE))


def check_record_bytes(data: Buffer) -> None:
    """Refuse a file form whose length is not whole records or that has a bad kind."""
    mv = memoryview(data).cast("B")
    if mv.nbytes % RECORD_SIZE:
        raise IntegrityError(f"page checksum records of {mv.nbytes} bytes: not a multiple "
                             f"of {RECORD_SIZE}")
    kinds = bytes(mv[::RECORD_SIZE])            # every record's first byte, in one C slice
    if kinds and max(kinds) > TMEM:
        i = next(i for i, k in enumerate(kinds) if k > TMEM)
        raise IntegrityError(f"page checksum record {i} has kind {kinds[i]}")


class PageLog:
    """The save side: one record per page written, in stream order, kept in
    the sidecar's file form (:attr:`data`).

    With ``covered`` (a deque, set by :class:`CrcWriter`), the image byte
    ranges the records cover are noted too, so the writer can checksum only
    the bytes between them."""

    def __init__(self) -> None:
        self.data = bytearray()  # the records, RECORD_SIZE bytes each
        self.sent = 0            # records already handed to a stream (migration)
        self.covered: Optional[Deque[List[int]]] = None

    @property
    def count(self) -> int:
        """Records logged."""
        return len(self.data) // RECORD_SIZE

    @property
    def records(self) -> List[Record]:
        """The records as tuples (a copy: for reports and tests, not per page)."""
        return decode(self.data)

    def cover(self, offset: Optional[int], nbytes: int) -> None:
        """Image bytes ``offset .. offset+nbytes`` are pages just logged (they
        reach the writer after this call)."""
        cov = self.covered
        if cov is None or offset is None or nbytes <= 0:
            return
        if cov and cov[-1][1] == offset:
            cov[-1][1] += nbytes
        else:
            if cov and offset < cov[-1][1]:
                raise ValueError(f"page range at image offset {offset} overlaps the previous one")
            cov.append([offset, offset + nbytes])

    def ram(self, pfns: Sequence[int], data: Buffer, offset: Optional[int] = None,
            crcs: Optional[Union[Sequence[int], Buffer]] = None) -> None:
        """``offset``: where the batch's page data goes in the image. ``crcs``:
        the pages' CRC32s when the hypervisor computed them (the guest cannot
        change them: it is suspended)."""
        if crcs is None:
            mv = memoryview(data).cast("B")
            crc32 = _crc32
            crcs = [crc32(mv[o:o + PAGE_SIZE]) for o in range(0, len(pfns) * PAGE_SIZE, PAGE_SIZE)]
        self.data += ram_record_bytes(pfns, crcs)
        self.cover(offset, len(pfns) * PAGE_SIZE)

    def tmem(self, pool_id: int, version: int, records: Buffer, count: int, page_size: int,
             offset: Optional[int] = None,
             crcs: Optional[Union[Sequence[int], Buffer]] = None) -> None:
        """``offset``: where the records go in the image (a record's oid and
        index are covered by its identity, its page by its CRC). ``crcs``: the
        pages' CRC32s when the hypervisor computed them."""
        if crcs is None:
            crcs = tmem_crcs(version, records, count, page_size)
        self.data += tmem_record_bytes(pool_id, version, records, count, page_size, crcs)
        self.cover(offset, count * _heads(version, page_size).size)

    def take_unsent_bytes(self) -> bytes:
        """The file form of the records not handed to a stream yet."""
        out = bytes(self.data[self.sent * RECORD_SIZE:])
        self.sent = self.count
        return out

    def take_unsent(self) -> List[Record]:
        return decode(self.take_unsent_bytes())


class PageCheck:
    """The restore side: pages as read, compared in order with the records
    (all known up front from a sidecar, or arriving ahead of their pages in a
    migration stream). Corrupt frames seen in transit are remembered too.

    The records are kept in their file form; a batch is compared as a whole
    (its records built the same way, one byte comparison); only a batch that
    differs is walked page by page, to name the first bad page."""

    def __init__(self, records: Optional[Union[List[Record], Buffer]] = None,
                 source: str = "") -> None:
        self._exp = bytearray()
        self.source = source            # "FILE.crc" or "the migration stream"
        self.seen = 0
        self.page_bytes = 0             # image bytes the checked records cover
        self.bad_frames: List[str] = []
        if records:
            self.add_expected(records)

    @property
    def count(self) -> int:
        """Records expected so far."""
        return len(self._exp) // RECORD_SIZE

    @property
    def expected(self) -> List[Record]:
        """The expected records as tuples (a copy: for reports and tests)."""
        return decode(self._exp)

    def _want(self, i: int) -> Record:
        return _RECORD.unpack_from(self._exp, i * RECORD_SIZE)

    def add_expected(self, records: Union[List[Record], Buffer]) -> None:
        """More records: tuples, or their file form (checked: whole records, known kinds)."""
        if isinstance(records, list):
            data: Buffer = encode(records)
        else:
            check_record_bytes(records)
            data = records
        n = memoryview(data).nbytes // RECORD_SIZE
        if self.count + n > MAX_RECORDS:
            raise IntegrityError(f"more than {MAX_RECORDS} page checksum records")
        self._exp += data

    def frame_bad(self, what: str) -> None:
        self.bad_frames.append(what)

    def _check(self, got: Record, offset: Optional[int]) -> None:
        where = f" (image offset {offset})" if offset is not None else ""
        if self.seen >= self.count:
            raise IntegrityError(f"{describe(got)}{where} has no checksum in {self.source}: "
                                 "the image does not match its checksums")
        want = self._want(self.seen)
        self.seen += 1
        if want[:6] != got[:6]:
            raise IntegrityError(f"{describe(got)}{where} is where {self.source} has "
                                 f"{describe(want)}: the image is corrupt")
        if want[6] != got[6]:
            raise IntegrityError(
                f"checksum mismatch in {describe(got)}{where}: CRC32 {got[6]:08x}, "
                f"{self.source} says {want[6]:08x}; the image is corrupt"
                + (f" ({'; '.join(self.bad_frames)})" if self.bad_frames else ""))

    def _matches(self, got: Buffer) -> bool:
        """``got`` (file form) is what the next records say."""
        return self._exp.startswith(got, self.seen * RECORD_SIZE)

    def _batch(self, got: Buffer, offsets: Optional[Callable[[int], int]]) -> None:
        n = memoryview(got).nbytes // RECORD_SIZE
        if self._matches(got):
            self.seen += n
            return
        for i, rec in enumerate(decode(got)):           # name the first bad one
            self._check(rec, None if offsets is None else offsets(i))
        raise AssertionError("a differing batch had no differing record")  # pragma: no cover

    def ram(self, pfns: Sequence[int], data: Buffer, offset: Optional[int] = None) -> None:
        mv = memoryview(data).cast("B")
        crc32 = _crc32
        crcs = [crc32(mv[o:o + PAGE_SIZE]) for o in range(0, len(pfns) * PAGE_SIZE, PAGE_SIZE)]
        self._batch(ram_record_bytes(pfns, crcs),
                    None if offset is None else (lambda i: offset + i * PAGE_SIZE))
        self.page_bytes += len(pfns) * PAGE_SIZE

    def expect_ram(self, pfns: Sequence[int], data: Buffer,
                   offset: Optional[int] = None) -> "array[int]":
        """Check a RAM batch's pfns (in order) and hand back the CRC32s its
        pages must have, to compare with what the hypervisor computes once
        they are written (:class:`RamCheck`); the records count as checked."""
        n = len(pfns)
        if self.seen + n <= self.count:
            want = record_crcs(self._exp, self.seen, n)
            if self._matches(ram_record_bytes(pfns, want)):   # the pfns, in order
                self.seen += n
                self.page_bytes += n * PAGE_SIZE
                return want
        self.ram(pfns, data, offset)            # raises, naming the first bad page
        raise AssertionError("a differing batch had no differing record")  # pragma: no cover

    def expected_tmem_crcs(self, pool_id: int, version: int, records: Buffer, count: int,
                           page_size: int, offset: Optional[int] = None) -> "array[int]":
        """Check a tmem batch's identities (pool, oid, index, in order) and
        hand back the CRC32s its pages must have, for the hypervisor to verify
        as it stores them (``restore_put_pages(crcs=)``); the records count as
        checked. :meth:`tmem_mismatch` names a page the hypervisor refused."""
        rec = _heads(version, page_size).size
        if self.seen + count <= self.count:
            want = record_crcs(self._exp, self.seen, count)
            if self._matches(tmem_record_bytes(pool_id, version, records, count, page_size,
                                               want)):
                self.seen += count
                self.page_bytes += count * rec
                return want
        self.tmem(pool_id, version, records, count, page_size, offset)   # raises
        raise AssertionError("a differing batch had no differing record")  # pragma: no cover

    def tmem_mismatch(self, first: int, count: int, index: int, records: Buffer, version: int,
                      page_size: int, offset: Optional[int] = None) -> IntegrityError:
        """The error for record ``index`` of the batch whose checks began at
        record ``first`` (the hypervisor refused it)."""
        rec = _heads(version, page_size).size
        want = self._want(first + index)
        got = tmem_crcs(version, memoryview(records).cast("B")[index * rec:], 1, page_size)[0]
        where = ("" if offset is None else
                 f" (image offset {offset + index * rec + rec - page_size})")
        return IntegrityError(
            f"checksum mismatch in {describe(want)}{where}: CRC32 {got:08x}, "
            f"{self.source} says {want[6]:08x}; the image is corrupt"
            + (f" ({'; '.join(self.bad_frames)})" if self.bad_frames else ""))

    def tmem(self, pool_id: int, version: int, records: Buffer, count: int, page_size: int,
             offset: Optional[int] = None) -> None:
        rec = _heads(version, page_size).size
        crcs = tmem_crcs(version, records, count, page_size)
        self._batch(tmem_record_bytes(pool_id, version, records, count, page_size, crcs),
                    None if offset is None else (lambda i: offset + i * rec + rec - page_size))
        self.page_bytes += count * rec

    def finish(self) -> None:
        """The image is read: every page checked, nothing corrupt in transit."""
        if self.bad_frames:
            raise IntegrityError(f"the image was corrupted in transit: "
                                 f"{'; '.join(self.bad_frames)}")
        if self.seen != self.count:
            raise IntegrityError(f"the image has {self.seen} pages, {self.source} lists "
                                 f"{self.count}: the image does not match")

    def explain(self, exc: BaseException) -> Optional[IntegrityError]:
        """A restore failure caused by a frame corrupted in transit, said so."""
        if self.bad_frames and not isinstance(exc, IntegrityError):
            return IntegrityError(f"the image was corrupted in transit "
                                  f"({'; '.join(self.bad_frames)}): {exc}")
        return None


class RamCheck:
    """RAM pages of a restore checked by the hypervisor once written: after
    ``write_pages`` of batch k, ``ram_page_crcs`` runs on a helper thread (the
    hypervisor computes them on its own core) while the restore reads batch
    k+1; each result is compared before batch k+1 is written (:meth:`expect`)
    and at :meth:`finish`, so a bad page still fails the restore before the
    domain runs. The pfns are checked against the records at once.

    Batch k's CRCs must be computed before batch k+1 is written: a live
    migration re-sends pages dirtied in a round, so batch k+1 may carry a
    newer copy of a pfn of batch k (the heartbeat page at the end of one round
    and at the start of the next), and a CRC of the newer copy would not match
    batch k's record."""

    def __init__(self, hv: Any, domid: int, check: PageCheck) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.hv = hv
        self.domid = domid
        self.check = check
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-check")
        self._pending: Optional[Tuple[Future[None], "array[int]", Sequence[int], "array[int]",
                                      Optional[int]]] = None

    def expect(self, pfns: Sequence[int], data: Buffer, offset: Optional[int]) -> Tuple[
            "array[int]", Sequence[int], Optional[int]]:
        """Before the batch is written: the previous batch compared (its CRCs
        taken before this one can overwrite its pages), this one's pfns
        checked, its CRCs to come."""
        self._compare()
        return self.check.expect_ram(pfns, data, offset), list(pfns), offset

    def written(self, token: Tuple["array[int]", Sequence[int], Optional[int]]) -> None:
        """After the batch is written: ask for its CRCs."""
        self._compare()                 # no-op after expect(); kept for direct callers
        want, pfns, offset = token
        got = array("I", bytes(4 * len(pfns)))
        future = self._helper.submit(self.hv.ram_page_crcs, self.domid, pfns, got)
        self._pending = (future, want, pfns, got, offset)

    def _compare(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        future, want, pfns, got, offset = pending
        future.result()
        if got == want:                 # two array('I'): one C comparison
            return
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                where = "" if offset is None else f" (image offset {offset + i * PAGE_SIZE})"
                raise IntegrityError(
                    f"checksum mismatch in RAM page pfn {pfns[i]}{where}: CRC32 {g:08x}, "
                    f"{self.check.source} says {w:08x}; the image is corrupt")

    def finish(self) -> None:
        """Every batch compared (raises for a bad page)."""
        try:
            self._compare()
        finally:
            self.close()

    def close(self) -> None:
        self._helper.shutdown(wait=True)


# -- the sidecar file ----------------------------------------------------------------

def sidecar_path(image: str) -> str:
    return image + SIDECAR_SUFFIX


class FileSink(Sink, Protocol):
    """An image file, or a wrapper of one, that :class:`CrcWriter` writes through."""

    def fileno(self) -> int: ...


class CrcWriter:
    """A write-through file that keeps the size, the CRC32 of the first
    :data:`HEAD_BYTES` and one CRC32 per run of bytes that are not pages
    ``log`` covers (the sidecar's header and runs)."""

    def __init__(self, out: FileSink, log: Optional[PageLog] = None) -> None:
        self.out = out
        self.size = 0
        self.head_crc = 0
        self.runs: List[List[int]] = []     # [offset, length, crc]
        self.covered: Deque[List[int]] = deque()
        if log is not None:
            log.covered = self.covered

    def _run(self, at: int, data: memoryview) -> None:
        runs = self.runs
        if runs and runs[-1][0] + runs[-1][1] == at:
            last = runs[-1]
            last[1] += data.nbytes
            last[2] = _crc32(data, last[2])
        else:
            runs.append([at, data.nbytes, _crc32(data)])

    def write(self, data: Buffer) -> int:
        mv = memoryview(data).cast("B")
        n = self.out.write(mv)
        n = mv.nbytes if n is None else n       # a partial write: only what went out
        done = mv[:n]
        pos = self.size
        if pos < HEAD_BYTES:
            self.head_crc = _crc32(done[:HEAD_BYTES - pos], self.head_crc)
        end = pos + n
        p = pos
        cov = self.covered
        while p < end:
            while cov and cov[0][1] <= p:
                cov.popleft()                   # a page range fully written
            if cov and cov[0][0] <= p:
                p = min(end, cov[0][1])         # inside pages: their records cover them
                continue
            q = min(end, cov[0][0]) if cov else end
            self._run(p, done[p - pos:q - pos])
            p = q
        self.size = end
        return n

    def flush(self) -> None:
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            flush()

    def fileno(self) -> int:
        return self.out.fileno()


def write_sidecar(path: str, log: PageLog, image: CrcWriter, rename: bool = True) -> str:
    """Write ``path`` for the image ``image`` wrote: ``PATH.part``, fsynced, then
    renamed (``rename`` False: left as ``.part`` for the caller to rename once
    the image is in place). Returns the file written."""
    tmp = f"{path}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(SIDECAR_MAGIC, image.size, image.head_crc, len(image.runs),
                                 log.count))
            f.write(b"".join(_RUN.pack(*r) for r in image.runs))
            f.write(log.data)           # the records are kept in their file form
            f.flush()
            os.fsync(f.fileno())
        if not rename:
            return tmp
        os.replace(tmp, path)
        return path
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class ImageCheck(PageCheck):
    """A :class:`PageCheck` from a sidecar that also checks the non-page runs:
    each as soon as the reader has passed it, and at :meth:`finish` that the
    runs and the checked pages make up the whole image."""

    def __init__(self, records: Union[List[Record], Buffer], source: str, size: int,
                 runs: Sequence[Tuple[int, int, int]]) -> None:
        super().__init__(records, source)
        self.size = size
        self.runs = list(runs)
        self._reader: Optional["CrcReader"] = None

    def reader(self, inp: io.BufferedIOBase) -> "CrcReader":
        """``inp`` read through the run checks."""
        self._reader = CrcReader(inp, self)
        return self._reader

    def finish(self) -> None:
        super().finish()
        if self._reader is not None:
            self.finish_image(self._reader)

    def finish_image(self, reader: "CrcReader") -> None:
        run_bytes = sum(r[1] for r in self.runs)
        if reader.size != self.size or reader.next_run != len(self.runs):
            raise IntegrityError(f"the image ended after {reader.size} bytes, {self.source} "
                                 f"describes {self.size}: the image is corrupt outside its pages")
        if run_bytes + self.page_bytes != self.size:
            raise IntegrityError(f"{self.source} covers {run_bytes} bytes outside pages and "
                                 f"the pages {self.page_bytes}, not the image's {self.size}: "
                                 "the image is corrupt outside its pages")


class CrcReader:
    """A read-through file checking the CRC32 of each non-page run as it passes."""

    def __init__(self, inp: io.BufferedIOBase, check: ImageCheck) -> None:
        self.inp = inp
        self.page_check = check
        self.size = 0
        self.next_run = 0          # the first run not yet fully read
        self._crc = 0              # of the part of that run read so far

    def _see(self, mv: memoryview) -> None:
        pos, end = self.size, self.size + mv.nbytes
        runs = self.page_check.runs
        while self.next_run < len(runs):
            at, length, want = runs[self.next_run]
            if at >= end:
                break
            lo, hi = max(at, pos), min(at + length, end)
            if lo < hi:
                self._crc = _crc32(mv[lo - pos:hi - pos], self._crc)
            if at + length > end:
                break
            if self._crc != want:
                raise IntegrityError(
                    f"image bytes {at}..{at + length - 1} (outside pages) have CRC32 "
                    f"{self._crc:08x}, {self.page_check.source} says {want:08x}: the image is "
                    "corrupt outside its pages")
            self.next_run += 1
            self._crc = 0
        self.size = end

    def readinto(self, buf: Buffer) -> int:
        n = self.inp.readinto(buf)
        if n:
            self._see(memoryview(buf).cast("B")[:n])
        return n or 0

    def read(self, n: int = -1) -> bytes:
        data = self.inp.read(n)
        if data:
            self._see(memoryview(data))
        return data

    def close(self) -> None:
        self.inp.close()

    def __enter__(self) -> "CrcReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_sidecar(image_path: str, image_fd: int) -> Tuple[Optional[ImageCheck], str]:
    """The sidecar of an image, if present and its header matches the image
    open as ``image_fd``: ``(check, note)``; ``check`` None with a note saying
    why it is not used (empty note: there is none)."""
    path = sidecar_path(image_path)
    try:
        f = open(path, "rb")     # noqa: SIM115 - closed by the with below; opening tells why not
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"{path} not used: {exc.strerror or exc}"
    with f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None, f"{path} not used: too short"
        magic, size, head_crc, nruns, count = _HEADER.unpack(head)
        if magic in OLD_MAGICS:
            return None, f"{path} not used: written by an older xend-tmem (save again)"
        if magic != SIDECAR_MAGIC:
            return None, f"{path} not used: not a page checksum file"
        st = os.fstat(image_fd)
        if size != st.st_size:
            return None, f"{path} not used: written for an image of {size} bytes, not {st.st_size}"
        prefix = os.pread(image_fd, HEAD_BYTES, 0)
        if zlib.crc32(prefix) != head_crc:
            return None, f"{path} not used: written for another image"
        body = os.fstat(f.fileno()).st_size - len(head)
        if (count > MAX_RECORDS or nruns > MAX_RUNS
                or nruns * _RUN.size + count * RECORD_SIZE != body):
            return None, f"{path} not used: its record count does not match its size"
        runs = [r for r in _RUN.iter_unpack(f.read(nruns * _RUN.size))]
        at = 0
        for off, length, _ in runs:
            if off < at or length == 0 or off + length > size:
                return None, f"{path} not used: its runs are not in image order"
            at = off + length
        records = f.read(count * RECORD_SIZE)       # checked by ImageCheck (kinds)
    return ImageCheck(records, os.path.basename(path), size, runs), ""


__all__ = ["PageLog", "PageCheck", "RamCheck", "ImageCheck", "IntegrityError", "CrcWriter",
           "CrcReader", "write_sidecar", "load_sidecar", "sidecar_path", "describe", "encode",
           "decode", "RECORD_SIZE", "ram_record_bytes", "tmem_record_bytes", "record_crcs",
           "check_record_bytes"]
