"""Xen's own PV images restore: every golden vector wrapped as Xen 4.0 framed it.

The images come from ``tests/xenframer.py``, written from SPEC §1-§4 without
``xend_tmem``: extended info with ``vcpu`` and ``extv`` (and ``xcnt``), the
released and the seed tmem layout, live and non-live, 64-bit and 32-bit
tools, 64-bit and 32-bit guests. Each restores through ``restore_domain`` on
a simulated hypervisor of the vector's release, with the tools' width
inferred from the stream; the domain then holds Xen's RAM, vcpu and extended
contexts, shared info and tmem less the invalidated pages; saved again and
restored, it holds the same. HVM images and 64 KiB tmem pages are refused in
one line.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from xend_tmem import plugins, xen
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.codec import legacy
from xend_tmem.errors import StreamError
from xend_tmem.hypervisor.sim import SimHypervisor

import xenframer as xf

VECTORS = Path(__file__).parent / "data" / "vectors"
ALL = sorted(p for p in VECTORS.glob("v*/*") if p.is_dir())
# every vector but the malformed ones (v1/07-bug-ret0-desync): those are
# rejected by the vector tests themselves
GOOD = [p for p in ALL if "error" not in json.loads((p / "expected.json").read_text())]
RELEASE = {0: "4.0.0", 1: "4.0.2"}


def vid(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def expected_chunks(vec: Path) -> Tuple[dict, list]:
    chunks = json.loads((vec / "expected.json").read_text())["chunks"]
    tmem = next(c for c in chunks if c["marker"] == -5)
    extra = next((c for c in chunks if c["marker"] == -6), None)
    return tmem, (extra["invalidations"] if extra else [])


def big_pages(vec: Path) -> bool:
    """Pools of more than 4 KiB pages: legal in the format, refused by x86 Xen."""
    return any((p["flags"] >> 4) & 0xF for p in expected_chunks(vec)[0]["pools"])


def is_live(vec: Path) -> bool:
    return any(c["marker"] == -6 for c in json.loads((vec / "expected.json").read_text())["chunks"])


def _oid(oid) -> Tuple[int, int, int]:
    return (oid, 0, 0) if isinstance(oid, int) else tuple(oid)


def expected_tmem(vec: Path) -> dict:
    """The tmem Xen saved, in ``comparable`` form: pages less the invalidated ones."""
    tmem, invs = expected_chunks(vec)
    pools: Dict[int, tuple] = {}
    for p in tmem["pools"]:
        pages = {(_oid(g["oid"]), g["index"]): int(g["crc32"], 16) for g in p.get("pages", [])}
        shared = bool(p["flags"] & 2)
        pools[p["id"]] = (p["flags"] & 0xFF, tuple(p["uuid"]) if shared else None,
                          pages if p["flags"] & 1 else {})
    for e in invs:
        pools[e["pool"]][2].pop((_oid(e["oid"]), e["index"]), None)
    c = tmem["client"]
    return {"client": {"compress": bool(c["flags"] & 1), "frozen": bool(c["flags"] & 2),
                       "weight": c["weight"], "cap": c["cap"]},
            "pools": pools}


def comparable(state: dict) -> dict:
    pools = {}
    for pid, p in state["pools"].items():
        pools[pid] = (p["flags"] & 0xFF, tuple(p["uuid"]) if p["shared"] else None,
                      dict(p["pages"]) if p["persistent"] else {})
    return {"client": state["client"], "pools": pools}


def guest_state(hv: SimHypervisor, domid: int, vcpus: int) -> dict:
    p2m = hv.p2m_size(domid)
    return {
        "ram": hv.read_pages(domid, range(p2m)),
        "contexts": [hv.get_vcpu_context(domid, v) for v in range(vcpus)],
        "ext": [hv.get_ext_vcpu_context(domid, v) for v in range(vcpus)],
        "shared_info": hv.get_shared_info(domid),
        "tmem": comparable(hv.tmem_state(domid)),
    }


def framed_state(f: xf.Framed, vec: Path) -> dict:
    g = f.guest
    return {"ram": g.ram_bytes(), "contexts": g.contexts, "ext": g.ext,
            "shared_info": g.shared_info, "tmem": expected_tmem(vec)}


def hooks():
    return plugins.get_plugin_manager(["tmem"], {})


def version_of(vec: Path) -> int:
    return expected_chunks(vec)[0]["version"]


def only_dom0(hv: SimHypervisor) -> bool:
    return [d.domid for d in hv.list_domains()] == [0]


CASES = [(vec, layout, width, live, ctx)
         for vec in GOOD
         for layout in ("released", "seed")
         for width in (8, 4)
         for live in ((True,) if is_live(vec) else (False, True))
         for ctx in (xf.CTX_X64, xf.CTX_X32)]


def case_id(case) -> str:
    vec, layout, width, live, ctx = case
    return (f"{vid(vec)}-{layout}-tools{8 * width}-{'live' if live else 'nonlive'}"
            f"-guest{64 if ctx == xf.CTX_X64 else 32}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_xen_image_restores_and_survives_a_second_save(case) -> None:
    vec, layout, width, live, ctx = case
    restore_and_save_again(vec, layout, width, live, ctx, RELEASE[version_of(vec)])


@pytest.mark.parametrize("vec", [v for v in GOOD if version_of(v) == 1], ids=vid)
def test_v1_images_restore_on_a_later_release(vec) -> None:
    """4.3.0 reports the pool version bits (no H4) and requires them as 4.0.2 does."""
    restore_and_save_again(vec, "released", 8, is_live(vec), xf.CTX_X64, "4.3.0")


def restore_and_save_again(vec: Path, layout: str, width: int, live: bool, ctx: int,
                           release: str) -> None:
    f = xf.frame(vec, layout=layout, width=width, live=live, ctx_size=ctx)
    hv = SimHypervisor(release=release)
    if big_pages(vec):
        with pytest.raises(StreamError, match=r"65536|pagebits") as ei:
            restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
        assert "\n" not in str(ei.value) and only_dom0(hv)
        return
    domid, report = restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    # the tools' width was inferred from the stream, not assumed
    assert (report["width"], report["width_inferred"], report["layout"]) == (width, True, layout)
    want = framed_state(f, vec)
    got = guest_state(hv, domid, f.guest.vcpus)
    for key in want:
        assert got[key] == want[key], key

    # saved again (non-live, this project's writer) and restored elsewhere: the same
    buf = io.BytesIO()
    save_domain(hv, domid, buf, hooks=hooks(), live=False, width=width)
    hv2 = SimHypervisor(release=release)
    buf.seek(0)
    domid2, _ = restore_domain(hv2, buf, hooks=hooks())
    again = guest_state(hv2, domid2, f.guest.vcpus)
    for key in want:
        assert again[key] == want[key], key


@pytest.mark.parametrize("layout", ["released", "seed"])
@pytest.mark.parametrize("vec", GOOD, ids=vid)
def test_xcnt_xsave_records_reach_the_hypervisor(vec, layout, mocker) -> None:
    if big_pages(vec):
        pytest.skip("refused before the tail (64 KiB pages)")
    f = xf.frame(vec, layout=layout, width=8, live=is_live(vec), xcnt=832)
    hv = SimHypervisor(release=RELEASE[version_of(vec)])
    spy = mocker.spy(hv, "set_vcpu_xsave")
    ext = mocker.spy(hv, "set_ext_vcpu_context")
    domid, _ = restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    assert [c.args for c in spy.call_args_list] == [(domid, v, f.guest.xsave[v])
                                                     for v in range(f.guest.vcpus)]
    assert [c.args for c in ext.call_args_list] == [(domid, v, f.guest.ext[v])
                                                    for v in range(f.guest.vcpus)]
    assert [hv.get_vcpu_context(domid, v) for v in range(2)] == f.guest.contexts


def test_width_override_and_a_wrong_width_fails_cleanly() -> None:
    vec = GOOD[0]
    f = xf.frame(vec, width=4, ctx_size=xf.CTX_X32)
    hv = SimHypervisor(release=RELEASE[version_of(vec)])
    domid, report = restore_domain(hv, io.BytesIO(f.data), hooks=hooks(), width=4)
    assert (report["width"], report["width_inferred"]) == (4, False)
    hv.destroy_domain(domid)
    with pytest.raises(StreamError) as ei:
        restore_domain(hv, io.BytesIO(f.data), hooks=hooks(), width=8)
    assert "\n" not in str(ei.value) and only_dom0(hv)


@pytest.mark.parametrize("low,following,hint,width", [
    (768, b"\xff\xff\xff\xff" + bytes(8), None, 4),          # 32-bit tools' ext-info ~0
    (768, bytes(4) + b"\xff" * 8, None, 8),                   # high half 0, then 64-bit ~0
    (768, struct.pack("<I", 0x1a2b0) + bytes(8), 768, 4),     # 32-bit tools, first frame
    (0, struct.pack("<I", 1) + bytes(8), 1 << 32, 8),         # 64-bit p2m_size >= 2^32
    (768, bytes(12), 768, 8),                                 # ambiguous: 64-bit default
    (768, b"", None, 8),                                      # too short to tell
])
def test_width_rule(low, following, hint, width) -> None:
    assert legacy.detect_width(low, following, "pv", hint) == width


def test_hvm_image_is_refused_in_one_line() -> None:
    hv = SimHypervisor()
    with pytest.raises(StreamError, match="HVM") as ei:
        restore_domain(hv, io.BytesIO(xf.frame_hvm()), hooks=hooks())
    assert "\n" not in str(ei.value) and only_dom0(hv)


@pytest.mark.parametrize("layout", ["released", "seed"])
@pytest.mark.parametrize("width", [8, 4])
def test_64k_tmem_pages_are_refused_in_one_line(tmp_path: Path, layout, width) -> None:
    vec = tmp_path / "v1" / "64k"
    vec.mkdir(parents=True)
    flags = 1 | (4 << 4) | (1 << 24)            # persistent, pagebits 4: 64 KiB pages
    (vec / "chunks.bin").write_bytes(xf.tmem_chunk(1, [(0, flags, [(7, 0, b"\xab" * 65536)])]))
    f = xf.frame(vec, layout=layout, width=width)
    hv = SimHypervisor(release="4.0.2")
    with pytest.raises(StreamError, match="65536-byte pages") as ei:
        restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    assert "\n" not in str(ei.value) and only_dom0(hv)
    assert hv.tmem_free_pages() == SimHypervisor(release="4.0.2").tmem_free_pages()


def test_framer_splits_chunks_as_expected_json_says() -> None:
    """The framer's own -5/-6 split agrees with expected.json (it owes no trust)."""
    for vec in GOOD:
        tmem, extra = xf.split_chunks((vec / "chunks.bin").read_bytes())
        assert struct.unpack_from("<i", tmem)[0] == -5
        assert bool(extra) == is_live(vec)
        if extra:
            invs = expected_chunks(vec)[1]
            oid_len = 8 if version_of(vec) == 0 else 24
            assert len(extra) == 8 + len(invs) * (8 + oid_len)


@pytest.mark.e2e
def test_xm_restore_of_xen_images_against_a_real_xend(tmp_path: Path) -> None:
    """``xm restore`` on daemons of each vector's release: every well-formed
    vector framed as Xen did (widths, layouts, guest words, live or not varied
    across them), saved again with ``xm save`` and restored with the same tmem;
    ``--width`` reaches xend; 64 KiB pages and HVM refused in one line."""
    from e2e.xendtest import XendFactory

    factory = XendFactory(tmp_path / "daemons")
    try:
        hosts: Dict[str, Any] = {}   # one daemon per Xen release
        images = tmp_path / "images"
        images.mkdir()
        still_vec = next(v for v in GOOD if not is_live(v) and version_of(v) == 1
                         and not big_pages(v))
        # every well-formed vector once, the framings varied across them
        combos = [(layout, width, ctx) for layout in ("seed", "released") for width in (4, 8)
                  for ctx in (xf.CTX_X32, xf.CTX_X64)]
        for i, vec in enumerate(GOOD):
            layout, width, ctx = combos[i % len(combos)]
            live = is_live(vec) or i % 2 == 1
            name = f"xen{i}"
            release = RELEASE[version_of(vec)]
            if release not in hosts:
                hosts[release] = factory.start(f"h{len(hosts)}", hypervisor={
                    "backend": "sim", "xen-release": release, "tmem-capacity-mb": 64})
            a = hosts[release]
            f = xf.frame(vec, layout=layout, width=width, live=live, ctx_size=ctx, name=name)
            path = images / f"{name}.img"
            path.write_bytes(f.data)
            r = a.xm("restore", "--json", str(path))
            if big_pages(vec):
                assert r.returncode == 1 and "65536-byte pages" in r.stderr, r.stderr
                continue
            assert r.returncode == 0, f"{vid(vec)}: {r.stderr}"
            report = json.loads(r.stdout)
            assert (report["domain"], report["width"], report["layout"]) == (name, width, layout)
            assert a.domains()[name][3] == "r-----"
            want = {pid: len(pages)
                    for pid, (_, _, pages) in expected_tmem(vec)["pools"].items()}
            assert {i: int(p["pages"]) for i, p in a.tmem_pools(name).items()} == want
            # saved again by this toolstack and restored: the same tmem
            again = images / f"{name}.again.img"
            a.xm_ok("save", name, str(again))
            assert name not in a.domains()
            a.xm_ok("restore", str(again))
            assert {i: int(p["pages"]) for i, p in a.tmem_pools(name).items()} == want
        a = hosts["4.0.2"]
        # the width override reaches the daemon
        f = xf.frame(still_vec, width=4, ctx_size=xf.CTX_X32, name="forced32")
        (images / "forced32.img").write_bytes(f.data)
        r = a.xm("restore", "--json", "--width", "4", str(images / "forced32.img"))
        assert r.returncode == 0, r.stderr
        assert (json.loads(r.stdout)["width"], json.loads(r.stdout)["width_inferred"]) == (4, False)

        before = set(a.domains())
        big = tmp_path / "v1" / "64k"
        big.mkdir(parents=True)
        flags = 1 | (4 << 4) | (1 << 24)
        (big / "chunks.bin").write_bytes(xf.tmem_chunk(1, [(0, flags, [(7, 0, b"\x5a" * 65536)])]))
        (images / "big.img").write_bytes(xf.frame(big, name="big").data)
        (images / "hvm.img").write_bytes(xf.frame_hvm())
        for img, what in (("big.img", "65536-byte pages"), ("hvm.img", "HVM")):
            r = a.xm("restore", str(images / img))
            assert r.returncode == 1, r.stdout
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: ") and what in lines[0], r.stderr
        assert set(a.domains()) == before
    finally:
        problems = factory.stop_all()
        assert not problems, problems


def test_xm_restore_width_option_reaches_xend(mocker, capsys, tmp_path: Path) -> None:
    from xend_tmem.xend import xm

    proxy = mocker.MagicMock(name="proxy")
    mocker.patch.object(xm, "server", return_value=proxy)
    mocker.patch.object(xm, "POLL_S", 0.0)
    image = tmp_path / "x.img"
    image.write_bytes(b"LinuxGuestRecord")
    result = {"op": "restore", "domain": "xenvm", "domid": 4, "path": str(image), "bytes": 16,
              "elapsed_s": 0.1, "pages": 0, "width": 4, "plugins": {}}
    proxy.xend.job.restore.return_value = 7
    proxy.xend.job.status.return_value = {"state": "done", "phase": "tail", "done": 16,
                                          "total": None, "result": result}
    assert xm.main(["restore", "--json", "--width", "4", str(image)]) == 0
    proxy.xend.job.restore.assert_called_once_with(str(image), False, 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        xm.main(["restore", "--width", "2", str(image)])
    assert ei.value.code == 1 and "--width" in capsys.readouterr().err
    assert proxy.xend.job.restore.call_count == 1


def test_framer_imports_nothing_from_the_project() -> None:
    import ast

    tree = ast.parse(Path(xf.__file__).read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules and not any(m.split(".")[0] == "xend_tmem" for m in modules), modules
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def test_sim_ext_context_and_xsave_domctls_check_their_arguments() -> None:
    from xend_tmem.errors import HypervisorError

    hv = SimHypervisor()
    domid = hv.create_domain_shell("shell", 256, 2)
    assert hv.get_ext_vcpu_context(domid, 1) == bytes(128)
    hv.set_ext_vcpu_context(domid, 1, b"\x07" * 128)
    assert hv.get_ext_vcpu_context(domid, 1) == b"\x07" * 128
    assert hv.get_ext_vcpu_context(domid, 0) == bytes(128)
    with pytest.raises(HypervisorError, match="128 bytes, got 5296"):
        hv.set_ext_vcpu_context(domid, 0, bytes(5296))
    with pytest.raises(HypervisorError, match="no vcpu 2"):
        hv.set_ext_vcpu_context(domid, 2, bytes(128))
    hv.set_vcpu_xsave(domid, 0, bytes(832))
    with pytest.raises(HypervisorError, match="at most 65536"):
        hv.set_vcpu_xsave(domid, 0, bytes(65537))


def _stream_xsaves(data: bytes) -> Tuple[Any, list]:
    """The ``xcnt`` size and each vcpu's xsave record as an image carries them,
    read with the codec alone (tmem chunks skipped by their own reader)."""
    from xend_tmem.binio import StreamReader
    from xend_tmem.codec import image, tmemchunk as tc
    from xend_tmem.codec.chunkdoc import ChunkCollector

    r = StreamReader(io.BytesIO(data))
    image.read_header(r)
    order, collector = tc.ChunkOrder(), ChunkCollector(False)

    def handler(reader, marker, offset) -> None:
        order.see(marker, offset)
        if marker == xen.TMEM:
            order.client = tc.read_tmem(reader, collector, marker_offset=offset)
        else:
            tc.read_extra(reader, order.version, collector,
                          max_pools=order.client.max_pools, marker_offset=offset)

    reader = legacy.LegacyReader(r, width=None, handlers={m: handler for m in xen.TMEM_MARKERS})
    header = reader.read_header()
    tail = reader.read_tail(reader.read_body())
    assert r.at_eof()
    return header.xcnt_size, [header.split_vcpu_record(rec)[2] for _, rec in tail.vcpu_contexts]


@pytest.mark.parametrize("width,ctx", [(8, xf.CTX_X64), (4, xf.CTX_X32)])
def test_xcnt_xsave_records_survive_a_second_save(width, ctx) -> None:
    """DOMCTL_getvcpuextstate: a re-save writes ``xcnt`` and each vcpu's xsave
    record again, so a guest restored from a 4.1 image keeps its FPU state."""
    vec = next(v for v in GOOD if not big_pages(v))
    release = RELEASE[version_of(vec)]
    f = xf.frame(vec, width=width, live=is_live(vec), ctx_size=ctx, xcnt=832)
    hv = SimHypervisor(release=release)
    domid, _ = restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    assert [hv.get_vcpu_xsave(domid, v) for v in range(f.guest.vcpus)] == f.guest.xsave
    buf = io.BytesIO()
    save_domain(hv, domid, buf, hooks=hooks(), live=False, width=width)
    assert _stream_xsaves(buf.getvalue()) == (832, f.guest.xsave)
    hv2 = SimHypervisor(release=release)
    domid2, _ = restore_domain(hv2, io.BytesIO(buf.getvalue()), hooks=hooks())
    assert [hv2.get_vcpu_xsave(domid2, v) for v in range(f.guest.vcpus)] == f.guest.xsave
    want = framed_state(f, vec)
    again = guest_state(hv2, domid2, f.guest.vcpus)
    for key in want:
        assert again[key] == want[key], key


def test_save_without_xsave_writes_no_xcnt() -> None:
    vec = next(v for v in GOOD if not big_pages(v))
    f = xf.frame(vec, live=is_live(vec))
    hv = SimHypervisor(release=RELEASE[version_of(vec)])
    domid, _ = restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    assert hv.get_vcpu_xsave(domid, 0) == b""
    buf = io.BytesIO()
    save_domain(hv, domid, buf, hooks=hooks(), live=False)
    assert _stream_xsaves(buf.getvalue()) == (None, [None] * f.guest.vcpus)


def test_save_refuses_vcpus_with_xsave_records_of_different_sizes() -> None:
    from xend_tmem.errors import SaveError

    vec = next(v for v in GOOD if not big_pages(v))
    f = xf.frame(vec, live=is_live(vec), xcnt=832)
    hv = SimHypervisor(release=RELEASE[version_of(vec)])
    domid, _ = restore_domain(hv, io.BytesIO(f.data), hooks=hooks())
    hv.set_vcpu_xsave(domid, 1, bytes(512))
    with pytest.raises(SaveError, match=r"different sizes \(vcpu 0: 832, vcpu 1: 512\)") as ei:
        save_domain(hv, domid, io.BytesIO(), hooks=hooks(), live=False)
    assert "\n" not in str(ei.value)
    # refused before anything was lost: the domain runs again with its state
    info = hv.domain_info(domid)
    assert info.running and not info.shutdown
    assert hv.get_vcpu_xsave(domid, 0) == f.guest.xsave[0]


def test_sim_get_vcpu_xsave_reads_back_and_checks_the_vcpu() -> None:
    from xend_tmem.errors import HypervisorError

    hv = SimHypervisor()
    domid = hv.create_domain_shell("shell", 256, 2)
    assert hv.get_vcpu_xsave(domid, 1) == b""
    hv.set_vcpu_xsave(domid, 1, b"\x5a" * 832)
    assert (hv.get_vcpu_xsave(domid, 0), hv.get_vcpu_xsave(domid, 1)) == (b"", b"\x5a" * 832)
    with pytest.raises(HypervisorError, match="no vcpu 2"):
        hv.get_vcpu_xsave(domid, 2)
