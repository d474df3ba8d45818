"""Storage for one tmem pool's pages, sized for gigabytes.

Pages live as *records in the stream's wire layout* (OID of 8 or 24 bytes,
u32 index, page data; SPEC §4) in fixed-size slots of anonymous-mmap segments,
so the save walk hands out contiguous runs of records with one slice each and
a restore stores a batch with one copy per segment it touches.

The index holds no Python object per page: each object (OID) maps to a table
of slots by page index (an ``array`` where the indices are dense, a dict only
for the sparse rest), and the put order is a log of slots in an ``array`` with,
per slot, its position in that log (an entry is live while the two agree).
Batches of records that are runs of one object's consecutive indices (what a
save stream carries) are indexed a run at a time.
"""
from __future__ import annotations

import functools
import hashlib
import mmap
import random
import struct
import sys
import threading
import weakref
import zlib
from array import array
from typing import (Any, Callable, Dict, Generic, Iterator, List, Optional, Sequence, Tuple,
                    TypeVar, Union, overload)

from ..binio import Buffer
from ..crc import crc32 as fast_crc32

OID = Tuple[int, int, int]
Run = Tuple[int, int, int]             # (segment, start byte, end byte)

SEGMENT_BYTES = 2 << 20     # size of one segment: 508 records of 4 KiB, two 1 MiB batches
COMMIT_AHEAD = 2            # segments committed ahead of a batched writer
_LINGER_S = 0.05            # the committing thread waits this long for more work

# Private anonymous memory with no advice: measured on this VM (benchmarks/
# README.md, tmem_pipe), transparent huge pages are fast only while the kernel
# has free huge pages and otherwise compact memory on the spot (up to 5 x
# slower); MADV_POPULATE_WRITE was no faster than MAP_POPULATE. Memory is
# committed with MAP_POPULATE, inside mmap(2), which runs without the GIL: a
# helper thread commits the next segments while a batched writer (a restore)
# copies into the current one.
_SEGMENT_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_LITTLE = sys.byteorder == "little"
_PENDING_RUNS = 1024        # runs of lent batches indexed in one pass, at most
_FEW_RUNS = 8               # runs per batch found by bisection before going record by record


def _new_segment(size: int, commit: bool) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=_SEGMENT_FLAGS | (_MAP_POPULATE if commit else 0))


class SegmentHeap:
    """Segments for the stores of one hypervisor: the simulated tmem heap.

    Xen hands tmem pages out of a heap that is already resident; a process that
    maps fresh memory pays the kernel (and, in a VM, the host) to commit it on
    first touch. ``reserve`` commits memory up front (``tmem_prealloc_mib``) and
    ``give`` keeps freed segments up to the reserved amount, so that cost is
    paid once. A batched writer takes segments with ``ahead=True``: a helper
    thread then keeps ``COMMIT_AHEAD`` committed segments ready, so committing
    overlaps the stream instead of faulting page by page under the copy.
    """

    def __init__(self, segment_bytes: int = SEGMENT_BYTES, ahead: int = COMMIT_AHEAD) -> None:
        self.segment_bytes = segment_bytes
        self._ahead = ahead
        self._free: List[mmap.mmap] = []
        self._keep = 0
        self._owed = 0                 # segments the helper thread is still to commit
        self._running = False          # the helper thread is alive
        self._cond = threading.Condition()

    def reserve(self, nbytes: int) -> None:
        want = -(-nbytes // self.segment_bytes)
        with self._cond:
            self._keep = max(self._keep, want)
            short = want - len(self._free) - self._owed
        for _ in range(max(0, short)):
            seg = _new_segment(self.segment_bytes, commit=True)
            with self._cond:
                self._free.append(seg)

    def take(self, ahead: bool = False) -> mmap.mmap:
        """A segment: a kept or committed-ahead one when there is one (waiting
        for the helper if it is committing one), else a fresh lazy one."""
        with self._cond:
            if ahead:
                self._commit_ahead(1 + self._ahead - len(self._free) - self._owed)
            if self._free:
                return self._free.pop()
            if ahead and self._owed > 1:
                self._owed -= 1       # the helper is behind: commit one here, beside it
        return _new_segment(self.segment_bytes, commit=ahead)

    def _commit_ahead(self, n: int) -> None:
        """Owe ``n`` more committed segments (caller holds the lock)."""
        if n <= 0:
            return
        self._owed += n
        self._cond.notify_all()
        if not self._running:
            try:
                threading.Thread(target=self._committer, name="tmem-commit",
                                 daemon=True).start()
            except RuntimeError:      # no thread to be had: segments are faulted in as written
                self._owed = 0
                return
            self._running = True

    def _committer(self) -> None:
        """Commit what is owed; linger a little for more (a stream's next batch)
        rather than start a thread per segment."""
        while True:
            try:
                seg: Optional[mmap.mmap] = _new_segment(self.segment_bytes, commit=True)
            except Exception:         # noqa: BLE001 - e.g. ENOMEM: nothing owed any more,
                seg = None            # the writer's own segments are faulted in as written
            with self._cond:
                if seg is not None:
                    self._free.append(seg)
                    self._owed -= 1
                else:
                    self._owed = 0
                self._cond.notify_all()
                if not self._owed:
                    self._cond.wait_for(lambda: self._owed > 0, timeout=_LINGER_S)
                if not self._owed:
                    # the stream stopped: what was committed ahead beyond the
                    # reserved heap goes back to the kernel
                    del self._free[self._keep:]
                    self._running = False
                    return

    def give(self, segments: Sequence[mmap.mmap]) -> None:
        with self._cond:
            for seg in segments:
                if len(self._free) >= self._keep:
                    break
                self._free.append(seg)

    @property
    def free_bytes(self) -> int:
        with self._cond:
            return len(self._free) * self.segment_bytes


def _holes(n: int) -> "array[int]":
    return array("i", [-1]) * n


_IOTA = array("i")


def _iota(lo: int, hi: int) -> "array[int]":
    """``array("i", range(lo, hi))`` for slot numbers (0 <= lo <= hi), sliced
    from a table that grows to the largest slot asked for: a batch's slots are
    indexed with a few slices instead of building each range item by item."""
    global _IOTA
    table = _IOTA
    if hi > len(table):
        table = array("i", table)
        table.extend(range(len(table), max(hi, 2 * len(table), 4096)))
        _IOTA = table
    return table[lo:hi]


def _u32_run(first: int, n: int) -> memoryview:
    """``first, first+1, ...`` (n of them, below 2**32) as u32s: a slice of the
    slot table where it reaches that far (a stream's indices mostly do), else
    built."""
    table = _IOTA
    if first + n <= len(table):
        return memoryview(table).cast("B").cast("I")[first:first + n]
    return memoryview(array("I", range(first, first + n)))


_ZEROS = memoryview(bytes(4 * 1024)).cast("I")


def _u32_same(value: int, n: int) -> memoryview:
    """``n`` copies of ``value`` as u32s (zeros, the usual high words of an
    object id, from a table)."""
    if not value and n <= len(_ZEROS):
        return _ZEROS[:n]
    return memoryview(array("I", (value,)) * n)


_T = TypeVar("_T")


class _Settled(Generic[_T]):
    """An index attribute of :class:`PageStore` (held as ``<name>_``): reading
    it first indexes the pending runs of lent batches."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.raw = name + "_"

    @overload
    def __get__(self, store: None, owner: type) -> "_Settled[_T]": ...
    @overload
    def __get__(self, store: "PageStore", owner: type) -> _T: ...

    def __get__(self, store: Optional["PageStore"], owner: type) -> Any:
        if store is None:
            return self
        if store._pending:
            store._settle()
        return getattr(store, self.raw)

    def __set__(self, store: "PageStore", value: _T) -> None:
        setattr(store, self.raw, value)


class _Object:
    """One object's pages: page index -> slot. A dense table from ``base`` while
    the indices stay within twice the page count (plus 64), a dict beyond."""

    __slots__ = ("base", "table", "sparse", "count")

    def __init__(self) -> None:
        self.base = 0
        self.table = array("i")
        self.sparse: Optional[Dict[int, int]] = None
        self.count = 0

    def get(self, index: int) -> int:
        j = index - self.base
        if 0 <= j < len(self.table):
            slot = self.table[j]
            if slot >= 0:
                return slot
        if self.sparse:
            return self.sparse.get(index, -1)
        return -1

    def _dense_span(self, lo: int, hi: int) -> bool:
        """Make the table cover indices ``lo..hi-1`` (about to be added) if it
        then spans at most four times the page count plus 64; False when they
        must go to the dict. Growth takes up to a quarter of the table more,
        so ascending or descending puts cost amortized O(1)."""
        table = self.table
        n = len(table)
        bound = 4 * (self.count + hi - lo) + 64
        if not n:
            self.base = lo
            self.table = _holes(hi - lo)
            return True
        grow = max(n // 4, 16)          # growth beyond what is needed: amortized O(1)
        span = max(hi, self.base + n) - min(lo, self.base)
        if span > bound:
            return False
        if lo < self.base:
            extra = min(lo, grow, bound - span)
            grown = _holes(self.base - lo + extra)
            grown.extend(table)
            self.table = table = grown
            self.base = lo - extra
            span += extra
        end = hi - self.base
        if end > len(table):
            table.extend(_holes(end - len(table) + min(grow, bound - span)))
        return True

    def add(self, index: int, slot: int) -> None:
        """``index`` must be absent."""
        self.count += 1
        if self._dense_span(index, index + 1):
            self.table[index - self.base] = slot
            return
        if self.sparse is None:
            self.sparse = {}
        self.sparse[index] = slot

    def add_run(self, first: int, slots: "array[int]") -> None:
        """Indices ``first..`` (all absent) get ``slots``."""
        m = len(slots)
        if self._dense_span(first, first + m):
            j = first - self.base
            self.table[j:j + m] = slots
            self.count += m
            return
        for k, slot in enumerate(slots):
            self.add(first + k, slot)

    def absent_run(self, first: int, m: int) -> bool:
        """Whether none of indices ``first..first+m-1`` is stored."""
        lo = max(first - self.base, 0)
        hi = min(first + m - self.base, len(self.table))
        if lo < hi and self.table[lo:hi].count(-1) != hi - lo:
            return False
        if self.sparse:
            return not any(i in self.sparse for i in range(first, first + m))
        return True

    def remove(self, index: int) -> None:
        j = index - self.base
        self.count -= 1
        if 0 <= j < len(self.table) and self.table[j] >= 0:
            self.table[j] = -1
        else:
            assert self.sparse is not None
            del self.sparse[index]

    def slots(self) -> List[int]:
        out = [s for s in self.table if s >= 0]
        if self.sparse:
            out.extend(self.sparse.values())
        return out

    def slots_by_index(self) -> "array[int]":
        """The slots by ascending page index (a table without holes is that
        already: copied in C, not slot by slot)."""
        table = self.table
        if not self.sparse:
            return array("i", table) if not table.count(-1) else \
                array("i", [s for s in table if s >= 0])
        pairs = [(self.base + j, s) for j, s in enumerate(table) if s >= 0]
        pairs.extend(self.sparse.items())
        pairs.sort()
        return array("i", [s for _, s in pairs])


class Snapshot:
    """The put order at SAVE_BEGIN, as slots: Xen's per-pool page list that the
    save walk's cursor follows. A page deleted since (whose slot may hold
    another page by now) is remembered by key in ``gone``, so a walk skips it,
    or finds it where it was put again."""

    __slots__ = ("slots", "gone", "__weakref__")

    def __init__(self, slots: "array[int]") -> None:
        self.slots = slots
        self.gone: Dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.slots)


_KEY_V0 = struct.Struct("<QI")
_KEY_V1 = struct.Struct("<QQQI")


class PageStore:
    """Pages of one pool keyed by (OID, index), in put order.

    ``version`` chooses the record layout (0: 8-byte OID, 1: 24-byte OID); a
    key is a record's header (:meth:`make_key`). Callers validate keys and page
    sizes; the store only stores.
    """

    __slots__ = ("version", "page_size", "header_len", "record_size", "slots_per_segment",
                 "_segments", "_objs_", "_count", "_seq_", "_order_", "_free", "_next", "_heap",
                 "_snaps", "_lent", "_lent_asked", "_lent_ahead", "_pending", "_pending_spans")

    def __init__(self, version: int, page_size: int, segment_bytes: int = SEGMENT_BYTES,
                 heap: Optional[SegmentHeap] = None) -> None:
        self._heap = heap if heap is not None else SegmentHeap()
        segment_bytes = min(segment_bytes, self._heap.segment_bytes)
        self.version = version
        self.page_size = page_size
        self.header_len = (8 if version == 0 else 24) + 4
        self.record_size = self.header_len + page_size
        self.slots_per_segment = max(1, segment_bytes // self.record_size)
        self._segments: List[mmap.mmap] = []
        self._objs_: Dict[bytes, _Object] = {}
        self._count = 0
        self._seq_ = array("i")         # slot -> its position in _order, -1 when free
        self._order_ = array("i")       # slots in put order (stale entries included)
        # runs of a lent batch stored but not indexed yet (oid, first index,
        # first slot, records), on consecutive slots; each object's pending
        # index spans, merged, for telling a new key
        self._pending: List[Tuple[bytes, int, int, int]] = []
        self._pending_spans: Dict[bytes, List[List[int]]] = {}
        self._free = array("i")         # freed slots, reused last-freed first
        self._next = 0
        self._snaps: "weakref.WeakSet[Snapshot]" = weakref.WeakSet()
        self._lent: Optional[Tuple[int, memoryview]] = None   # slots a reader fills in place
        self._lent_asked = 0            # how many slots that lending asked for
        self._lent_ahead = False        # and whether it had the heap commit ahead

    # -- the index -------------------------------------------------------------
    # Batches read into lent slots (a restore stream) are indexed later, in one
    # pass: any use of the index below settles them first, and so does the
    # batch that fills what its lending asked for (the reader's last). The
    # stream's reader then spends its time reading, not indexing between reads.
    _objs: "_Settled[Dict[bytes, _Object]]" = _Settled()
    _seq: "_Settled[array[int]]" = _Settled()
    _order: "_Settled[array[int]]" = _Settled()

    def _settle(self) -> None:
        """Index the pending runs: each object's table, then the put order of
        their slots (consecutive fresh ones from the first run's, in stream
        order) in two slices."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._pending_spans = {}
        objs = self._objs_
        for oid, first, slot, m in pending:
            obj = objs.get(oid)
            if obj is None:
                obj = objs[oid] = _Object()
            obj.add_run(first, _iota(slot, slot + m))
        start, n = pending[0][2], sum(run[3] for run in pending)
        if len(self._order_) >= 2 * self._count + 1024:
            self._compact()
        base = len(self._order_)
        self._seq_.extend(_iota(base, base + n))
        self._order_.extend(_iota(start, start + n))

    # -- keys -----------------------------------------------------------------
    def make_key(self, oid: Sequence[int], index: int) -> bytes:
        if self.version == 0:
            return _KEY_V0.pack(oid[0], index)
        return _KEY_V1.pack(oid[0], oid[1], oid[2], index)

    def parse_key(self, key: bytes) -> Tuple[OID, int]:
        if self.version == 0:
            o, i = _KEY_V0.unpack(key)
            return (o, 0, 0), i
        a, b, c, i = _KEY_V1.unpack(key)
        return (a, b, c), i

    def _find(self, key: bytes) -> int:
        obj = self._objs.get(key[:-4])
        return obj.get(int.from_bytes(key[-4:], "little")) if obj is not None else -1

    def _key_at(self, slot: int) -> bytes:
        seg, rel = divmod(slot, self.slots_per_segment)
        off = rel * self.record_size
        return self._segments[seg][off:off + self.header_len]

    # -- size -----------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: bytes) -> bool:
        return self._find(key) >= 0

    @property
    def allocated_bytes(self) -> int:
        """Bytes of segments mapped (an upper bound on what the pages occupy)."""
        return sum(len(seg) for seg in self._segments)

    @property
    def segments(self) -> Tuple[mmap.mmap, ...]:
        return tuple(self._segments)

    # -- slots and order --------------------------------------------------------
    def _alloc(self, ahead: bool = False) -> int:
        """A slot for one put; ``ahead``: a stream's put, whose new segment the
        heap commits ahead (see :meth:`SegmentHeap.take`)."""
        if self._lent is not None:
            self.drop_lent()
        if self._free:
            return self._free.pop()
        slot = self._next
        self._next += 1
        self._seq.append(-1)
        if slot // self.slots_per_segment >= len(self._segments):
            self._segments.append(self._heap.take(ahead=ahead))
        return slot

    def _where(self, slot: int) -> Tuple[mmap.mmap, int]:
        seg, rel = divmod(slot, self.slots_per_segment)
        return self._segments[seg], rel * self.record_size

    def _touch(self, slot: int) -> None:
        """Move ``slot`` to the end of the put order."""
        if len(self._order) >= 2 * self._count + 1024:
            self._compact()
        self._seq[slot] = len(self._order)
        self._order.append(slot)

    def _compact(self) -> None:
        seq = self._seq
        live = array("i", [s for p, s in enumerate(self._order) if seq[s] == p])
        for p, s in enumerate(live):
            seq[s] = p
        self._order = live

    def _live_order(self) -> "array[int]":
        if len(self._order) != self._count:
            self._compact()
        return self._order

    # -- single pages ---------------------------------------------------------
    def put(self, key: bytes, data: Buffer) -> bool:
        """Store a page; an existing key is overwritten and moves to the end of
        the put order. Returns True when the key was new."""
        oid, index = key[:-4], int.from_bytes(key[-4:], "little")
        obj = self._objs.get(oid)
        slot = obj.get(index) if obj is not None else -1
        new = slot < 0
        if new:
            slot = self._alloc()
            if obj is None:
                obj = self._objs[oid] = _Object()
            obj.add(index, slot)
            self._count += 1
        self._touch(slot)
        seg, off = self._where(slot)
        hl = self.header_len
        seg[off:off + hl] = key
        seg[off + hl:off + self.record_size] = data
        return new

    def get(self, key: bytes) -> Optional[bytes]:
        slot = self._find(key)
        if slot < 0:
            return None
        seg, off = self._where(slot)
        return seg[off + self.header_len:off + self.record_size]

    def delete(self, key: bytes) -> bool:
        oid, index = key[:-4], int.from_bytes(key[-4:], "little")
        obj = self._objs.get(oid)
        slot = obj.get(index) if obj is not None else -1
        if slot < 0:
            return False
        assert obj is not None
        for snap in self._snaps:
            snap.gone.setdefault(slot, key)
        if self._count == 1:
            self.clear()        # last page gone: give the segments back
            return True
        obj.remove(index)
        if not obj.count:
            del self._objs[oid]
        self._seq[slot] = -1
        self._free.append(slot)
        self._count -= 1
        return True

    def clear(self) -> int:
        self.drop_lent()
        n = self._count
        if self._snaps and n:
            for slot in self._live_order():
                key = self._key_at(slot)
                for snap in self._snaps:
                    snap.gone.setdefault(slot, key)
        self._objs.clear()
        self._count = 0
        self._seq = array("i")
        self._order = array("i")
        self._free = array("i")
        if not self._snaps:     # a save walk may still be writing views of them: no reuse
            self._heap.give(self._segments)
        self._segments.clear()
        self._next = 0
        return n

    # -- batches ----------------------------------------------------------------
    def _runs_of(self, src: memoryview, count: int) -> Optional[List[Tuple[bytes, int, int, int]]]:
        """The batch as runs ``(oid, first index, first record, records)`` of one
        object's consecutive indices, or None when the header words cannot be
        read in place (a big-endian host). The header fields are read as
        strided columns of u32 words (a record is a whole number of words).
        A stream's batch is a few runs: each run's end is found by bisection
        and then checked whole, column by column (no Python step per record);
        a batch that is not (or has many runs) is split record by record."""
        rs, hl = self.record_size, self.header_len
        if not _LITTLE or rs % 4:
            return None
        step, w = rs // 4, hl // 4
        with src[:count * rs] as body, body.cast("I") as words:
            runs = self._few_runs(src, words, count, step, w)
            if runs is not None:
                return runs
            cols = [words[j::step].tolist() for j in range(w)]
        idx = cols.pop()
        oids = list(zip(*cols))
        runs = []
        start = 0
        for i in range(1, count):
            if oids[i] != oids[i - 1] or idx[i] != idx[i - 1] + 1:
                runs.append((bytes(src[start * rs:start * rs + hl - 4]), idx[start], start,
                             i - start))
                start = i
        runs.append((bytes(src[start * rs:start * rs + hl - 4]), idx[start], start,
                     count - start))
        return runs

    def _few_runs(self, src: memoryview, words: memoryview, count: int, step: int,
                  w: int) -> Optional[List[Tuple[bytes, int, int, int]]]:
        """:meth:`_runs_of` for a batch of at most ``_FEW_RUNS`` runs, else None
        (also when an object changes inside a run of consecutive indices: the
        record-by-record split then says where). Each run's end is found by
        bisection on the index column, compared with the run's expected indices
        a slice at a time, and its object checked column by column; every
        comparison is one of memoryviews, in C."""
        rs, klen = self.record_size, self.header_len - 4
        end = count * step
        idx = words[w - 1:end:step]             # the records' indices
        cols = [words[j:end:step] for j in range(w - 1)]     # their object ids, a u32 each
        runs: List[Tuple[bytes, int, int, int]] = []
        s = 0
        while s < count:
            if len(runs) == _FEW_RUNS:
                return None
            first = idx[s]
            span = min(count - s, (1 << 32) - first)   # u32 indices: a run does not wrap
            want = _u32_run(first, span)
            if idx[s:s + span] == want:
                m = span
            else:                       # idx[s:s+m] == want[:m] holds for m = 1, not for span
                m, hi = 1, span
                while hi - m > 1:
                    mid = (m + hi) // 2
                    if idx[s + m:s + mid] == want[m:mid]:
                        m = mid
                    else:
                        hi = mid
            e = s + m
            for col in cols:
                if col[s:e] != _u32_same(col[s], m):
                    return None
            runs.append((bytes(src[s * rs:s * rs + klen]), first, s, m))
            s = e
        return runs

    def _all_new(self, runs: List[Tuple[bytes, int, int, int]]) -> bool:
        """No key of the runs is stored, indexed or pending (the pending are not
        settled for this), and none is in two runs. One object may have several
        runs: a busy guest's pool, saved in put order, has holes where pages
        were put again later, so an object comes back in pieces."""
        objs, spans = self._objs_, self._pending_spans
        mine: Dict[bytes, List[Tuple[int, int]]] = {}
        for oid, first, _, m in runs:
            obj = objs.get(oid)
            if obj is not None and not obj.absent_run(first, m):
                return False
            for lo, hi in spans.get(oid, ()):
                if first < hi and lo < first + m:
                    return False
            mine.setdefault(oid, []).append((first, first + m))
        if len(mine) == len(runs):
            return True
        for ranges in mine.values():            # the batch's own runs of one object
            if len(ranges) > 1:
                ranges.sort()
                if any(lo < prev_hi for (_, prev_hi), (lo, _) in zip(ranges, ranges[1:])):
                    return False                # a key twice: the general path orders them
        return True

    def put_records(self, records: Buffer, count: int,
                    room: Optional[Callable[[int], None]] = None,
                    commit_ahead: bool = False) -> int:
        """Store ``count`` wire-layout records in order, as that many puts:
        an existing key is overwritten and moves to the end of the put order.
        ``room(new)`` is called with the number of new keys before anything is
        stored (it raises to refuse the batch). Returns that number.
        ``commit_ahead`` (a restore stream) has the heap commit the next
        segments while this batch is copied."""
        if not count:
            if room is not None:
                room(0)
            return 0
        with memoryview(records) as raw, raw.cast("B") as src:
            runs = self._runs_of(src, count) if not self._free else None
            if runs is not None and self._all_new(runs):
                if room is not None:
                    room(count)
                self._append_runs(src, runs, count, commit_ahead)
                return count
            return self._put_each(src, count, room, commit_ahead)

    def _append_runs(self, src: memoryview, runs: List[Tuple[bytes, int, int, int]],
                     count: int, commit_ahead: bool) -> None:
        """All-new keys, no free slots: consecutive fresh slots, indexed a run at
        a time, copied with one slice per segment touched."""
        if self._lent is not None:
            self.drop_lent()
        rs, per = self.record_size, self.slots_per_segment
        start = self._next
        end = start + count
        while (end - 1) // per >= len(self._segments):
            self._segments.append(self._heap.take(ahead=commit_ahead))
        self._index_runs(runs, start, count)
        self._settle()
        done, slot = 0, start
        while done < count:
            seg, rel = divmod(slot, per)
            n = min(count - done, per - rel)
            self._segments[seg][rel * rs:(rel + n) * rs] = src[done * rs:(done + n) * rs]
            done += n
            slot += n

    def _index_runs(self, runs: List[Tuple[bytes, int, int, int]], start: int,
                    count: int) -> None:
        """Take ``count`` all-new records as slots ``start..`` (the next fresh
        ones), their index pending (at most ``_PENDING_RUNS`` runs of it)."""
        pending, spans = self._pending, self._pending_spans
        for oid, first, at, m in runs:
            pending.append((oid, first, start + at, m))
            known = spans.get(oid)
            if known is None:
                spans[oid] = [[first, first + m]]
            elif known[-1][1] == first:
                known[-1][1] = first + m
            else:
                known.append([first, first + m])
        self._next = start + count
        self._count += count
        if len(pending) >= _PENDING_RUNS:
            self._settle()

    # -- records read in place --------------------------------------------------
    def lend_slots(self, max_count: int, commit_ahead: bool = False) -> Optional[memoryview]:
        """A writable view of up to ``max_count`` fresh consecutive slots (to the
        end of their segment) for a reader to fill with wire-layout records in
        place, so a restore stream lands in the store with no copy of its own;
        :meth:`put_lent` then stores what was read as :meth:`put_records` would.
        None when puts would not take fresh slots (freed ones are reused first).
        Until then the slots are not the store's: nothing is indexed."""
        self.drop_lent()
        if self._free or max_count <= 0:
            return None
        rs, per = self.record_size, self.slots_per_segment
        seg, rel = divmod(self._next, per)
        n = min(max_count, per - rel)
        while seg >= len(self._segments):
            self._segments.append(self._heap.take(ahead=commit_ahead))
        view = memoryview(self._segments[seg])[rel * rs:(rel + n) * rs]
        self._lent = (self._next, view)
        self._lent_asked = max_count
        self._lent_ahead = commit_ahead
        return view

    @property
    def lent_view(self) -> Optional[memoryview]:
        """The view :meth:`lend_slots` handed out, while it is outstanding."""
        return self._lent[1] if self._lent is not None else None

    def drop_lent(self) -> None:
        """Forget the lent slots (nothing was stored in them); a segment taken
        only for them goes back to the heap."""
        lent, self._lent = self._lent, None
        if lent is None:
            return
        lent[1].release()
        need = -(-self._next // self.slots_per_segment)
        if len(self._segments) > need:
            extra = self._segments[need:]
            del self._segments[need:]
            self._heap.give(extra)

    def put_lent(self, count: int, room: Optional[Callable[[int], None]] = None) -> int:
        """Store the first ``count`` records written into the lent slots, as
        :meth:`put_records` (``room`` may refuse them: then nothing is stored).
        All-new keys in runs (a save stream) are indexed where they lie; other
        batches (overwrites, repeated keys) are stored from a copy."""
        lent = self._lent
        if lent is None or lent[0] != self._next or self._free:
            self.drop_lent()
            raise ValueError("no slots lent, or the store took them for other puts since")
        start, view = lent
        rs = self.record_size
        if not 0 <= count <= view.nbytes // rs:
            self.drop_lent()
            raise ValueError(f"{count} records do not fit the {view.nbytes // rs} slots lent")
        if not count:
            if room is not None:
                room(0)
            self.drop_lent()
            return 0
        try:
            runs = self._runs_of(view, count)
            if runs is not None and self._all_new(runs):
                if room is not None:
                    room(count)
                self._lent = None
                self._index_runs(runs, start, count)
                view.release()
                if count == self._lent_asked:
                    self._settle()      # all that was asked for: the reader's last batch
                return count
            copy = bytes(view[:count * rs])
        except BaseException:
            self.drop_lent()
            raise
        self.drop_lent()
        return self.put_records(copy, count, room, commit_ahead=self._lent_ahead)

    def _put_each(self, src: memoryview, count: int,
                  room: Optional[Callable[[int], None]], commit_ahead: bool = False) -> int:
        rs, hl, per = self.record_size, self.header_len, self.slots_per_segment
        keys = [bytes(src[o:o + hl]) for o in range(0, count * rs, rs)]
        if room is not None:
            uniq = dict.fromkeys(keys)
            room(sum(1 for k in uniq if self._find(k) < 0))
        new = 0
        run_slot = run_src = run_len = 0

        def flush() -> None:
            seg, off = self._where(run_slot)
            seg[off:off + run_len * rs] = src[run_src * rs:(run_src + run_len) * rs]

        objs = self._objs
        for i, key in enumerate(keys):
            oid, index = key[:-4], int.from_bytes(key[-4:], "little")
            obj = objs.get(oid)
            slot = obj.get(index) if obj is not None else -1
            if slot < 0:
                slot = self._alloc(commit_ahead)
                if obj is None:
                    obj = objs[oid] = _Object()
                obj.add(index, slot)
                self._count += 1
                new += 1
            self._touch(slot)
            if run_len and slot == run_slot + run_len and slot % per:
                run_len += 1
                continue
            if run_len:
                flush()
            run_slot, run_src, run_len = slot, i, 1
        if run_len:
            flush()
        return new

    # -- the save walk ------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The put order now, for a save walk that skips later deletions."""
        snap = Snapshot(array("i", self._live_order()))
        self._snaps.add(snap)
        return snap

    def _live(self, snap: Snapshot, slot: int) -> int:
        """Where the page the snapshot saw in ``slot`` is now (-1: deleted)."""
        key = snap.gone.get(slot)
        return slot if key is None else self._find(key)

    def walk_left(self, snap: Snapshot, pos: int) -> int:
        """Pages the walk would still return from ``pos``."""
        if not snap.gone:
            return max(0, len(snap.slots) - pos)
        return sum(1 for s in snap.slots[pos:] if self._live(snap, s) >= 0)

    def walk_after(self, snap: Snapshot, key: bytes) -> int:
        """The position after ``key`` in ``snap`` (its end when the key is gone)."""
        slot = self._find(key)
        if slot < 0:
            return len(snap.slots)
        try:
            return snap.slots.index(slot) + 1
        except ValueError:
            return len(snap.slots)

    def _walk_runs(self, snap: Snapshot, pos: int, max_pages: int) -> Tuple[int, int, List[Run]]:
        """Walk ``snap`` from ``pos`` skipping deleted pages: ``(new_pos, count,
        runs)`` for up to ``max_pages`` pages, runs of consecutive slots merged."""
        rs, per = self.record_size, self.slots_per_segment
        slots, gone = snap.slots, snap.gone
        window = slots[pos:pos + max_pages]
        k = len(window)
        if k and not (gone and any(map(gone.__contains__, window))):
            first = window[0]
            seg, rel = divmod(first, per)
            if rel + k <= per and window == array("i", range(first, first + k)):
                return pos + k, k, [(seg, rel * rs, (rel + k) * rs)]
        runs: List[Run] = []
        count = 0
        n = len(slots)
        run_seg = -1
        run_start = run_end = 0
        while pos < n and count < max_pages:
            slot = slots[pos]
            pos += 1
            if gone and slot in gone:
                slot = self._find(gone[slot])
                if slot < 0:
                    continue
            count += 1
            seg, rel = divmod(slot, per)
            off = rel * rs
            if seg == run_seg and off == run_end:
                run_end += rs
                continue
            if run_seg >= 0:
                runs.append((run_seg, run_start, run_end))
            run_seg, run_start, run_end = seg, off, off + rs
        if run_seg >= 0:
            runs.append((run_seg, run_start, run_end))
        return pos, count, runs

    def collect(self, snap: Snapshot, pos: int, max_pages: int,
                view: bool = False) -> Tuple[int, int, Buffer]:
        """``(new_pos, count, records)``: up to ``max_pages`` records of the walk.
        With ``view``, records in one run are a read-only view of the segment
        (no copy; a save writes it before the pool changes again)."""
        pos, count, runs = self._walk_runs(snap, pos, max_pages)
        if view and len(runs) == 1:
            s, a, b = runs[0]
            with memoryview(self._segments[s]) as whole:
                return pos, count, whole[a:b].toreadonly()
        parts = [self._segments[s][a:b] for s, a, b in runs]
        return pos, count, parts[0] if len(parts) == 1 else b"".join(parts)

    def collect_into(self, snap: Snapshot, pos: int, max_pages: int,
                     out: memoryview) -> Tuple[int, int]:
        """:meth:`collect` copying the records straight into ``out`` (the caller's
        buffer, e.g. a connection's shared memory), one copy per run; ``out``
        must hold ``max_pages`` records. Returns ``(new_pos, count)``."""
        pos, count, runs = self._walk_runs(snap, pos, max_pages)
        at = 0
        for s, a, b in runs:
            with memoryview(self._segments[s]) as sv:
                out[at:at + b - a] = sv[a:b]
            at += b - a
        return pos, count

    # -- inspection and workloads ------------------------------------------------
    def oldest(self, n: int) -> List[bytes]:
        """Up to ``n`` keys from the start of the put order."""
        return [self._key_at(s) for s in self._live_order()[:max(0, n)]]

    def keys_with_oid(self, oid: Sequence[int]) -> List[bytes]:
        """Keys of one object's pages, in put order."""
        obj = self._objs.get(self.make_key(oid, 0)[:-4])
        if obj is None:
            return []
        seq = self._seq
        return [self._key_at(s) for s in sorted(obj.slots(), key=seq.__getitem__)]

    def random_key(self, rng: random.Random, tries: int = 8) -> Optional[bytes]:
        """A uniformly chosen stored key, found by probing slots (O(1), no list)."""
        if not self._count:
            return None
        for _ in range(tries):
            slot = rng.randrange(self._next)
            if self._seq[slot] >= 0:
                return self._key_at(slot)
        return None

    def items(self) -> Iterator[Tuple[bytes, bytes]]:
        """(key, data) in put order; data is copied page by page."""
        hl, rs = self.header_len, self.record_size
        for slot in array("i", self._live_order()):
            if self._seq[slot] < 0:
                continue
            seg, off = self._where(slot)
            yield seg[off:off + hl], seg[off + hl:off + rs]

    def crc_map(self) -> Dict[Tuple[OID, int], int]:
        return {self.parse_key(k): zlib.crc32(d) for k, d in self.items()}

    def digest(self) -> Tuple[int, str]:
        """(count, sha256) over the pages in (OID, index) order, numerically,
        each hashed as the v1 record (24-byte OID, u32 index, data), so v0 and
        v1 stores of the same pages agree. A v1 store's records are that very
        layout: where consecutive pages of the order lie in consecutive slots
        (a restored store holds a stream's runs so), one run is hashed in one
        call straight from the segment. A migration's destination hashes
        while the guest waits (the tmem-digest plugin), so this is downtime."""
        h = hashlib.sha256()
        objs = self._objs
        count = 0
        views = [memoryview(seg) for seg in self._segments]
        try:
            for oid in sorted(objs, key=_oid_words):
                slots = objs[oid].slots_by_index()
                count += len(slots)
                if self.version == 0:
                    self._digest_v0(h, views, slots)
                    continue
                for seg, lo, hi in self._slot_runs(slots):
                    h.update(views[seg][lo:hi])
        finally:
            for view in views:
                view.release()
        return count, h.hexdigest()

    def _slot_runs(self, slots: "array[int]") -> Iterator[Tuple[int, int, int]]:
        """(segment, start byte, end byte) of maximal runs of consecutive
        slots within one segment, in the order given."""
        spp, rs = self.slots_per_segment, self.record_size
        i, n = 0, len(slots)
        while i < n:
            first = slots[i]
            seg, rel = divmod(first, spp)
            limit = min(n - i, spp - rel)          # a run ends at its segment's end
            m = 1
            while m < limit and slots[i + m] == first + m:
                m += 1
            yield seg, rel * rs, (rel + m) * rs
            i += m

    def _digest_v0(self, h: Any, views: List[memoryview], slots: "array[int]") -> None:
        pad, rs = bytes(16), self.record_size
        for slot in slots:
            seg, rel = divmod(slot, self.slots_per_segment)
            off = rel * rs
            h.update(views[seg][off:off + 8])
            h.update(pad)
            h.update(views[seg][off + 8:off + rs])


def _oid_words(oid: bytes) -> Tuple[int, ...]:
    """An object's key (a record header less its index: 8 or 24 bytes) as
    numbers: v0's one word sorts as v1's (word, 0, 0)."""
    return struct.unpack(f"<{len(oid) // 8}Q", oid) + (0,) * (3 - len(oid) // 8)


@functools.lru_cache(maxsize=8)
def _page_slices(count: int, record_size: int, page_size: int) -> Tuple[slice, ...]:
    """Where the pages of ``count`` wire-layout records lie: made once per batch
    shape (a restore's batches are all one shape but the last), not per page."""
    head = record_size - page_size
    return tuple(slice(o, o + page_size) for o in range(head, count * record_size, record_size))


def _page_crcs(records: Buffer, count: int, record_size: int, page_size: int) -> "array[int]":
    # views released on return: ``records`` may be a shared buffer about to be reused or closed
    with memoryview(records) as raw, raw.cast("B") as mv:
        return array("I", map(fast_crc32, map(mv.__getitem__,
                                               _page_slices(count, record_size, page_size))))


def record_crcs(records: Buffer, count: int, record_size: int, page_size: int,
                out: Union[bytearray, memoryview, array[int]]) -> None:
    """Store the CRC32 of each of ``count`` wire-layout records' pages in
    ``out`` (a writable buffer of native u32): the sidecar's page checksums."""
    with memoryview(out) as raw, raw.cast("B") as flat, flat.cast("I") as dst:
        if dst.nbytes < 4 * count:
            raise ValueError(f"a CRC buffer of {dst.nbytes} bytes cannot hold {count} CRCs")
        dst[:count] = _page_crcs(records, count, record_size, page_size)


def first_crc_mismatch(records: Buffer, count: int, record_size: int, page_size: int,
                       crcs: Union[Buffer, array[int]]) -> Optional[Tuple[int, int, int]]:
    """``(index, got, want)`` of the first record whose page's CRC32 is not
    ``crcs[index]``, else None."""
    with memoryview(crcs) as raw, raw.cast("B") as flat, flat.cast("I") as want:
        if want.nbytes < 4 * count:
            raise ValueError(f"{want.nbytes // 4} CRCs for {count} records")
        got = _page_crcs(records, count, record_size, page_size)
        if got.tobytes() == want[:count].tobytes():
            return None
        for i, (g, w) in enumerate(zip(got, want[:count].tolist())):
            if g != w:
                return i, g, w
    return None  # pragma: no cover
