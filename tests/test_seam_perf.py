"""The save path's zero-copy and overlap measures (issue 6, PERF6): each must
give the same bytes and the same hypervisor calls as the plain path."""
from __future__ import annotations

import io
import os
import random
import struct
from typing import List

import pytest

from xend_tmem import binio
from xend_tmem.binio import StreamWriter
from xend_tmem.codec import tmemchunk as tc
from xend_tmem import xen
from xend_tmem.hypervisor.interface import Hypervisor
from xend_tmem.hypervisor.pagestore import PageStore
from xend_tmem.tmem.save import TmemWriter

RS = 24 + 4 + 4096


def _key(i: int) -> bytes:
    return struct.pack("<QQQI", 1, 0, i // 64, i % 64)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_collect_into_gives_what_collect_gives(seed):
    """Deleted keys, reused slots and segment boundaries: same records, same cursor."""
    rng = random.Random(seed)
    store = PageStore(1, 4096, segment_bytes=7 * RS)       # 7 slots a segment
    for i in range(60):
        store.put(_key(i), bytes([i]) * 4096)
    for i in rng.sample(range(60), 15):
        store.delete(_key(i))
    for i in range(60, 70):                                  # reuse freed slots
        store.put(_key(i), bytes([i]) * 4096)
    store.put(_key(5), bytes([5]) * 4096)                    # (again) the newest page
    keys = store.snapshot()
    store.delete(_key(5))                                    # a page gone since the snapshot
    out = memoryview(bytearray(9 * RS))
    pos_a = pos_b = 0
    while True:
        pos_a, count_a, recs = store.collect(keys, pos_a, 9)
        pos_b, count_b = store.collect_into(keys, pos_b, 9, out)
        assert (pos_a, count_a) == (pos_b, count_b)
        assert bytes(out[:count_b * RS]) == bytes(recs)
        if not count_a:
            break


def test_writer_streams_a_regular_file_to_the_disk_only(monkeypatch, tmp_path):
    calls: List[tuple] = []
    monkeypatch.setattr(binio, "_sync_file_range", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(binio, "WRITEBACK_BYTES", 256 << 10)
    with open(tmp_path / "img", "wb", buffering=0) as f:
        w = StreamWriter(f)
        for _ in range(8):
            w.write(bytes(128 << 10))
        w.flush()
        fd, r = f.fileno(), 256 << 10
        # each range is started, and the one two ranges back is waited for
        assert calls == [(fd, 0, r, 2), (fd, r, r, 2), (fd, 2 * r, r, 2), (fd, 0, r, 7),
                         (fd, 3 * r, r, 2), (fd, r, r, 7)]
    assert (tmp_path / "img").stat().st_size == 1 << 20
    calls.clear()
    r, wfd = os.pipe()
    try:
        with open(wfd, "wb", buffering=0) as pipe:
            w = StreamWriter(pipe)
            w.write(bytes(64 << 10))
            assert w._wb_fd == -1
        w = StreamWriter(io.BytesIO())
        for _ in range(4):
            w.write(bytes(128 << 10))
    finally:
        os.close(r)
    assert calls == []


def test_writer_stops_asking_when_the_filesystem_refuses(monkeypatch, tmp_path):
    calls: List[tuple] = []
    monkeypatch.setattr(binio, "_sync_file_range", lambda *a: calls.append(a) or -1)
    monkeypatch.setattr(binio, "WRITEBACK_BYTES", 64 << 10)
    with open(tmp_path / "img", "wb", buffering=0) as f:
        w = StreamWriter(f)
        for _ in range(4):
            w.write(bytes(64 << 10))
    assert len(calls) == 1


class _SpyPipe:
    """A pipe's write end that records which object each write's bytes lived in."""

    def __init__(self, fd: int) -> None:
        self._f = open(fd, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self.sources: List[object] = []
        self.sizes: List[int] = []

    def fileno(self) -> int:
        return self._f.fileno()

    def write(self, mv: memoryview) -> int:
        self.sources.append(mv.obj)
        self.sizes.append(mv.nbytes)
        return self._f.write(mv)

    def close(self) -> None:
        self._f.close()


def test_writer_bounces_large_writes_into_a_pipe_and_only_those(tmp_path):
    """A large buffer reaches a pipe through the writer's own small buffer, in
    pieces no larger than it, byte for byte; coalesced small writes, files and
    sockets get the caller's buffer itself."""
    import threading
    big = bytes(random.Random(7).getrandbits(8) for _ in range(1000)) * 700   # 700,000 bytes
    big_view = memoryview(big).cast("I")
    r, wfd = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_drain(r)))
    reader.start()
    spy = _SpyPipe(wfd)
    try:
        w = StreamWriter(spy)
        w.write(b"hdr")                          # coalesced
        w.write(big_view)                        # not bytes: any buffer, any format
        w.write(b"tail" * 10)
        w.flush()
    finally:
        spy.close()
        reader.join()
    assert bytes(got) == b"hdr" + big + b"tail" * 10
    assert max(spy.sizes) <= binio.PIPE_BOUNCE
    assert big not in spy.sources and big_view.obj not in spy.sources
    bounced = [s for s in spy.sources if isinstance(s, bytearray) and len(s) == binio.PIPE_BOUNCE]
    assert sum(n for s, n in zip(spy.sources, spy.sizes) if s in bounced) == len(big)

    with open(tmp_path / "img", "wb", buffering=0) as f:        # a file: written straight
        seen: List[object] = []
        real = f.write
        f_spy = type("F", (), {"fileno": f.fileno,
                               "write": lambda self, mv: seen.append(mv.obj) or real(mv)})()
        w = StreamWriter(f_spy)
        w.write(big)
        assert seen and all(o is big for o in seen)
    assert (tmp_path / "img").read_bytes() == big


def test_reader_reads_a_pipe_and_a_file_straight_into_the_destination(tmp_path):
    """Read in place, a pipe as a file: into the destination itself, byte for
    byte (a spliced save's pages are copied once, by this read)."""
    import threading
    from xend_tmem.binio import StreamReader
    data = bytes(random.Random(8).getrandbits(8) for _ in range(1000)) * 700
    rfd, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    targets: List[object] = []
    with open(rfd, "rb", buffering=0) as f:
        real = f.readinto
        spy = type("P", (), {"fileno": f.fileno,
                             "readinto": lambda self, mv: targets.append((mv.obj, mv.nbytes))
                             or real(mv)})()
        r = StreamReader(spy)
        out = bytearray(len(data) + 10)
        got = r.read_direct(memoryview(out))
    writer.join()
    assert got == len(data) and bytes(out[:got]) == data
    assert targets and all(obj is out for obj, _ in targets)
    assert max(n for _, n in targets) > binio.PIPE_BOUNCE    # not in pieces either

    (tmp_path / "img").write_bytes(data)
    targets.clear()
    with open(tmp_path / "img", "rb", buffering=0) as f:
        real = f.readinto
        spy = type("F", (), {"fileno": f.fileno,
                             "readinto": lambda self, mv: targets.append((mv.obj, mv.nbytes))
                             or real(mv)})()
        out = bytearray(len(data))
        assert StreamReader(spy).read_direct(memoryview(out)) == len(data)
    assert bytes(out) == data and targets and all(obj is out for obj, _ in targets)


def test_both_ends_widen_a_pipe_to_a_chunk():
    import fcntl
    from xend_tmem.binio import CHUNK, StreamReader
    for end in ("reader", "writer"):
        r, w = os.pipe()
        try:
            assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < CHUNK      # Linux's 64 KiB
            if end == "reader":
                with open(r, "rb", buffering=0, closefd=False) as f:
                    StreamReader(f)
            else:
                with open(w, "wb", buffering=0, closefd=False) as f:
                    StreamWriter(f)
            assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == CHUNK
        finally:
            os.close(r)
            os.close(w)


def _drain(fd: int) -> bytes:
    out = bytearray()
    with open(fd, "rb", buffering=0) as f:
        while True:
            b = f.read(1 << 16)
            if not b:
                return bytes(out)
            out += b


def _records(start: int, n: int) -> bytes:
    return b"".join(struct.pack("<QQQI", 1, 2, 3, start + i) + bytes(4096) for i in range(n))


@pytest.mark.parametrize("n_pages,walk", [(600, 600), (600, 300), (254, 254), (0, 0)])
def test_two_batches_in_flight_make_the_plain_loops_calls(mocker, n_pages, walk):
    """Same counts asked, in the same order, never past the pages announced; a
    short walk still ends with the terminator; an empty pool asks nothing."""
    hv = mocker.create_autospec(Hypervisor, instance=True)
    left = [walk]
    asked: List[int] = []

    def get(domid, pool_id, n):
        asked.append(n)
        k = min(n, left[0])
        left[0] -= k
        return k, _records(walk - left[0] - k, k)

    hv.save_pages_lending.return_value = None       # lends nothing: save_get_pages copies
    hv.save_get_pages.side_effect = get
    deleted = [(0, (1, 2, 3), i) for i in range(n_pages - walk)]
    hv.save_get_invs.side_effect = lambda d, start, n: deleted[start:start + n]
    w = TmemWriter(hv, 1, live=True)
    w.version = 1
    out = io.BytesIO()
    sw = StreamWriter(out)
    pool = tc.PoolRecord(0, xen.POOL_PERSIST | 1 << xen.POOL_VERSION_SHIFT, n_pages, (0, 0))
    w._write_pages(sw, pool)
    sw.flush()
    per = tc.BATCH_BYTES // RS
    plain: List[int] = []
    sent, remaining = 0, walk
    while sent < n_pages:
        plain.append(min(per, n_pages - sent))
        got = min(plain[-1], remaining)
        remaining -= got
        if not got:
            break
        sent += got
    assert asked == plain
    body = out.getvalue()
    assert body[:walk * RS] == _records(0, walk)
    assert body[walk * RS:] == (tc.terminator(1) if walk < n_pages else b"")
    assert w.pages == walk


def test_writer_streams_from_where_the_file_stands(monkeypatch, tmp_path):
    """A file with bytes before the stream (a header written first): the ranges
    are the file's, not the stream's."""
    calls: List[tuple] = []
    monkeypatch.setattr(binio, "_sync_file_range", lambda *a: calls.append(a) or 0)
    monkeypatch.setattr(binio, "WRITEBACK_BYTES", 64 << 10)
    with open(tmp_path / "img", "wb", buffering=0) as f:
        f.write(b"head")
        w = StreamWriter(f)
        w.write(bytes(64 << 10))
        assert calls == [(f.fileno(), 4, 64 << 10, 2)]


def _resident_pages(path) -> List[int]:
    """Which of the file's pages are in the page cache (mincore of a mapping)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            pytest.skip("cannot map the file")
        try:
            if libc.mincore(addr, size, vec) != 0:
                pytest.skip(f"mincore: {os.strerror(ctypes.get_errno())}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return [b & 1 for b in vec]


def _mib_resident(path, lo_mib: int, hi_mib: int) -> float:
    pages = _resident_pages(path)[lo_mib * 256:hi_mib * 256]
    return sum(pages) / 256


def test_drop_behind_reads_everything_and_keeps_little_cached(tmp_path):
    """A restore's read of its image: every byte arrives (read and readinto),
    what was read more than a range ago leaves the page cache; a plain read of
    the same file (the control) leaves it cached."""
    path = tmp_path / "img"
    data = os.urandom(1 << 20) * 128
    with open(path, "wb") as f:                     # on the disk, as a saved image is
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    assert _mib_resident(path, 0, 64) > 48          # the control: a plain read caches
    got = bytearray()
    with open(path, "rb") as raw:
        f = binio.DropBehind(raw)
        assert f.fileno() == raw.fileno()
        buf = bytearray(3 << 20)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            got += buf[:n]
            got += f.read(12345)
        f.close()
        assert raw.closed
    assert got == data
    assert _mib_resident(path, 0, 128 - 2 * (binio.WRITEBACK_BYTES >> 20)) < 4
