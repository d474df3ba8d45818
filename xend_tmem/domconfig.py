"""Domain configuration files: what the simulated hypervisor builds a guest from.

A domain file is YAML: ``name``, ``memory`` (MiB), ``vcpus``, an optional
``workload`` (rates of guest activity the simulator plays back) and an optional
``tmem`` section written exactly like the golden vectors' ``scenario.yaml``
(SPEC §8), plus per-pool ``bulk`` generation for GiB-sized tests. A vector's
``scenario.yaml`` loads as-is, so the vectors double as domain configs.

Everything is validated up front; a mistake is one :class:`ConfigError` line
that names the file and the key path (``domain.yaml: tmem.pools[2].pagebits:
expected an int 0..15, got 'x'``).
"""
from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple


from .errors import ConfigError
from .xen import MAX_POOLS, PAGE_SIZE
from .yamlfile import parse_yaml

OID = Tuple[int, int, int]

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_MEMORY_MIB = 1 << 20          # 1 TiB: the simulator maps RAM lazily, but keep it sane
MAX_VCPUS = 128
MAX_BULK_PAGES = 1 << 28          # 1 TiB of 4 KiB pages
MAX_RATE = 1e9
BULK_OID_BASE = 1 << 32           # bulk objects start here, clear of hand-written OIDs
BULK_BLOCK_PAGES = 256            # bulk data is generated 1 MiB (of 4 KiB pages) at a time

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = U64_MAX


def splitmix64_bytes(seed: int, size: int) -> bytes:
    """``size`` bytes of the vectors' splitmix64 stream (SPEC §8) starting at ``seed``.

    Each output word is written as 8 little-endian bytes; ``size`` is rounded
    up to whole words internally and cut back.
    """
    words = (size + 7) // 8
    out = [0] * words
    s = seed & _MASK
    for i in range(words):
        s = (s + _GOLDEN) & _MASK
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        out[i] = z ^ (z >> 31)
    return struct.pack(f"<{words}Q", *out)[:size]


# -- typed configuration ------------------------------------------------------

@dataclass(frozen=True)
class PageSpec:
    """One hand-written page: key plus content recipe (``fill`` byte or splitmix ``seed``)."""

    oid: OID
    index: int
    fill: Optional[int] = None
    seed: Optional[int] = None

    def data(self, page_size: int = PAGE_SIZE) -> bytes:
        if self.fill is not None:
            return bytes((self.fill,)) * page_size
        return splitmix64_bytes(self.seed or 0, page_size)


@dataclass(frozen=True)
class BulkSpec:
    """``pages`` pages of pseudo-random data spread over ``objects`` objects.

    Keys are distinct: page ``i`` is object ``BULK_OID_BASE + i // per_object``,
    index ``i % per_object``. Data comes from :class:`random.Random` seeded by
    (``seed``, pool id) so a verifier can regenerate it.
    """

    pages: int
    objects: int = 1
    seed: int = 0

    @property
    def per_object(self) -> int:
        return max(1, math.ceil(self.pages / self.objects))

    def key(self, i: int) -> Tuple[OID, int]:
        per = self.per_object
        return (BULK_OID_BASE + i // per, 0, 0), i % per

    def records(self, pool_id: int, version: int, page_size: int = PAGE_SIZE,
                block_pages: int = BULK_BLOCK_PAGES) -> Iterator[Tuple[int, bytearray]]:
        """Yield ``(count, records)`` blocks in the wire layout of ``version``
        (OID of 8 or 24 bytes + u32 index + data), ready for a batched put."""
        rng = random.Random(f"xend-tmem bulk seed={self.seed} pool={pool_id}")
        hdr = struct.Struct("<QI" if version == 0 else "<QQQI")
        hlen = hdr.size
        rsize = hlen + page_size
        per = self.per_object
        done = 0
        while done < self.pages:
            n = min(block_pages, self.pages - done)
            data = memoryview(rng.randbytes(n * page_size))
            out = bytearray(n * rsize)
            for j in range(n):
                i = done + j
                o = j * rsize
                obj, idx = BULK_OID_BASE + i // per, i % per
                if version == 0:
                    hdr.pack_into(out, o, obj, idx)
                else:
                    hdr.pack_into(out, o, obj, 0, 0, idx)
                out[o + hlen:o + rsize] = data[j * page_size:(j + 1) * page_size]
            data.release()
            yield n, out
            done += n


@dataclass(frozen=True)
class PoolSpec:
    id: int
    persistent: bool
    shared: bool = False
    pagebits: int = 0
    uuid: Tuple[int, int] = (0, 0)
    pages: Tuple[PageSpec, ...] = ()
    announce_pages: Optional[int] = None
    bulk: Optional[BulkSpec] = None

    @property
    def page_size(self) -> int:
        return PAGE_SIZE << self.pagebits

    @property
    def total_pages(self) -> int:
        """Pages the pool will hold at most (hand-written plus bulk)."""
        return len(self.pages) + (self.bulk.pages if self.bulk else 0)


@dataclass(frozen=True)
class ClientSpec:
    compress: bool = False
    frozen: bool = False
    weight: int = 0
    cap: int = 0


@dataclass(frozen=True)
class InvalidationSpec:
    pool: int
    oid: OID
    index: int


@dataclass(frozen=True)
class TmemSpec:
    """The ``tmem:`` section. ``dom``, ``live`` and ``invalidations`` come from
    vector scenarios; they are kept for tests and do not shape the domain."""

    version: int = 1
    client: ClientSpec = field(default_factory=ClientSpec)
    pools: Tuple[PoolSpec, ...] = ()
    dom: Optional[int] = None
    live: Optional[bool] = None
    invalidations: Tuple[InvalidationSpec, ...] = ()


@dataclass(frozen=True)
class WorkloadSpec:
    """Guest activity per simulated second (the simulator's ``tick``)."""

    ram_dirty_pages_per_s: float = 0
    tmem_puts_per_s: float = 0
    tmem_gets_per_s: float = 0
    tmem_flushes_per_s: float = 0
    seed: int = 0

    @property
    def active(self) -> bool:
        return any((self.ram_dirty_pages_per_s, self.tmem_puts_per_s,
                    self.tmem_gets_per_s, self.tmem_flushes_per_s))


@dataclass(frozen=True)
class DomainConfig:
    name: str
    memory: int = 128
    vcpus: int = 1
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    tmem: Optional[TmemSpec] = None
    source: str = "<string>"

    def to_dict(self) -> Dict[str, object]:
        """The settings a save image's SXP config carries (the workload too, so a
        restored or migrated simulated guest keeps running as it did)."""
        d: Dict[str, object] = {"name": self.name, "memory": self.memory, "vcpus": self.vcpus}
        if self.workload.active:
            d["workload"] = {k: getattr(self.workload, k) for k in WORKLOAD_KEYS}
        return d


# -- loading and validation ---------------------------------------------------

def load_domain_config(path: Any) -> DomainConfig:
    """Read and validate a domain YAML file."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    return parse_domain_config(parse_yaml(text, source), source=source)


def parse_domain_config(mapping: Any, source: str = "<string>") -> DomainConfig:
    """Validate an already-parsed mapping (e.g. from YAML) into a :class:`DomainConfig`."""
    return _Parser(source).domain(mapping)


WORKLOAD_KEYS = ("ram_dirty_pages_per_s", "tmem_puts_per_s", "tmem_gets_per_s",
                 "tmem_flushes_per_s", "seed")


def workload_from_image(mapping: Any, source: str = "image config") -> WorkloadSpec:
    """The ``workload`` of a save image's config, where SXP made numbers strings."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: workload: expected a mapping, got {_show(mapping)}")
    values: Dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            values[key] = int(value) if key == "seed" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: workload.{key}: expected a number, "
                              f"got {_show(value)}") from None
    return _Parser(source).workload(values, "workload")


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _range_text(lo: int, hi: int) -> str:
    return f"{lo}..{hi:#x}" if hi > 1 << 20 else f"{lo}..{hi}"


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, path: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")

    # primitives
    def mapping(self, v: Any, path: str, allowed: Tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(v, dict):
            raise self.err(path, f"expected a mapping, got {_show(v)}")
        for k in v:
            if k not in allowed:
                raise self.err(_join(path, str(k)),
                               f"unknown key (expected one of: {', '.join(allowed)})")
        return v

    def seq(self, v: Any, path: str) -> List[Any]:
        if not isinstance(v, list):
            raise self.err(path, f"expected a list, got {_show(v)}")
        return v

    def int_(self, v: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.err(path, f"expected an int {_range_text(lo, hi)}, got {_show(v)}")
        return v

    def bool_(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.err(path, f"expected true or false, got {_show(v)}")
        return v

    def rate(self, v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= MAX_RATE):
            raise self.err(path, f"expected a number 0..{MAX_RATE:g}, got {_show(v)}")
        return float(v)

    def str_(self, v: Any, path: str) -> str:
        if not isinstance(v, str) or not v or len(v) > 64 or any(c.isspace() for c in v) \
                or any(c in "()'\"" for c in v):
            raise self.err(path, f"expected a name (1-64 characters, no spaces, quotes or "
                                 f"parentheses), got {_show(v)}")
        return v

    def oid(self, v: Any, path: str, version: int) -> OID:
        if version == 0:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= U64_MAX:
                raise self.err(path, f"expected an int 0..{U64_MAX:#x} (spec version 0 "
                                     f"OIDs are one u64), got {_show(v)}")
            return (v, 0, 0)
        if isinstance(v, int) and not isinstance(v, bool):
            return (self.int_(v, path, 0, U64_MAX), 0, 0)
        if not isinstance(v, list) or len(v) != 3:
            raise self.err(path, f"expected an int or a list of three u64, got {_show(v)}")
        a, b, c = (self.int_(x, f"{path}[{i}]", 0, U64_MAX) for i, x in enumerate(v))
        return (a, b, c)

    # sections
    def domain(self, m: Any) -> DomainConfig:
        if m is None:
            raise self.err("", "empty file (expected a mapping with at least 'name')")
        m = self.mapping(m, "", ("name", "memory", "vcpus", "workload", "tmem"))
        tmem = self.tmem(m["tmem"], "tmem") if "tmem" in m else None
        if "name" in m:
            name = self.str_(m["name"], "name")
        elif tmem is not None and tmem.dom is not None:
            name = f"scenario-dom{tmem.dom}"
        else:
            raise self.err("name", "required")
        return DomainConfig(
            name=name,
            memory=self.int_(m.get("memory", 128), "memory", 1, MAX_MEMORY_MIB),
            vcpus=self.int_(m.get("vcpus", 1), "vcpus", 1, MAX_VCPUS),
            workload=(self.workload(m["workload"], "workload") if "workload" in m
                      else WorkloadSpec()),
            tmem=tmem,
            source=self.source,
        )

    def workload(self, v: Any, path: str) -> WorkloadSpec:
        rates = ("ram_dirty_pages_per_s", "tmem_puts_per_s", "tmem_gets_per_s",
                 "tmem_flushes_per_s")
        m = self.mapping(v, path, rates + ("seed",))
        kw: Dict[str, Any] = {k: self.rate(m[k], f"{path}.{k}") for k in rates if k in m}
        if "seed" in m:
            kw["seed"] = self.int_(m["seed"], f"{path}.seed", 0, U64_MAX)
        return WorkloadSpec(**kw)

    def tmem(self, v: Any, path: str) -> TmemSpec:
        m = self.mapping(v, path, ("version", "client", "pools", "dom", "live", "invalidations"))
        version = self.int_(m.get("version", 1), f"{path}.version", 0, 1)
        client = self.client(m.get("client") or {}, f"{path}.client")
        pools: List[PoolSpec] = []
        seen: Dict[int, int] = {}
        for i, pv in enumerate(self.seq(m.get("pools") or [], f"{path}.pools")):
            pool = self.pool(pv, f"{path}.pools[{i}]", version)
            if pool.id in seen:
                raise self.err(f"{path}.pools[{i}].id",
                               f"pool {pool.id} already defined at pools[{seen[pool.id]}]")
            seen[pool.id] = i
            pools.append(pool)
        invs = tuple(self.invalidation(iv, f"{path}.invalidations[{i}]", version)
                     for i, iv in enumerate(self.seq(m.get("invalidations") or [],
                                                     f"{path}.invalidations")))
        dom = self.int_(m["dom"], f"{path}.dom", 0, 0x7FEF) if "dom" in m else None
        live = self.bool_(m["live"], f"{path}.live") if "live" in m else None
        return TmemSpec(version=version, client=client, pools=tuple(pools), dom=dom,
                        live=live, invalidations=invs)

    def client(self, v: Any, path: str) -> ClientSpec:
        m = self.mapping(v, path, ("compress", "frozen", "weight", "cap"))
        return ClientSpec(
            compress=self.bool_(m.get("compress", False), f"{path}.compress"),
            frozen=self.bool_(m.get("frozen", False), f"{path}.frozen"),
            weight=self.int_(m.get("weight", 0), f"{path}.weight", 0, U32_MAX),
            cap=self.int_(m.get("cap", 0), f"{path}.cap", 0, U32_MAX),
        )

    def pool(self, v: Any, path: str, version: int) -> PoolSpec:
        m = self.mapping(v, path, ("id", "persistent", "shared", "pagebits", "uuid", "pages",
                                   "announce_pages", "bulk"))
        for key in ("id", "persistent"):
            if key not in m:
                raise self.err(f"{path}.{key}", "required")
        pid = self.int_(m["id"], f"{path}.id", 0, MAX_POOLS - 1)
        persistent = self.bool_(m["persistent"], f"{path}.persistent")
        uuid_v = m.get("uuid", [0, 0])
        if not isinstance(uuid_v, list) or len(uuid_v) != 2:
            raise self.err(f"{path}.uuid", f"expected a list of two u64, got {_show(uuid_v)}")
        uuid = (self.int_(uuid_v[0], f"{path}.uuid[0]", 0, U64_MAX),
                self.int_(uuid_v[1], f"{path}.uuid[1]", 0, U64_MAX))
        pages = tuple(self.page(pv, f"{path}.pages[{i}]", version)
                      for i, pv in enumerate(self.seq(m.get("pages") or [], f"{path}.pages")))
        announce = None
        if "announce_pages" in m:
            announce = self.int_(m["announce_pages"], f"{path}.announce_pages", 0, U32_MAX)
            if not persistent:
                raise self.err(f"{path}.announce_pages",
                               "only persistent pools announce pages (ephemeral pools send none)")
        bulk = self.bulk(m["bulk"], f"{path}.bulk") if m.get("bulk") is not None else None
        return PoolSpec(
            id=pid, persistent=persistent,
            shared=self.bool_(m.get("shared", False), f"{path}.shared"),
            pagebits=self.int_(m.get("pagebits", 0), f"{path}.pagebits", 0, 15),
            uuid=uuid, pages=pages, announce_pages=announce, bulk=bulk,
        )

    def page(self, v: Any, path: str, version: int) -> PageSpec:
        m = self.mapping(v, path, ("oid", "index", "fill", "seed"))
        for key in ("oid", "index"):
            if key not in m:
                raise self.err(f"{path}.{key}", "required")
        if ("fill" in m) == ("seed" in m):
            raise self.err(path, "needs exactly one of 'fill' and 'seed'")
        return PageSpec(
            oid=self.oid(m["oid"], f"{path}.oid", version),
            index=self.int_(m["index"], f"{path}.index", 0, U32_MAX),
            fill=self.int_(m["fill"], f"{path}.fill", 0, 255) if "fill" in m else None,
            seed=self.int_(m["seed"], f"{path}.seed", 0, U64_MAX) if "seed" in m else None,
        )

    def bulk(self, v: Any, path: str) -> BulkSpec:
        m = self.mapping(v, path, ("pages", "objects", "seed"))
        if "pages" not in m:
            raise self.err(f"{path}.pages", "required")
        pages = self.int_(m["pages"], f"{path}.pages", 0, MAX_BULK_PAGES)
        objects = self.int_(m.get("objects", 1), f"{path}.objects", 1, max(1, pages))
        seed = self.int_(m.get("seed", 0), f"{path}.seed", 0, U64_MAX)
        return BulkSpec(pages=pages, objects=objects, seed=seed)

    def invalidation(self, v: Any, path: str, version: int) -> InvalidationSpec:
        m = self.mapping(v, path, ("pool", "oid", "index"))
        for key in ("pool", "oid", "index"):
            if key not in m:
                raise self.err(f"{path}.{key}", "required")
        return InvalidationSpec(
            pool=self.int_(m["pool"], f"{path}.pool", 0, MAX_POOLS - 1),
            oid=self.oid(m["oid"], f"{path}.oid", version),
            index=self.int_(m["index"], f"{path}.index", 0, U32_MAX),
        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
