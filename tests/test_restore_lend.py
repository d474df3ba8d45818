"""A restore's batches stay in the stream reader's buffers (lent to the put
thread, given back after the put), never copied on the way: pages arrive intact
across many batches, after an early terminator, and the reader keeps at most
two buffers however long the stream."""
from __future__ import annotations

import io
import struct
from typing import Dict, Tuple

import pytest
from hvfixtures import bulk_source, write_tmem_stream

from xend_tmem.binio import StreamReader
from xend_tmem.codec import tmemchunk as tc
from xend_tmem.domconfig import BULK_OID_BASE
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.tmem.restore import TmemRestorer

PAGES = 1500          # six 1 MiB batches


def _source(pages: int) -> Tuple[SimHypervisor, int]:
    return bulk_source(pages, objects=7, seed=3)


def _stream(hv: SimHypervisor, domid: int) -> bytes:
    out = io.BytesIO()
    write_tmem_stream(hv, domid, out)
    return out.getvalue()


def _restore(data: bytes) -> Tuple[SimHypervisor, Dict[int, Tuple[int, str]], StreamReader]:
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain_shell("dst", 256, 1)
    r = StreamReader(io.BytesIO(data))
    rest = TmemRestorer(hv, domid)
    off = r.offset
    rest.read_chunk(r, r.s32("marker"), off)
    rest.finish()
    assert r.at_eof()
    return hv, hv.tmem_digest(domid), r


@pytest.mark.parametrize("in_place", [True, False])
def test_many_batches_arrive_intact_and_the_reader_keeps_two_buffers(monkeypatch,
                                                                     in_place: bool) -> None:
    """With the store's slots lent (``restore_lend_slots``) the records are read
    straight into them, all but what the reader had buffered; without, every
    batch stays in the reader's buffers. No batch is copied either way."""
    lent = []
    direct = []
    lend = StreamReader.lend
    read_direct = StreamReader.read_direct

    def counting(self: StreamReader, n: int) -> bytearray:
        lent.append(n)
        return lend(self, n)

    def counting_direct(self: StreamReader, out: memoryview) -> int:
        got = read_direct(self, out)
        direct.append(got)
        return got

    monkeypatch.setattr(StreamReader, "lend", counting)
    monkeypatch.setattr(StreamReader, "read_direct", counting_direct)
    if not in_place:
        monkeypatch.setattr(SimHypervisor, "restore_lend_slots", lambda *a: None)
    src, domid = _source(PAGES)
    hv, digest, r = _restore(_stream(src, domid))
    total = PAGES * tc.record_size(1, 4096)
    assert sum(lent) + sum(direct) == total      # every batch lent or read in place
    if in_place:
        assert sum(direct) >= total - (1 << 20)   # all but the first buffered MiB
    else:
        assert not direct
    assert digest == src.tmem_digest(domid)
    assert digest[0][0] == PAGES
    assert len(r._spare) <= 1 and len(r.buf) <= 2 * tc.BATCH_BYTES    # white-box: the pair


@pytest.mark.parametrize("cut", [1, 300, 254 * 3])
def test_a_pool_that_ends_early_keeps_the_pages_before_its_terminator(cut: int) -> None:
    """The stream announces PAGES and carries ``cut`` before the terminator (a
    live save whose pages were deleted): the batches before it are stored."""
    src, domid = _source(PAGES)
    data = _stream(src, domid)
    rec = tc.record_size(1, 4096)
    head = data.index(struct.pack("<QQQI", BULK_OID_BASE, 0, 0, 0))   # the first record
    body_end = head + PAGES * rec
    cut_data = data[:head + cut * rec] + tc.terminator(1) + data[body_end:]
    hv, digest, _ = _restore(cut_data)
    assert digest[0][0] == cut
