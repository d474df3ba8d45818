"""Regression tests for issue 8 #4: integrity of images and migration streams.

A byte flipped inside a tmem page (or a RAM page) of an ``xm save`` image, or
inside a tmem page of a migration stream (a loopback proxy flips it), must be
refused before the domain runs, naming the page (tmem pool/oid/index or RAM
pfn); the restore leaves no domain behind and a migration leaves the source
running. The checksums live where a stock reader never sees them: a sidecar
file beside the image, and per-frame CRCs negotiated in the pre-flight.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Iterator, List

import pytest

import relocation_proxy
from xend_tmem.codec import image as image_codec
from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.relocation.server import RelocationServer
from xend_tmem.xend.service import XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [
              {"id": 0, "persistent": True, "bulk": {"pages": 64, "objects": 2}}]}}
OID = (0, 0, 977)
INDEX = 5
PFN = 301


def pattern(tag: bytes) -> bytes:
    """A page no simulated workload writes: 4096 bytes of a hash chain."""
    out = b""
    h = tag
    while len(out) < 4096:
        h = hashlib.sha256(h).digest()
        out += h
    return out[:4096]


TMEM_PAGE = pattern(b"tmem")
RAM_PAGE = pattern(b"ram")


class Host:
    def __init__(self, state: Path) -> None:
        state.mkdir(parents=True)
        self.state = state
        self.hv = SimHypervisor()
        self.svc = XendService(parse_toolstack_config({"xend-state-dir": str(state)}), self.hv,
                               get_plugin_manager(["tmem"], {}))
        self.svc.ack_timeout = 5.0
        self.svc.query_window = 3.0
        self.server = RelocationServer(
            "127.0.0.1", 0, hosts_allow=[], restore=self.svc.incoming_restore,
            check_offer=self.svc.check_offer, discard=self.svc.discard_domain, go_timeout=5.0)
        self.svc.relocation_servers = [self.server]
        self.server.start()

    def web1(self) -> List:
        return [d for d in self.hv.list_domains() if d.name in ("web1", "migrating-web1")]

    def stop(self) -> None:
        self.svc.stop(5)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator:
    made: List[Host] = []

    def make() -> Host:
        made.append(Host(tmp_path / f"host{len(made)}"))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def make_domain(h: Host) -> int:
    domid = h.hv.create_domain(parse_domain_config(DOMAIN))
    assert h.hv.guest_put(domid, 0, OID, INDEX, TMEM_PAGE)
    h.hv.write_pages(domid, [PFN], RAM_PAGE)
    return domid


def flip(path: Path, page: bytes) -> int:
    """Flip one bit inside ``page``'s copy in the image; returns the page's offset."""
    data = bytearray(path.read_bytes())
    at = data.find(page)
    assert at > 0 and data.find(page, at + 1) < 0, "the page is in the image once"
    data[at + 1234] ^= 0x40
    path.write_bytes(bytes(data))
    return at


def saved_image(h: Host, tmp_path: Path) -> Path:
    make_domain(h)
    path = tmp_path / "web1.img"
    h.svc.domain_save("web1", str(path))
    assert h.web1() == []
    return path


def test_save_writes_a_sidecar_a_stock_reader_never_sees(hosts, tmp_path: Path) -> None:
    h = hosts()
    path = saved_image(h, tmp_path)
    side = Path(str(path) + ".crc")
    assert side.is_file() and side.stat().st_size > 0
    # the image itself is the stock layout: the header reads, nothing appended for us
    assert image_codec.is_image(path.read_bytes()[:16])
    h.svc.domain_restore(str(path))
    (info,) = h.web1()
    assert info.running and h.hv.guest_get(info.domid, 0, OID, INDEX) == TMEM_PAGE


def test_a_flipped_tmem_byte_in_an_image_is_refused_naming_the_page(hosts,
                                                                    tmp_path: Path) -> None:
    h = hosts()
    path = saved_image(h, tmp_path)
    at = flip(path, TMEM_PAGE)
    with pytest.raises(Exception) as info:
        h.svc.domain_restore(str(path))
    text = str(info.value)
    assert re.search(r"tmem page pool 0 oid 0:0:977 index 5\b", text), text
    assert f"image offset {at})" in text
    assert "checksum" in text
    assert h.web1() == []                     # never ran, removed


def test_a_flipped_ram_byte_in_an_image_is_refused_naming_the_pfn(hosts,
                                                                  tmp_path: Path) -> None:
    h = hosts()
    path = saved_image(h, tmp_path)
    at = flip(path, RAM_PAGE)
    with pytest.raises(Exception) as info:
        h.svc.domain_restore(str(path))
    assert re.search(rf"RAM page pfn {PFN}\b", str(info.value)), str(info.value)
    assert f"image offset {at})" in str(info.value)
    assert h.web1() == []


def test_a_flipped_byte_outside_pages_is_refused(hosts, tmp_path: Path) -> None:
    """No whole-image CRC any more: the tail's last byte (shared info, no page
    record covers it) is caught by its run's CRC32 before the domain runs."""
    h = hosts()
    path = saved_image(h, tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as info:
        h.svc.domain_restore(str(path))
    assert "corrupt outside its pages" in str(info.value), str(info.value)
    assert h.web1() == []


class _FlippingPair(relocation_proxy._Pair):
    """Flips one byte inside the first stretch of TMEM_PAGE going to the receiver."""

    def _send(self, to, data: bytes, count: bool) -> bool:
        probe = TMEM_PAGE[1024:1024 + 256]
        if count and not self.proxy.fired.is_set():
            at = data.find(probe)
            if at >= 0:
                buf = bytearray(data)
                buf[at + 100] ^= 0x01
                data = bytes(buf)
                self.proxy.fired.set()
        return super()._send(to, data, count)


def test_a_flipped_tmem_byte_in_a_migration_stream_is_refused(hosts, monkeypatch) -> None:
    src, dst = hosts(), hosts()
    make_domain(src)
    monkeypatch.setattr(relocation_proxy, "_Pair", _FlippingPair)
    proxy = relocation_proxy.Proxy(dst.server.port, None)
    try:
        job = src.svc.jobs.get(src.svc.job_migrate("web1", "127.0.0.1", live=False,
                                                   port=proxy.port))
        assert job.finished_event.wait(30)
    finally:
        proxy.close()
    assert proxy.fired.is_set()
    status = job.status()
    assert status["state"] == "failed", status
    assert re.search(r"tmem page pool 0 oid 0:0:977 index 5\b", status["error"]), status
    deadline = time.monotonic() + 5
    while dst.web1() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dst.web1() == []
    (info,) = src.web1()
    assert info.name == "web1" and info.running
