"""The -5/-6 chunk codec against Xen's own bytes, its validations, and round trips."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xend_tmem.binio import StreamReader, StreamWriter
from xend_tmem.codec.chunkdoc import ChunkCollector
from xend_tmem.codec import tmemchunk as tc
from xend_tmem import xen
from xend_tmem.errors import SaveError, StreamError

VECTORS = Path(__file__).parent / "data" / "vectors"
ALL = sorted(p for p in VECTORS.glob("v*/*") if p.is_dir())
GOOD = [p for p in ALL if "error" not in json.loads((p / "expected.json").read_text())]


def decode(data: bytes, with_pages: bool = True, **kw) -> ChunkCollector:
    col = ChunkCollector(with_pages)
    tc.read_chunk_file(StreamReader(io.BytesIO(data)), col, **kw)
    return col


@pytest.mark.parametrize("vec", GOOD, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vectors_decode_to_expected(vec):
    col = decode((vec / "chunks.bin").read_bytes())
    assert col.chunks == json.loads((vec / "expected.json").read_text())["chunks"]


def test_desync_vector_rejected_naming_pool_id():
    data = (VECTORS / "v1" / "07-bug-ret0-desync" / "chunks.bin").read_bytes()
    with pytest.raises(StreamError) as ei:
        decode(data)
    assert ei.value.field == "pool_id" and ei.value.value == 0x44444444
    assert "offset" in str(ei.value) and "\n" not in str(ei.value)


# -- building small chunks -----------------------------------------------------------

def record(version: int, oid, index: int, fill: int, size: int = 4096) -> bytes:
    return tc.encode_oid(version, oid) + struct.pack("<I", index) + bytes([fill]) * size


def build(version=1, pools=(), extra=None, client=(0, 0, 0), max_pools=16) -> bytes:
    """pools: (pool_id, flags, n_pages, uuid, [records], terminated)"""
    buf = io.BytesIO()
    w = StreamWriter(buf)
    tc.write_client(w, tc.ClientRecord(version, max_pools, *client))
    for pid, flags, n, uuid, recs, term in pools:
        tc.write_pool(w, tc.PoolRecord(pid, flags, n, uuid))
        for r in recs:
            w.write(r)
        if term:
            tc.write_pages_end(w, version)
    tc.write_pool_list_end(w)
    if extra is not None:
        tc.write_extra(w, version, extra)
    w.flush()
    return buf.getvalue()


V1P = xen.POOL_PERSIST | (1 << 24)


def test_round_trip_v0_and_v1_with_terminator_and_extra():
    for version in (0, 1):
        oid = (7, 0, 0) if version == 0 else (7, 8, 9)
        flags = xen.POOL_PERSIST | (version << 24)
        data = build(version, pools=[
            (0, flags, 3, (1, 2), [record(version, oid, 0, 1), record(version, oid, 1, 2)], True),
            (3, xen.POOL_SHARED | (version << 24), 0, (5, 6), [], False),
        ], extra=[(0, oid, 1), (3, oid, 4)], client=(xen.CLIENT_COMPRESS, 9, 11))
        col = decode(data)
        c = col.chunks[0]
        assert c["client"] == {"flags": 1, "weight": 9, "cap": 11}
        assert [p["id"] for p in c["pools"]] == [0, 3]
        assert c["pools"][0]["terminated"] and len(c["pools"][0]["pages"]) == 2
        assert not c["pools"][1]["terminated"] and c["pools"][1]["pages"] == []
        inv = col.chunks[1]["invalidations"]
        assert [(e["pool"], e["index"]) for e in inv] == [(0, 1), (3, 4)]


def test_counts_only_without_pages():
    oid = (1, 2, 3)
    data = build(1, pools=[(0, V1P, 2, (0, 0), [record(1, oid, 0, 1), record(1, oid, 1, 1)], False)],
                 extra=[])
    col = decode(data, with_pages=False)
    assert col.chunks[0]["pools"][0]["page_count"] == 2
    assert col.chunks[1] == {"marker": -6, "invalidation_count": 0}


# -- validation: every field Xen trusted ---------------------------------------------

BASE = build(1, pools=[(1, V1P, 1, (0, 0), [record(1, (1, 2, 3), 0, 5)], False)])


def patched(offset: int, value: int, data: bytes = BASE) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("offset,value,field", [
    (4, 2, "version"),
    (8, 17, "max_pools"),
    (12, 0, "separator after max_pools"),
    (16, 0x4, "client flags"),
    (28, 1, "separator after cap"),
    (32, 16, "pool_id"),
    (36, xen.POOL_PERSIST | (1 << 3), "pool flags"),
    (36, xen.POOL_PERSIST | (1 << 12), "pool flags"),
    (36, xen.POOL_PERSIST | (2 << 24), "pool flags"),
    (36, xen.POOL_PERSIST | (1 << 4), "pool flags"),  # 8 KiB pages on a 4 KiB target
    (36, xen.POOL_SHARED, "n_pages"),                 # ephemeral pool announcing pages
])
def test_field_validation_names_field_and_offset(offset, value, field):
    with pytest.raises(StreamError) as ei:
        decode(patched(offset, value), max_page_size=4096)
    assert ei.value.field == field
    assert ei.value.offset is not None


def test_v0_rejects_precompressed_bit_and_v1_accepts_it():
    d0 = build(0, pools=[(0, xen.POOL_PRECOMPRESSED, 0, (0, 0), [], False)])
    with pytest.raises(StreamError):
        decode(d0)
    d1 = build(1, pools=[(0, xen.POOL_PRECOMPRESSED | (1 << 24), 0, (0, 0), [], False)])
    assert decode(d1).chunks[0]["pools"][0]["flags"] & xen.POOL_PRECOMPRESSED


def test_pool_ids_must_increase():
    data = build(1, pools=[(2, V1P, 0, (0, 0), [], False), (2, V1P, 0, (0, 0), [], False)])
    with pytest.raises(StreamError, match="strictly increasing"):
        decode(data)


def test_h4_pool_flags_without_version_bits_accepted():
    data = build(1, pools=[(0, xen.POOL_PERSIST, 0, (0, 0), [], False)])
    assert decode(data).chunks[0]["pools"][0]["flags"] == xen.POOL_PERSIST


def test_stream_order_rules():
    one = build(1)
    with pytest.raises(StreamError, match="second tmem chunk"):
        decode(one + one)
    with pytest.raises(StreamError, match="before any tmem chunk"):
        decode(struct.pack("<iI", -6, 0xFFFFFFFF))
    with pytest.raises(StreamError, match="marker"):
        decode(one + b"\0\0\0\0")
    with pytest.raises(StreamError, match="empty"):
        decode(b"")


def test_extra_pool_id_bounded():
    data = build(1, extra=[(20, (1, 1, 1), 0)])
    with pytest.raises(StreamError) as ei:
        decode(data)
    assert ei.value.field == "invalidation pool_id"


@pytest.mark.parametrize("vec", GOOD, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_truncation_is_a_stream_error(vec):
    data = (vec / "chunks.bin").read_bytes()
    cuts = sorted(set(range(0, 120)) | set(range(len(data) - 80, len(data))) |
                  set(range(120, len(data), 997)))
    for cut in cuts:
        if cut >= len(data):
            continue
        with pytest.raises(StreamError):
            decode(data[:cut])


def test_huge_page_size_is_not_preallocated():
    # pagebits 15 = 128 MiB pages, n_pages 2^32-1, but only a few bytes follow:
    data = patched(36, xen.POOL_PERSIST | (15 << 4) | (1 << 24))
    data = patched(40, 0xFFFFFFFE, data)
    r = StreamReader(io.BytesIO(data[:200]))
    with pytest.raises(StreamError):
        tc.read_chunk_file(r, ChunkCollector(False))
    assert len(r.buf) <= 2 << 20


# -- writer refusals -------------------------------------------------------------------

def test_all_ones_oid_refused_on_save_t4():
    recs = record(1, (1, 1, 1), 0, 0) + record(1, (2**64 - 1,) * 3, 5, 0)
    w = StreamWriter(io.BytesIO())
    with pytest.raises(SaveError, match="all-ones OID"):
        tc.write_page_records(w, 1, recs, 2, 4096, 0)
    # all-ones bytes inside page data are fine
    ok = record(1, (1, 1, 1), 0, 0xFF)
    tc.write_page_records(w, 1, ok, 1, 4096, 0)
    with pytest.raises(SaveError):
        tc.write_page(w, 0, (2**64 - 1, 0, 0), 0, b"\0" * 4096)


def test_v0_refuses_wide_oid():
    with pytest.raises(SaveError, match="version 0"):
        tc.encode_oid(0, (1, 2, 0))


def test_ephemeral_pool_with_pages_refused_on_write():
    with pytest.raises(SaveError):
        tc.write_pool(StreamWriter(io.BytesIO()), tc.PoolRecord(0, 0, 3, (0, 0)))


# -- property: anything the writer emits, the reader returns ------------------------

u64 = st.integers(0, 2**64 - 2)


@st.composite
def chunk_states(draw):
    version = draw(st.sampled_from([0, 1]))
    ids = sorted(draw(st.sets(st.integers(0, 15), max_size=5)))
    pools = []
    for pid in ids:
        persist = draw(st.booleans())
        flags = (xen.POOL_PERSIST if persist else 0) | (xen.POOL_SHARED if draw(st.booleans()) else 0)
        flags |= version << 24
        n_real = draw(st.integers(0, 3)) if persist else 0
        extra = draw(st.integers(0, 2)) if persist else 0
        keys = draw(st.lists(st.tuples(u64, u64, u64, st.integers(0, 2**32 - 1)),
                             min_size=n_real, max_size=n_real))
        recs = []
        for a, b, c, idx in keys:
            oid = (a, 0, 0) if version == 0 else (a, b, c)
            recs.append(record(version, oid, idx, idx & 0xFF))
        pools.append((pid, flags, n_real + extra, (draw(u64), draw(u64)), recs, extra > 0))
    inv = draw(st.lists(st.tuples(st.sampled_from(ids or [0]), u64, st.integers(0, 2**32 - 1)),
                        max_size=4))
    extra = [(p, (o, 0, 0) if version == 0 else (o, 1, 2), i) for p, o, i in inv] if ids else None
    client = (draw(st.integers(0, 3)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))
    return version, pools, extra, client


@settings(max_examples=60, deadline=None)
@given(chunk_states())
def test_property_round_trip(state):
    version, pools, extra, client = state
    data = build(version, pools=pools, extra=extra, client=client)
    col = decode(data)
    got = col.chunks[0]
    assert got["client"] == dict(zip(("flags", "weight", "cap"), client))
    assert [p["id"] for p in got["pools"]] == [p[0] for p in pools]
    for (_pid, flags, n, uuid, recs, term), gp in zip(pools, got["pools"]):
        assert gp["flags"] == flags and gp["n_pages"] == n and gp["uuid"] == list(uuid)
        assert len(gp["pages"]) == len(recs) and gp["terminated"] == term
    if extra is not None:
        assert len(col.chunks[1]["invalidations"]) == len(extra)
