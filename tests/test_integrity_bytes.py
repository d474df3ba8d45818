"""The page log and checker keep records in the sidecar's file form, built a
batch at a time by strided byte copies: the bytes must be exactly
``struct.pack("<BIQQQQI", ...)`` of each record (the XTMCRC02 format)."""
from __future__ import annotations

import random
import struct
from array import array

import pytest

from xend_tmem import integrity
from xend_tmem.crc import crc32
from xend_tmem.integrity import IntegrityError, PageCheck, PageLog

REC = struct.Struct("<BIQQQQI")


def _tmem_wire(version: int, heads: list, size: int) -> bytes:
    fmt = "<QI" if version == 0 else "<3QI"
    return b"".join(struct.pack(fmt, *(h[:1] if version == 0 else h[:3]), h[3])
                    + bytes([h[3] & 0xFF]) * size for h in heads)


def test_ram_records_are_the_packed_file_form() -> None:
    rng = random.Random(5)
    pfns = [rng.randrange(1 << 40) for _ in range(37)]
    pages = rng.randbytes(4096 * len(pfns))
    log = PageLog()
    log.ram(pfns, pages)
    crcs = [crc32(pages[i * 4096:(i + 1) * 4096]) for i in range(len(pfns))]
    want = b"".join(REC.pack(integrity.RAM, 0, p, 0, 0, 0, c) for p, c in zip(pfns, crcs))
    assert bytes(log.data) == want and log.count == len(pfns)
    log2 = PageLog()                                   # CRCs handed in (the hypervisor's)
    log2.ram(range(5, 9), bytes(4 * 4096), crcs=array("I", crcs[:4]))
    assert bytes(log2.data) == b"".join(REC.pack(0, 0, p, 0, 0, 0, c)
                                        for p, c in zip(range(5, 9), crcs))


@pytest.mark.parametrize("version", [0, 1])
def test_tmem_records_are_the_packed_file_form(version: int) -> None:
    rng = random.Random(version)
    size = 1024
    heads = [(rng.randrange(1 << 64), rng.randrange(1 << 64) if version else 0,
              rng.randrange(1 << 64) if version else 0, rng.randrange(1 << 32))
             for _ in range(11)]
    wire = _tmem_wire(version, heads, size)
    pool = 0x01020304
    log = PageLog()
    log.tmem(pool, version, wire + b"tail", len(heads), size)
    want = b"".join(REC.pack(integrity.TMEM, pool, o0, o1, o2, i, crc32(bytes([i & 0xFF]) * size))
                    for o0, o1, o2, i in heads)
    assert bytes(log.data) == want
    check = PageCheck(bytes(log.data), "x.crc")
    got = check.expected_tmem_crcs(pool, version, wire, len(heads), size)
    assert list(got) == [REC.unpack_from(want, k * REC.size)[6] for k in range(len(heads))]
    check.finish()


def test_a_tmem_identity_that_differs_is_named() -> None:
    heads = [(7, 8, 9, i) for i in range(4)]
    wire = _tmem_wire(1, heads, 4096)
    log = PageLog()
    log.tmem(3, 1, wire, 4, 4096)
    bad = bytearray(wire)
    bad[2 * (28 + 4096) + 8] ^= 1                     # record 2's oid1
    with pytest.raises(IntegrityError, match=r"tmem page pool 3 oid 7:9:9 index 2 is where "
                                             r"x.crc has tmem page pool 3 oid 7:8:9 index 2"):
        PageCheck(log.data, "x.crc").expected_tmem_crcs(3, 1, bytes(bad), 4, 4096)


def test_expect_ram_hands_back_crcs_and_names_a_pfn_out_of_place() -> None:
    pages = bytes(range(256)) * 16 * 3
    log = PageLog()
    log.ram([4, 5, 6], pages)
    want = list(REC.unpack_from(log.data, k * REC.size)[6] for k in range(3))
    assert list(PageCheck(log.data, "x.crc").expect_ram([4, 5, 6], pages)) == want
    with pytest.raises(IntegrityError, match="RAM page pfn 7 is where x.crc has RAM page pfn 6"):
        PageCheck(log.data, "x.crc").expect_ram([4, 5, 7], pages)
    with pytest.raises(IntegrityError, match="RAM page pfn 4 has no checksum"):
        PageCheck(log.data[:0], "x.crc").expect_ram([4], pages[:4096])


def test_unsent_records_come_once_and_bad_bytes_are_refused() -> None:
    log = PageLog()
    log.ram([1, 2], bytes(8192))
    first = log.take_unsent_bytes()
    log.ram([3], bytes(4096))
    assert len(first) == 2 * REC.size and log.take_unsent() == log.records[2:]
    check = PageCheck(source="s")
    check.add_expected(first)
    with pytest.raises(IntegrityError, match="record 0 has kind 9"):
        check.add_expected(b"\x09" + bytes(REC.size - 1))
    with pytest.raises(IntegrityError, match="not a multiple"):
        check.add_expected(bytes(REC.size + 1))
