"""Untrusted images: any corruption is a one-line XendTmemError, never a crash,
and a failed restore leaves nothing behind."""
from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xend_tmem import plugins
from xend_tmem.checkpoint import restore_domain, save_domain
from xend_tmem.cli.inspect import inspect_file
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import XendTmemError
from xend_tmem.hypervisor.sim import SimHypervisor

SMALL = {
    "name": "fz", "memory": 1, "vcpus": 2,
    "tmem": {"version": 1, "client": {"weight": 1, "cap": 2},
             "pools": [{"id": 0, "persistent": True, "pages": [
                 {"oid": [1, 2, 3], "index": 0, "fill": 7}, {"oid": [1, 2, 3], "index": 1, "seed": 4}]},
                 {"id": 3, "persistent": False, "shared": True, "uuid": [5, 6], "pages": []}]},
}


def _image(live: bool, layout: str) -> bytes:
    hv = SimHypervisor()
    domid = hv.create_domain(parse_domain_config(SMALL))
    buf = io.BytesIO()
    save_domain(hv, domid, buf, live=live,
                hooks=plugins.get_plugin_manager(["tmem"], {"tmem": {"layout": layout}}))
    return buf.getvalue()


IMAGES = {(live, layout): _image(live, layout) for live in (False, True)
          for layout in ("released", "seed")}
HOOKS = plugins.get_plugin_manager(["tmem"], {})


def _interesting_offsets(data: bytes):
    """Offsets of the tmem chunk and the stream structure, where corruption matters."""
    cfg_end = 20 + struct.unpack(">i", data[16:20])[0]
    tm = data.find(struct.pack("<i", -5), cfg_end)
    return st.one_of(st.integers(0, 40), st.integers(cfg_end, cfg_end + 80),
                     st.integers(max(tm, 0), max(tm, 0) + 120),
                     st.integers(len(data) - 10000, len(data) - 1),
                     st.integers(0, len(data) - 1))


@pytest.mark.parametrize("key", sorted(IMAGES), ids=lambda k: f"{'live' if k[0] else 'nonlive'}-{k[1]}")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_images_fail_cleanly(tmp_path_factory, key, data):
    image = bytearray(IMAGES[key])
    for _ in range(data.draw(st.integers(1, 3))):
        off = data.draw(_interesting_offsets(bytes(image))) % len(image)
        image[off] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        image = image[:data.draw(st.integers(0, len(image)))]
    path = tmp_path_factory.mktemp("fz") / "img"
    path.write_bytes(bytes(image))
    try:
        inspect_file(str(path), chunks_only=False, with_pages=True)
    except XendTmemError as exc:
        assert "\n" not in str(exc)
    hv = SimHypervisor()
    try:
        restore_domain(hv, io.BytesIO(bytes(image)), hooks=HOOKS)
    except XendTmemError as exc:
        assert "\n" not in str(exc)
        assert [d.domid for d in hv.list_domains()] == [0]
        assert hv.tmem_free_pages() == SimHypervisor().tmem_free_pages()
