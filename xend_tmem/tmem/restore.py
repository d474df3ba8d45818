"""Restoring a domain's tmem from ``-5`` and ``-6`` chunks into the hypervisor.

Fixes over Xen's ``xc_tmem_restore``: weight and cap are restored as saved
(T1); a client saved FROZEN is frozen only after the last ``-6`` has been
applied, at the end of the restore (T2/H7); the stream is validated before
anything is created from it (T5); a pool whose flags carry spec version 0 in
a v1 stream (what Xen 4.0.2-4.1.3 and 4.2.0 wrote, H4) is created with the
target's spec version, which every release's RESTORE_NEW requires; and a
failed restore removes the client it created.
"""
from __future__ import annotations

from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

from ..binio import StreamReader
from ..codec import tmemchunk as tc
from .. import xen
from ..errors import HypervisorError, StreamError
from ..hypervisor.interface import Buffer, Hypervisor, crc_mismatch_index

if TYPE_CHECKING:
    from ..integrity import PageCheck

MAX_PAGE_SIZE = xen.PAGE_SIZE   # x86 Xen creates pools with pagebits 0 only


class TmemRestorer(tc.ChunkVisitor):
    """A :class:`~xend_tmem.codec.tmemchunk.ChunkVisitor` that applies what it reads."""

    def __init__(self, hv: Hypervisor, domid: int, max_page_size: int = MAX_PAGE_SIZE,
                 page_check: Optional["PageCheck"] = None) -> None:
        self.hv = hv
        self.page_check = page_check     # integrity.PageCheck: pages checked as they arrive
        self.domid = domid
        self.max_page_size = max_page_size
        self.order = tc.ChunkOrder()
        self.created = False
        self.saved: Optional[tc.ClientRecord] = None
        self.version: Optional[int] = None      # the target's tmem spec version
        self.pools: Dict[int, tc.PoolRecord] = {}
        self.page_count = 0
        self.invalidation_count = 0
        self.bytes = 0
        # one page batch in flight: the hypervisor stores (and checks) batch k
        # while the stream's batch k+1 is read
        self._putter: Optional[ThreadPoolExecutor] = None
        self._pending: Optional["Future[None]"] = None
        self._reader: Optional[StreamReader] = None
        self._lent: Optional[Tuple[bytearray, memoryview]] = None   # the batch in flight

    # -- chunk entry points ------------------------------------------------------
    def read_chunk(self, reader: StreamReader, marker: int, offset: int) -> None:
        start = reader.offset
        self._reader = reader
        self.order.see(marker, offset)
        if marker == xen.TMEM:
            self.order.client = tc.read_tmem(reader, self, max_page_size=self.max_page_size,
                                             marker_offset=offset)
        else:
            assert self.order.client is not None      # ChunkOrder.see: -6 follows a -5
            tc.read_extra(reader, self.order.version, self,
                          max_pools=self.order.client.max_pools, marker_offset=offset)
        self.bytes += reader.offset - start + 4

    # -- visitor ----------------------------------------------------------------
    def client(self, rec: tc.ClientRecord, offset: int) -> None:
        hv, domid = self.hv, self.domid
        version = hv.save_get_version(domid)
        max_pools = hv.save_get_maxpools(domid)
        if rec.version != version:
            raise StreamError(f"stream carries tmem spec version {rec.version}; this "
                              f"hypervisor speaks version {version}", offset=offset + 4,
                              field="version", value=rec.version)
        if rec.max_pools > max_pools:
            raise StreamError(f"stream allows {rec.max_pools} pools; this hypervisor "
                              f"{max_pools}", offset=offset + 8, field="max_pools",
                              value=rec.max_pools)
        self.version = version
        hv.restore_begin(domid)
        self.created = True
        self.saved = rec
        if rec.compress:
            hv.set_compress(domid, True)
        hv.set_weight(domid, rec.weight)     # T1: as saved, not 0
        hv.set_cap(domid, rec.cap)

    def pool(self, rec: tc.PoolRecord, offset: int) -> None:
        self.drain()
        flags = rec.flags
        if not flags >> xen.POOL_VERSION_SHIFT and self.version:
            flags |= self.version << xen.POOL_VERSION_SHIFT     # H4 streams carry 0 here
        try:
            self.hv.restore_new_pool(self.domid, rec.pool_id, flags, rec.uuid)
        except HypervisorError as exc:
            raise StreamError(f"cannot recreate pool {rec.pool_id}: {exc}", offset=offset,
                              field="pool_id", value=rec.pool_id) from exc
        self.pools[rec.pool_id] = rec

    def pages(self, pool: tc.PoolRecord, records: memoryview, count: int, offset: int) -> None:
        """Hand the batch to the hypervisor: with page checks, its identities
        are compared here and its pages' CRC32s by the hypervisor as it stores
        them (``restore_put_pages(crcs=)``). When the pool announced more than
        one batch, the call runs on a helper thread while this one reads the
        next batch: one call in flight at a time, so the hypervisor sees the
        same calls in the same order; every other call waits for it first.
        The batch stays where the stream reader put it: the reader lends that
        buffer and goes on in another (no copy of the batch)."""
        version = self.saved.version if self.saved else 1
        crcs = None
        first = 0
        if self.page_check is not None:
            first = self.page_check.seen
            crcs = array("I", self.page_check.expected_tmem_crcs(
                pool.pool_id, version, records, count, pool.page_size, offset))
        self.page_count += count
        self.drain()
        if pool.n_pages <= count and self._putter is None:      # one batch: nothing to overlap
            self._put(pool.pool_id, records, count, crcs, (first, version, pool.page_size, offset))
            return
        if self._putter is None:
            self._putter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tmem-put")
        reader = self._reader
        assert reader is not None
        data: Any
        if records.obj is reader.buf and records.nbytes <= reader.available:
            # tmemchunk hands out the reader's buffer from ``pos``
            at = reader.pos
            buf = reader.lend(records.nbytes)
            data = memoryview(buf)[at:at + records.nbytes]
            self._lent = (buf, data)
        else:                                 # not the reader's bytes: a copy to keep
            data = bytes(records)
        self._pending = self._putter.submit(self._put, pool.pool_id, data, count, crcs,
                                            (first, version, pool.page_size, offset))

    def page_slots(self, pool: tc.PoolRecord, max_count: int) -> Optional[memoryview]:
        """Slots the hypervisor lends for the stream to be read into in place
        (``restore_lend_slots``: an in-process simulator's store), when no page
        check needs the batch first; else None (the batched put)."""
        if self.page_check is not None:
            return None
        self.drain()
        return self.hv.restore_lend_slots(self.domid, pool.pool_id, max_count)

    def pages_lent(self, pool: tc.PoolRecord, count: int, offset: int) -> None:
        """Store the first ``count`` records read into the lent slots (zero: give
        them back)."""
        self.page_count += count
        self.hv.restore_put_lent(self.domid, pool.pool_id, count)

    def _put(self, pool_id: int, records: Buffer, count: int, crcs: "Optional[array[int]]",
             where: Tuple[int, int, int, int]) -> None:
        try:
            if crcs is None:
                self.hv.restore_put_pages(self.domid, pool_id, records, count)
            else:
                self.hv.restore_put_pages(self.domid, pool_id, records, count, crcs=crcs)
        except HypervisorError as exc:
            bad = crc_mismatch_index(exc) if crcs is not None else None
            if bad is None or not 0 <= bad < count:
                raise
            first, version, page_size, offset = where
            assert self.page_check is not None
            raise self.page_check.tmem_mismatch(first, count, bad, records, version,
                                                page_size, offset) from None

    def drain(self) -> None:
        """Wait for the batch in flight; its failure is raised here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        finally:
            lent, self._lent = self._lent, None
            if lent is not None and self._reader is not None:
                lent[1].release()
                self._reader.give_back(lent[0])

    def _stop_putter(self) -> None:
        putter, self._putter = self._putter, None
        if putter is not None:
            putter.shutdown(wait=True)

    def pool_end(self, pool: tc.PoolRecord, received: int, terminated: bool) -> None:
        self.drain()

    def invalidations(self, entries: Sequence[Tuple[int, tc.OID, int]], offset: int) -> None:
        self.drain()
        assert self.version is not None           # ChunkOrder.see: -6 follows a -5
        entry_len = 8 + tc.oid_len(self.version)  # pool_id, OID, index
        for k, (pool_id, _, _) in enumerate(entries):
            if pool_id not in self.pools:
                raise StreamError(f"invalidation names pool {pool_id}, which the tmem chunk "
                                  "did not define", offset=offset + k * entry_len,
                                  field="invalidation pool_id", value=pool_id)
        # one call for the batch: a migration reads this chunk while the guest
        # is suspended, and a round trip per page cost ~1 s per 6000 of them
        self.hv.restore_flush_pages(self.domid, entries)
        self.invalidation_count += len(entries)

    def end(self, marker: int, offset: int) -> None:
        self.drain()
        self._stop_putter()

    # -- completion ----------------------------------------------------------------
    def finish(self) -> None:
        """After the whole stream: freeze last, so every page and flush got in (T2/H7)."""
        self.drain()
        self._stop_putter()
        if self.saved is not None and self.saved.frozen:
            self.hv.freeze(self.domid)

    def abort(self) -> None:
        """Remove the partly restored client (no-op if none was created)."""
        try:
            self.drain()
        except Exception:        # noqa: BLE001 - the restore already failed; it is removed
            pass
        finally:
            self._stop_putter()
        if self.created:
            self.created = False
            self.hv.destroy(self.domid)
