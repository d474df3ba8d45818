"""Legacy libxc stream codec: header layouts, chunk loop, tail (SPEC §2, §3)."""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
from typing import Dict, List, Optional

import pytest

from xend_tmem.binio import StreamReader, StreamWriter
from xend_tmem.codec import legacy as L
from xend_tmem import xen
from xend_tmem.codec.image import QEMU_SIGNATURE
from xend_tmem.errors import SaveError, StreamError, XendTmemError

PAGE = xen.PAGE_SIZE


def page(tag: int) -> bytes:
    """A recognisable page: its tag repeated (tag fits in 16 bits)."""
    return struct.pack("<H", tag) * (PAGE // 2)


class Recorder:
    """on_pages / on_chunk / tmem handler sink; copies page data while valid."""

    def __init__(self) -> None:
        self.batches: List[tuple] = []
        self.chunks: List[L.ChunkInfo] = []
        self.tmem: List[tuple] = []

    def on_pages(self, pfns, types, data, offset):
        self.batches.append((list(pfns), list(types), bytes(data), offset))

    def on_chunk(self, info):
        self.chunks.append(info)

    def tmem_handler(self, r: StreamReader, marker: int, offset: int) -> None:
        # a stand-in for the tmem plugin: u32 length + payload
        n = r.u32("fake tmem length")
        self.tmem.append((marker, offset, r.read_exact(n, "fake tmem payload")))


def fake_tmem(marker: int, payload: bytes) -> bytes:
    return struct.pack("<iI", marker, len(payload)) + payload


class Built:
    """A stream plus what was put in it."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.w = StreamWriter(self.buf)
        self.offsets: Dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.offsets[name] = self.w.offset

    def data(self) -> bytes:
        self.w.flush()
        return self.buf.getvalue()


BATCHES = [
    # (pfns, types) — types: 0 normal, 1 L1TAB, 9 pinned L1, 0xF XTAB, 0xE XALLOC, 0xD BROKEN
    ([0, 1, 2, 3], None),
    ([10, 11, 12, 13, 14], [1, 0xF, 9, 0xE, 0xD]),
    ([99], [0xF]),
    (list(range(200, 200 + 1024)), None),
]


def batch_data(pfns, types) -> bytes:
    return b"".join(page(p) for i, p in enumerate(pfns)
                    if types is None or types[i] not in xen.NO_DATA_TYPES)


def build_pv(width=8, ctx=xen.VCPU_CTX_X64, extv=False, xcnt=None, layout="released",
             tmem_body=True, vcpus=(0, 2), max_vcpu=3, p2m_size=5000,
             unmapped=(5, 7, 4999), batches=BATCHES) -> Built:
    b = Built()
    w = b.w
    if layout == "seed":
        w.write(fake_tmem(-5, b"seed-tmem"))
    L.write_p2m_size(w, p2m_size, width, layout)
    L.write_pv_ext_info(w, width, ctx, extv=extv, xcnt_size=xcnt)
    gw = xen.VCPU_CTX_SIZES[ctx]
    frames = L.p2m_frame_count(p2m_size, gw)
    L.write_p2m_frame_list(w, width, [0x1000 + i for i in range(frames)])
    b.mark("body")
    if tmem_body:
        b.mark("tmem5")
        w.write(fake_tmem(-5, b"pages..."))
    L.write_tsc_info(w, 1, 123456789, 2400000, 3)
    for pfns, types in batches[:2]:
        L.write_page_batch(w, width, pfns, types, batch_data(pfns, types))
    if tmem_body:
        b.mark("tmem6")
        w.write(fake_tmem(-6, b"inval"))
    for pfns, types in batches[2:]:
        L.write_page_batch(w, width, pfns, types, batch_data(pfns, types))
    L.write_vcpu_info(w, max_vcpu, vcpus)
    L.write_chunk(w, xen.LAST_CHECKPOINT)
    b.mark("end")
    L.write_end(w)
    b.mark("tail")
    rec = ctx + (xen.EXTV_SIZE if extv else 0) + (xcnt or 0)
    ctxs = [bytes([(v + 1) & 0xFF]) * ctx for v in vcpus]
    ext = [bytes([0xE0 + v % 16]) * (rec - ctx) for v in vcpus]
    L.write_pv_tail(w, width, list(unmapped), ctxs, b"S" * PAGE, ext_ctx=ext)
    return b


def read(data: bytes, width=8, guest="pv", rec: Optional[Recorder] = None, handlers=None,
         **kw):
    rec = rec or Recorder()
    if handlers is None:
        handlers = {-5: rec.tmem_handler, -6: rec.tmem_handler}
    return L.read_stream(StreamReader(io.BytesIO(data)), width, guest, handlers,
                         rec.on_pages, rec.on_chunk, **kw)


# -- round trips --------------------------------------------------------------

@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("ctx, extv, xcnt", [
    (xen.VCPU_CTX_X64, False, None),
    (xen.VCPU_CTX_X32, True, None),
    (xen.VCPU_CTX_X64, True, 832),
])
def test_pv_round_trip(width, ctx, extv, xcnt):
    b = build_pv(width, ctx, extv, xcnt)
    data = b.data()
    rec = Recorder()
    header, body, tail = read(data, width, rec=rec)

    gw = xen.VCPU_CTX_SIZES[ctx]
    assert header.layout == "released"
    assert header.p2m_size == 5000
    assert (header.width, header.guest, header.guest_width) == (width, "pv", gw)
    assert header.vcpu_ctx_size == ctx and header.extv == extv and header.xcnt_size == xcnt
    assert header.p2m_frames == L.p2m_frame_count(5000, gw) == (-(-5000 // (4096 // gw)))
    expected_tags = {"vcpu": ctx}
    if extv:
        expected_tags["extv"] = 0
    if xcnt is not None:
        expected_tags["xcnt"] = 4
    assert header.ext_info == expected_tags
    assert header.end_offset == b.offsets["body"]

    assert body.batches == 4
    assert body.entries == 4 + 5 + 1 + 1024
    assert body.pages == 4 + 2 + 0 + 1024
    assert body.tsc == L.TscInfo(1, 123456789, 2400000, 3)
    assert body.vcpu_info == (3, (0b101,))
    assert body.last_checkpoint and not body.compressed
    assert body.end_offset == b.offsets["tail"]
    assert [c for c, _ in body.chunks] == [-5, -7, -6, -2, -9, 0]
    assert dict((c, o) for c, o in body.chunks)[-5] == b.offsets["tmem5"]
    assert rec.tmem == [(-5, b.offsets["tmem5"], b"pages..."), (-6, b.offsets["tmem6"], b"inval")]
    assert [(c.chunk_id, c.size) for c in rec.chunks] == \
        [(-5, 12), (-7, 20), (-6, 9), (-2, 12), (-9, 0), (0, 0)]

    got = [(p, t) for p, t, _, _ in rec.batches]
    want = [(pf, t if t is not None else [0] * len(pf)) for pf, t in BATCHES]
    assert got == want
    for (_pfns, _types, blob, off), (wp, wt) in zip(rec.batches, BATCHES):
        assert blob == batch_data(wp, wt)
        assert data[off:off + len(blob)] == blob      # offset is where the data sits

    assert list(tail.unmapped_pfns) == [5, 7, 4999]
    assert tail.vcpus == [0, 2]
    rec_size = ctx + (128 if extv else 0) + (xcnt or 0)
    assert [len(c) for c in tail.contexts] == [rec_size, rec_size]
    assert tail.contexts[1][:ctx] == b"\x03" * ctx
    assert tail.contexts[1][ctx:] == b"\xe2" * (rec_size - ctx)
    assert tail.shared_info == b"S" * PAGE
    assert tail.end_offset == len(data)


def test_pv_without_ext_info_or_vcpu_info():
    b = Built()
    L.write_p2m_size(b.w, 1024, 4)
    L.write_p2m_frame_list(b.w, 4, [7])            # 1024 pfns / 1024 per page at width 4
    L.write_page_batch(b.w, 4, [3], None, page(3))
    L.write_end(b.w)
    L.write_pv_tail(b.w, 4, [], [b"c" * xen.VCPU_CTX_X32], bytes(PAGE))
    header, body, tail = read(b.data(), 4)
    assert header.ext_info == {} and header.guest_width == 4
    assert header.vcpu_ctx_size == xen.VCPU_CTX_X32 and header.p2m_frames == 1
    assert body.vcpu_info is None
    assert tail.vcpus == [0] and tail.contexts == [b"c" * xen.VCPU_CTX_X32]


def test_many_vcpus_use_multiword_bitmap():
    b = Built()
    L.write_vcpu_info(b.w, 130, [0, 70, 130])
    raw = b.data()
    assert raw == struct.pack("<iiQQQ", -2, 130, 1, 1 << 6, 1 << 2)
    b = build_pv(8, vcpus=(0, 70, 130), max_vcpu=130, tmem_body=False)
    header, body, tail = read(b.data(), 8)
    assert body.vcpu_info == (130, (1, 1 << 6, 1 << 2))
    assert tail.vcpus == [0, 70, 130]
    assert [(v, c[0]) for v, c in tail.vcpu_contexts] == [(0, 1), (70, 71), (130, 131)]


def test_wire_bytes_match_spec():
    b = Built()
    L.write_pv_ext_info(b.w, 8, xen.VCPU_CTX_X32, extv=True, xcnt_size=512)
    L.write_page_batch(b.w, 4, [5, 6], [0xF, 2], page(6))
    L.write_tsc_info(b.w, 2, 1 << 40, 3000000, 9)
    L.write_vcpu_info(b.w, 1, [0, 1])
    L.write_hvm_param(b.w, xen.HVM_VIRIDIAN, 0x1234)
    L.write_end(b.w)
    raw = b.data()
    ext = (b"\xff" * 8 + struct.pack("<I", 8 + 2800 + 8 + 12) + b"vcpu" + struct.pack("<I", 2800)
           + bytes(2800) + b"extv" + struct.pack("<I", 0) + b"xcnt" + struct.pack("<II", 4, 512))
    batch = struct.pack("<iII", 2, (0xF << 28) | 5, (2 << 28) | 6) + page(6)
    tsc = struct.pack("<iIQII", -7, 2, 1 << 40, 3000000, 9)
    vci = struct.pack("<iiQ", -2, 1, 3)
    hvm = struct.pack("<iIQ", -11, 0, 0x1234)
    assert raw == ext + batch + tsc + vci + hvm + struct.pack("<i", 0)


# -- tmem markers and layouts ---------------------------------------------------

@pytest.mark.parametrize("width", [4, 8])
def test_seed_layout_detected(width):
    b = build_pv(width, layout="seed", tmem_body=False)
    rec = Recorder()
    header, body, tail = read(b.data(), width, rec=rec)
    assert header.layout == "seed"
    assert header.p2m_size == 5000
    assert rec.tmem == [(-5, 0, b"seed-tmem")]
    assert header.seed_chunk == L.ChunkInfo(-5, 0, 4 + len(b"seed-tmem"))
    assert rec.chunks[0] == header.seed_chunk
    assert body.batches == 4 and len(tail.contexts) == 2


def test_seed_layout_with_body_tmem_too():
    b = build_pv(8, layout="seed", tmem_body=True)
    rec = Recorder()
    read(b.data(), 8, rec=rec)
    assert [m for m, _, _ in rec.tmem] == [-5, -5, -6]


def test_stream_starting_with_tmem_but_no_handler():
    b = build_pv(8, layout="seed", tmem_body=False)
    with pytest.raises(StreamError) as ei:
        read(b.data(), 8, handlers={-6: Recorder().tmem_handler})
    e = ei.value
    assert "stream starts with tmem chunk -5" in str(e)
    assert "no plugin handles tmem" in str(e)
    assert "offset 0" in str(e)
    assert e.offset == 0 and e.value == -5


def test_stream_starting_with_tmem_extra_is_refused():
    data = fake_tmem(-6, b"x") + bytes(64)
    with pytest.raises(StreamError, match="only -5"):
        read(data, 8)


@pytest.mark.parametrize("marker", [-5, -6])
def test_body_tmem_without_handler(marker):
    b = build_pv(8)
    handlers = {m: Recorder().tmem_handler for m in (-5, -6) if m != marker}
    with pytest.raises(StreamError) as ei:
        read(b.data(), 8, handlers=handlers)
    where = b.offsets["tmem5" if marker == -5 else "tmem6"]
    assert f"tmem chunk {marker} at offset {where} but no plugin handles tmem" in str(ei.value)
    assert ei.value.offset == where


@pytest.mark.parametrize("marker", [-7, -1, 0, 1])
def test_no_handlers_for_host_ids(marker):
    with pytest.raises(ValueError, match="parsed by the host"):
        L.LegacyReader(io.BytesIO(), handlers={marker: lambda r, m, o: None})


def test_plugin_marker_dispatched_and_unowned_one_named():
    """-21 is no Xen id: a plugin that owns it reads it; without one, its offset is named."""
    b = build_pv(8)
    data = b.data()
    at = b.offsets["tmem6"]
    data = data[:at] + struct.pack("<iI", -21, 7) + data[at:]
    seen = []

    def handler(r, m, o):
        seen.append((m, o, r.u32("x")))

    rec = Recorder()
    read(data, 8, rec=rec, handlers={-5: rec.tmem_handler, -6: rec.tmem_handler, -21: handler})
    assert seen == [(-21, at, 7)]
    with pytest.raises(StreamError, match=rf"chunk -21 at offset {at}: not a chunk id Xen "
                                          "defined, and no checkpoint plugin") as ei:
        read(data, 8)
    assert ei.value.offset == at and ei.value.value == -21


def test_host_chunk_ids_exclude_tmem():
    assert -5 not in L.HOST_CHUNK_IDS and -6 not in L.HOST_CHUNK_IDS
    assert {-1, -2, -7, -9, -12, -13, -18, -20, 0} <= L.HOST_CHUNK_IDS


# -- p2m_size: writer refusals and the posted-code bug --------------------------

@pytest.mark.parametrize("layout", ["released", "seed"])
@pytest.mark.parametrize("width, p2m", [
    (4, 0xFFFFFFFB), (4, 0xFFFFFFFA),
    (8, 0xFFFFFFFB), (8, 0x1_FFFFFFFB), (8, 0xAB_FFFFFFFA),
])
def test_writer_refuses_marker_p2m_size(layout, width, p2m):
    with pytest.raises(L.UnencodableError) as ei:
        L.write_p2m_size(StreamWriter(io.BytesIO()), p2m, width, layout)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, SaveError)
    assert isinstance(ei.value, XendTmemError)
    assert "tmem marker" in str(ei.value) and layout in str(ei.value)


@pytest.mark.parametrize("width, p2m, why", [
    (4, 1 << 32, "does not fit"), (8, (1 << 40) + 1, "exceeds"), (8, 0, "positive"),
])
def test_writer_refuses_unrepresentable_p2m_size(width, p2m, why):
    with pytest.raises(L.UnencodableError, match=why):
        L.check_p2m_size(p2m, width)


def test_writer_refuses_custom_marker():
    L.check_p2m_size(0xFFFFFFF9, 8)
    with pytest.raises(L.UnencodableError):
        L.check_p2m_size(0xFFFFFFF9, 8, "seed", markers=(-5, -6, -7))


@pytest.mark.parametrize("width, p2m", [
    (8, 0x80000010), (8, 0x1_80000010), (8, 0xFFFF_FFFF), (4, 0x80000010), (4, 0xFFFFFFFF),
])
def test_low_half_with_bit31_combines_unsigned(width, p2m):
    # HVM: no frame list, so large p2m sizes stay cheap to write
    b = Built()
    L.write_p2m_size(b.w, p2m, width, "seed")
    L.write_end(b.w)
    L.write_hvm_tail(b.w, (1, 2, 3), b"")
    raw = b.data()
    assert raw[:4] == struct.pack("<I", p2m & 0xFFFFFFFF)
    rec = Recorder()
    header, body, tail = read(raw, width, "hvm", rec=rec)
    assert header.p2m_size == p2m
    assert header.layout == "released" and rec.tmem == []


def test_huge_p2m_size_fails_fast_without_allocating():
    data = struct.pack("<QQ", 1 << 40, 0) + bytes(1000)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(StreamError) as ei:
            read(data, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2
    assert peak < 8 << 20
    assert "p2m frame list" in str(ei.value)
    assert ei.value.offset == 8
    with pytest.raises(StreamError) as ei:
        read(struct.pack("<Q", (1 << 40) + 1), 8)
    assert ei.value.field == "p2m_size" and ei.value.value == (1 << 40) + 1
    with pytest.raises(StreamError, match="p2m_size"):
        read(struct.pack("<Q", 0), 8)


# -- body errors ----------------------------------------------------------------

def _body_stream(width: int, *chunks: bytes, p2m: int = 4096) -> bytes:
    """HVM header (no ext info) then raw body bytes."""
    return struct.pack("<Q" if width == 8 else "<I", p2m) + b"".join(chunks)


def test_unknown_chunk_is_named():
    data = _body_stream(8, struct.pack("<i", -1), struct.pack("<i", -21), bytes(16))
    with pytest.raises(StreamError) as ei:
        read(data, 8, "hvm")
    e = ei.value
    assert "-21" in str(e) and e.value == -21 and e.offset == 12
    assert "at offset 12" in str(e)


def test_batch_over_1024_is_an_error():
    data = _body_stream(8, struct.pack("<i", 1025), bytes(1025 * 8))
    with pytest.raises(StreamError) as ei:
        read(data, 8, "hvm")
    assert ei.value.value == 1025 and ei.value.offset == 8
    assert "1025" in str(ei.value) and "1024" in str(ei.value)


def test_pfn_outside_p2m_size():
    data = _body_stream(4, struct.pack("<iII", 2, 1, (1 << 28) | 4096), p2m=4096)
    with pytest.raises(StreamError) as ei:
        read(data, 4, "hvm")
    assert ei.value.offset == 4 + 4 + 4 and "outside p2m_size" in str(ei.value)


def test_wide_entry_with_high_bits():
    data = _body_stream(8, struct.pack("<iQ", 1, 1 << 32))
    with pytest.raises(StreamError, match="above 31"):
        read(data, 8, "hvm")


@pytest.mark.parametrize("max_id", [-1, 4096])
def test_vcpu_info_bounds(max_id):
    data = _body_stream(8, struct.pack("<ii", -2, max_id), bytes(8))
    with pytest.raises(StreamError) as ei:
        read(data, 8, "hvm")
    assert ei.value.field == "max_vcpu_id" and ei.value.value == max_id


def test_hvm_params_toolstack_and_compression():
    b = Built()
    w = b.w
    L.write_p2m_size(w, 64, 8)
    for cid in sorted(xen.HVM_PARAM_IDS):
        L.write_hvm_param(w, cid, -cid * 0x1000)
    L.write_toolstack(w, b"libxl-toolstack")
    L.write_chunk(w, xen.ENABLE_VERIFY_MODE)
    L.write_page_batch(w, 8, [1, 2], None, page(1) + page(2))
    L.write_chunk(w, xen.ENABLE_COMPRESSION)
    L.write_page_batch(w, 8, [3, 4, 5], [0, 0xF, 0], inline=False)
    L.write_compressed_data(w, 8, b"z" * 3000)
    L.write_end(w)
    L.write_hvm_tail(w, (0xfeffe, 0xfeffd, 0xfeffc), b"H" * 5000, b"dm",
                     dm_signature=L.DM_RECORD_0002)
    rec = Recorder()
    header, body, tail = read(b.data(), 8, "hvm", rec=rec)
    assert body.hvm_params == {cid: -cid * 0x1000 for cid in xen.HVM_PARAM_IDS}
    assert body.toolstack_len == len(b"libxl-toolstack")
    assert body.verify_mode and body.compressed
    assert body.batches == 2 and body.pages == 2 and body.compressed_pages == 2
    assert body.compressed_bytes == 3000
    assert len(rec.batches) == 1      # the compressed batch has no data to hand over
    assert tail.magic_pfns == (0xfeffe, 0xfeffd, 0xfeffc)
    assert tail.hvm_context == b"H" * 5000
    assert tail.dm_signature == L.DM_RECORD_0002 and tail.dm_bytes == 2


def test_oversized_compressed_chunk():
    data = _body_stream(8, struct.pack("<iQ", -12, L.MAX_COMPRESSED_CHUNK + 1))
    with pytest.raises(StreamError) as ei:
        read(data, 8, "hvm")
    assert ei.value.field == "compressed data size" and ei.value.offset == 12


# -- header errors ----------------------------------------------------------------

def _pv_header(ext_body: bytes, width: int = 8, total: Optional[int] = None) -> bytes:
    ul = "<Q" if width == 8 else "<I"
    total = len(ext_body) if total is None else total
    return struct.pack(ul, 1024) + b"\xff" * width + struct.pack("<I", total) + ext_body


def test_bad_vcpu_context_size():
    data = _pv_header(b"vcpu" + struct.pack("<I", 1234) + bytes(1234))
    with pytest.raises(StreamError) as ei:
        read(data, 8)
    assert ei.value.value == 1234 and ei.value.offset == 8 + 8 + 4 + 4


def test_ext_block_overrun_and_total_bound():
    data = _pv_header(b"abcd" + struct.pack("<I", 100) + bytes(10))
    with pytest.raises(StreamError, match="overruns"):
        read(data, 8)
    data = _pv_header(b"", total=L.MAX_EXT_INFO + 1)
    with pytest.raises(StreamError) as ei:
        read(data, 8)
    assert ei.value.field == "extended info length"
    data = _pv_header(b"abc", total=3)
    with pytest.raises(StreamError, match="too few"):
        read(data, 8)


def test_unknown_ext_tag_is_skipped():
    ext = (b"zzzz" + struct.pack("<I", 3) + b"abc" + b"vcpu" + struct.pack("<I", 2800)
           + bytes(2800))
    data = _pv_header(ext, width=4) + struct.pack("<I", 9) + struct.pack("<i", 0)
    rec = Recorder()
    r = L.LegacyReader(io.BytesIO(data), 4, "pv", on_pages=rec.on_pages)
    header = r.read_header()
    assert header.ext_info == {"zzzz": 3, "vcpu": 2800} and header.guest_width == 4
    assert r.read_body().end_offset == len(data)


def test_unmapped_count_bounds():
    b = Built()
    L.write_p2m_size(b.w, 16, 4)
    L.write_p2m_frame_list(b.w, 4, [1])
    L.write_end(b.w)
    b.w.u32(17)
    with pytest.raises(StreamError) as ei:
        read(b.data(), 4)
    assert ei.value.field == "unmapped pfn count" and ei.value.value == 17


def test_unmapped_pfn_outside_p2m():
    b = Built()
    L.write_p2m_size(b.w, 16, 8)
    L.write_p2m_frame_list(b.w, 8, [1])
    L.write_end(b.w)
    L.write_pv_tail(b.w, 8, [3, 16], [bytes(xen.VCPU_CTX_X64)], bytes(PAGE))
    with pytest.raises(StreamError) as ei:
        read(b.data(), 8)
    assert ei.value.value == 16 and ei.value.offset == 8 + 8 + 4 + 4 + 8


def test_hvm_tail_qemu_record_to_eof():
    b = Built()
    L.write_p2m_size(b.w, 256, 4)
    L.write_hvm_param(b.w, xen.HVM_IDENT_PT, 0xFEFFD000)
    L.write_page_batch(b.w, 4, [0, 255], None, page(0) + page(255))
    L.write_end(b.w)
    state = bytes(range(256)) * 9000            # > one reader CHUNK
    L.write_hvm_tail(b.w, (10, 11, 12), b"hvm-ctx", state)
    raw = b.data()
    pieces: List[bytes] = []
    header, body, tail = read(raw, 4, "hvm", dm_sink=lambda v: pieces.append(bytes(v)))
    assert header.guest == "hvm" and header.p2m_frames == 0 and header.ext_info == {}
    assert body.hvm_params == {xen.HVM_IDENT_PT: 0xFEFFD000} and body.pages == 2
    assert tail.magic_pfns == (10, 11, 12) and tail.hvm_context == b"hvm-ctx"
    assert tail.dm_signature == QEMU_SIGNATURE
    assert tail.dm_bytes == len(state) and b"".join(pieces) == state
    assert len(pieces) > 1
    assert tail.end_offset == len(raw)


def test_hvm_tail_errors():
    head = _body_stream(8, struct.pack("<i", 0))
    tail = struct.pack("<3QI", 1, 2, 3, 2) + b"ok"
    with pytest.raises(StreamError) as ei:
        read(head + tail + b"SomethingElseEntirely", 8, "hvm")
    assert "unknown device-model signature" in str(ei.value)
    assert ei.value.offset == len(head) + 30
    with pytest.raises(StreamError) as ei:
        read(head + struct.pack("<3QI", 1, 2, 3, L.MAX_HVM_CONTEXT + 1), 8, "hvm")
    assert ei.value.field == "HVM context length"
    with pytest.raises(StreamError, match="device-model state"):
        read(head + tail + L.REMUS_DM_STATE + struct.pack("<I", 100) + b"short", 8, "hvm")


def test_page_data_view_is_only_valid_during_callback():
    b = build_pv(8, tmem_body=False)
    kept = []
    r = L.LegacyReader(io.BytesIO(b.data()), 8, on_pages=lambda p, t, d, o: kept.append(d))
    r.read_header()
    r.read_body()
    assert kept and all(isinstance(v, memoryview) for v in kept)
    with pytest.raises(ValueError):
        bytes(kept[0])                       # released: the reader may reuse its buffer


def test_read_body_needs_header():
    with pytest.raises(RuntimeError):
        L.LegacyReader(io.BytesIO(b"")).read_body()


# -- truncation: always a StreamError -------------------------------------------

def _cuts(data: bytes, b: Built, stride: int) -> List[int]:
    cuts = set(range(0, len(data), stride))
    for off in b.offsets.values():
        cuts.update(x for x in range(off - 6, off + 10) if 0 <= x < len(data))
    cuts.update(range(0, 64))
    cuts.add(len(data) - 1)
    return sorted(cuts)


@pytest.mark.parametrize("width, layout", [(8, "released"), (4, "seed")])
def test_truncated_pv_stream_raises_stream_error(width, layout):
    # small batches only: every cut re-reads the stream
    b = build_pv(width, xen.VCPU_CTX_X32, extv=True, xcnt=64, layout=layout, batches=BATCHES[:3])
    data = b.data()
    read(data, width)                                   # the whole stream is fine
    for cut in _cuts(data, b, 97):
        with pytest.raises(StreamError):
            read(data[:cut], width)


def test_truncated_hvm_stream_raises_stream_error():
    b = Built()
    L.write_p2m_size(b.w, 256, 8)
    b.w.write(fake_tmem(-5, b"t" * 40))
    L.write_hvm_param(b.w, xen.HVM_VM86_TSS, 7)
    L.write_page_batch(b.w, 8, [0, 1, 2], [0, 0xF, 0], page(0) + page(2))
    L.write_vcpu_info(b.w, 0, [0])
    L.write_toolstack(b.w, b"ts")
    L.write_end(b.w)
    b.mark("tail")
    L.write_hvm_tail(b.w, (1, 2, 3), b"C" * 300, b"state", dm_signature=L.REMUS_DM_STATE)
    data = b.data()
    read(data, 8, "hvm")
    for cut in range(len(data)):
        with pytest.raises(StreamError):
            read(data[:cut], 8, "hvm")


# -- writer argument checks ---------------------------------------------------------

def test_write_page_batch_checks_arguments():
    w = StreamWriter(io.BytesIO())
    with pytest.raises(ValueError, match="1..1024"):
        L.write_page_batch(w, 8, [], None, b"")
    with pytest.raises(ValueError, match="1..1024"):
        L.write_page_batch(w, 8, list(range(1025)), None, bytes(1025 * PAGE))
    with pytest.raises(ValueError, match="needs 8192"):
        L.write_page_batch(w, 8, [1, 2], None, bytes(PAGE))
    with pytest.raises(ValueError, match="needs 0"):
        L.write_page_batch(w, 8, [1], [0xF], bytes(PAGE))
    with pytest.raises(L.UnencodableError, match="pfn out of range"):
        L.write_page_batch(w, 8, [1 << 28], None, bytes(PAGE))
    with pytest.raises(ValueError, match="width|unsigned long"):
        L.write_page_batch(w, 2, [1], None, bytes(PAGE))


def test_writer_other_checks():
    w = StreamWriter(io.BytesIO())
    with pytest.raises(ValueError):
        L.write_pv_ext_info(w, 8, 4000)
    with pytest.raises(ValueError):
        L.write_vcpu_info(w, 3, [4])
    with pytest.raises(L.UnencodableError):
        L.write_vcpu_info(w, 4096, [0])
    with pytest.raises(ValueError):
        L.write_hvm_param(w, -7, 1)
    with pytest.raises(ValueError):
        L.write_pv_tail(w, 8, [], [b"a"], bytes(100))
    with pytest.raises(L.UnencodableError):
        L.write_p2m_frame_list(w, 4, [1 << 32])
    assert L.p2m_frame_count(1, 8) == 1 and L.p2m_frame_count(513, 8) == 2
    assert L.p2m_frame_count(1024, 4) == 1 and L.p2m_frame_count(1025, 4) == 2
