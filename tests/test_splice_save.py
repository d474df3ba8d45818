"""A save into a pipe hands a frozen client's pages over by reference
(``StreamWriter.stable``, vmsplice): the reader gets exactly the stream a copying
save writes, even when the store's memory is scribbled over the moment the save
returns, because the save returns only once the reader has taken every page."""
from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import threading
import time
from typing import Callable, List, Tuple

import pytest
from hvfixtures import bulk_source

from xend_tmem import binio
from xend_tmem.binio import StreamWriter
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.tmem.save import TmemWriter

PAGES = 1500                                   # ~6 MiB of records: six pipes full
F_SETPIPE_SZ = 1031

pytestmark = pytest.mark.skipif(binio._vmsplice is None, reason="no vmsplice(2) here")


def _save(hv: SimHypervisor, domid: int, out: object,
          after: Callable[[], None] = lambda: None) -> None:
    w = StreamWriter(out)                      # type: ignore[arg-type]
    writer = TmemWriter(hv, domid, live=False)
    writer.begin()
    try:
        writer.write_tmem(w)
        w.flush()
        after()                    # what may happen once the save has written its chunk
    finally:
        writer.end()


def _scribble(hv: SimHypervisor, domid: int) -> Callable[[], None]:
    """Overwrite every byte of the domain's tmem store (as pages put after the
    thaw, or another domain's, would)."""
    def run() -> None:
        for pool in hv._client(domid, "test").pools:
            if pool is not None:
                for seg in pool.store.segments:
                    seg[:] = b"\xa5" * len(seg)
    return run


def _through_pipe(hv: SimHypervisor, domid: int,
                  after: Callable[[], None]) -> Tuple[bytes, List[int]]:
    """Save into a 1 MiB pipe read by a slow reader thread; what it read, and
    the sizes spliced."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    got = bytearray()

    def reader() -> None:
        with os.fdopen(r, "rb", buffering=0) as f:
            while True:
                piece = f.read(64 << 10)
                if not piece:
                    return
                got.extend(piece)
                time.sleep(0.001)              # slower than the writer: the pipe stays full

    t = threading.Thread(target=reader)
    t.start()
    spliced: List[int] = []
    real = binio._splice_all

    def counting(fd: int, data: memoryview) -> None:
        spliced.append(data.nbytes)
        real(fd, data)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(binio, "_splice_all", counting)
        with os.fdopen(w, "wb", buffering=0) as out:
            _save(hv, domid, out, after)
    t.join(timeout=60)
    assert not t.is_alive()
    return bytes(got), spliced


def test_spliced_save_reads_as_the_copying_save_writes_even_if_the_store_changes_after() -> None:
    hv, domid = bulk_source(PAGES, 7, seed=11)
    copy = io.BytesIO()
    _save(hv, domid, copy)
    got, spliced = _through_pipe(hv, domid, _scribble(hv, domid))
    assert sum(spliced) > (PAGES - 300) * 4124         # the pages went by reference
    assert got == copy.getvalue()


def test_without_waiting_for_the_reader_the_scribble_would_show(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a writer that returned while the pipe still held its pages
    would send what the store held later, which the test above would see."""
    monkeypatch.setattr(StreamWriter, "settle", lambda self: self._held.clear())
    hv, domid = bulk_source(PAGES, 7, seed=11)
    copy = io.BytesIO()
    _save(hv, domid, copy)
    got, _ = _through_pipe(hv, domid, _scribble(hv, domid))
    assert len(got) == len(copy.getvalue()) and got != copy.getvalue()


def test_a_backend_that_lends_only_until_release_is_written_not_spliced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hv, domid = bulk_source(PAGES, 7, seed=11)
    real = SimHypervisor.save_pages_lending
    monkeypatch.setattr(SimHypervisor, "save_pages_lending",
                        lambda self: dataclasses.replace(real(self), in_place=False))
    copy = io.BytesIO()
    _save(hv, domid, copy)
    got, spliced = _through_pipe(hv, domid, lambda: None)
    assert spliced == [] and got == copy.getvalue()


def test_a_shared_pool_is_written_not_spliced() -> None:
    """Its other sharers still put while this client is frozen."""
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain(parse_domain_config({
        "name": "src", "memory": 1, "vcpus": 1,
        "tmem": {"version": 1, "pools": [
            {"id": 0, "persistent": True, "shared": True, "uuid": [5, 6],
             "bulk": {"pages": PAGES, "objects": 7, "seed": 11}}]}}))
    hv.suspend(domid)
    copy = io.BytesIO()
    _save(hv, domid, copy)
    got, spliced = _through_pipe(hv, domid, lambda: None)
    assert spliced == [] and got == copy.getvalue() and len(got) > PAGES * 4096


def test_a_reader_that_went_away_does_not_hang_the_save() -> None:
    hv, domid = bulk_source(PAGES, 7, seed=11)
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    first = threading.Event()

    def reader() -> None:
        os.read(r, 4096)
        first.set()
        os.close(r)                            # gone with the pipe full of pages

    t = threading.Thread(target=reader)
    t.start()
    with os.fdopen(w, "wb", buffering=0) as out, pytest.raises(BrokenPipeError):
        _save(hv, domid, out)
    t.join()
    assert first.is_set()
