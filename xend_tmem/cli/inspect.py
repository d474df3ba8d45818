"""``xend-tmem inspect``: what a save image, libxc stream or tmem chunk file holds.

The JSON form's ``chunks`` list has exactly the keys and types of the golden
vectors' ``expected.json``; other top-level keys describe the stream.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from ..binio import StreamReader
from ..codec import image, legacy, sxp
from ..codec import tmemchunk as tc
from ..codec.chunkdoc import ChunkCollector
from ..errors import ConfigError, StreamError


def _config_p2m_hint(hdr: image.ImageHeader) -> Optional[int]:
    """The page count the image's config memory implies (``detect_width``'s
    hint, as restore uses it); None when the config does not say."""
    try:
        memory = int(sxp.to_mapping(hdr.config).get("memory"))  # type: ignore[arg-type]
    except (TypeError, ValueError, ConfigError):
        return None
    return memory * 256 if memory > 0 else None


def inspect_file(path: str, *, chunks_only: bool, with_pages: bool,
                 width: Optional[int] = None, guest: Optional[str] = None) -> Dict[str, Any]:
    """Read ``path`` completely and describe it; raises StreamError on bad input.

    ``width`` is the saving tools' ``unsigned long``; None infers it as
    restore does (:func:`~xend_tmem.codec.legacy.detect_width`), because the
    stream does not record it and 32-bit dom0 tools wrote 4-byte words.
    """
    collector = ChunkCollector(with_pages)
    result: Dict[str, Any] = {"file": path}
    with open(path, "rb") as f:
        r = StreamReader(f)
        if chunks_only:
            tc.read_chunk_file(r, collector)
            result["kind"] = "tmem chunks"
        else:
            order = tc.ChunkOrder()

            def handler(reader: StreamReader, marker: int, offset: int) -> None:
                order.see(marker, offset)
                if marker == tc.MARKER_TMEM:
                    order.client = tc.read_tmem(reader, collector, marker_offset=offset)
                else:
                    tc.read_extra(reader, order.version, collector,
                                  max_pools=order.client.max_pools, marker_offset=offset)

            p2m_hint: Optional[int] = None
            if image.is_image(r.peek(len(image.SIGNATURE))):
                hdr = image.read_header(r)
                result["kind"] = "xend image"
                result["config"] = hdr.config_text
                guest = hdr.guest
                p2m_hint = _config_p2m_hint(hdr)
            else:
                result["kind"] = "libxc stream"
            guest = guest or "pv"
            counts = {"batches": 0, "pages": 0}

            def on_pages(pfns, types, data, offset) -> None:
                counts["batches"] += 1
                counts["pages"] += len(pfns)

            reader = legacy.LegacyReader(r, width=width, guest=guest,
                                         handlers={m: handler for m in tc.MARKERS},
                                         on_pages=on_pages, p2m_hint=p2m_hint)
            header = reader.read_header()
            body = reader.read_body()
            reader.read_tail(body)
            if not r.at_eof():
                raise StreamError("data after the end of the stream's tail (wrong --width "
                                  "or --guest?)", offset=r.offset)
            result.update({"layout": header.layout, "width": reader.width,
                           "width_inferred": reader.width_inferred, "guest": guest,
                           "p2m_size": header.p2m_size, "page_batches": counts["batches"],
                           "ram_pages": counts["pages"],
                           "other_chunks": [[cid, off] for cid, off in body.chunks
                                            if cid not in tc.MARKERS]})
        result["bytes"] = r.offset
    result["chunks"] = collector.chunks
    result["chunk_offsets"] = collector.offsets
    return result


def format_text(info: Dict[str, Any]) -> str:
    lines = [f"{info['file']}: {info['kind']}, {info['bytes']} bytes"]
    if "layout" in info:
        lines.append(f"  layout {info['layout']} (tmem {'before' if info['layout'] == 'seed' else 'after'}"
                     f" p2m_size), width {info['width']}"
                     f"{' (inferred)' if info.get('width_inferred') else ''}, guest {info['guest']}, "
                     f"p2m_size {info['p2m_size']}, {info['ram_pages']} RAM pages in "
                     f"{info['page_batches']} batches")
        if info.get("other_chunks"):
            lines.append("  other chunks: " + ", ".join(f"{c}@{o}" for c, o in info["other_chunks"]))
    if not info["chunks"]:
        lines.append("  no tmem")
    for chunk, off in zip(info["chunks"], info["chunk_offsets"]):
        if chunk["marker"] == tc.MARKER_TMEM:
            c = chunk["client"]
            cflags = [n for bit, n in ((tc.CLIENT_COMPRESS, "compress"), (tc.CLIENT_FROZEN, "frozen"))
                      if c["flags"] & bit]
            lines.append(f"  chunk -5 TMEM at offset {off}: spec version {chunk['version']}, "
                         f"max_pools {chunk['max_pools']}, client flags {c['flags']:#x}"
                         f" ({','.join(cflags) or 'none'}), weight {c['weight']}, cap {c['cap']}")
            for p in chunk["pools"]:
                n = len(p["pages"]) if "pages" in p else p["page_count"]
                uuid = f"{p['uuid'][0]:016x}{p['uuid'][1]:016x}"
                lines.append(f"    pool {p['id']}: flags {p['flags']:#010x} "
                             f"({tc.describe_pool_flags(p['flags'])}), uuid {uuid}, "
                             f"n_pages {p['n_pages']}, {n} pages"
                             + (", ended by terminator" if p["terminated"] else ""))
                for g in p.get("pages", []):
                    oid = g["oid"] if isinstance(g["oid"], int) else ":".join(f"{x:#x}" for x in g["oid"])
                    lines.append(f"      oid {oid} index {g['index']} crc32 {g['crc32']}")
        else:
            n = len(chunk["invalidations"]) if "invalidations" in chunk else chunk["invalidation_count"]
            lines.append(f"  chunk -6 TMEM_EXTRA at offset {off}: {n} invalidations")
            for e in chunk.get("invalidations", []):
                oid = e["oid"] if isinstance(e["oid"], int) else ":".join(f"{x:#x}" for x in e["oid"])
                lines.append(f"      pool {e['pool']} oid {oid} index {e['index']}")
    return "\n".join(lines)


def run(path: str, *, chunks_only: bool, as_json: bool, with_pages: bool, width: Optional[int],
        guest: Optional[str]) -> str:
    info = inspect_file(path, chunks_only=chunks_only, with_pages=with_pages, width=width,
                        guest=guest)
    if as_json:
        return json.dumps(info, indent=1)
    return format_text(info)


__all__: Sequence[str] = ["inspect_file", "format_text", "run", "ChunkCollector"]
