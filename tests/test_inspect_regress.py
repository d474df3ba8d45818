"""Issue 8 #11: ``xend-tmem inspect`` as an administrator uses it.

No traceback when the reader of its output goes away (``| head``); the kind
of file is detected (image, libxc stream, chunk file) and anything else is
named as such; the text shows the domain and a per-pool tmem summary; a
truncated image shows what arrived, says what is missing and can salvage the
tmem pages that arrived; ``--pages`` lists checksums in text form too.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor

VECTORS = Path(__file__).parent / "data" / "vectors"
REC = 24 + 4 + 4096            # a version 1 page record
BULK = 40


def inspect(*args, **kw):
    return subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=60, **kw)


def _config(layout_seed: bool = False):
    return parse_domain_config({
        "name": "web1", "memory": 4, "vcpus": 2,
        "tmem": {"version": 1, "client": {"compress": True, "frozen": False, "weight": 7, "cap": 0},
                 "pools": [
                     {"id": 0, "persistent": True, "shared": False, "pagebits": 0,
                      "uuid": [0, 0], "pages": [], "bulk": {"pages": BULK}},
                     {"id": 2, "persistent": True, "shared": True, "pagebits": 0,
                      "uuid": [5, 6], "pages": [{"oid": [1, 2, 3], "index": 4, "fill": 9}]},
                     {"id": 3, "persistent": False, "shared": False, "pagebits": 0,
                      "uuid": [0, 0], "pages": []}]}})


def _save(path: Path, settings=None) -> Path:
    hv = SimHypervisor()
    domid = hv.create_domain(_config())
    with open(path, "wb") as f:
        save_domain(hv, domid, f, hooks=plugins.get_plugin_manager(["tmem"], settings or {}),
                    live=False)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("img") / "web1.img")


@pytest.fixture(scope="module")
def full(image):
    r = inspect("--json", "--pages", image)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_closed_pipe_is_not_a_traceback(image):
    p = subprocess.Popen([sys.executable, "-m", "xend_tmem.cli.tool", "inspect", "--pages",
                          str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                    # like `| head` that has already exited
    err = p.stderr.read().decode()
    p.stderr.close()
    rc = p.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err and err == ""
    assert rc == 141                    # what a shell reports for a tool killed by SIGPIPE


@pytest.mark.parametrize("vec", ["v1/05-live-invalidations", "v0/02-one-persistent-pool"])
def test_chunk_file_is_detected_without_the_flag(vec):
    vec = VECTORS / vec
    r = inspect("--json", "--pages", vec / "chunks.bin")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "tmem chunks"
    assert doc["chunks"] == json.loads((vec / "expected.json").read_text())["chunks"]


def test_seed_layout_stream_is_still_a_stream(tmp_path):
    img = _save(tmp_path / "seed.img", {"tmem": {"layout": "seed"}})
    data = img.read_bytes()
    cfg_len = int.from_bytes(data[16:20], "big")
    raw = tmp_path / "seed.stream"
    raw.write_bytes(data[20 + cfg_len:])
    assert struct.unpack_from("<i", raw.read_bytes())[0] == -5
    r = inspect("--json", raw)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["kind"], doc["layout"]) == ("libxc stream", "seed")


@pytest.mark.parametrize("content", [b'{\n "chunks": [1, 2, 3]\n}\n', b"name = 'web1'\nmemory = 512\n",
                                     b"\x1f\x8b\x08\x00" + bytes(40), b""])
def test_a_file_that_is_no_stream_is_named_so(tmp_path, content):
    bad = tmp_path / "wrong.json"
    bad.write_bytes(content)
    r = inspect(bad)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"Error: {bad}: ")
    assert "not an image, libxc stream or tmem chunk file" in r.stderr
    assert "p2m_size" not in r.stderr


def test_text_shows_domain_and_pool_summary(image, full):
    text = inspect(image).stdout
    assert re.search(r"domain web1: memory 4 MiB, 2 vcpus", text), text
    assert "client flags 0x1 (compress)" in text
    assert re.search(rf"pool 0: persistent,page=4096,specver=1, {BULK} pages \({BULK * 4096} bytes\)",
                     text), text
    assert re.search(r"pool 2: persistent,shared,page=4096,specver=1, 1 pages? \(4096 bytes\)", text)
    assert re.search(r"pool 3: ephemeral,page=4096,specver=1, 0 pages \(0 bytes\)", text)
    assert re.search(rf"tmem: 3 pools, {BULK + 1} persistent pages \({(BULK + 1) * 4096} bytes\)", text)


def test_pages_in_text_carry_crc32(image, full):
    text = inspect("--pages", image).stdout
    pages = full["chunks"][0]["pools"][0]["pages"]
    assert len(pages) == BULK
    for g in pages:
        assert f"index {g['index']} crc32 {g['crc32']}" in text
    # RAM pages too: one line per page with its checksum
    ram = re.findall(r"^\s+pfn (0x[0-9a-f]+) crc32 (0x[0-9a-f]{8})$", text, re.M)
    assert len(ram) == full["ram_pages"] == 4 * 256


def _cut_inside_pool0(image: Path, full, tmp_path: Path, arrived: int) -> Path:
    off = full["chunk_offsets"][0]
    cut = off + 32 + 28 + arrived * REC + 100          # inside the next record
    bad = tmp_path / "cut.img"
    bad.write_bytes(image.read_bytes()[:cut])
    return bad


def test_truncated_image_shows_what_arrived_and_what_is_missing(image, full, tmp_path):
    bad = _cut_inside_pool0(image, full, tmp_path, 10)
    r = inspect(bad)
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: {bad}: ") and r.stderr.count("\n") == 1
    assert "domain web1: memory 4 MiB, 2 vcpus" in r.stdout          # the header arrived
    assert f"p2m_size {full['p2m_size']}" in r.stdout                 # and the stream header
    assert re.search(rf"pool 0: .*10 of {BULK} announced pages", r.stdout), r.stdout
    assert "truncated at offset" in r.stdout
    missing = r.stdout[r.stdout.index("missing:"):]
    for part in ("pool 0: 30 of its 40", "pools after pool 0", "vcpu", "shared info"):
        assert part in missing, missing
    r = inspect("--json", bad)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["complete"] is False and doc["truncated_at"] == bad.stat().st_size
    assert doc["chunks"][0]["pools"][0]["page_count"] == 10


def test_salvage_extracts_the_tmem_pages_that_arrived(image, full, tmp_path):
    bad = _cut_inside_pool0(image, full, tmp_path, 10)
    out = tmp_path / "salvage"
    r = inspect("--salvage", out, bad)
    assert r.returncode == 0, r.stderr
    assert "salvaged 10 tmem pages" in r.stdout
    chunks = out / "tmem.chunks"
    r = inspect("--json", "--pages", chunks)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "tmem chunks"
    pools = doc["chunks"][0]["pools"]
    assert [p["id"] for p in pools] == [0]
    assert pools[0]["pages"] == full["chunks"][0]["pools"][0]["pages"][:10]
    facts = json.loads((out / "salvage.json").read_text())
    assert facts["pools"]["0"] == {"announced": BULK, "salvaged": 10}
    # never over an earlier salvage
    r = inspect("--salvage", out, bad)
    assert r.returncode == 1 and "exists" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_salvage():
    r = subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "inspect", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert "--salvage" in r.stdout and "tmem.chunks" in r.stdout
