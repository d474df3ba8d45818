"""PERF6c: the page-checksum CRC32 (ISA-L when installed) gives zlib's values,
and a quiet ``xm save`` waits for its job with long polls."""
from __future__ import annotations

import importlib
import os
import sys
import zlib
from array import array

import pytest

from xend_tmem import crc, integrity
from xend_tmem.hypervisor import pagestore
from xend_tmem.xend import xm


def test_crc32_matches_zlib_on_pages_slices_and_running_values() -> None:
    data = os.urandom(8 * 4096 + 123)
    mv = memoryview(data)
    for o in range(0, len(data), 4096):
        assert crc.crc32(mv[o:o + 4096]) == zlib.crc32(mv[o:o + 4096])
    assert crc.crc32(b"") == zlib.crc32(b"") == 0
    for start in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xDEADBEEF):
        assert crc.crc32(mv[:5000], start) == zlib.crc32(mv[:5000], start)
    assert crc.IMPLEMENTATION in ("isal", "zlib")


def test_falls_back_to_zlib_without_isal(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "isal", None)        # import isal -> ImportError
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    try:
        fallback = importlib.reload(crc)
        assert fallback.IMPLEMENTATION == "zlib" and fallback.crc32 is zlib.crc32
    finally:
        monkeypatch.undo()
        importlib.reload(crc)


def test_hypervisor_record_crcs_and_sidecar_records_agree_with_zlib() -> None:
    page, head = 4096, 28
    count = 5
    records = bytearray(os.urandom(count * (head + page)))
    out = array("I", bytes(4 * count))
    pagestore.record_crcs(records, count, head + page, page, out)
    want = [zlib.crc32(records[i * (head + page) + head:(i + 1) * (head + page)])
            for i in range(count)]
    assert out.tolist() == want
    assert pagestore.first_crc_mismatch(records, count, head + page, page, out) is None
    out[3] ^= 1
    assert pagestore.first_crc_mismatch(records, count, head + page, page, out) == \
        (3, want[3], want[3] ^ 1)
    # the page offsets are kept per batch shape: other shapes get their own
    assert pagestore.first_crc_mismatch(records, 3, head + page, page, out) is None
    big = bytearray(os.urandom(2 * (20 + 8192)))
    big_out = array("I", bytes(8))
    pagestore.record_crcs(big, 2, 20 + 8192, 8192, big_out)
    assert big_out.tolist() == [zlib.crc32(big[20:8212]), zlib.crc32(big[8232:])]
    pages = os.urandom(3 * page)
    assert [r[6] for r in integrity.ram_records([7, 8, 9], pages)] == \
        [zlib.crc32(pages[i * page:(i + 1) * page]) for i in range(3)]


@pytest.mark.parametrize("shown, wait", [(False, xm.QUIET_POLL_S), (True, xm.POLL_S)])
def test_job_polls_long_without_a_display(mocker, shown: bool, wait: float) -> None:
    proxy = mocker.MagicMock(name="proxy")
    running = {"state": "running", "phase": "tmem", "done": 1, "total": None}
    proxy.xend.job.status.side_effect = [running, {**running, "state": "done",
                                                   "result": {"op": "save"}}]
    sleep = mocker.patch.object(xm.time, "sleep")
    stream = mocker.MagicMock(name="stderr")
    assert xm._job(proxy, lambda: 9, "save", shown, stream) == {"op": "save"}
    assert [c.args for c in proxy.xend.job.status.call_args_list] == [(9, wait), (9, wait)]
    assert sleep.call_count == 1


@pytest.mark.parametrize("version", [0, 1])
def test_page_log_tmem_records_are_identity_plus_crc(version: int) -> None:
    """The save's records for a tmem batch, built in one pass, equal the
    identities (what the restore compares) with each page's CRC32."""
    size = integrity._heads(version, 4096).size
    records = bytearray(os.urandom(20 * size + 7))          # trailing bytes ignored
    log = integrity.PageLog()
    log.tmem(5, version, records, 20, 4096)
    ids = integrity.tmem_ids(5, version, records, 20, 4096)
    crcs = integrity.tmem_crcs(version, records, 20, 4096)
    assert log.records == [(*i, c) for i, c in zip(ids, crcs)]
    given = integrity.PageLog()
    given.tmem(5, version, records, 19, 4096, crcs=crcs[:19])
    assert given.records == log.records[:19]
