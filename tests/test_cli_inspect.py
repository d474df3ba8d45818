"""``xend-tmem inspect`` from the command line: vectors, whole images, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xend_tmem import plugins
from xend_tmem.checkpoint import save_domain
from xend_tmem.domconfig import load_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor

VECTORS = Path(__file__).parent / "data" / "vectors"
ALL = sorted(p for p in VECTORS.glob("v*/*") if p.is_dir())


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("vec", ALL, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vectors_json(vec):
    exp = json.loads((vec / "expected.json").read_text())
    r = inspect("--chunks", "--json", "--pages", vec / "chunks.bin")
    if "error" in exp:
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
        assert "offset" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks"] == exp["chunks"]


def test_counts_without_pages_and_text_form():
    vec = VECTORS / "v1" / "05-live-invalidations" / "chunks.bin"
    doc = json.loads(inspect("--chunks", "--json", vec).stdout)
    assert doc["chunks"][0]["pools"][0]["page_count"] == 3
    assert "pages" not in doc["chunks"][0]["pools"][0]
    assert doc["chunks"][1]["invalidation_count"] == 3
    text = inspect("--chunks", vec).stdout
    assert "chunk -5 TMEM (plugin 'tmem') at offset 0" in text and "3 invalidations" in text
    assert "persistent" in text


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    hv = SimHypervisor()
    domid = hv.create_domain(load_domain_config(str(VECTORS / "v1" / "03-mixed-pools" / "scenario.yaml")))
    path = tmp_path_factory.mktemp("img") / "dom.img"
    with open(path, "wb") as f:
        save_domain(hv, domid, f, hooks=plugins.get_plugin_manager(["tmem"], {}), live=True)
    return path


def test_whole_image(image):
    r = inspect("--json", "--pages", image)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "xend image" and doc["layout"] == "released"
    assert [c["marker"] for c in doc["chunks"]] == [-5, -6]
    pools = doc["chunks"][0]["pools"]
    assert [p["id"] for p in pools] == [0, 1, 3, 4]
    assert all(p["flags"] >> 24 == 1 for p in pools)          # H4 fixed on save
    assert inspect(image).stdout.count("pool ") == 4


def test_raw_stream_and_wrong_width(image, tmp_path):
    data = image.read_bytes()
    cfg_len = int.from_bytes(data[16:20], "big")
    raw = tmp_path / "raw.stream"
    raw.write_bytes(data[20 + cfg_len:])
    r = inspect("--json", raw)
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "libxc stream"
    r = inspect("--width", "4", raw)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("cut", [5, 18, 400, 9000, -3])
def test_truncated_image_one_line_error(image, tmp_path, cut):
    """One error line; what did arrive is described on stdout (issue 8 #11)."""
    bad = tmp_path / "bad.img"
    bad.write_bytes(image.read_bytes()[:cut])
    r = inspect(bad)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert f"truncated at offset {bad.stat().st_size}" in r.stdout and "missing: " in r.stdout


def test_missing_file():
    r = inspect("/nonexistent/x.img")
    assert r.returncode == 1 and "Error: cannot read /nonexistent/x.img" in r.stderr


@pytest.mark.parametrize("width,ctx", [(4, "CTX_X32"), (8, "CTX_X64")])
def test_tools_width_is_inferred_for_images_and_bare_streams(tmp_path, width, ctx):
    """Images of 32-bit dom0 tools inspect without ``--width``: the width is
    inferred as restore infers it; ``--width`` still overrides."""
    import xenframer as xf

    vec = VECTORS / "v1" / "05-live-invalidations"
    f = xf.frame(vec, width=width, live=True, ctx_size=getattr(xf, ctx))
    img = tmp_path / "xen.img"
    img.write_bytes(f.data)
    cfg_len = int.from_bytes(f.data[16:20], "big")
    raw = tmp_path / "xen.stream"
    raw.write_bytes(f.data[20 + cfg_len:])
    expected = json.loads((vec / "expected.json").read_text())["chunks"]
    for path, kind in ((img, "xend image"), (raw, "libxc stream")):
        r = inspect("--json", "--pages", path)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert (doc["kind"], doc["width"], doc["width_inferred"]) == (kind, width, True)
        assert doc["p2m_size"] == f.guest.p2m_size and doc["chunks"] == expected
        assert f"width {width} (inferred)" in inspect(path).stdout
        r = inspect("--json", "--width", str(width), path)
        assert r.returncode == 0, r.stderr
        assert (json.loads(r.stdout)["width"], json.loads(r.stdout)["width_inferred"]) == (width, False)
        r = inspect("--width", str(12 - width), path)        # the wrong override fails cleanly
        assert r.returncode == 1 and "missing: " in r.stdout
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
