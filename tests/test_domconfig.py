"""Domain configuration loader: vectors load as configs, errors name file and key."""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest

from xend_tmem.domconfig import (BULK_OID_BASE, BulkSpec, DomainConfig, PageSpec,
                                 load_domain_config, parse_domain_config, splitmix64_bytes)
from xend_tmem.errors import ConfigError

VECTORS = Path(__file__).parent / "data" / "vectors"
SCENARIOS = sorted(VECTORS.glob("v*/*/scenario.yaml"))


def test_there_are_scenarios() -> None:
    assert len(SCENARIOS) >= 5


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_vector_scenario_loads_and_matches_expected(path: Path) -> None:
    cfg = load_domain_config(path)
    expected = json.loads((path.parent / "expected.json").read_text())
    chunk = expected["chunks"][0]
    t = cfg.tmem
    assert t is not None
    assert cfg.name == f"scenario-dom{t.dom}"
    assert (cfg.memory, cfg.vcpus) == (128, 1)
    assert t.version == chunk["version"] == int(path.parent.parent.name[1:])
    assert [p.id for p in t.pools] == [p["id"] for p in chunk["pools"]]
    for pool, xp in zip(t.pools, chunk["pools"]):
        assert list(pool.uuid) == xp["uuid"]
        if not pool.persistent:
            assert xp["pages"] == []
            continue
        # the scenario's pages, rebuilt from fill/seed, are the pages Xen wrote
        got = [(list(p.oid) if t.version == 1 else p.oid[0], p.index,
                f"{zlib.crc32(p.data()):#010x}") for p in pool.pages]
        assert got == [(xp_["oid"], xp_["index"], xp_["crc32"]) for xp_ in xp["pages"]]
    live_chunks = [c for c in expected["chunks"] if c["marker"] == -6]
    assert bool(live_chunks) == t.live
    if live_chunks:
        invs = [(i.pool, list(i.oid), i.index) for i in t.invalidations]
        assert invs == [(e["pool"], e["oid"], e["index"]) for e in live_chunks[0]["invalidations"]]


def test_scenario_keeps_vector_attributes() -> None:
    cfg = load_domain_config(VECTORS / "v1" / "06-npages-terminator" / "scenario.yaml")
    assert cfg.tmem.pools[0].announce_pages == 5
    assert cfg.tmem.pools[1].announce_pages is None
    cfg = load_domain_config(VECTORS / "v1" / "05-live-invalidations" / "scenario.yaml")
    assert (cfg.tmem.dom, cfg.tmem.live, len(cfg.tmem.invalidations)) == (3, True, 3)
    assert cfg.tmem.client.weight == 0 and cfg.tmem.client.frozen is False


def test_splitmix_matches_spec() -> None:
    assert zlib.crc32(splitmix64_bytes(1, 4096)) == 0x77AC17E9
    # the well-known first SplitMix64 output for state 0
    assert struct.unpack("<Q", splitmix64_bytes(0, 8))[0] == 0xE220A8397B1DCDAF
    assert splitmix64_bytes(7, 4096)[:100] == splitmix64_bytes(7, 100)
    assert PageSpec((1, 0, 0), 0, seed=1).data() == splitmix64_bytes(1, 4096)
    assert PageSpec((1, 0, 0), 0, fill=0xAA).data(8192) == b"\xaa" * 8192


def test_full_domain_config(tmp_path: Path) -> None:
    f = tmp_path / "web1.yaml"
    f.write_text("""
name: web1
memory: 64
vcpus: 2
workload: {ram_dirty_pages_per_s: 100, tmem_puts_per_s: 50.5, seed: 9}
tmem:
  client: {weight: 3, frozen: true}
  pools:
  - {id: 1, persistent: true, pages: [{oid: 5, index: 2, fill: 1}], bulk: {pages: 10, objects: 3}}
  - id: 0
    persistent: false
    shared: true
    uuid: [1, 2]
""")
    cfg = load_domain_config(f)
    assert isinstance(cfg, DomainConfig)
    assert (cfg.name, cfg.memory, cfg.vcpus, cfg.source) == ("web1", 64, 2, str(f))
    assert cfg.to_dict() == {"name": "web1", "memory": 64, "vcpus": 2, "workload": {
        "ram_dirty_pages_per_s": 100.0, "tmem_puts_per_s": 50.5, "tmem_gets_per_s": 0.0,
        "tmem_flushes_per_s": 0.0, "seed": 9}}
    w = cfg.workload
    assert (w.ram_dirty_pages_per_s, w.tmem_puts_per_s, w.tmem_gets_per_s, w.seed) == (100, 50.5, 0, 9)
    assert w.active
    t = cfg.tmem
    assert t.version == 1 and t.client.weight == 3 and t.client.frozen and not t.client.compress
    p1, p0 = t.pools
    assert p1.pages[0].oid == (5, 0, 0)          # an int OID in a v1 config
    assert p1.bulk == BulkSpec(pages=10, objects=3, seed=0) and p1.total_pages == 11
    assert (p0.shared, p0.uuid, p0.persistent, p0.pages) == (True, (1, 2), False, ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"                          # frozen dataclass


def test_defaults() -> None:
    cfg = parse_domain_config({"name": "a"})
    assert (cfg.memory, cfg.vcpus, cfg.tmem, cfg.workload.active) == (128, 1, None, False)
    assert cfg.source == "<string>"


def test_bulk_records_layout_and_determinism() -> None:
    b = BulkSpec(pages=600, objects=4, seed=3)
    blocks = list(b.records(pool_id=2, version=1))
    assert [n for n, _ in blocks] == [256, 256, 88]
    rs = 28 + 4096
    assert all(len(r) == n * rs for n, r in blocks)
    keys = set()
    for n, r in blocks:
        for i in range(n):
            keys.add(bytes(r[i * rs:i * rs + 28]))
    assert len(keys) == 600
    a, bb, c, idx = struct.unpack("<QQQI", bytes(blocks[0][1][:28]))
    assert (a, bb, c, idx) == (BULK_OID_BASE, 0, 0, 0)
    assert b.key(599) == ((BULK_OID_BASE + 3, 0, 0), 599 - 3 * 150)
    again = list(b.records(pool_id=2, version=1))
    assert again[1][1] == blocks[1][1]
    other_pool = list(b.records(pool_id=3, version=1))
    assert other_pool[0][1][28:rs] != blocks[0][1][28:rs]
    v0 = list(BulkSpec(pages=3).records(pool_id=0, version=0))
    assert len(v0[0][1]) == 3 * (12 + 4096)
    assert struct.unpack("<QI", bytes(v0[0][1][4108:4120])) == (BULK_OID_BASE, 1)


ERRORS = [
    ("name: d\ntmem:\n  pools:\n  - {id: 0, persistent: true}\n  - {id: 1, persistent: true}\n"
     "  - {id: 2, persistent: true, pagebits: x}\n",
     "domain.yaml: tmem.pools[2].pagebits: expected an int 0..15, got 'x'"),
    ("name: d\nmemroy: 3\n", "domain.yaml: memroy: unknown key"),
    ("memory: 3\n", "domain.yaml: name: required"),
    ("name: d\nmemory: true\n", "domain.yaml: memory: expected an int 1..1048576, got True"),
    ("name: d\nvcpus: 0\n", "domain.yaml: vcpus: expected an int 1..128, got 0"),
    ("name: 'a b'\n", "domain.yaml: name: expected a name"),
    ("name: d\nworkload: {tmem_puts_per_s: -1}\n", "domain.yaml: workload.tmem_puts_per_s: expected a number"),
    ("name: d\nworkload: {speed: 1}\n", "domain.yaml: workload.speed: unknown key"),
    ("name: d\ntmem: {version: 2}\n", "domain.yaml: tmem.version: expected an int 0..1, got 2"),
    ("name: d\ntmem: {client: {weight: -1}}\n", "domain.yaml: tmem.client.weight: expected an int"),
    ("name: d\ntmem: {client: {frozen: 1}}\n", "domain.yaml: tmem.client.frozen: expected true or false, got 1"),
    ("name: d\ntmem: {pools: [{id: 16, persistent: true}]}\n", "domain.yaml: tmem.pools[0].id: expected an int 0..15, got 16"),
    ("name: d\ntmem: {pools: [{id: 0}]}\n", "domain.yaml: tmem.pools[0].persistent: required"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true}, {id: 0, persistent: false}]}\n",
     "domain.yaml: tmem.pools[1].id: pool 0 already defined at pools[0]"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, uuid: [1]}]}\n", "domain.yaml: tmem.pools[0].uuid: expected a list of two u64"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, pages: [{oid: 1, index: 0}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0]: needs exactly one of 'fill' and 'seed'"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, pages: [{oid: 1, index: 0, fill: 256}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0].fill: expected an int 0..255, got 256"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, pages: [{oid: 1, index: 4294967296, seed: 1}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0].index: expected an int 0..0xffffffff"),
    ("name: d\ntmem: {version: 0, pools: [{id: 0, persistent: true, pages: [{oid: [1, 0, 0], index: 0, fill: 1}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0].oid: expected an int 0..0xffffffffffffffff (spec version 0"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, pages: [{oid: [1, 2], index: 0, fill: 1}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0].oid: expected an int or a list of three u64"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, pages: [{oid: [1, 2, -3], index: 0, fill: 1}]}]}\n",
     "domain.yaml: tmem.pools[0].pages[0].oid[2]: expected an int"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: false, announce_pages: 3}]}\n",
     "domain.yaml: tmem.pools[0].announce_pages: only persistent pools"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, bulk: {objects: 3}}]}\n",
     "domain.yaml: tmem.pools[0].bulk.pages: required"),
    ("name: d\ntmem: {pools: [{id: 0, persistent: true, bulk: {pages: 2, objects: 3}}]}\n",
     "domain.yaml: tmem.pools[0].bulk.objects: expected an int 1..2, got 3"),
    ("name: d\ntmem: {pools: {id: 0}}\n", "domain.yaml: tmem.pools: expected a list"),
    ("name: d\ntmem: {invalidations: [{pool: 0, oid: 1}]}\n", "domain.yaml: tmem.invalidations[0].index: required"),
    ("- just\n- a list\n", "domain.yaml: expected a mapping"),
    ("", "domain.yaml: empty file"),
    ("name: [unclosed\n", "domain.yaml: not valid YAML at line 2, column 1"),
]


@pytest.mark.parametrize("text,message", ERRORS, ids=[m.split(": ", 2)[1][:40] for _, m in ERRORS])
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "domain.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_domain_config(f)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(tmp_path) + "/")
    assert message in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_domain_config(tmp_path / "nope.yaml")


def test_parse_uses_source_name() -> None:
    with pytest.raises(ConfigError, match=r"^web\.yaml: vcpus: expected an int 1\.\.128, got 'two'$"):
        parse_domain_config({"name": "w", "vcpus": "two"}, source="web.yaml")


def test_workload_travels_through_an_image_config():
    from xend_tmem.domconfig import workload_from_image
    w = workload_from_image({"ram_dirty_pages_per_s": "200.0", "seed": "3"})
    assert (w.ram_dirty_pages_per_s, w.seed) == (200.0, 3)
    with pytest.raises(ConfigError, match="workload.tmem_puts_per_s"):
        workload_from_image({"tmem_puts_per_s": "fast"})
    with pytest.raises(ConfigError, match="workload"):
        workload_from_image({"colour": "1"})
