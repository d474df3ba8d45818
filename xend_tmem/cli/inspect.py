"""``xend-tmem inspect``: what a save image, libxc stream or tmem chunk file holds.

The kind of file is detected (a xend image by its signature, a bare tmem chunk
file by a ``-5`` chunk followed by nothing or ``-6``, a libxc stream
otherwise); text, compressed data and empty files are refused by name rather
than read as a stream with an absurd ``p2m_size``. A damaged or truncated file
is described up to the last byte that could be read, with what is missing;
``--salvage DIR`` writes the tmem pages that arrived as a chunk file.

The JSON form's ``chunks`` list has exactly the keys and types of the golden
vectors' ``expected.json``; other top-level keys describe the stream.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

from ..binio import StreamReader, StreamWriter
from ..codec import image, legacy, sxp
from ..codec import tmemchunk as tc
from .. import xen
from ..codec.chunkdoc import ChunkCollector
from ..errors import ConfigError, StreamError, XendTmemError

if TYPE_CHECKING:
    from ..plugins import CheckpointHooks

KINDS = ("image", "stream", "chunks")
KIND_NAMES = {"image": "xend image", "stream": "libxc stream", "chunks": "tmem chunks"}
SALVAGE_CHUNKS = "tmem.chunks"
SALVAGE_FACTS = "salvage.json"
_SNIFF = 64
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
               (b"\x28\xb5\x2f\xfd", "zstd"))


class NotAStream(XendTmemError):
    """The file is none of the three kinds ``inspect`` reads."""

    def __init__(self, why: str) -> None:
        super().__init__(f"not an image, libxc stream or tmem chunk file: {why}")


class SalvageError(XendTmemError):
    """The salvage directory cannot take the salvage (never overwritten)."""


def _config_p2m_hint(hdr: image.ImageHeader) -> Optional[int]:
    """The page count the image's config memory implies (``detect_width``'s
    hint, as restore uses it); None when the config does not say."""
    try:
        raw: Any = sxp.to_mapping(hdr.config).get("memory")   # int() refuses a non-number
        memory = int(raw)
    except (TypeError, ValueError, ConfigError):
        return None
    return memory * 256 if memory > 0 else None


def _domain_facts(hdr: image.ImageHeader) -> Dict[str, Any]:
    """Name, memory and vcpus as the image's config states them (what xm shows)."""
    try:
        cfg = sxp.to_mapping(hdr.config)
    except ConfigError:
        return {}
    out: Dict[str, Any] = {"name": cfg.get("name")}
    for key in ("memory", "vcpus"):
        try:
            value: Any = cfg.get(key)                         # int() refuses a non-number
            out[key] = int(value)
        except (TypeError, ValueError):
            out[key] = None
    return out


# ---------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------

def _looks_like_text(head: bytes) -> bool:
    """No stream starts with printable text: a ``p2m_size`` whose four bytes
    were all printable would be a guest of more than 2 TiB, and the bytes after
    it (PV ``~0``, frame numbers) are not text either."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:       # not merely a character cut by the sniff
            return False
        text = head[:e.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)


def _is_chunk_file(path: str) -> bool:
    """A file starting with ``-5``: a chunk file if nothing or ``-6`` follows the
    chunk, a seed-layout stream if ``p2m_size`` does (one extra pass over the
    tmem chunk, with a visitor that keeps nothing)."""
    with open(path, "rb") as f:
        r = StreamReader(f)
        r.s32("marker")
        try:
            tc.read_tmem(r, _NullVisitor(), marker_offset=0)
        except StreamError:
            return True                   # a damaged chunk either way: read it as one
        nxt = r.peek(4)
        return len(nxt) < 4 or int.from_bytes(nxt, "little", signed=True) == xen.TMEM_EXTRA


class _NullVisitor(tc.ChunkVisitor):
    """Reads a chunk for detection only: keeps nothing."""

    def client(self, rec: tc.ClientRecord, offset: int) -> None: ...
    def pool(self, rec: tc.PoolRecord, offset: int) -> None: ...
    def pages(self, pool: tc.PoolRecord, records: memoryview, count: int,
              offset: int) -> None: ...
    def pool_end(self, pool: tc.PoolRecord, received: int, terminated: bool) -> None: ...
    def invalidations(self, entries: Sequence[Tuple[int, tc.OID, int]],
                      offset: int) -> None: ...
    def end(self, marker: int, offset: int) -> None: ...


def detect_kind(path: str) -> str:
    """``image``, ``stream`` or ``chunks``; :class:`NotAStream` for anything else."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if not head:
        raise NotAStream("the file is empty")
    if image.SIGNATURE.startswith(head[:16]):
        return "image"
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            raise NotAStream(f"it is {name}-compressed data; decompress it first")
    if _looks_like_text(head):
        shown = head[:24].decode("utf-8", "replace")
        raise NotAStream(f"it is text, starting {shown!r}")
    if len(head) >= 4:
        first = int.from_bytes(head[:4], "little", signed=True)
        if first == xen.TMEM_EXTRA:
            return "chunks"
        if first == xen.TMEM and _is_chunk_file(path):
            return "chunks"
    return "stream"


# ---------------------------------------------------------------------------
# the visitor: JSON document, truncation tracking, salvage
# ---------------------------------------------------------------------------

class _Salvage:
    """Writes the tmem that arrives as a bare chunk file, record by record (bounded
    memory), closed validly wherever the input stops: a cut pool gets the
    terminator the format allows, a cut chunk its end separator."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise SalvageError(f"cannot create the salvage directory {directory}: "
                               f"{exc.strerror or exc}") from None
        self.path = os.path.join(directory, SALVAGE_CHUNKS)
        self.facts_path = os.path.join(directory, SALVAGE_FACTS)
        for p in (self.path, self.facts_path):
            if os.path.lexists(p):
                raise SalvageError(f"{p} exists: salvage into another directory (an earlier "
                                   "salvage is never overwritten)")
        self._f: Optional[BinaryIO] = None
        self.w: Optional[StreamWriter] = None
        self.version = 1
        self.pools: Dict[str, Dict[str, int]] = {}
        self.page_count = 0
        self.invalidation_count = 0
        self._pool: Optional[Tuple[tc.PoolRecord, int]] = None
        self._in_tmem = False
        self._in_extra = False

    def _open(self) -> StreamWriter:
        """The salvage file's writer, created by the first record (the client
        record: the reader refuses a pool, page or end before it)."""
        if self.w is None:
            # open across visitor calls; closed by close() or abandon()
            self._f = open(self.path, "xb")  # noqa: SIM115
            self.w = StreamWriter(self._f)
        return self.w

    def client(self, rec: tc.ClientRecord) -> None:
        if self.w is not None:            # only one -5 per stream; the reader refuses more
            return
        self.version = rec.version
        tc.write_client(self._open(), rec)
        self._in_tmem = True

    def pool(self, rec: tc.PoolRecord) -> None:
        tc.write_pool(self._open(), rec)
        self._pool = (rec, 0)
        self.pools[str(rec.pool_id)] = {"announced": rec.n_pages, "salvaged": 0}

    def pages(self, pool: tc.PoolRecord, records: memoryview, count: int) -> None:
        self._open().write(records)
        self._pool = (pool, (self._pool[1] if self._pool is not None else 0) + count)
        self.pools[str(pool.pool_id)]["salvaged"] += count
        self.page_count += count

    def pool_end(self, pool: tc.PoolRecord, received: int, terminated: bool) -> None:
        if terminated:
            tc.write_pages_end(self._open(), self.version)
        self._pool = None

    def end(self, marker: int) -> None:
        if marker == xen.TMEM and self._in_tmem:
            tc.write_pool_list_end(self._open())
            self._in_tmem = False
        elif marker == xen.TMEM_EXTRA and self._in_extra:
            self._open().u32(xen.SEPARATOR)
            self._in_extra = False

    def invalidation_entries(self, entries: Sequence[Tuple[int, tc.OID, int]]) -> None:
        if self.w is None:
            return
        if not self._in_extra:
            self.w.s32(xen.TMEM_EXTRA)
            self._in_extra = True
        self.w.write(b"".join(tc.encode_invalidation(self.version, p, o, i)
                              for p, o, i in entries))
        self.invalidation_count += len(entries)

    def close(self, info: Dict[str, Any]) -> Dict[str, Any]:
        """Close what the input left open, write the facts; returns them."""
        if self._pool is not None:
            pool, received = self._pool
            if received < pool.n_pages:
                tc.write_pages_end(self._open(), self.version)
            self._pool = None
        if self._in_tmem:
            tc.write_pool_list_end(self._open())
            self._in_tmem = False
        if self._in_extra:
            self._open().u32(xen.SEPARATOR)
            self._in_extra = False
        if self.w is not None:
            self.w.flush()
        if self._f is not None:
            self._f.close()
        complete = info.get("complete", True)
        # every -6 is in the body: a file that stops before the tail may lack
        # invalidations sent after the pages salvaged here (which may be stale)
        inv_complete = complete or info.get("_stage") in ("tail", "done")
        facts = {"source": info["file"], "complete": complete,
                 "error": info.get("error"), "truncated_at": info.get("truncated_at"),
                 "files": [SALVAGE_CHUNKS] if self.w is not None else [],
                 "pages": self.page_count, "pools": self.pools,
                 "invalidations": self.invalidation_count,
                 "invalidations_complete": inv_complete}
        with open(self.facts_path, "x") as f:
            json.dump(facts, f, indent=1)
            f.write("\n")
        return facts

    def abandon(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()


class _Visitor(ChunkCollector):
    """The expected.json collector, plus where a cut fell and the salvage sink."""

    def __init__(self, with_pages: bool, salvage: Optional[_Salvage]) -> None:
        super().__init__(with_pages)
        self.salvage = salvage
        self.client_rec: Optional[tc.ClientRecord] = None
        self.open_pool: Optional[Tuple[tc.PoolRecord, int]] = None   # (pool, received)
        self.in_tmem = False
        self.in_extra = False
        self.pools_seen: List[int] = []

    def client(self, rec: tc.ClientRecord, offset: int) -> None:
        super().client(rec, offset)
        self.client_rec = rec
        self.in_tmem = True
        if self.salvage:
            self.salvage.client(rec)

    def pool(self, rec: tc.PoolRecord, offset: int) -> None:
        super().pool(rec, offset)
        self._open_pool()["page_size"] = rec.page_size   # for the text form; not in the JSON
        self.open_pool = (rec, 0)
        self.pools_seen.append(rec.pool_id)
        if self.salvage:
            self.salvage.pool(rec)

    def pages(self, pool: tc.PoolRecord, records: memoryview, count: int, offset: int) -> None:
        super().pages(pool, records, count, offset)
        self.open_pool = (pool, (self.open_pool[1] if self.open_pool is not None else 0) + count)
        if self.salvage:
            self.salvage.pages(pool, records, count)

    def pool_end(self, pool: tc.PoolRecord, received: int, terminated: bool) -> None:
        super().pool_end(pool, received, terminated)
        self.open_pool = None
        if self.salvage:
            self.salvage.pool_end(pool, received, terminated)

    def invalidations(self, entries: Sequence[Tuple[int, tc.OID, int]], offset: int) -> None:
        self.in_extra = True
        super().invalidations(entries, offset)
        if self.salvage:
            self.salvage.invalidation_entries(entries)

    def end(self, marker: int, offset: int) -> None:
        super().end(marker, offset)
        if marker == xen.TMEM:
            self.in_tmem = False
        else:
            self.in_extra = False
        if self.salvage:
            self.salvage.end(marker)

    def extra_started(self, offset: int) -> None:
        """A ``-6`` marker was read (its entries may never arrive)."""
        self.in_extra = True

    def document(self) -> List[Dict[str, Any]]:
        """The chunks as expected.json has them (no helper keys)."""
        out = []
        for c in self.chunks:
            if c["marker"] == xen.TMEM:
                c = dict(c, pools=[{k: v for k, v in p.items() if k != "page_size"}
                                   for p in c["pools"]])
            out.append(c)
        return out


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

def _missing(info: Dict[str, Any], visitor: _Visitor, stage: str, guest: str) -> List[str]:
    """What a file cut (or spoiled) during ``stage`` lacks, first things first."""
    out: List[str] = []
    if stage == "image header":
        out.append("the rest of the image header (signature, config)")
    if stage in ("image header", "stream header"):
        out.append("the libxc stream header (p2m_size, extended info, p2m frame list)")
    if stage in ("image header", "stream header", "body"):
        if visitor.open_pool is not None:
            pool, got = visitor.open_pool
            out.append(f"pool {pool.pool_id}: {pool.n_pages - got} of its {pool.n_pages} "
                       "announced tmem pages")
        if visitor.in_tmem:
            mp = visitor.client_rec.max_pools if visitor.client_rec else xen.MAX_POOLS
            last = visitor.pools_seen[-1] if visitor.pools_seen else None
            out.append(("any pools after pool " + str(last) if last is not None else "its pools")
                       + f" (max_pools {mp}) and the end of the -5 TMEM chunk")
        if visitor.in_extra:
            out.append("the rest of the -6 TMEM_EXTRA chunk (invalidations)")
        if info.get("kind") == KIND_NAMES["chunks"]:
            return out
        out.append("the rest of the body: any further page batches and chunks, the vcpu "
                   "list (VCPU_INFO) and the end marker 0")
    if info.get("kind") == KIND_NAMES["chunks"]:
        return out
    if guest == "hvm":
        out.append("the tail: magic pfns, HVM context, device-model state")
    else:
        out.append("the tail: unmapped pfns, the context of each vcpu, the shared info page")
    return out


def _open_hooks(hooks: Optional["CheckpointHooks"]) -> legacy.MarkerRegistry:
    """The plugin manager's marker registry, or tmem's markers alone."""
    if hooks is not None:
        return hooks.registry
    return legacy.MarkerRegistry(xen.XEN_PLUGIN_MARKERS)


def describe_file(path: str, *, kind: Optional[str] = None, with_pages: bool = False,
                  width: Optional[int] = None, guest: Optional[str] = None,
                  hooks: Optional["CheckpointHooks"] = None,
                  salvage_dir: Optional[str] = None) -> Dict[str, Any]:
    """Read ``path`` as far as it goes and describe it; never raises for bad input
    past detection: the document's ``complete`` is False, ``error`` says why,
    ``truncated_at`` is set when the file simply ended, ``missing`` lists what
    did not arrive. ``kind`` overrides detection (``image``, ``stream``,
    ``chunks``). ``hooks`` (a plugin manager) names and reads plugins' chunks.
    ``width`` is the saving tools' ``unsigned long``; None infers it as restore
    does (:func:`~xend_tmem.codec.legacy.detect_width`).
    Raises OSError, :class:`NotAStream`, or PluginError/FileExistsError for salvage.
    """
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    registry = _open_hooks(hooks)
    salvage = _Salvage(salvage_dir) if salvage_dir is not None else None
    visitor = _Visitor(with_pages, salvage)
    info: Dict[str, Any] = {"file": path, "kind": KIND_NAMES[kind]}
    plugin_chunks: List[Dict[str, Any]] = []
    ram: List[List[Any]] = []
    counts = {"batches": 0, "pages": 0}
    stage = "image header" if kind == "image" else "stream header"
    guest = guest or "pv"
    reader: Optional[legacy.LegacyReader] = None
    error: Optional[BaseException] = None
    try:
        with open(path, "rb") as f:
            r = StreamReader(f)
            try:
                if kind == "chunks":
                    stage = "body"
                    tc.read_chunk_file(r, visitor)
                else:
                    p2m_hint: Optional[int] = None
                    if kind == "image":
                        hdr = image.read_header(r)
                        info["config"] = hdr.config_text
                        info["domain"] = _domain_facts(hdr)
                        guest = hdr.guest
                        p2m_hint = _config_p2m_hint(hdr)
                        stage = "stream header"
                    order = tc.ChunkOrder()

                    def tmem_handler(rd: StreamReader, marker: int, offset: int) -> None:
                        order.see(marker, offset)
                        if marker == xen.TMEM:
                            order.client = tc.read_tmem(rd, visitor, marker_offset=offset)
                        else:
                            visitor.extra_started(offset)
                            tc.read_extra(rd, order.version, visitor,
                                          max_pools=order.max_pools, marker_offset=offset)

                    def plugin_handler(rd: StreamReader, marker: int, offset: int) -> None:
                        # registered only for markers a plugin manager's registry has
                        assert hooks is not None
                        start = rd.offset
                        described = hooks.inspect_chunk(marker, rd, offset)
                        plugin_chunks.append({"marker": marker, "plugin": registry.owner(marker),
                                              "offset": offset, "size": rd.offset - start,
                                              "info": described})

                    handlers = {m: plugin_handler for m in registry.markers
                                if registry.owner(m) != "tmem" or m not in xen.TMEM_MARKERS}
                    for m in xen.TMEM_MARKERS:
                        if registry.owner(m) in (None, "tmem"):
                            handlers[m] = tmem_handler

                    def on_pages(pfns: Sequence[int], types: Sequence[int], data: memoryview,
                                 offset: int) -> None:
                        counts["batches"] += 1
                        counts["pages"] += len(pfns)
                        if with_pages:
                            i = 0
                            for pfn, t in zip(pfns, types):
                                if t in xen.NO_DATA_TYPES:
                                    ram.append([pfn, None])
                                    continue
                                ram.append([pfn, f"0x{zlib.crc32(data[i:i + xen.PAGE_SIZE]):08x}"])
                                i += xen.PAGE_SIZE

                    reader = legacy.LegacyReader(r, width=width, guest=guest, handlers=handlers,
                                                 on_pages=on_pages, p2m_hint=p2m_hint,
                                                 registry=registry)
                    header = reader.read_header()
                    info.update({"layout": header.layout, "width": reader.width,
                                 "width_inferred": reader.width_inferred, "guest": guest,
                                 "p2m_size": header.p2m_size})
                    stage = "body"
                    body = reader.read_body()
                    stage = "tail"
                    tail = reader.read_tail(body)
                    info["vcpus_in_stream"] = list(tail.vcpus) if guest == "pv" else None
                    if not r.at_eof():
                        raise StreamError("data after the end of the stream's tail (wrong "
                                          "--width or --guest?)", offset=r.offset)
                    stage = "done"
            except XendTmemError as exc:
                error = exc
            info["bytes"] = os.fstat(f.fileno()).st_size if error is not None else r.offset
    except BaseException:
        if salvage is not None:
            salvage.abandon()
        raise
    if reader is not None:
        info.setdefault("width", reader.width)
        info.setdefault("width_inferred", reader.width_inferred)
        info.setdefault("guest", guest)
        body_info = reader.body
        info.update({"page_batches": counts["batches"], "ram_pages": counts["pages"]})
        if body_info is not None:
            info["other_chunks"] = [[cid, off] for cid, off in body_info.chunks
                                    if cid not in handlers]
        if with_pages:
            info["ram_pages_crc32"] = ram
        if plugin_chunks or registry.markers - set(xen.TMEM_MARKERS):
            info["plugin_chunks"] = plugin_chunks
    if error is not None:                       # absent when complete (the vectors' form)
        info["complete"] = False
        info["_error_obj"] = error
        info["error"] = str(error)
        if isinstance(error, StreamError) and error.problem.startswith("stream ends"):
            info["truncated_at"] = info["bytes"]
        info["missing"] = _missing(info, visitor, stage, guest)
        info["_stage"] = stage
    info["chunks"] = visitor.document()
    info["chunk_offsets"] = visitor.offsets
    if salvage is not None:
        info["salvage"] = dict(salvage.close(info), directory=salvage_dir)
    info["_pool_pages"] = visitor.chunks     # with page sizes, for the text form
    return info


def inspect_file(path: str, *, chunks_only: bool = False, with_pages: bool = False,
                 width: Optional[int] = None, guest: Optional[str] = None,
                 hooks: Optional["CheckpointHooks"] = None,
                 kind: Optional[str] = None) -> Dict[str, Any]:
    """Read ``path`` completely and describe it; raises StreamError (or the
    error that stopped the reading) on bad input."""
    info = describe_file(path, kind="chunks" if chunks_only else kind, with_pages=with_pages,
                         width=width, guest=guest, hooks=hooks)
    if "_error_obj" in info:
        raise info["_error_obj"]
    return public(info)


def public(info: Dict[str, Any]) -> Dict[str, Any]:
    """The document without the private keys (``_``) the text form uses."""
    return {k: v for k, v in info.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------

def _oid(oid: Union[int, Sequence[int]]) -> str:
    return str(oid) if isinstance(oid, int) else ":".join(f"{x:#x}" for x in oid)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_text(info: Dict[str, Any]) -> str:
    """The human form: the domain, the stream, a tmem summary, then each chunk."""
    lines = [f"{info['file']}: {info['kind']}, {info['bytes']} bytes"]
    dom = info.get("domain")
    if dom:
        mem = f"memory {dom['memory']} MiB" if dom.get("memory") is not None else "memory ?"
        vc = _plural(dom["vcpus"], "vcpu") if dom.get("vcpus") is not None else "vcpus ?"
        lines.append(f"  domain {dom.get('name') or '(unnamed)'}: {mem}, {vc}, guest "
                     f"{info.get('guest', 'pv')}")
    if "p2m_size" in info:
        where = "before" if info["layout"] == "seed" else "after"
        lines.append(f"  layout {info['layout']} (tmem {where} p2m_size), width {info['width']}"
                     f"{' (inferred)' if info.get('width_inferred') else ''}, "
                     f"guest {info['guest']}, "
                     f"p2m_size {info['p2m_size']}, {info['ram_pages']} RAM pages in "
                     f"{info['page_batches']} batch{'' if info['page_batches'] == 1 else 'es'}")
    if info.get("vcpus_in_stream") is not None:
        lines.append("  vcpus in the stream: " + ",".join(map(str, info["vcpus_in_stream"])))
    if info.get("other_chunks"):
        lines.append("  other chunks: " + ", ".join(
            f"{c} {xen.CHUNK_NAMES.get(c, '')}@{o}".replace(" @", "@")
            for c, o in info["other_chunks"]))
    chunks = info.get("_pool_pages", info["chunks"])
    tmem = [c for c in chunks if c["marker"] == xen.TMEM]
    if tmem:
        pools = tmem[0]["pools"]
        persistent = [p for p in pools if p["flags"] & xen.POOL_PERSIST]
        n = sum(_pool_pages(p) for p in persistent)
        b = sum(_pool_pages(p) * _page_size(p) for p in persistent)
        lines.append(f"  tmem: {_plural(len(pools), 'pool')}, {n} persistent pages ({b} bytes)")
    elif not info.get("plugin_chunks"):
        lines.append("  no tmem")
    for chunk, off in zip(chunks, info["chunk_offsets"]):
        if chunk["marker"] == xen.TMEM:
            c = chunk["client"]
            cflags = [n for bit, n in ((xen.CLIENT_COMPRESS, "compress"),
                                       (xen.CLIENT_FROZEN, "frozen")) if c["flags"] & bit]
            lines.append(f"  chunk -5 TMEM (plugin 'tmem') at offset {off}: spec version "
                         f"{chunk['version']}, max_pools {chunk['max_pools']}, client flags "
                         f"{c['flags']:#x} ({','.join(cflags) or 'none'}), weight {c['weight']}, "
                         f"cap {c['cap']}")
            for p in chunk["pools"]:
                got = _pool_pages(p)
                size = _page_size(p)
                uuid = f"{p['uuid'][0]:016x}{p['uuid'][1]:016x}"
                if "terminated" not in p:             # the file ended inside this pool
                    count = f"{got} of {p['n_pages']} announced pages ({got * size} bytes arrived)"
                else:
                    count = f"{_plural(got, 'page')} ({got * size} bytes)"
                    if p["terminated"]:
                        count += f", ended by terminator (n_pages {p['n_pages']})"
                lines.append(f"    pool {p['id']}: {tc.describe_pool_flags(p['flags'])}, {count}; "
                             f"flags {p['flags']:#010x}, uuid {uuid}")
                for g in p.get("pages", []):
                    lines.append(f"      oid {_oid(g['oid'])} index {g['index']} "
                                 f"crc32 {g['crc32']}")
        else:
            n = (len(chunk["invalidations"]) if "invalidations" in chunk
                 else chunk["invalidation_count"])
            lines.append(f"  chunk -6 TMEM_EXTRA (plugin 'tmem') at offset {off}: "
                         f"{_plural(n, 'invalidation')}")
            for e in chunk.get("invalidations", []):
                lines.append(f"      pool {e['pool']} oid {_oid(e['oid'])} index {e['index']}")
    for pc in info.get("plugin_chunks", []):
        detail = ""
        if pc["info"]:
            detail = ": " + ", ".join(f"{k}={v}" for k, v in pc["info"].items())
        lines.append(f"  chunk {pc['marker']} (plugin '{pc['plugin']}') at offset {pc['offset']}, "
                     f"{pc['size']} bytes{detail}")
    if "ram_pages_crc32" in info:
        lines.append("  RAM pages as sent (a page re-sent by a later round appears again):")
        for pfn, crc in info["ram_pages_crc32"]:
            lines.append(f"    pfn {pfn:#x} " + (f"crc32 {crc}" if crc else "no data"))
    if not info.get("complete", True):
        if "truncated_at" in info:
            lines.append(f"  truncated at offset {info['truncated_at']}: {info['error']}")
        else:
            lines.append(f"  unreadable beyond this point: {info['error']}")
        lines.append("  missing: " + "; ".join(info["missing"]))
    if "salvage" in info:
        s = info["salvage"]
        where = os.path.join(s["directory"], SALVAGE_CHUNKS)
        if s["files"]:
            lines.append(f"  salvaged {s['pages']} tmem pages ({_plural(len(s['pools']), 'pool')}, "
                         f"{_plural(s['invalidations'], 'invalidation')}) into {where}; facts in "
                         f"{os.path.join(s['directory'], SALVAGE_FACTS)}")
            if not s["invalidations_complete"]:
                lines.append("  the file stops before the end of its body: invalidations sent "
                             "later (live saves) are missing, so a salvaged page may be stale")
        else:
            lines.append(f"  salvaged 0 tmem pages: no tmem chunk arrived; facts in "
                         f"{os.path.join(s['directory'], SALVAGE_FACTS)}")
    return "\n".join(lines)


def _pool_pages(p: Dict[str, Any]) -> int:
    return len(p["pages"]) if "pages" in p else p["page_count"]


def _page_size(p: Dict[str, Any]) -> int:
    size: int = p.get("page_size") or xen.PAGE_SIZE << ((p["flags"] >> xen.POOL_PAGEBITS_SHIFT)
                                                        & 0xF)
    return size


def run(path: str, *, chunks_only: bool = False, as_json: bool = False, with_pages: bool = False,
        width: Optional[int] = None, guest: Optional[str] = None, kind: Optional[str] = None,
        hooks: Optional["CheckpointHooks"] = None,
        salvage_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(stdout text, error or None)``. A file that could not be read whole
    yields its readable part and the error; in JSON form a damaged (not merely
    truncated) file yields no document, as the vectors' expected.json demands."""
    info = describe_file(path, kind="chunks" if chunks_only else kind, with_pages=with_pages,
                         width=width, guest=guest, hooks=hooks, salvage_dir=salvage_dir)
    error = info.get("error")
    if as_json:
        if error is not None and "truncated_at" not in info and salvage_dir is None:
            return "", error
        return json.dumps(public(info), indent=1), error
    return format_text(info), error


__all__: Sequence[str] = ["inspect_file", "describe_file", "detect_kind", "format_text", "run",
                          "ChunkCollector", "NotAStream", "SalvageError", "KINDS", "SALVAGE_CHUNKS",
                          "SALVAGE_FACTS"]
