"""Regression test: a live migration's restore refused a good page as corrupt.

``RamCheck`` has the hypervisor compute the CRCs of RAM batch k on a helper
thread after ``write_pages``. Precopy re-sends pages dirtied during a round, so
the batch after k may carry a newer copy of a pfn of batch k (the guest's
heartbeat page: last in a full round, again in the next round's first batch).
When batch k+1 was written before batch k's CRCs were taken, the CRC was of the
newer copy and the migration failed with ``checksum mismatch in RAM page pfn
1023 ... the image is corrupt``. Batch k must be checked before k+1 is written.
"""
from __future__ import annotations

import threading
import zlib
from typing import Dict, List, Sequence

import pytest

from xend_tmem.hypervisor.interface import Hypervisor
from xend_tmem.integrity import IntegrityError, PageCheck, RamCheck, ram_records
from xend_tmem.xen import PAGE_SIZE as PAGE

DOMID = 7


class FakeRam:
    """A domain's RAM whose CRCs the 'hypervisor' takes late: ``ram_page_crcs``
    waits (bounded) for the toolstack's next ``write_pages`` before reading."""

    def __init__(self, late_s: float = 0.3) -> None:
        self.pages: Dict[int, bytes] = {}
        self.writes = 0
        self.cond = threading.Condition()
        self.late_s = late_s

    def write_pages(self, domid: int, pfns: Sequence[int], data) -> None:
        mv = memoryview(data).cast("B")
        with self.cond:
            for i, pfn in enumerate(pfns):
                self.pages[pfn] = bytes(mv[i * PAGE:(i + 1) * PAGE])
            self.writes += 1
            self.cond.notify_all()

    def ram_page_crcs(self, domid: int, pfns: Sequence[int], out) -> None:
        with self.cond:
            seen = self.writes
            self.cond.wait_for(lambda: self.writes > seen, timeout=self.late_s)
            for i, pfn in enumerate(pfns):
                out[i] = zlib.crc32(self.pages[pfn])


def page(tag: int) -> bytes:
    return bytes([tag]) * PAGE


def restore(mocker, batches: List[List[int]], sent: List[bytes],
            expected: List[bytes]) -> None:
    """The restore's order per batch (checkpoint.restore_domain's on_pages):
    expect, write_pages, written; then finish. ``sent``: each batch's pages as
    they arrive; ``expected``: as the sender's records say."""
    ram = FakeRam()
    hv = mocker.create_autospec(Hypervisor, instance=True)
    hv.write_pages.side_effect = ram.write_pages
    hv.ram_page_crcs.side_effect = ram.ram_page_crcs
    records = []
    for pfns, data in zip(batches, expected):
        records += ram_records(pfns, data)
    check = PageCheck(records, "the migration stream's checksums")
    rc = RamCheck(hv, DOMID, check)
    try:
        for pfns, data in zip(batches, sent):
            token = rc.expect(pfns, memoryview(data), None)
            hv.write_pages(DOMID, pfns, memoryview(data))
            rc.written(token)
        rc.finish()
    finally:
        rc.close()
    check.finish()


def test_a_pfn_resent_in_the_next_batch_is_checked_against_its_own_copy(mocker) -> None:
    # round 1's last batch ends with pfn 3 (content 0x11); round 2 re-sends it (0x22)
    batches = [[0, 1, 2, 3], [3]]
    data = [page(1) + page(2) + page(3) + page(0x11), page(0x22)]
    restore(mocker, batches, data, data)


def test_a_corrupt_page_of_a_resent_batch_is_still_refused(mocker) -> None:
    batches = [[0, 1, 2, 3], [3]]
    good = [page(1) + page(2) + page(3) + page(0x11), page(0x22)]
    bad = [good[0], page(0x23)]
    with pytest.raises(IntegrityError, match=r"checksum mismatch in RAM page pfn 3: CRC32 "):
        restore(mocker, batches, bad, good)
