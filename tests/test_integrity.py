"""Page checksums (xend_tmem.integrity): the sidecar's header binds it to its
image, and the checker refuses pages that are missing, extra or out of order."""
from __future__ import annotations

import io
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


def test_the_whole_image_crc_catches_bytes_outside_pages(tmp_path: Path) -> None:
    path = _image(tmp_path, b"A" * 70000)
    with open(path, "rb") as f:
        check, _ = integrity.load_sidecar(str(path), f.fileno())
    assert check is not None
    r = check.reader(io.BytesIO(b"A" * 69999 + b"B"))
    r.read(70000)
    check.ram([1], PAGE)
    with pytest.raises(IntegrityError, match="corrupt outside its pages"):
        check.finish()
    assert zlib.crc32(b"A" * 70000) == check.crc
