"""Page records read straight into the store's slots (``restore_lend_slots``)
and written straight from them (``save_get_pages_held``): every outcome, good or
bad, is the one the copying path gives (the same pages stored, the same error at
the same offset), and a refused or cut batch leaves nothing of itself behind."""
from __future__ import annotations

import io
import struct
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
from hvfixtures import write_tmem_stream

from xend_tmem.binio import StreamReader
from xend_tmem.codec import tmemchunk as tc
from xend_tmem.domconfig import BULK_OID_BASE, parse_domain_config
from xend_tmem.errors import HypervisorError, StreamError
from xend_tmem.hypervisor.pagestore import PageStore, SegmentHeap
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.tmem.restore import TmemRestorer

PAGES = 1300                       # a buffered MiB, then two and a half segments in place
REC = tc.record_size(1, 4096)


class Trickle(io.RawIOBase):
    """A pipe that hands out at most ``step`` bytes a call (short reads/writes)."""

    def __init__(self, data: bytes = b"", step: int = 4093) -> None:
        self.data = data
        self.at = 0
        self.step = step
        self.out = bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.step, len(self.data) - self.at)
        b[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n

    def write(self, b: Any) -> int:
        with memoryview(b) as mv:
            n = min(mv.nbytes, self.step)
            self.out += mv[:n]
        return n


def _source(pages: int = PAGES, objects: int = 5) -> Tuple[SimHypervisor, int]:
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain(parse_domain_config({
        "name": "src", "memory": 1, "vcpus": 1,
        "tmem": {"version": 1, "pools": [
            {"id": 0, "persistent": True,
             "bulk": {"pages": pages, "objects": objects, "seed": 5}},
            {"id": 1, "persistent": True, "bulk": {"pages": 3, "objects": 1, "seed": 6}}]}}))
    hv.suspend(domid)
    return hv, domid


def _stream(hv: SimHypervisor, domid: int, f: Optional[Any] = None) -> bytes:
    out = f if f is not None else io.BytesIO()
    write_tmem_stream(hv, domid, out)
    return bytes(out.out) if isinstance(out, Trickle) else out.getvalue()


def _first_record(data: bytes) -> int:
    return data.index(struct.pack("<QQQI", BULK_OID_BASE, 0, 0, 0))


def _restore(data: bytes, in_place: bool, monkeypatch: pytest.MonkeyPatch,
             step: Optional[int] = None, capacity: int = 1 << 22) -> Dict[str, Any]:
    """Restore ``data``; what came of it: the error (kind, offset, field, text),
    the pages stored, how many records were read in place."""
    direct = []
    with monkeypatch.context() as m:
        if not in_place:
            m.setattr(SimHypervisor, "restore_lend_slots", lambda *a: None)
        read_direct = StreamReader.read_direct

        def counting(self: StreamReader, out: memoryview) -> int:
            got = read_direct(self, out)
            direct.append(got)
            return got

        m.setattr(StreamReader, "read_direct", counting)
        hv = SimHypervisor(tmem_version=1, tmem_capacity_pages=capacity)
        domid = hv.create_domain_shell("dst", 256, 1)
        f = io.BytesIO(data) if step is None else Trickle(data, step)
        r = StreamReader(f)
        rest = TmemRestorer(hv, domid)
        error = None
        try:
            off = r.offset
            rest.read_chunk(r, r.s32("marker"), off)
            rest.finish()
        except (StreamError, HypervisorError) as exc:
            error = (type(exc).__name__, getattr(exc, "offset", None),
                     getattr(exc, "field", None), str(exc))
            rest.drain()
        return {"error": error, "pages": hv.tmem_digest(domid), "offset": r.offset,
                "direct": sum(direct), "used": hv._used}


@pytest.fixture(scope="module")
def stream() -> bytes:
    return _stream(*_source())


def _same(data: bytes, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Dict[str, Any]:
    fast = _restore(data, True, monkeypatch, **kw)
    slow = _restore(data, False, monkeypatch, **kw)
    assert slow["direct"] == 0
    direct = fast.pop("direct")
    slow.pop("direct")
    assert fast == slow
    fast["direct"] = direct
    return fast


def test_a_whole_stream_is_read_in_place_and_stores_what_the_copy_does(
        stream: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    got = _same(stream, monkeypatch)
    assert got["error"] is None
    assert got["pages"][0][0] == PAGES and got["pages"][1][0] == 3
    assert got["direct"] >= (PAGES - 260) * REC        # all but the buffered first MiB


@pytest.mark.parametrize("step", [7, 4093, 70000])
def test_short_reads_from_the_pipe(stream: bytes, step: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if step < 100:               # a few bytes a call: a small stream (two segments)
        stream = _stream(*_source(pages=300))
    got = _same(stream, monkeypatch, step=step)
    assert got["error"] is None and got["direct"] > 0


@pytest.mark.parametrize("cut", [300, 600, 761, 1299])
def test_a_terminator_inside_a_batch_read_in_place(stream: bytes, cut: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool announces PAGES and carries ``cut`` (a live save's deletions):
    the records before the terminator are stored, the bytes read past it go
    back to the stream and the next pool follows."""
    head = _first_record(stream)
    data = stream[:head + cut * REC] + tc.terminator(1) + stream[head + PAGES * REC:]
    got = _same(data, monkeypatch)
    assert got["error"] is None
    assert got["pages"][0][0] == cut and got["pages"][1][0] == 3
    assert got["offset"] == len(data)


@pytest.mark.parametrize("at", [700, 1001])
def test_a_corrupt_record_mid_batch_stores_nothing_after_it(
        stream: bytes, at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose OID is all ones where a page was due ends the list there;
    the page data behind it then reads as a pool id, refused at its offset."""
    head = _first_record(stream)
    o = head + at * REC
    data = stream[:o] + tc.terminator(1) + stream[o + 24:]
    got = _same(data, monkeypatch)
    assert got["error"] is not None and got["error"][0] == "StreamError"
    assert got["error"][1] == o + 24 and got["error"][2] == "pool_id"
    assert got["pages"][0][0] == at


@pytest.mark.parametrize("keep", [900 * REC + 17, 900 * REC, 1100 * REC + 30])
def test_a_stream_cut_inside_the_page_list(stream: bytes, keep: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    head = _first_record(stream)
    got = _same(stream[:head + keep], monkeypatch)
    assert got["error"] is not None and got["error"][0] == "StreamError"
    assert got["error"][1] == head + keep // REC * REC
    assert got["pages"][0][0] == keep // REC


def test_repeated_keys_in_a_batch_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overwrites (a key twice in the list) are stored as the copy path stores them."""
    src, domid = _source()
    data = bytearray(_stream(src, domid))
    head = _first_record(bytes(data))
    for i in (800, 801, 1200):             # these records repeat the keys of 3, 4, 5
        data[head + i * REC:head + i * REC + 28] = data[head + (i - 797) * REC:
                                                        head + (i - 797) * REC + 28]
    got = _same(bytes(data), monkeypatch)
    assert got["error"] is None and got["pages"][0][0] == PAGES - 3


@pytest.mark.parametrize("in_place", [True, False])
def test_a_full_hypervisor_refuses_a_batch_whole(stream: bytes, in_place: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused with the same error either way; what was stored before depends
    only on where the batches fall (in place: a segment's slots at a time)."""
    got = _restore(stream, in_place, monkeypatch, capacity=1000)
    assert got["error"] is not None and got["error"][0] == "HypervisorError"
    assert "tmem is full" in got["error"][3]
    stored = got["pages"][0][0]
    # whole batches only (none cut to fit the 1000 pages): the buffered MiB,
    # then a segment's slots in place, or a batch of tc.BATCH_BYTES that fits
    assert got["used"] == stored and 0 < stored < 1000
    assert (got["direct"] > 0) == in_place


# -- the store --------------------------------------------------------------------

def _records(first: int, n: int, oid: int = 9) -> bytes:
    return b"".join(struct.pack("<QQQI", oid, 0, 0, first + i) + bytes([i % 251]) * 4096
                    for i in range(n))


def test_put_lent_refused_leaves_the_store_as_it_was() -> None:
    heap = SegmentHeap()
    st = PageStore(1, 4096, heap=heap)
    st.put_records(_records(0, 10), 10)
    before = (len(st), st.digest(), st.allocated_bytes)
    view = st.lend_slots(st.slots_per_segment * 2)
    assert view is not None and view.nbytes == (st.slots_per_segment - 10) * REC
    view[:5 * REC] = _records(100, 5)

    def refuse(n: int) -> None:
        raise HypervisorError("RESTORE_PUT_PAGE", f"no room for {n}")

    with pytest.raises(HypervisorError):
        st.put_lent(5, room=refuse)
    assert (len(st), st.digest(), st.allocated_bytes) == before
    assert st.lent_view is None
    with pytest.raises(ValueError):
        st.put_lent(1)                      # nothing lent any more


def test_a_lend_goes_stale_when_the_store_changes_meanwhile() -> None:
    st = PageStore(1, 4096)
    st.put_records(_records(0, 4), 4)
    view = st.lend_slots(8)
    assert view is not None
    st.put(struct.pack("<QQQI", 1, 0, 0, 0), bytes(4096))    # takes the first lent slot
    assert st.lent_view is None
    with pytest.raises(ValueError):
        st.put_lent(1)
    assert len(st) == 5


def test_a_lent_segment_goes_back_to_the_heap_when_unused() -> None:
    heap = SegmentHeap()
    st = PageStore(1, 4096, heap=heap)
    heap.reserve(4 * heap.segment_bytes)
    free = heap.free_bytes
    assert st.lend_slots(3) is not None
    assert heap.free_bytes == free - heap.segment_bytes
    assert st.put_lent(0) == 0
    assert heap.free_bytes == free and st.allocated_bytes == 0


def test_the_store_lends_nothing_while_it_has_freed_slots() -> None:
    st = PageStore(1, 4096)
    st.put_records(_records(0, 4), 4)
    st.delete(struct.pack("<QQQI", 9, 0, 0, 2))
    assert st.lend_slots(8) is None


# -- the reader -----------------------------------------------------------------------

def test_read_direct_takes_the_buffer_first_and_unread_gives_bytes_back() -> None:
    data = bytes(range(256)) * 64
    r = StreamReader(Trickle(data, 100), offset=1000)
    assert r.fill(50) >= 50
    r.skip(10)
    out = bytearray(3000)
    with memoryview(out) as mv:
        assert r.read_direct(mv) == 3000
    assert out == data[10:3010] and r.offset == 4010
    r.unread(out[2000:])                   # past what the reader still buffers
    assert r.offset == 3010
    assert r.read_exact(1500, "x") == data[2010:3510]
    rest = bytearray(20000)
    with memoryview(rest) as mv:
        assert r.read_direct(mv) == len(data) - 3510       # short: the end of the stream
    assert rest[:len(data) - 3510] == data[3510:]
    assert r.at_eof() and r.offset == 1000 + len(data)


def test_unread_into_the_room_before_pos() -> None:
    r = StreamReader(io.BytesIO(b"abcdefgh"))
    assert r.read_exact(6, "x") == b"abcdef"
    r.unread(b"XY")
    assert r.offset == 4 and r.read_exact(4, "x") == b"XYgh"


# -- the save side ----------------------------------------------------------------------

def _chunks(hv: SimHypervisor, domid: int, monkeypatch: pytest.MonkeyPatch,
            in_place: bool, f: Optional[Any] = None) -> Iterator[bytes]:
    with monkeypatch.context() as m:
        if not in_place:                    # the backend declines to lend: a copy
            m.setattr(SimHypervisor, "save_pages_lending", lambda self: None)
        yield _stream(hv, domid, f)


def test_the_save_writes_views_of_the_store_the_same_bytes(
        stream: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    view = SimHypervisor.save_get_pages_held

    def counting(self: SimHypervisor, *a: Any, **kw: Any) -> Tuple[int, Any, Any]:
        got = view(self, *a, **kw)
        calls.append(type(got[1]))
        return got

    monkeypatch.setattr(SimHypervisor, "save_get_pages_held", counting)
    src, domid = _source()
    (fast,) = _chunks(src, domid, monkeypatch, True)
    assert memoryview in calls
    lent = len(calls)
    (slow,) = _chunks(src, domid, monkeypatch, False)
    assert len(calls) == lent              # declined: nothing lent, save_get_pages copied
    (trickled,) = _chunks(src, domid, monkeypatch, True, Trickle(step=65521))  # short writes
    assert fast == slow == trickled == stream


def test_an_emptied_store_keeps_its_memory_while_a_walk_is_open() -> None:
    """A save may still be writing views of the segments: they are not handed
    to another store until the walk is gone."""
    heap = SegmentHeap()
    heap.reserve(8 * heap.segment_bytes)
    st = PageStore(1, 4096, heap=heap)
    st.put_records(_records(0, 20), 20)
    snap = st.snapshot()
    _, count, records = st.collect(snap, 0, 20, view=True)
    assert count == 20 and isinstance(records, memoryview) and records.readonly
    free = heap.free_bytes
    st.clear()
    assert heap.free_bytes == free
    assert bytes(records[28:32]) == bytes([0]) * 4     # still the page it was
    del snap                                          # the walk is gone
    st.put_records(_records(0, 1), 1)
    assert heap.free_bytes == free - heap.segment_bytes
    st.clear()
    assert heap.free_bytes == free                    # given back this time
