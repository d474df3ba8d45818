"""tmem chunks as a JSON document: the golden vectors' ``expected.json`` form.

:class:`ChunkCollector` is a chunk visitor that records what it is shown; with
``with_pages`` it lists every page (crc32 of its data) and invalidation, else
only counts, so a GiB of tmem costs a few integers.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import tmemchunk as tc
from .. import xen


class ChunkCollector(tc.ChunkVisitor):
    """A chunk visitor that records what it sees (crc32 per page when asked)."""

    def __init__(self, with_pages: bool) -> None:
        self.with_pages = with_pages
        self.chunks: List[Dict[str, Any]] = []
        self.offsets: List[int] = []
        self.version = 1
        self._pool: Optional[Dict[str, Any]] = None
        self._extra: Optional[Dict[str, Any]] = None

    def _oid(self, oid: Tuple[int, int, int]) -> Union[int, List[int]]:
        return oid[0] if self.version == 0 else list(oid)

    def client(self, rec: tc.ClientRecord, offset: int) -> None:
        self.version = rec.version
        self.chunks.append({"marker": xen.TMEM, "version": rec.version,
                            "max_pools": rec.max_pools,
                            "client": {"flags": rec.flags, "weight": rec.weight, "cap": rec.cap},
                            "pools": []})
        self.offsets.append(offset)

    def pool(self, rec: tc.PoolRecord, offset: int) -> None:
        pool: Dict[str, Any] = {"id": rec.pool_id, "flags": rec.flags, "n_pages": rec.n_pages,
                                "uuid": list(rec.uuid)}
        if self.with_pages:
            pool["pages"] = []
        else:
            pool["page_count"] = 0
        self.chunks[-1]["pools"].append(pool)
        self._pool = pool

    def _open_pool(self) -> Dict[str, Any]:
        """The pool being read: the reader shows its record before its pages."""
        assert self._pool is not None, "tmem pages before their pool record"
        return self._pool

    def pages(self, pool: tc.PoolRecord, records: memoryview, count: int, offset: int) -> None:
        p = self._open_pool()
        if not self.with_pages:
            p["page_count"] += count
            return
        out = p["pages"]
        for oid, index, data in tc.iter_records(self.version, records, count, pool.page_size):
            out.append({"oid": self._oid(oid), "index": index,
                        "crc32": f"0x{zlib.crc32(data):08x}"})

    def pool_end(self, pool: tc.PoolRecord, received: int, terminated: bool) -> None:
        self._open_pool()["terminated"] = terminated

    def invalidations(self, entries: Sequence[Tuple[int, tc.OID, int]], offset: int) -> None:
        extra = self._open_extra(offset)
        if self.with_pages:
            extra["invalidations"].extend({"pool": p, "oid": self._oid(o), "index": i}
                                          for p, o, i in entries)
        else:
            extra["invalidation_count"] += len(entries)

    def _open_extra(self, offset: int) -> Dict[str, Any]:
        if self._extra is None:
            self._extra = {"marker": xen.TMEM_EXTRA}
            self._extra["invalidations" if self.with_pages else "invalidation_count"] = (
                [] if self.with_pages else 0)
            self.chunks.append(self._extra)
            self.offsets.append(offset)
        return self._extra

    def end(self, marker: int, offset: int) -> None:
        if marker == xen.TMEM_EXTRA:
            if self._extra is None:
                self._open_extra(offset)
            self.offsets[-1] = offset
            self._extra = None
