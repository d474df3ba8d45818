"""Page checksums (xend_tmem.integrity): the sidecar's header binds it to its
image, and the checker refuses pages that are missing, extra or out of order."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest

from xend_tmem import integrity
from xend_tmem.integrity import IntegrityError, PageCheck, PageLog

PAGE = bytes(range(256)) * 16


def _log(*pfns: int) -> PageLog:
    log = PageLog()
    log.ram(list(pfns), PAGE * len(pfns))
    return log


def test_pages_in_order_pass_and_finish() -> None:
    check = PageCheck(_log(1, 2, 3).records, "x.crc")
    check.ram([1, 2], PAGE * 2, offset=100)
    check.ram([3], PAGE, offset=100 + 2 * 4096)
    check.finish()


def test_a_missing_page_fails_at_finish_and_an_extra_one_at_once() -> None:
    check = PageCheck(_log(1, 2).records, "x.crc")
    check.ram([1], PAGE)
    with pytest.raises(IntegrityError, match="has 1 pages, x.crc lists 2"):
        check.finish()
    with pytest.raises(IntegrityError, match=r"RAM page pfn 9 \(image offset 7\) has no checksum"):
        PageCheck([], "x.crc").ram([9], PAGE, offset=7)


def test_a_page_out_of_place_is_named() -> None:
    check = PageCheck(_log(1, 2).records, "x.crc")
    with pytest.raises(IntegrityError, match="RAM page pfn 2 is where x.crc has RAM page pfn 1"):
        check.ram([2], PAGE)


def test_records_round_trip_and_bad_kinds_are_refused() -> None:
    recs = _log(5).records + [(integrity.TMEM, 3, 1, 2, 3, 4, 0xDEADBEEF)]
    assert integrity.decode(integrity.encode(recs)) == recs
    bad = bytearray(integrity.encode(recs))
    bad[0] = 7
    with pytest.raises(IntegrityError, match="kind 7"):
        integrity.decode(bytes(bad))
    with pytest.raises(IntegrityError, match="not a multiple"):
        integrity.decode(b"\0" * 5)


def _image(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "img"
    w = integrity.CrcWriter(io.BytesIO())
    w.write(body)
    path.write_bytes(body)
    integrity.write_sidecar(integrity.sidecar_path(str(path)), _log(1), w)
    return path


def test_sidecar_is_used_only_for_its_own_image(tmp_path: Path) -> None:
    path = _image(tmp_path, b"A" * 70000)
    with open(path, "rb") as f:
        check, note = integrity.load_sidecar(str(path), f.fileno())
    assert check is not None and note == "" and check.expected == _log(1).records
    assert not list(tmp_path.glob("*.part"))
    path.write_bytes(b"B" * 70000)                 # same size, another image
    with open(path, "rb") as f:
        check, note = integrity.load_sidecar(str(path), f.fileno())
    assert check is None and "written for another image" in note
    path.write_bytes(b"A" * 10)
    with open(path, "rb") as f:
        check, note = integrity.load_sidecar(str(path), f.fileno())
    assert check is None and "70000 bytes, not 10" in note
    (tmp_path / "img.crc").write_bytes(b"garbage")
    with open(path, "rb") as f:
        assert integrity.load_sidecar(str(path), f.fileno())[0] is None


def test_bytes_outside_pages_are_checked_run_by_run(tmp_path: Path) -> None:
    """No whole-image CRC: the pages' records cover the pages, one CRC32 per
    run covers the bytes between them, and together they tile the image."""
    path = tmp_path / "img"
    log = PageLog()
    w = integrity.CrcWriter(io.BytesIO(), log)
    head, tail = b"H" * 70000, b"T" * 100
    w.write(head)
    log.ram([1], PAGE, offset=len(head))
    w.write(PAGE[:100])                         # a page may arrive in pieces
    w.write(PAGE[100:] + tail)
    assert [r[:2] for r in w.runs] == [[0, 70000], [70000 + 4096, 100]]
    body = head + PAGE + tail
    path.write_bytes(body)
    integrity.write_sidecar(integrity.sidecar_path(str(path)), log, w)

    def restore(image: bytes) -> None:
        with open(path, "rb") as f:
            check, note = integrity.load_sidecar(str(path), f.fileno())
        assert check is not None, note
        r = check.reader(io.BytesIO(image))
        assert r.read(len(head)) == image[:len(head)]
        check.ram([1], r.read(4096), offset=len(head))
        r.read()
        check.finish()

    restore(body)
    for at in (len(head) - 1, len(body) - 1):   # a header byte, the tail's last
        bad = bytearray(body)
        bad[at] ^= 1
        with pytest.raises(IntegrityError, match="corrupt outside its pages"):
            restore(bytes(bad))
    bad = bytearray(body)
    bad[len(head) + 5] ^= 1
    with pytest.raises(IntegrityError, match=r"checksum mismatch in RAM page pfn 1 "
                                             r"\(image offset 70000\)"):
        restore(bytes(bad))


def test_runs_and_pages_must_tile_the_image(tmp_path: Path) -> None:
    path = _image(tmp_path, b"A" * 70000)      # one run over everything, one page record
    with open(path, "rb") as f:
        check, _ = integrity.load_sidecar(str(path), f.fileno())
    assert check is not None
    r = check.reader(io.BytesIO(b"A" * 70000))
    r.read()
    check.ram([1], PAGE)                        # a page the runs already cover: too many bytes
    with pytest.raises(IntegrityError, match="corrupt outside its pages"):
        check.finish()


def test_an_old_format_sidecar_is_not_used(tmp_path: Path) -> None:
    path = _image(tmp_path, b"A" * 70000)
    side = Path(integrity.sidecar_path(str(path)))
    side.write_bytes(b"XTMCRC01" + side.read_bytes()[8:])
    with open(path, "rb") as f:
        check, note = integrity.load_sidecar(str(path), f.fileno())
    assert check is None and "older xend-tmem" in note


def test_tmem_records_checked_in_batches_name_the_bad_page() -> None:
    version, size = 1, 4096
    recs = b"".join(struct.pack("<3QI", 7, 0, 0, i) + bytes([i]) * size for i in range(3))
    log = PageLog()
    log.tmem(2, version, recs, 3, size)
    assert [r[:6] for r in log.records] == [(integrity.TMEM, 2, 7, 0, 0, i) for i in range(3)]
    assert [r[6] for r in log.records] == [zlib.crc32(bytes([i]) * size) for i in range(3)]
    PageCheck(log.records, "x.crc").tmem(2, version, recs, 3, size)
    bad = bytearray(recs)
    bad[2 * (28 + size) + 28 + 9] ^= 0x40
    with pytest.raises(IntegrityError, match=r"tmem page pool 2 oid 7:0:0 index 2 "
                                             rf"\(image offset {10 + 2 * (28 + size) + 28}\)"):
        PageCheck(log.records, "x.crc").tmem(2, version, bytes(bad), 3, size, offset=10)
