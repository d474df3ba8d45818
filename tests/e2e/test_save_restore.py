"""xm save / restore against real daemons: tmem travels in the image file."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from xend_tmem.checkpoint import save_domain
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager

from .xendtest import BUSY_DOMAIN, STILL_DOMAIN, write_domain

pytestmark = pytest.mark.e2e

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
ALL_ONES = 2**64 - 1


def persistent_and_ephemeral(pools: dict) -> tuple:
    return ({i: int(p["pages"]) for i, p in pools.items() if p["kind"] == "persistent"},
            {i: int(p["pages"]) for i, p in pools.items() if p["kind"] == "ephemeral"})


def test_save_then_restore_brings_back_persistent_tmem(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    persistent, ephemeral = persistent_and_ephemeral(a.tmem_pools("still1"))
    assert persistent == {0: 1024} and ephemeral == {1: 512}
    image = tmp_path / "images" / "still1.img"
    image.parent.mkdir()

    r = a.xm("save", "still1", str(image))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                   # off a terminal: no progress
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"Saved domain still1 to {image}: ")
    assert any(ln.startswith("tmem: plan ") for ln in lines)
    assert any("1024 pages" in ln for ln in lines if ln.startswith("tmem: "))
    assert "still1" not in a.domains() and "migrating-still1" not in a.domains()
    # the image and its page checksums (issue 8 #4)
    assert sorted(p.name for p in image.parent.iterdir()) == ["still1.img", "still1.img.crc"]

    r = a.xm("restore", "--json", str(image))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["op"] == "restore" and report["domain"] == "still1"
    assert report["plugins"]["tmem"]["pages"] == 1024
    assert a.domains()["still1"][3] == "r-----"
    assert persistent_and_ephemeral(a.tmem_pools("still1")) == ({0: 1024}, {1: 0})
    client = a.tmem_client("still1")
    assert (client["weight"], client["frozen"], client["saving"]) == ("5", "0", "0")


def test_restore_paused_and_image_restores_on_a_daemon_started_later(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    image = tmp_path / "still1.img"
    a.xm_ok("save", "--quiet", "still1", str(image))
    a.stop()
    c = xends.start("c")                                   # a new daemon, a new hypervisor
    out = c.xm_ok("restore", "-p", str(image))
    assert out.startswith(f"Restored domain still1 (id=1) from {image}")
    assert c.domains()["still1"][3] == "--p---"
    assert persistent_and_ephemeral(c.tmem_pools("still1")) == ({0: 1024}, {1: 0})
    c.xm_ok("unpause", "still1")
    assert c.domains()["still1"][3] == "r-----"


def test_checkpoint_save_leaves_the_domain_running_with_tmem_thawed(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    b = xends.start("b")
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    before = a.domains()["web1"]
    image = tmp_path / "web1-cp.img"
    out = a.xm_ok("save", "-c", "web1", str(image))
    assert out.startswith(f"Checkpointed domain web1 to {image}")
    after = a.domains()["web1"]
    assert after[0] == before[0] and after[3] == "r-----"   # same domain, running
    client = a.tmem_client("web1")
    assert (client["frozen"], client["saving"]) == ("0", "0")
    # thawed: the guest's new puts are taken again, none fall back to swap
    fallbacks = int(client["swap_fallbacks"])
    puts = int(client["puts"])
    time.sleep(0.5)
    client = a.tmem_client("web1")
    assert int(client["puts"]) > puts and int(client["swap_fallbacks"]) == fallbacks
    # the snapshot is a complete image; restored paused, so its workload (which
    # travels in the image's config) has not refilled the ephemeral pool yet
    b.xm_ok("restore", "-p", str(image))
    assert b.domains()["web1"][3] == "--p---"
    persistent, ephemeral = persistent_and_ephemeral(b.tmem_pools("web1"))
    assert persistent[0] > 0 and ephemeral == {1: 0}


@pytest.mark.parametrize("vector, version", [("v0/02-one-persistent-pool", 0),
                                             ("v1/03-mixed-pools", 1)])
def test_engine_images_restore_through_xm(xends, tmp_path: Path, vector: str, version: int) -> None:
    """An image the engine wrote in-process (from a golden vector's tmem state)
    restores through ``xm restore`` with its persistent pages."""
    scenario = yaml.safe_load((VECTORS / vector / "scenario.yaml").read_text())
    scenario.update({"name": "vec", "memory": 4})
    scenario["tmem"].pop("live", None)
    scenario["tmem"].pop("invalidations", None)
    config = parse_domain_config(scenario, source=vector)
    hv = SimHypervisor(tmem_version=version)
    domid = hv.create_domain(config)
    image = tmp_path / "vec.img"
    with open(image, "wb") as f:
        save_domain(hv, domid, f, hooks=get_plugin_manager(["tmem"], {}), live=False)
    expected = {p.id: (len(p.pages) if p.persistent else 0) for p in config.tmem.pools}

    d = xends.start("d", hypervisor={"backend": "sim", "tmem-version": version})
    d.xm_ok("restore", str(image))
    pools = d.tmem_pools("vec")
    assert {i: int(p["pages"]) for i, p in pools.items()} == expected
    assert d.tmem_client("vec")["weight"] == str(config.tmem.client.weight)


def test_failed_save_leaves_no_file_and_the_domain_running_under_its_name(xends,
                                                                         tmp_path: Path) -> None:
    """Xen's T4: an all-ones OID cannot be written; the save fails midway."""
    bad = {"name": "bad1", "memory": 8,
           "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True, "pages": [
               {"oid": [1, 2, 3], "index": 0, "fill": 1},
               {"oid": [ALL_ONES, ALL_ONES, ALL_ONES], "index": 5, "fill": 2}]}]}}
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, bad)))
    target_dir = tmp_path / "out"
    target_dir.mkdir()
    r = a.xm("save", "bad1", str(target_dir / "bad1.img"))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and "all-ones OID" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert list(target_dir.iterdir()) == []                # no image, no temp file
    assert a.domains()["bad1"][3] == "r-----"              # resumed, name given back
    client = a.tmem_client("bad1")
    assert (client["frozen"], client["saving"]) == ("0", "0")
    assert "migrating-bad1" not in a.domains()


def test_a_daemon_without_the_plugin_refuses_a_tmem_image_cleanly(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    b = xends.start("b", **{"checkpoint-plugins": []})
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    image = tmp_path / "still1.img"
    a.xm_ok("save", "still1", str(image))
    r = b.xm("restore", str(image))
    assert r.returncode == 1
    assert r.stderr.startswith("Error: bad stream: ") and "-5" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert list(b.domains()) == ["Domain-0"]              # nothing half-built stays
    # and a daemon without the plugin saves like a toolstack without tmem support
    plain = write_domain(tmp_path, {"name": "plain", "memory": 8})
    b.xm_ok("create", str(plain))
    out = b.xm_ok("save", "plain", str(tmp_path / "plain.img"))
    assert "tmem: not carried" in out
    a.xm_ok("restore", str(tmp_path / "plain.img"))
    assert "plain" in a.domains()
