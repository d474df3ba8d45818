"""The page store against a plain model (a dict in put order): the compact
index (per-object slot tables, the put-order log, batched runs) must give the
same answers as the dict it replaced, through puts, overwrites, deletions,
batches and save walks."""
from __future__ import annotations

import random
import struct
import time
from typing import Dict, List, Optional, Tuple

import pytest

from xend_tmem.hypervisor import pagestore
from xend_tmem.hypervisor.pagestore import PageStore, SegmentHeap

PAGE = 64
KEY = struct.Struct("<QQQI")
RS = KEY.size + PAGE


def _key(oid: int, index: int) -> bytes:
    return KEY.pack(oid, 0, 0, index)


def _records(keys: List[bytes], fill: int) -> bytearray:
    out = bytearray()
    for k in keys:
        out += k + bytes([fill % 256]) * PAGE
    return out


def _check(store: PageStore, model: Dict[bytes, bytes]) -> None:
    assert len(store) == len(model)
    assert [k for k, _ in store.items()] == list(model)
    assert store.oldest(5) == list(model)[:5]
    for k, v in model.items():
        assert k in store and store.get(k) == v
    for oid in {k[:24] for k in model}:
        o = KEY.unpack(oid + bytes(4))[:3]
        assert store.keys_with_oid(o) == [k for k in model if k[:24] == oid]


@pytest.mark.parametrize("seed", range(6))
def test_store_behaves_as_an_ordered_dict(seed: int) -> None:
    rng = random.Random(seed)
    store = PageStore(1, PAGE, segment_bytes=5 * RS)
    model: Dict[bytes, bytes] = {}
    for step in range(400):
        op = rng.random()
        oid = rng.randrange(4)
        if op < 0.35:                          # single put (sparse and dense indices)
            idx = rng.choice([rng.randrange(40), rng.randrange(1 << 32)])
            k, v = _key(oid, idx), bytes([step % 256]) * PAGE
            assert store.put(k, v) == (k not in model)
            model.pop(k, None)
            model[k] = v
        elif op < 0.55 and model:              # delete
            k = rng.choice(list(model))
            assert store.delete(k)
            del model[k]
            assert not store.delete(k)
        else:                                  # a batch: runs, overlaps, duplicates
            first = rng.randrange(60)
            keys = [_key(oid, first + i) for i in range(rng.randrange(1, 12))]
            if rng.random() < 0.3:
                keys += [_key(oid + 1, i) for i in range(3)] + keys[:2]
            elif rng.random() < 0.4:           # the object again, after another's run:
                again = first + rng.choice([len(keys), len(keys) + 5, rng.randrange(12)])
                keys += [_key(oid + 1, 7)] + [_key(oid, again + i)      # disjoint or not
                                              for i in range(rng.randrange(1, 6))]
            recs = _records(keys, step)
            want_new = len({k for k in keys if k not in model})
            seen: List[int] = []
            assert store.put_records(recs, len(keys), room=seen.append) == want_new
            assert seen == [want_new]
            for k in keys:
                model.pop(k, None)
                model[k] = bytes([step % 256]) * PAGE
        if step % 40 == 0:
            _check(store, model)
    _check(store, model)


def test_a_refused_batch_stores_nothing() -> None:
    store = PageStore(1, PAGE)
    store.put(_key(1, 0), bytes(PAGE))

    def refuse(n: int) -> None:
        raise MemoryError(n)

    with pytest.raises(MemoryError):
        store.put_records(_records([_key(1, i) for i in range(1, 9)], 7), 8, room=refuse)
    assert len(store) == 1 and [k for k, _ in store.items()] == [_key(1, 0)]


@pytest.mark.parametrize("seed", range(4))
def test_walk_skips_deleted_pages_and_finds_pages_put_again(seed: int) -> None:
    rng = random.Random(seed)
    store = PageStore(1, PAGE, segment_bytes=7 * RS)
    keys = [_key(i // 16, i % 16) for i in range(90)]
    store.put_records(_records(keys, 1), len(keys))
    snap = store.snapshot()
    gone = set(rng.sample(keys, 20))
    for k in gone:
        store.delete(k)
    back = set(rng.sample(sorted(gone), 5))
    for k in back:                             # deleted, then put again (another slot)
        store.put(k, bytes([2]) * PAGE)
    store.put(_key(99, 0), bytes(PAGE))        # new since the snapshot: not walked
    want = [k for k in keys if k not in gone or k in back]
    assert store.walk_left(snap, 0) == len(want)
    got: List[bytes] = []
    pos = 0
    while True:
        pos, count, recs = store.collect(snap, pos, rng.randrange(1, 9))
        if not count:
            break
        got += [bytes(recs[i * RS:i * RS + 28]) for i in range(count)]
    assert got == want
    assert store.walk_after(snap, want[3]) == keys.index(want[3]) + 1
    assert store.walk_after(snap, _key(77, 1)) == len(snap)


def test_emptied_store_keeps_a_walk_consistent() -> None:
    store = PageStore(0, PAGE)
    k = KEY.pack(1, 0, 0, 0)[:8] + (3).to_bytes(4, "little")
    store.put(k, bytes(PAGE))
    snap = store.snapshot()
    store.clear()
    assert store.walk_left(snap, 0) == 0
    store.put(k, bytes([1]) * PAGE)             # the same page, put again
    assert store.collect(snap, 0, 4)[:2] == (1, 1)


def _big_records(first: int, n: int) -> bytearray:
    out = bytearray()
    for i in range(first, first + n):
        out += _key(1, i) + bytes([i % 251]) * 4096
    return out


def test_reserved_heap_is_reused() -> None:
    heap = SegmentHeap(segment_bytes=1 << 20, ahead=2)
    heap.reserve(3 << 20)
    assert heap.free_bytes == 3 << 20
    store = PageStore(1, 4096, heap=heap)
    n = 3 * store.slots_per_segment + 1
    assert store.put_records(_big_records(0, n), n) == n
    assert len(store.segments) == 4 and heap.free_bytes == 0
    assert store.get(_key(1, n - 1)) == bytes([(n - 1) % 251]) * 4096
    store.clear()
    assert heap.free_bytes == 3 << 20          # the reserved amount is kept, no more


def test_a_restore_stream_commits_ahead_and_gives_the_rest_back(monkeypatch) -> None:
    monkeypatch.setattr(pagestore, "_LINGER_S", 0.5)      # the window to see the spares in
    heap = SegmentHeap(segment_bytes=1 << 20, ahead=2)
    store = PageStore(1, 4096, heap=heap)
    per = store.slots_per_segment
    assert store.put_records(_big_records(0, per), per, commit_ahead=True) == per
    # the segment it took was committed by the helper, which owes two more
    deadline = time.monotonic() + 10
    seen_ahead = heap.free_bytes
    while heap._running and time.monotonic() < deadline:   # white-box: the helper thread
        seen_ahead = max(seen_ahead, heap.free_bytes)
        time.sleep(0.001)
    assert not heap._running and heap.free_bytes == 0     # given back once the stream stops
    assert 0 < seen_ahead <= 2 << 20
    assert store.put_records(_big_records(per, per), per, commit_ahead=True) == per
    assert len(store) == 2 * per and store.get(_key(1, 2 * per - 1)) is not None


@pytest.mark.parametrize("path", ["records", "lent"])
def test_an_object_in_several_runs_of_a_batch_is_stored_as_puts(mocker, path: str) -> None:
    """A busy guest's pool comes in put order with holes, so one object's pages
    arrive in several runs of a batch, in any order: still the runs path (no
    page-by-page puts), and the store is what those puts in order make it."""
    store = PageStore(1, PAGE, segment_bytes=64 * RS)
    model: Dict[bytes, bytes] = {_key(9, 0): b"\x09" * PAGE}
    store.put(_key(9, 0), b"\x09" * PAGE)
    per_page = mocker.spy(PageStore, "_put_each")
    spans = [(1, 0, 10), (2, 0, 5), (1, 20, 10), (3, 7, 1), (1, 10, 10), (2, 5, 3)]
    keys = [_key(oid, first + i) for oid, first, m in spans for i in range(m)]
    recs = _records(keys, 0x5A)
    if path == "records":
        assert store.put_records(recs, len(keys)) == len(keys)
    else:
        view = store.lend_slots(len(keys))
        assert view is not None and view.nbytes >= len(recs)
        view[:len(recs)] = recs
        assert store.put_lent(len(keys)) == len(keys)
    assert per_page.call_count == 0
    for k in keys:
        model[k] = b"\x5a" * PAGE
    _check(store, model)
    again = [_key(1, 25), _key(2, 1)]                    # put again: moved to the end
    assert store.put_records(_records(again, 7), 2) == 0
    for k in again:
        model.pop(k)
        model[k] = b"\x07" * PAGE
    _check(store, model)


@pytest.mark.parametrize("path", ["records", "lent"])
def test_a_scattered_restore_batch_commits_ahead_too(mocker, path: str) -> None:
    """A batch that is not all-new runs (here one key is already stored) is
    stored page by page; its new segments still come committed ahead, not
    faulted in under the copy."""
    heap = SegmentHeap(segment_bytes=1 << 20, ahead=2)
    store = PageStore(1, 4096, heap=heap)
    n = 2 * store.slots_per_segment + 3
    keys = [_key(1 + i % 3, i // 3 * 2) for i in range(n)]      # objects interleaved
    store.put(keys[1], bytes([1]) * 4096)                       # stored before the batch
    take = mocker.spy(heap, "take")
    recs = bytearray()
    for i, k in enumerate(keys):
        recs += k + bytes([i % 251]) * 4096
    if path == "records":
        assert store.put_records(recs, n, commit_ahead=True) == n - 1     # new keys
    else:
        done = new = 0
        while done < n:
            view = store.lend_slots(n - done, commit_ahead=True)
            assert view is not None
            m = min(n - done, view.nbytes // RS_4K)
            view[:m * RS_4K] = recs[done * RS_4K:(done + m) * RS_4K]
            new += store.put_lent(m)
            done += m
        assert new == n - 1
    assert take.call_count >= 2
    assert all(call.kwargs.get("ahead") for call in take.call_args_list)
    assert len(store) == n
    for i in (0, n // 2, n - 1):
        assert store.get(keys[i]) == bytes([i % 251]) * 4096
    store.clear()


RS_4K = KEY.size + 4096


def test_a_writer_commits_beside_a_helper_that_is_behind(monkeypatch) -> None:
    """A stream's writer does not wait for a helper that is still committing: it
    commits the segment it needs itself, and the helper owes one fewer."""
    import threading
    release = threading.Event()
    calls: List[tuple] = []
    real = pagestore._new_segment

    def new_segment(size: int, commit: bool):
        calls.append((threading.current_thread().name, commit))
        if threading.current_thread().name == "tmem-commit":
            release.wait(10)                    # the helper is slow
        return real(size, commit)

    monkeypatch.setattr(pagestore, "_new_segment", new_segment)
    heap = SegmentHeap(segment_bytes=1 << 20, ahead=2)
    try:
        t0 = time.monotonic()
        seg = heap.take(ahead=True)
        assert time.monotonic() - t0 < 5 and len(seg) == 1 << 20
        assert (threading.current_thread().name, True) in calls
        assert heap._owed == 2                  # three owed, one taken over
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while heap._running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not heap._running


def _runs_by_record(recs: bytes, count: int) -> list:
    """The reference split: a new run wherever the object changes or the index
    does not follow on."""
    runs: list = []
    for i in range(count):
        head = recs[i * RS:i * RS + KEY.size]
        oid, index = head[:-4], int.from_bytes(head[-4:], "little")
        last = runs[-1] if runs else None
        if last and last[0] == oid and last[1] + last[3] == index:
            runs[-1] = (oid, last[1], last[2], last[3] + 1)
        else:
            runs.append((oid, index, i, 1))
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_batch_runs_match_a_record_by_record_split(seed: int) -> None:
    """Bisection finds a batch's runs (and falls back on batches of many runs or
    runs that look whole at their ends only): the same split either way."""
    rng = random.Random(seed)
    keys: List[bytes] = []
    while len(keys) < rng.choice([1, 7, 60, 200]):
        shape = rng.random()
        oid, first = rng.randrange(3), rng.choice([0, 5, (1 << 32) - 3])
        n = rng.randrange(1, 40)
        if shape < 0.6:        # a run (u32 indices may wrap: not a run there)
            keys += [_key(oid, (first + i) & 0xFFFFFFFF) for i in range(n)]
        elif shape < 0.8:      # a run with one record of another object (or index) inside
            run = [_key(oid, (first + i) & 0xFFFFFFFF) for i in range(n)]
            at = rng.randrange(n)    # ... at its own index or at the run's
            run[at] = rng.choice([_key(oid + 1, first), _key(oid + 1, (first + at) & 0xFFFFFFFF),
                                  _key(oid, (first + at + 9) & 0xFFFFFFFF)])
            keys += run
        else:                  # scattered
            keys += [_key(rng.randrange(3), rng.randrange(50)) for _ in range(n)]
    recs = bytes(_records(keys, seed))
    store = PageStore(1, PAGE)
    assert store._runs_of(memoryview(recs), len(keys)) == _runs_by_record(recs, len(keys))


@pytest.mark.parametrize("word", range(6))
@pytest.mark.parametrize("second_run", ["index-restarts", "index-follows-on", "same-object"])
def test_a_batch_of_two_runs_splits_where_the_second_begins(word: int, second_run: str) -> None:
    """Every split point of a two-run batch, the two objects differing in one
    u32 word of their id (the high ones included), with indices inside and far
    beyond the table the run finder compares against; the second object's
    indices restart, or follow on from the first's (then only the object
    tells the runs apart), or the second run is the same object's from an
    index further on (then only the index does)."""
    def head(obj: int, index: int) -> bytes:
        words = [3, 0, 0, 0, 0, 0]
        words[word] = obj
        return struct.pack("<7I", *words, index)

    for first in (0, 5, 70_000, (1 << 32) - 80):
        for cut in range(1, 60):
            keys = [head(11, first + i) for i in range(cut)]
            obj, second = {"index-restarts": (12, 0), "index-follows-on": (12, first + cut),
                           "same-object": (11, first + cut + 7)}[second_run]
            keys += [head(obj, second + i) for i in range(60 - cut)]
            recs = bytes(_records(keys, cut))
            want = _runs_by_record(recs, len(keys))
            assert len(want) == 2
            assert PageStore(1, PAGE)._runs_of(memoryview(recs), len(keys)) == want


@pytest.mark.parametrize("seed", range(10))
def test_lent_batches_indexed_later_behave_as_puts(seed: int, monkeypatch) -> None:
    """Batches read into lent slots are indexed later, in one pass: on any use
    of the index, at the batch that fills all its lending asked for, or every
    ``_PENDING_RUNS`` runs. Meanwhile keys put again (by a later lent batch, a
    batch put or a single put), deleted or looked up behave as in an ordered
    dict, exactly as if each batch had been indexed at once."""
    rng = random.Random(seed)
    cap = rng.choice([2, 5, 1024])
    monkeypatch.setattr(pagestore, "_PENDING_RUNS", cap, raising=False)
    store = PageStore(1, PAGE, segment_bytes=7 * RS)
    model: Dict[bytes, bytes] = {}
    last: Optional[Tuple[int, int]] = None
    for step in range(300):
        op = rng.random()
        oid = rng.randrange(3)
        if op < 0.6:                               # a lent batch: runs, overlaps, repeats
            first = rng.choice([0, rng.randrange(30), rng.randrange(1 << 32)])
            if last and rng.random() < 0.3:        # over the last batch (maybe still pending)
                oid, first = last
                first = max(0, first + rng.randrange(-3, 4))
            keys = [_key(oid, (first + i) & 0xFFFFFFFF) for i in range(rng.randrange(1, 9))]
            last = (oid, first)
            if rng.random() < 0.3:
                keys += [_key(oid + 1, i) for i in range(rng.randrange(1, 4))]
                if rng.random() < 0.5:             # the object again: disjoint or not
                    again = (first + rng.choice([len(keys), 9, rng.randrange(9)])) & 0xFFFFFFFF
                    keys += [_key(oid, (again + i) & 0xFFFFFFFF) for i in range(3)]
            if rng.random() < 0.1:
                keys += keys[:1]
            asked = len(keys) + rng.choice([0, 0, 3])
            view = store.lend_slots(asked)
            if view is None:                       # freed slots are reused first
                n = len(keys)
                want_new = len({k for k in keys if k not in model})
                assert store.put_records(_records(keys, step), n) == want_new
            else:
                n = min(len(keys), view.nbytes // RS)
                view[:n * RS] = _records(keys[:n], step)
                want_new = len({k for k in keys[:n] if k not in model})
                seen: List[int] = []
                assert store.put_lent(n, room=seen.append) == want_new
                assert seen == [want_new]
                if n == asked:                     # the reader's last batch: indexed now
                    assert not getattr(store, "_pending", ())
            for k in keys[:n]:
                model.pop(k, None)
                model[k] = bytes([step % 256]) * PAGE
        elif op < 0.7:                             # a single put
            k = _key(oid, rng.randrange(30))
            assert store.put(k, bytes([step % 256]) * PAGE) == (k not in model)
            model.pop(k, None)
            model[k] = bytes([step % 256]) * PAGE
        elif op < 0.78 and model:                  # a delete
            k = rng.choice(list(model))
            assert store.delete(k)
            del model[k]
        elif op < 0.9:                             # a lookup
            k = _key(oid, rng.randrange(30))
            assert store.get(k) == model.get(k)
        else:
            _check(store, model)
        assert len(getattr(store, "_pending", ())) < cap and len(store) == len(model)
    _check(store, model)


def _reference_digest(pages: Dict[Tuple[Tuple[int, int, int], int], bytes]) -> Tuple[int, str]:
    """The digest's definition, written out: v1 records in (OID, index) order."""
    import hashlib
    h = hashlib.sha256()
    for (oid, index), data in sorted(pages.items()):
        h.update(struct.pack("<QQQI", *oid, index) + data)
    return len(pages), h.hexdigest()


@pytest.mark.parametrize("seed", range(6))
def test_digest_is_the_definition_whatever_the_layout(seed: int) -> None:
    """Runs hashed straight from the segments, page by page where slots are
    scattered, across segment ends and past holes and sparse indices: always
    the same sha256 as the definition, for v0 and v1 stores alike, whatever
    order the pages were put in or how many were deleted."""
    rng = random.Random(seed)
    pages: Dict[Tuple[Tuple[int, int, int], int], bytes] = {}
    for o in range(rng.randrange(1, 6)):
        base = rng.choice([0, 5, 1 << 20])
        for i in range(rng.randrange(1, 1300)):
            index = base + (i if rng.random() < 0.9 else rng.randrange(1 << 31))
            pages[((o + 1, 0, 0), index)] = bytes([rng.randrange(256)]) * 4096
    keys = list(pages)
    if seed % 2:
        rng.shuffle(keys)
    else:
        keys.sort()                   # a restore of a walk in order: long runs
    stores = [PageStore(0, 4096, segment_bytes=1 << 20), PageStore(1, 4096)]
    for st in stores:
        for oid, index in keys:
            st.put(st.make_key(oid, index), pages[(oid, index)])
        for oid, index in keys[::7]:
            st.delete(st.make_key(oid, index))
    for oid, index in keys[::7]:
        del pages[(oid, index)]
    want = _reference_digest(pages)
    assert [st.digest() for st in stores] == [want, want]


def test_an_ordered_store_is_hashed_in_runs(mocker) -> None:
    """A store whose slots follow (OID, index) order is hashed a run per
    segment, not a call per page."""
    import hashlib
    st = PageStore(1, 4096)
    for i in range(2000):
        st.put(st.make_key((1, 0, 0), i), bytes([i % 256]) * 4096)
    calls = []
    real = hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self.h = real()

        def update(self, data) -> None:
            calls.append(len(data))
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    mocker.patch.object(pagestore.hashlib, "sha256", Counting)
    count, _ = st.digest()
    assert count == 2000 and sum(calls) == 2000 * st.record_size
    assert len(calls) == -(-2000 // st.slots_per_segment)
