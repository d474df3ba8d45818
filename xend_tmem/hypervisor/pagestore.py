"""Storage for one tmem pool's pages, sized for gigabytes.

Pages live as *records in the stream's wire layout* (OID of 8 or 24 bytes,
u32 index, page data; SPEC §4) in fixed-size slots of anonymous-mmap segments,
so there is no Python object per page holding data, memory is committed only
as slots are written, and the save walk hands out contiguous runs of records
with one slice each. A dict maps each record header (the key) to its slot;
its insertion order *is* the put order the save walk must follow.
"""
from __future__ import annotations

import hashlib
import mmap
from array import array
import random
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..crc import crc32 as fast_crc32

OID = Tuple[int, int, int]

SEGMENT_BYTES = 16 << 20     # size of one segment

# Private anonymous memory, committed when the segment is made: the kernel
# fills 16 MiB in one call (huge pages where it can), several times faster than
# faulting 4 KiB pages one by one as records are copied in.
_SEGMENT_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_POPULATE_WRITE = 23    # Linux 5.14+


def _new_segment(size: int) -> mmap.mmap:
    seg = mmap.mmap(-1, size, flags=_SEGMENT_FLAGS)
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), _MADV_POPULATE_WRITE):
        if advice is not None:
            try:
                seg.madvise(advice)
            except OSError:      # older kernel: pages are committed as they are written
                pass
    return seg


class SegmentHeap:
    """Committed segments kept for reuse: the simulated hypervisor's tmem heap.

    Xen hands tmem pages out of a heap that is already resident; a process that
    maps fresh memory pays the kernel (and, in a VM, the host) to commit it on
    first touch. ``reserve`` commits memory up front and ``give`` keeps freed
    segments, up to the reserved amount, so that cost is paid once.
    """

    def __init__(self) -> None:
        self._free: List[mmap.mmap] = []
        self._keep = 0

    def reserve(self, nbytes: int) -> None:
        want = -(-nbytes // SEGMENT_BYTES)
        self._keep = max(self._keep, want)
        while len(self._free) < want:
            self._free.append(_new_segment(SEGMENT_BYTES))

    def take(self) -> mmap.mmap:
        return self._free.pop() if self._free else _new_segment(SEGMENT_BYTES)

    def give(self, segments: Sequence[mmap.mmap]) -> None:
        for seg in segments:
            if len(self._free) >= self._keep:
                break
            self._free.append(seg)

    @property
    def free_bytes(self) -> int:
        return len(self._free) * SEGMENT_BYTES


_KEY_V0 = struct.Struct("<QI")
_KEY_V1 = struct.Struct("<QQQI")


class PageStore:
    """Pages of one pool keyed by (OID, index), in put order.

    ``version`` chooses the record layout (0: 8-byte OID, 1: 24-byte OID).
    Callers validate keys and page sizes; the store only stores.
    """

    __slots__ = ("version", "page_size", "header_len", "record_size", "slots_per_segment",
                 "_segments", "_index", "_free", "_next", "_key", "_heap")

    def __init__(self, version: int, page_size: int, segment_bytes: int = SEGMENT_BYTES,
                 heap: Optional[SegmentHeap] = None) -> None:
        segment_bytes = min(segment_bytes, SEGMENT_BYTES)
        self._heap = heap if heap is not None else SegmentHeap()
        self.version = version
        self._key = _KEY_V0 if version == 0 else _KEY_V1
        self.page_size = page_size
        self.header_len = self._key.size
        self.record_size = self.header_len + page_size
        self.slots_per_segment = max(1, segment_bytes // self.record_size)
        self._segments: List[mmap.mmap] = []
        self._index: Dict[bytes, int] = {}
        self._free: List[int] = []
        self._next = 0

    # -- keys -----------------------------------------------------------------
    def make_key(self, oid: Sequence[int], index: int) -> bytes:
        if self.version == 0:
            return self._key.pack(oid[0], index)
        return self._key.pack(oid[0], oid[1], oid[2], index)

    def parse_key(self, key: bytes) -> Tuple[OID, int]:
        if self.version == 0:
            o, i = self._key.unpack(key)
            return (o, 0, 0), i
        a, b, c, i = self._key.unpack(key)
        return (a, b, c), i

    # -- size -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def allocated_bytes(self) -> int:
        """Bytes of segments mapped (an upper bound on what the pages occupy)."""
        return sum(len(seg) for seg in self._segments)

    @property
    def segments(self) -> Tuple[mmap.mmap, ...]:
        return tuple(self._segments)

    # -- slots ----------------------------------------------------------------
    def _alloc(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next
        self._next += 1
        if slot // self.slots_per_segment >= len(self._segments):
            self._segments.append(self._heap.take())
        return slot

    def _where(self, slot: int) -> Tuple[mmap.mmap, int]:
        seg, rel = divmod(slot, self.slots_per_segment)
        return self._segments[seg], rel * self.record_size

    # -- single pages ---------------------------------------------------------
    def put(self, key: bytes, data) -> bool:
        """Store a page; an existing key is overwritten and moves to the end of
        the put order. Returns True when the key was new."""
        slot = self._index.pop(key, None)
        new = slot is None
        if new:
            slot = self._alloc()
        seg, off = self._where(slot)
        hl = self.header_len
        seg[off:off + hl] = key
        seg[off + hl:off + self.record_size] = data
        self._index[key] = slot
        return new

    def get(self, key: bytes) -> Optional[bytes]:
        slot = self._index.get(key)
        if slot is None:
            return None
        seg, off = self._where(slot)
        return seg[off + self.header_len:off + self.record_size]

    def delete(self, key: bytes) -> bool:
        slot = self._index.pop(key, None)
        if slot is None:
            return False
        if self._index:
            self._free.append(slot)
        else:
            self.clear()        # last page gone: give the segments back
        return True

    def clear(self) -> int:
        n = len(self._index)
        self._index.clear()
        self._free.clear()
        self._heap.give(self._segments)
        self._segments.clear()
        self._next = 0
        return n

    # -- batches ----------------------------------------------------------------
    def record_keys(self, records, count: int) -> List[bytes]:
        """The keys (record headers) of ``count`` wire-layout records."""
        mv = memoryview(records)
        rs, hl = self.record_size, self.header_len
        return [bytes(mv[i * rs:i * rs + hl]) for i in range(count)]

    def count_new(self, keys: Sequence[bytes]) -> int:
        uniq = dict.fromkeys(keys)
        return len(uniq) - sum(map(self._index.__contains__, uniq))

    def put_records(self, records, keys: Sequence[bytes]) -> int:
        """Store wire-layout records whose headers are ``keys`` (see
        :meth:`record_keys`), copying runs that land in consecutive slots with one
        slice each. Returns how many keys were new."""
        src = memoryview(records)
        rs = self.record_size
        per = self.slots_per_segment
        index = self._index
        if not self._free and len(dict.fromkeys(keys)) == len(keys) \
                and not any(map(index.__contains__, keys)):
            return self._append_records(src, keys)
        new = 0
        run_slot = run_src = run_len = 0

        def flush() -> None:
            seg, off = self._where(run_slot)
            seg[off:off + run_len * rs] = src[run_src * rs:(run_src + run_len) * rs]

        for i, key in enumerate(keys):
            slot = index.pop(key, None)
            if slot is None:
                slot = self._alloc()
                new += 1
            index[key] = slot
            if run_len and slot == run_slot + run_len and slot % per:
                run_len += 1
                continue
            if run_len:
                flush()
            run_slot, run_src, run_len = slot, i, 1
        if run_len:
            flush()
        return new

    def _append_records(self, src: memoryview, keys: Sequence[bytes]) -> int:
        """Fast path of put_records for all-new keys: consecutive fresh slots, the
        index updated in one C call, one copy per segment touched."""
        rs, per = self.record_size, self.slots_per_segment
        count = len(keys)
        start = self._next
        end = start + count
        while (end - 1) // per >= len(self._segments):
            self._segments.append(self._heap.take())
        self._index.update(zip(keys, range(start, end)))
        self._next = end
        done, slot = 0, start
        while done < count:
            seg, rel = divmod(slot, per)
            n = min(count - done, per - rel)
            self._segments[seg][rel * rs:(rel + n) * rs] = src[done * rs:(done + n) * rs]
            done += n
            slot += n
        return count

    def snapshot(self) -> List[bytes]:
        """The keys in put order, for a save walk that skips later deletions."""
        return list(self._index)

    def collect(self, keys: Sequence[bytes], pos: int, max_pages: int) -> Tuple[int, int, bytes]:
        """Walk ``keys`` from ``pos`` skipping deleted ones; return
        ``(new_pos, count, records)`` for up to ``max_pages`` pages."""
        index = self._index
        rs, per = self.record_size, self.slots_per_segment
        window = keys[pos:pos + max_pages]
        slots = list(map(index.get, window))
        if slots and None not in slots:
            # fast path: nothing deleted and the slots are one consecutive run
            first = slots[0]
            seg, rel = divmod(first, per)
            if rel + len(slots) <= per and slots == list(range(first, first + len(slots))):
                return (pos + len(slots), len(slots),
                        self._segments[seg][rel * rs:(rel + len(slots)) * rs])
        parts: List[bytes] = []
        count = 0
        n = len(keys)
        run_seg = -1
        run_start = run_end = 0
        while pos < n and count < max_pages:
            slot = index.get(keys[pos])
            pos += 1
            if slot is None:
                continue
            count += 1
            seg, rel = divmod(slot, per)
            off = rel * rs
            if seg == run_seg and off == run_end:
                run_end += rs
                continue
            if run_seg >= 0:
                parts.append(self._segments[run_seg][run_start:run_end])
            run_seg, run_start, run_end = seg, off, off + rs
        if run_seg >= 0:
            parts.append(self._segments[run_seg][run_start:run_end])
        return pos, count, parts[0] if len(parts) == 1 else b"".join(parts)

    def collect_into(self, keys: Sequence[bytes], pos: int, max_pages: int,
                     out: memoryview) -> Tuple[int, int]:
        """:meth:`collect` copying the records straight into ``out`` (the caller's
        buffer, e.g. a connection's shared memory): one copy per run of
        consecutive slots and no intermediate bytes. ``out`` must hold
        ``max_pages`` records. Returns ``(new_pos, count)``."""
        index = self._index
        rs, per = self.record_size, self.slots_per_segment
        segments = self._segments
        window = keys[pos:pos + max_pages]
        slots = list(map(index.get, window))
        if slots and None not in slots:
            # fast path: nothing deleted and the slots are one consecutive run
            first = slots[0]
            seg, rel = divmod(first, per)
            k = len(slots)
            if rel + k <= per and slots == list(range(first, first + k)):
                with memoryview(segments[seg]) as sv:
                    out[:k * rs] = sv[rel * rs:(rel + k) * rs]
                return pos + k, k
        count = 0
        n = len(keys)
        run_seg = -1
        run_start = run_end = 0
        at = 0

        def flush() -> int:
            size = run_end - run_start
            with memoryview(segments[run_seg]) as sv:
                out[at:at + size] = sv[run_start:run_end]
            return at + size

        while pos < n and count < max_pages:
            slot = index.get(keys[pos])
            pos += 1
            if slot is None:
                continue
            count += 1
            seg, rel = divmod(slot, per)
            off = rel * rs
            if seg == run_seg and off == run_end:
                run_end += rs
                continue
            if run_seg >= 0:
                at = flush()
            run_seg, run_start, run_end = seg, off, off + rs
        if run_seg >= 0:
            flush()
        return pos, count

    def oldest(self, n: int) -> List[bytes]:
        """Up to ``n`` keys from the start of the put order."""
        out: List[bytes] = []
        for key in self._index:
            if len(out) >= n:
                break
            out.append(key)
        return out

    def keys_with_oid(self, oid: Sequence[int]) -> List[bytes]:
        """Keys of one object's pages, in put order (a scan: objects are not indexed)."""
        prefix = self.make_key(oid, 0)[:-4]
        return [k for k in self._index if k.startswith(prefix)]

    def random_key(self, rng: random.Random, tries: int = 8) -> Optional[bytes]:
        """A uniformly chosen stored key, found by probing slots (O(1), no list)."""
        if not self._index:
            return None
        for _ in range(tries):
            slot = rng.randrange(self._next)
            seg, off = self._where(slot)
            key = seg[off:off + self.header_len]
            if self._index.get(key) == slot:
                return key
        return None

    # -- inspection -------------------------------------------------------------
    def items(self) -> Iterator[Tuple[bytes, bytes]]:
        """(key, data) in put order; data is copied page by page."""
        for key in list(self._index):
            slot = self._index.get(key)
            if slot is None:
                continue
            seg, off = self._where(slot)
            yield key, seg[off + self.header_len:off + self.record_size]

    def crc_map(self) -> Dict[Tuple[OID, int], int]:
        return {self.parse_key(k): zlib.crc32(d) for k, d in self.items()}

    def digest(self) -> Tuple[int, str]:
        """(count, sha256) over the pages in key order, each hashed as the v1
        record (24-byte OID, u32 index, data), so v0 and v1 stores of the same
        pages agree. Sorting the raw keys is already canonical: a v0 key is the
        v1 key without its two zero words, which does not change the order."""
        h = hashlib.sha256()
        order = sorted(self._index)
        pad = bytes(16) if self.version == 0 else b""
        for key in order:
            h.update(key[:8] + pad + key[8:] if pad else key)
            seg, off = self._where(self._index[key])
            h.update(seg[off + self.header_len:off + self.record_size])
        return len(order), h.hexdigest()


def record_crcs(records, count: int, record_size: int, page_size: int, out) -> None:
    """Store the CRC32 of each of ``count`` wire-layout records' pages in
    ``out`` (a writable buffer of native u32): the sidecar's page checksums."""
    mv = memoryview(records).cast("B")
    head = record_size - page_size
    crc32 = fast_crc32
    with memoryview(out) as raw, raw.cast("B") as flat, flat.cast("I") as dst:
        if dst.nbytes < 4 * count:
            raise ValueError(f"a CRC buffer of {dst.nbytes} bytes cannot hold {count} CRCs")
        dst[:count] = array("I", [crc32(mv[o:o + page_size])
                                  for o in range(head, count * record_size, record_size)])


def first_crc_mismatch(records, count: int, record_size: int, page_size: int,
                       crcs) -> Optional[Tuple[int, int, int]]:
    """``(index, got, want)`` of the first record whose page's CRC32 is not
    ``crcs[index]``, else None."""
    mv = memoryview(records).cast("B")
    head = record_size - page_size
    with memoryview(crcs) as raw, raw.cast("B") as flat, flat.cast("I") as want:
        if want.nbytes < 4 * count:
            raise ValueError(f"{want.nbytes // 4} CRCs for {count} records")
        crc32 = fast_crc32
        got = [crc32(mv[o:o + page_size]) for o in range(head, count * record_size, record_size)]
        if got == want[:count].tolist():
            return None
        for i, (g, w) in enumerate(zip(got, want[:count].tolist())):
            if g != w:
                return i, g, w
    return None  # pragma: no cover
