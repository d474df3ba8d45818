"""The toolstack's side of the hypervisor process: backend ``sim`` (see :mod:`.server`).

:func:`connect` is the entry point of the ``sim`` backend: it connects to the
hypervisor process of the state directory, starting one if none runs, and
returns a :class:`HypervisorClient` that implements every call of
:class:`~xend_tmem.hypervisor.interface.Hypervisor`.

Thread safety: calls take a connection from a pool (one per concurrent caller,
each with its own shared page buffer) and put it back, so xend's request
threads never interleave messages and short-lived threads reuse connections.

Pages never travel in messages. Tmem page batches are copied through the
connection's memfd buffer (``save_get_pages`` by the hypervisor into it,
``restore_put_pages`` by the client into it). Guest RAM is the domain's memfd,
mapped here on first use: ``read_pages``/``write_pages`` copy from/to that
mapping without a round trip, and ``map_foreign_range`` lends a view of it so a
save writes its image straight from guest RAM. Like Xen's foreign mappings, a mapping keeps a
destroyed domain's pages readable until the toolstack drops it; the client
drops it when it destroys the domain, when ``list_domains`` no longer shows the
domain, and when it finds itself talking to another hypervisor process.

A lost hypervisor (process killed or stopped) makes every call raise
:class:`~xend_tmem.errors.HypervisorError` with ``code`` ``errno.ECONNRESET``
naming the call; a hypervisor started again later is reached again.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import subprocess
import threading
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence,
                    Tuple, Type, Union)

from ..detach import READY, spawn_detached
from ..errors import HypervisorError, NoSuchDomain, XendTmemError
from . import wire
from ..xen import PAGE_SIZE
from .interface import OID, Buffer, DomainInfo, HostInfo, PageLending, crc_mismatch_index
from .pfnruns import pfn_runs as _runs
from .server import PROTOCOL, ServeOptions, paths, raise_error, running_pid

if TYPE_CHECKING:
    from array import array

    from ..config import HypervisorSettings
    from .interface import Hypervisor

log = logging.getLogger("xend_tmem.hypervisor")

BUFFER_SIZE = 16 << 20            # per connection: 4000 page records, 16 x tmem's 1 MiB batch
HELD_BATCH_BYTES = 4 << 20        # a save's lent batch: a quarter of the round trips of 1 MiB
FLUSH_BATCH = 16384               # invalidations per round trip: well under wire.MAX_MESSAGE
_MADV_POPULATE_READ = 22          # Linux 5.14+: fault a run about to be read in one call
_POPULATE_MIN = 64 * PAGE_SIZE    # below this the call costs more than the faults
START_TIMEOUT_S = 30.0
BACKEND = "sim"


class HypervisorStartError(XendTmemError):
    """The hypervisor process could not be started (its reason, or where its log is)."""


class _Conn:
    __slots__ = ("sock", "buf", "view", "identity")

    def __init__(self, sock: socket.socket, buf: mmap.mmap, identity: Dict[str, Any]) -> None:
        self.sock = sock
        self.buf = buf
        self.view = memoryview(buf)
        self.identity = identity

    def close(self) -> None:
        self.view.release()
        try:
            self.buf.close()
        except BufferError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class _Mapping:
    __slots__ = ("mm", "fd", "pages", "gen")

    def __init__(self, mm: mmap.mmap, fd: int, pages: int, gen: int) -> None:
        self.mm = mm
        self.fd = fd                # the RAM memfd itself: a restore writes pages with pwrite
        self.pages = pages
        self.gen = gen              # when it was made (see list_domains)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _reason(exc: HypervisorError) -> str:
    prefix = f"hypervisor refused {exc.op}: "
    text = str(exc)
    return text[len(prefix):] if text.startswith(prefix) else text




class HypervisorClient:
    """A :class:`~xend_tmem.hypervisor.interface.Hypervisor` served by the process."""

    def __init__(self, state_dir: str, buffer_size: int = BUFFER_SIZE,
                 timeout: Optional[float] = None) -> None:
        """``timeout`` bounds each call (a command-line tool facing a hung
        hypervisor); xend waits as long as a call takes (a GiB-scale create)."""
        self.state_dir = os.path.abspath(state_dir)
        self.timeout = timeout
        self.sock_path = paths(self.state_dir)[0]
        self.buffer_size = buffer_size
        self._free: List[_Conn] = []
        self._all: List[_Conn] = []
        self._lock = threading.Lock()
        self._maps: Dict[int, _Mapping] = {}
        self._map_lock = threading.Lock()
        self._map_gen = 0
        self._populate_read = True
        self._instance: Optional[Tuple[object, object]] = None   # (pid, started)
        self.identity: Dict[str, Any] = {}
        self._closed = False

    # -- connections ---------------------------------------------------------------
    def _open(self) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            with wire.ShortPath(self.sock_path) as address:
                sock.connect(address)
        except OSError:
            sock.close()
            raise
        fd = os.memfd_create("xend-hv-buffer", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.buffer_size)
            buf = mmap.mmap(fd, self.buffer_size)
            try:
                wire.send(sock, ("hello", (PROTOCOL,)), [fd])
            except OSError:
                buf.close()
                sock.close()
                raise
        finally:
            os.close(fd)
        try:
            reply, fds = wire.recv(sock)
        except OSError:
            buf.close()
            sock.close()
            raise
        wire.close_fds(fds)
        identity = reply[1] if isinstance(reply, tuple) and reply[:1] == (wire.OK,) else {}
        instance = (identity.get("pid"), identity.get("started"))
        with self._map_lock:
            if self._instance is not None and instance != self._instance:
                log.warning("the hypervisor process changed (pid %s, was %s): dropping RAM "
                            "mappings", instance[0], self._instance[0])
                self._drop_maps()
            self._instance = instance
        self.identity = identity
        conn = _Conn(sock, buf, identity)
        with self._lock:
            self._all.append(conn)
        return conn

    def _acquire(self, op: str) -> _Conn:
        with self._lock:
            if self._closed:
                raise HypervisorError(op, "the hypervisor connection is closed")
            if self._free:
                return self._free.pop()
        try:
            return self._open()
        except OSError as exc:
            raise HypervisorError(op, f"cannot reach the hypervisor process at "
                                      f"{self.sock_path}: {exc.strerror or exc}",
                                  code=errno.ECONNRESET) from None

    def _release(self, conn: _Conn) -> None:
        with self._lock:
            if conn not in self._all or conn in self._free:
                return                   # discarded (lost) or already back
            if self._closed:
                self._all.remove(conn)
                conn.close()
            else:
                self._free.append(conn)

    def _discard(self, conn: _Conn) -> None:
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def _lost(self, op: str, conn: _Conn, exc: BaseException) -> HypervisorError:
        self._discard(conn)
        with self._lock:                 # the others are to the same dead process
            stale, self._free = self._free, []
            for c in stale:
                self._all.remove(c)
        for c in stale:
            c.close()
        return HypervisorError(op, f"lost the hypervisor process ({exc}); its domains are "
                                   f"gone unless it is still running", code=errno.ECONNRESET)

    def _exchange(self, conn: _Conn, op: str, method: str, args: Tuple[Any, ...]
                  ) -> Tuple[Any, List[int]]:
        try:
            wire.send(conn.sock, (method, args))
            reply, fds = wire.recv(conn.sock)
        except (OSError, wire.ConnectionLost) as exc:
            raise self._lost(op, conn, exc) from None
        status, value = reply
        if status != wire.OK:
            wire.close_fds(fds)
            raise_error(op, value)
        return value, fds

    def _call(self, method: str, *args: Any) -> Any:
        conn = self._acquire(method)
        try:
            value, fds = self._exchange(conn, method, method, args)
        finally:
            self._release(conn)
        wire.close_fds(fds)
        return value

    def close(self) -> None:
        """Close every connection and RAM mapping; the hypervisor and its domains stay."""
        with self._lock:
            self._closed = True
            conns, self._all, self._free = self._all, [], []
        for c in conns:
            c.close()
        with self._map_lock:
            self._drop_maps()

    def server_identity(self) -> Dict[str, Any]:
        """``hello``'s answer: pid, start time, release and defects of the process."""
        conn = self._acquire("hello")
        identity = conn.identity
        self._release(conn)
        return identity

    # -- RAM mappings --------------------------------------------------------------
    def _drop_maps(self) -> None:
        maps, self._maps = self._maps, {}
        for m in maps.values():
            m.close()

    def _forget(self, domid: int) -> None:
        with self._map_lock:
            m = self._maps.pop(domid, None)
            if m is not None:
                m.close()             # under the lock: write_pages dups the fd under it

    def _mapping(self, domid: int, op: str) -> _Mapping:
        m = self._maps.get(domid)
        if m is not None:
            return m
        conn = self._acquire(op)
        try:
            size, fds = self._exchange(conn, op, "memory_fd", (domid,))
        except HypervisorError as exc:
            if exc.op == op or exc.code == errno.ECONNRESET:
                raise
            raise HypervisorError(op, _reason(exc), code=exc.code) from None
        finally:
            self._release(conn)
        if len(fds) != 1:
            wire.close_fds(fds)
            raise HypervisorError(op, f"the hypervisor sent {len(fds)} descriptors for "
                                      f"domain {domid}'s RAM")
        try:
            mm = mmap.mmap(fds[0], size)
        except (OSError, ValueError) as exc:
            os.close(fds[0])
            raise HypervisorError(op, f"cannot map domain {domid}'s RAM: {exc}") from None
        with self._map_lock:
            old = self._maps.get(domid)
            if old is not None:
                mm.close()
                os.close(fds[0])
                return old
            self._map_gen += 1
            m = self._maps[domid] = _Mapping(mm, fds[0], size // PAGE_SIZE, self._map_gen)
        return m

    # =====================================================================
    # DomainControl
    # =====================================================================
    def list_domains(self) -> List[DomainInfo]:
        gen = self._map_gen
        infos = [DomainInfo(**d) for d in self._call("list_domains")]
        live = {i.domid for i in infos}
        # a mapping made before the listing whose domain it lacks: destroyed (by
        # another client); ids are not reused, so a newer mapping is left alone
        for domid, m in list(self._maps.items()):
            if domid not in live and m.gen <= gen:
                self._forget(domid)
        return infos

    def domain_info(self, domid: int) -> DomainInfo:
        return DomainInfo(**self._call("domain_info", domid))

    def create_domain(self, config: Mapping[str, object]) -> int:
        return self._call("create_domain", dict(config))

    def create_domain_shell(self, name: str, p2m_size: int, vcpus: int,
                            config: Optional[Mapping[str, object]] = None) -> int:
        return self._call("create_domain_shell", name, p2m_size, vcpus,
                          None if config is None else dict(config))

    def destroy_domain(self, domid: int) -> None:
        self._forget(domid)
        self._call("destroy_domain", domid)

    def rename_domain(self, domid: int, name: str) -> None:
        self._call("rename_domain", domid, name)

    def pause(self, domid: int) -> None:
        self._call("pause", domid)

    def unpause(self, domid: int) -> None:
        self._call("unpause", domid)

    def suspend(self, domid: int) -> None:
        self._call("suspend", domid)

    def resume(self, domid: int) -> None:
        self._call("resume", domid)

    def online_vcpus(self, domid: int) -> List[int]:
        return self._call("online_vcpus", domid)

    def get_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        return self._call("get_vcpu_context", domid, vcpu)

    def set_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._call("set_vcpu_context", domid, vcpu, bytes(data))

    def get_ext_vcpu_context(self, domid: int, vcpu: int) -> bytes:
        return self._call("get_ext_vcpu_context", domid, vcpu)

    def set_ext_vcpu_context(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._call("set_ext_vcpu_context", domid, vcpu, bytes(data))

    def get_vcpu_xsave(self, domid: int, vcpu: int) -> bytes:
        return self._call("get_vcpu_xsave", domid, vcpu)

    def set_vcpu_xsave(self, domid: int, vcpu: int, data: Buffer) -> None:
        self._call("set_vcpu_xsave", domid, vcpu, bytes(data))

    def get_shared_info(self, domid: int) -> bytes:
        return self._call("get_shared_info", domid)

    def set_shared_info(self, domid: int, data: Buffer) -> None:
        self._call("set_shared_info", domid, bytes(data))

    def shutdown_domain(self, domid: int, reason: str) -> None:
        self._call("shutdown_domain", domid, reason)

    def set_memory_target(self, domid: int, target_mib: int) -> None:
        self._call("set_memory_target", domid, target_mib)

    def vcpu_info(self, domid: int) -> List[Dict[str, Any]]:
        return self._call("vcpu_info", domid)

    # =====================================================================
    # MemoryAccess: the foreign mapping
    # =====================================================================
    def p2m_size(self, domid: int) -> int:
        return self._call("p2m_size", domid)

    def read_pages(self, domid: int, pfns: Sequence[int]) -> bytes:
        op = "read_pages"
        m = self._mapping(domid, op)
        mm = m.mm
        runs = _runs(pfns, m.pages, op)
        try:
            if len(runs) == 1:
                s, n = runs[0]
                return mm[s * PAGE_SIZE:(s + n) * PAGE_SIZE]
            # scattered pages (a last round's): one copy, joined from views of
            # the mapping, not a bytes object per run joined again
            with memoryview(mm) as whole:
                return b"".join([whole[s * PAGE_SIZE:(s + n) * PAGE_SIZE] for s, n in runs])
        except ValueError:                   # unmapped meanwhile: destroyed
            raise NoSuchDomain(domid) from None

    def map_foreign_range(self, domid: int, pfns: Sequence[int]) -> Optional[memoryview]:
        """A read-only view of this client's own mapping of ``pfns`` when they are
        one contiguous run (Xen's ``xc_map_foreign_range``, which ``xc_domain_save``
        wrote the image from), else None (use :meth:`read_pages`).

        No copy: the save writes the image straight from guest RAM. The view sees
        the guest's later writes, as Xen's mapping did (a live save's log-dirty
        round sends such pages again). Release it promptly: a mapping with views
        outstanding stays mapped until they are gone."""
        op = "read_pages"
        m = self._mapping(domid, op)
        runs = _runs(pfns, m.pages, op)
        if len(runs) != 1:
            return None
        start, count = runs[0]
        lo, n = start * PAGE_SIZE, count * PAGE_SIZE
        try:
            if self._populate_read and n >= _POPULATE_MIN:
                try:                     # one call instead of a fault per page
                    m.mm.madvise(_MADV_POPULATE_READ, lo, n)
                except OSError:          # older kernel: fault page by page
                    self._populate_read = False
            with memoryview(m.mm) as whole:
                return whole[lo:lo + n].toreadonly()
        except ValueError:               # unmapped meanwhile: destroyed
            raise NoSuchDomain(domid) from None

    def write_pages(self, domid: int, pfns: Sequence[int], data: Buffer) -> None:
        """Through the RAM memfd itself (``pwrite``), not the mapping: the kernel
        puts whole pages of data into fresh memory without zeroing them first
        or faulting them into this process's page tables, and without the GIL
        (512 MiB of a restore: ~0.25 s instead of ~0.45 s in this VM). The
        hypervisor's and the guest's mappings share those pages."""
        op = "write_pages"
        m = self._mapping(domid, op)
        with memoryview(data) as raw, raw.cast("B") as src:
            if src.nbytes != len(pfns) * PAGE_SIZE:
                raise HypervisorError(op, f"{src.nbytes} bytes of data for {len(pfns)} pages")
            runs = _runs(pfns, m.pages, op)
            with self._map_lock:        # never a descriptor closed (and reused) meanwhile
                if self._maps.get(domid) is not m or m.fd < 0:
                    raise NoSuchDomain(domid)       # unmapped meanwhile: destroyed
                fd = os.dup(m.fd)
            try:
                pos = 0
                for s, n in runs:
                    with src[pos:pos + n * PAGE_SIZE] as run:
                        done, at = 0, s * PAGE_SIZE
                        while done < run.nbytes:
                            k = os.pwrite(fd, run[done:], at + done)
                            if k <= 0:
                                raise HypervisorError(op, f"domain {domid}'s RAM took {k} "
                                                          f"bytes at offset {at + done}")
                            done += k
                    pos += n * PAGE_SIZE
            except OSError as exc:
                raise HypervisorError(op, f"cannot write domain {domid}'s RAM: "
                                          f"{exc.strerror or exc}") from None
            finally:
                os.close(fd)

    def enable_logdirty(self, domid: int) -> None:
        self._call("enable_logdirty", domid)

    def disable_logdirty(self, domid: int) -> None:
        self._call("disable_logdirty", domid)

    def read_and_clear_dirty(self, domid: int) -> List[int]:
        return self._call("read_and_clear_dirty", domid)

    # =====================================================================
    # TmemControl: save
    # =====================================================================
    def save_begin(self, domid: int, live: bool) -> bool:
        return self._call("save_begin", domid, live)

    def save_get_version(self, domid: int) -> int:
        return self._call("save_get_version", domid)

    def save_get_maxpools(self, domid: int) -> int:
        return self._call("save_get_maxpools", domid)

    def save_get_client_weight(self, domid: int) -> int:
        return self._call("save_get_client_weight", domid)

    def save_get_client_cap(self, domid: int) -> int:
        return self._call("save_get_client_cap", domid)

    def save_get_client_flags(self, domid: int) -> int:
        return self._call("save_get_client_flags", domid)

    def save_get_pool_flags(self, domid: int, pool_id: int) -> Optional[int]:
        return self._call("save_get_pool_flags", domid, pool_id)

    def save_get_pool_npages(self, domid: int, pool_id: int) -> int:
        return self._call("save_get_pool_npages", domid, pool_id)

    def save_get_pool_uuid(self, domid: int, pool_id: int) -> Tuple[int, int]:
        hi, lo = self._call("save_get_pool_uuid", domid, pool_id)
        return hi, lo

    def save_get_next_page(self, domid: int, pool_id: int) -> Optional[Tuple[OID, int, bytes]]:
        op = "save_get_next_page"
        conn = self._acquire(op)
        try:
            got, _ = self._exchange(conn, op, op, (domid, pool_id))
            if got is None:
                return None
            oid, index, n = got
            o0, o1, o2 = oid
            return (o0, o1, o2), index, bytes(conn.view[:n])
        finally:
            self._release(conn)

    def save_get_pages(self, domid: int, pool_id: int, max_pages: int,
                       out: Optional[Union[bytearray, memoryview]] = None,
                       crcs: Optional[Union[bytearray, memoryview, array[int]]] = None
                       ) -> Tuple[int, Buffer]:
        """As the interface; several round trips when ``max_pages`` records exceed
        the shared buffer (the same loop of SAVE_GET_NEXT_PAGE, continued). The
        hypervisor process computes ``crcs`` and leaves them in the shared
        buffer after the records: no message carries them."""
        op = "save_get_pages"
        conn = self._acquire(op)
        total = 0
        pos = 0
        parts: List[bytes] = []
        crc_dst = None
        if crcs is not None:
            crc_dst = memoryview(crcs).cast("B")
            if isinstance(max_pages, int) and crc_dst.nbytes < 4 * max_pages:
                crc_dst.release()
                raise HypervisorError(op, f"a CRC buffer of {crc_dst.nbytes} bytes cannot "
                                          f"hold {max_pages} CRCs")
        try:
            while True:
                want = max_pages - total if isinstance(max_pages, int) else max_pages
                (count, nbytes, crc_off), _ = self._exchange(
                    conn, op, op, (domid, pool_id, want, crc_dst is not None))
                if count and crc_dst is not None:
                    if crc_off < 0 or crc_off + 4 * count > len(conn.view):
                        raise HypervisorError(op, f"the hypervisor put {count} CRCs at "
                                                  f"offset {crc_off} of the shared buffer")
                    crc_dst[4 * total:4 * (total + count)] = conn.view[crc_off:crc_off + 4 * count]
                if count:
                    chunk = conn.view[:nbytes]
                    if out is not None:
                        with memoryview(out) as dst:
                            if pos + nbytes > dst.nbytes:
                                raise HypervisorError(op, f"the out buffer of {dst.nbytes} "
                                                          f"bytes cannot hold "
                                                          f"{pos + nbytes} bytes of records")
                            dst[pos:pos + nbytes] = chunk
                    else:
                        parts.append(bytes(chunk))
                    chunk.release()
                    pos += nbytes
                    total += count
                if not count or not isinstance(max_pages, int) or total >= max_pages:
                    break
        finally:
            self._release(conn)
            if crc_dst is not None:
                crc_dst.release()
        if out is not None:
            return total, memoryview(out)[:pos]
        return total, parts[0] if len(parts) == 1 else b"".join(parts)

    def save_pages_lending(self) -> Optional[PageLending]:
        """Batches are lent in the connections' shared buffers: two held at once
        (two connections) while a third is filled, each a round trip."""
        return PageLending(batch_bytes=HELD_BATCH_BYTES, in_flight=2, immediate=False)

    def save_get_pages_held(self, domid: int, pool_id: int, max_pages: int,
                            crcs: Optional["array[int]"] = None
                            ) -> Tuple[int, memoryview, Callable[[], None]]:
        """As the interface: one SAVE_GET_PAGES round trip whose records stay in the connection's
        shared buffer: ``(count, view, release)``. The caller writes the image
        straight from ``view`` (no copy into a fresh buffer: 1 GiB of tmem is
        1 GiB of memcpy and page faults less) and must call ``release`` once
        done; the connection serves no other call until then, so a save
        fetching batch k+1 while it writes batch k uses two connections, two
        buffers. ``count`` may be less than ``max_pages`` (what one buffer
        holds), 0 at the end of the walk, as with the hypercall."""
        op = "save_get_pages"
        if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages <= 0:
            raise HypervisorError(op, f"max_pages {max_pages!r} is not a positive count")
        crc_dst = None
        if crcs is not None:
            crc_dst = memoryview(crcs).cast("B")
            if crc_dst.nbytes < 4 * max_pages:
                crc_dst.release()
                raise HypervisorError(op, f"a CRC buffer of {crc_dst.nbytes} bytes cannot "
                                          f"hold {max_pages} CRCs")
        conn = self._acquire(op)
        try:
            (count, nbytes, crc_off), _ = self._exchange(
                conn, op, op, (domid, pool_id, max_pages, crc_dst is not None))
            if not isinstance(count, int) or not 0 <= count <= max_pages \
                    or not isinstance(nbytes, int) or not 0 <= nbytes <= len(conn.view):
                raise HypervisorError(op, f"the hypervisor answered {count!r} records in "
                                          f"{nbytes!r} bytes")
            if count and crc_dst is not None:
                if crc_off < 0 or crc_off + 4 * count > len(conn.view) or crc_off < nbytes:
                    raise HypervisorError(op, f"the hypervisor put {count} CRCs at "
                                              f"offset {crc_off} of the shared buffer")
                crc_dst[:4 * count] = conn.view[crc_off:crc_off + 4 * count]
            view = conn.view[:nbytes]
        except BaseException:
            self._release(conn)
            raise
        finally:
            if crc_dst is not None:
                crc_dst.release()
        done: List[bool] = []

        def release() -> None:
            if not done:
                done.append(True)
                view.release()
                self._release(conn)
        return count, view, release

    def save_get_next_inv(self, domid: int) -> Optional[Tuple[int, OID, int]]:
        got = self._call("save_get_next_inv", domid)
        if got is None:
            return None
        pool_id, (o0, o1, o2), index = got
        return pool_id, (o0, o1, o2), index

    def save_get_invs(self, domid: int, start: int, max_count: int) -> List[Tuple[int, OID, int]]:
        return [(p, (o0, o1, o2), i) for p, (o0, o1, o2), i in
                self._call("save_get_invs", domid, start, max_count)]

    def save_end(self, domid: int) -> None:
        self._call("save_end", domid)

    # =====================================================================
    # TmemControl: restore
    # =====================================================================
    def restore_begin(self, domid: int) -> None:
        self._call("restore_begin", domid)

    def restore_new_pool(self, domid: int, pool_id: int, flags: int, uuid: Tuple[int, int]) -> int:
        return self._call("restore_new_pool", domid, pool_id, flags, tuple(uuid))

    def _with_data(self, op: str, args: Tuple[Any, ...], data: Buffer) -> Any:
        conn = self._acquire(op)
        try:
            with memoryview(data) as raw, raw.cast("B") as src:
                n = src.nbytes
                if n > len(conn.view):
                    raise HypervisorError(op, f"a page of {n} bytes does not fit the "
                                              f"{len(conn.view)}-byte buffer")
                conn.view[:n] = src
            value, _ = self._exchange(conn, op, op, args + (n,))
        finally:
            self._release(conn)
        return value

    def restore_put_page(self, domid: int, pool_id: int, oid: OID, index: int,
                         data: Buffer) -> None:
        self._with_data("restore_put_page", (domid, pool_id, tuple(oid), index), data)

    def restore_put_pages(self, domid: int, pool_id: int, records: Buffer, count: int,
                          crcs: Optional[Union[Buffer, array[int]]] = None) -> None:
        """As the interface; records beyond the shared buffer go in several round
        trips (the same loop of RESTORE_PUT_PAGE, continued; stops at a refusal).
        ``crcs`` travel in the shared buffer after the records; a refusal in a
        later round trip names the record's index in the whole batch."""
        op = "restore_put_pages"
        if crcs is not None:
            self._put_pages_checked(op, domid, pool_id, records, count, crcs)
            return
        conn = self._acquire(op)
        try:
            with memoryview(records) as raw, raw.cast("B") as src:
                size = len(conn.view)
                n = src.nbytes
                if n <= size or isinstance(count, bool) or not isinstance(count, int) \
                        or count <= 0 or n % count:
                    take = min(n, size)
                    conn.view[:take] = src[:take]
                    self._exchange(conn, op, op, (domid, pool_id, take, count))
                    return
                rs = n // count
                per = max(1, size // rs)
                done = 0
                while done < count:
                    k = min(per, count - done)
                    conn.view[:k * rs] = src[done * rs:(done + k) * rs]
                    self._exchange(conn, op, op, (domid, pool_id, k * rs, k))
                    done += k
        finally:
            self._release(conn)

    def _put_pages_checked(self, op: str, domid: int, pool_id: int, records: Buffer,
                           count: int, crcs: Union[Buffer, array[int]]) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise HypervisorError(op, f"record count {count!r} is not a count")
        conn = self._acquire(op)
        try:
            with memoryview(records) as raw, raw.cast("B") as src, \
                    memoryview(crcs) as craw, craw.cast("B") as csrc:
                if csrc.nbytes < 4 * count:
                    raise HypervisorError(op, f"{csrc.nbytes // 4} CRCs for {count} records")
                size = len(conn.view)
                n = src.nbytes
                if count == 0 or n % count:
                    raise HypervisorError(op, f"{n} bytes are not {count} records")
                rs = n // count
                per = size // (rs + 4)
                if not per:
                    raise HypervisorError(op, f"a record of {rs} bytes and its CRC do not fit "
                                              f"the {size}-byte buffer")
                done = 0
                while done < count:
                    k = min(per, count - done)
                    coff = (k * rs + 3) & ~3
                    conn.view[:k * rs] = src[done * rs:(done + k) * rs]
                    conn.view[coff:coff + 4 * k] = csrc[4 * done:4 * (done + k)]
                    try:
                        self._exchange(conn, op, op, (domid, pool_id, k * rs, k, coff))
                    except HypervisorError as exc:
                        bad = crc_mismatch_index(exc)
                        if bad is None or not done:
                            raise
                        raise HypervisorError(exc.op, str(exc).split(": ", 1)[1].replace(
                            f"record {bad}:", f"record {done + bad}:", 1),
                            code=exc.code) from None
                    done += k
        finally:
            self._release(conn)

    def restore_lend_slots(self, domid: int, pool_id: int,
                           max_pages: int) -> Optional[memoryview]:
        """Declines (``None``): the store lives in the hypervisor process, and a
        connection's shared buffer serves only the call that holds it, so the
        records travel by :meth:`restore_put_pages` (one copy into the buffer)."""
        return None

    def restore_put_lent(self, domid: int, pool_id: int, count: int) -> None:
        """Refused: :meth:`restore_lend_slots` lends nothing here."""
        raise HypervisorError("RESTORE_PUT_PAGE", f"no slots of pool {pool_id} are lent")

    def restore_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> None:
        self._call("restore_flush_page", domid, pool_id, tuple(oid), index)

    def restore_flush_pages(self, domid: int, entries: Sequence[Tuple[int, OID, int]]) -> None:
        """As the interface: one round trip per :data:`FLUSH_BATCH` entries
        (each a few dozen bytes in the message), not one per page."""
        for at in range(0, len(entries), FLUSH_BATCH):
            self._call("restore_flush_pages", domid,
                       [(p, tuple(o), i) for p, o, i in entries[at:at + FLUSH_BATCH]])

    # -- client settings and admin ops -----------------------------------------------
    def set_weight(self, domid: int, weight: int) -> None:
        self._call("set_weight", domid, weight)

    def set_cap(self, domid: int, cap: int) -> None:
        self._call("set_cap", domid, cap)

    def set_compress(self, domid: int, compress: bool) -> None:
        self._call("set_compress", domid, compress)

    def freeze(self, domid: int) -> None:
        self._call("freeze", domid)

    def thaw(self, domid: int) -> None:
        self._call("thaw", domid)

    def destroy(self, domid: int) -> None:
        self._call("destroy", domid)

    def flush(self, domid: int, pages: int) -> int:
        return self._call("flush", domid, pages)

    def tmem_list(self, domid: Optional[int], long: bool = False) -> str:
        return self._call("tmem_list", domid, long)

    def query_freeable_mb(self) -> int:
        return self._call("query_freeable_mb")

    # =====================================================================
    # GuestTmem
    # =====================================================================
    def guest_new_pool(self, domid: int, persistent: bool, shared: bool = False,
                       uuid: Tuple[int, int] = (0, 0), pagebits: int = 0) -> int:
        return self._call("guest_new_pool", domid, persistent, shared, tuple(uuid), pagebits)

    def guest_destroy_pool(self, domid: int, pool_id: int) -> None:
        self._call("guest_destroy_pool", domid, pool_id)

    def guest_put(self, domid: int, pool_id: int, oid: OID, index: int, data: Buffer) -> bool:
        return self._with_data("guest_put", (domid, pool_id, tuple(oid), index), data)

    def guest_get(self, domid: int, pool_id: int, oid: OID, index: int) -> Optional[bytes]:
        op = "guest_get"
        conn = self._acquire(op)
        try:
            n, _ = self._exchange(conn, op, op, (domid, pool_id, tuple(oid), index))
            return None if n < 0 else bytes(conn.view[:n])
        finally:
            self._release(conn)

    def guest_flush_page(self, domid: int, pool_id: int, oid: OID, index: int) -> bool:
        return self._call("guest_flush_page", domid, pool_id, tuple(oid), index)

    def guest_flush_object(self, domid: int, pool_id: int, oid: OID) -> int:
        return self._call("guest_flush_object", domid, pool_id, tuple(oid))

    # =====================================================================
    # Inspection
    # =====================================================================
    def host_info(self) -> HostInfo:
        d = dict(self._call("host_info"))
        d["defects"] = tuple(d.get("defects") or ())
        d["backend"] = BACKEND
        return HostInfo(**d)

    def tmem_version(self) -> int:
        return self._call("tmem_version")

    def tmem_free_pages(self) -> int:
        return self._call("tmem_free_pages")

    def guest_stats(self, domid: int) -> Dict[str, int]:
        return self._call("guest_stats", domid)

    def tmem_state(self, domid: int) -> Dict[str, Any]:
        return self._call("tmem_state", domid)

    def tmem_digest(self, domid: int) -> Dict[int, Tuple[int, str]]:
        return {k: (n, sha) for k, (n, sha) in self._call("tmem_digest", domid).items()}

    def ram_digest(self, domid: int) -> str:
        return self._call("ram_digest", domid)

    def ram_page_crcs(self, domid: int, pfns: Sequence[int],
                      out: Union[bytearray, memoryview, array[int]]) -> None:
        """As the interface: computed by the hypervisor process from its own
        mapping; the CRCs come back in the shared buffer."""
        op = "ram_page_crcs"
        with memoryview(out) as raw, raw.cast("B") as dst:
            if dst.nbytes < 4 * len(pfns):
                raise HypervisorError(op, f"a CRC buffer of {dst.nbytes} bytes cannot hold "
                                          f"{len(pfns)} CRCs")
            conn = self._acquire(op)
            try:
                n, _ = self._exchange(conn, op, op, (domid, [int(p) for p in pfns]))
                if n != len(pfns):
                    raise HypervisorError(op, f"{n} CRCs for {len(pfns)} pages")
                dst[:4 * n] = conn.view[:4 * n]
            finally:
                self._release(conn)

    def guest_heartbeat(self, domid: int) -> Tuple[int, int]:
        ns, count = self._call("guest_heartbeat", domid)
        return int(ns), int(count)

    def op_trace(self, start: int = 0) -> List[str]:
        return self._call("op_trace", start)

    def domain_uptime(self, domid: int) -> float:
        return self._call("domain_uptime", domid)

    def console_output(self, domid: int) -> str:
        return self._call("console_output", domid)

    def read_console_ring(self, clear: bool = False) -> str:
        return self._call("read_console_ring", clear)


# -- starting the process ------------------------------------------------------------

def options(settings: "HypervisorSettings", state_dir: str, trace: bool = False) -> ServeOptions:
    """The process options of a ``hypervisor:`` configuration section."""
    return ServeOptions(state_dir=os.path.abspath(state_dir), release=settings.xen_release,
                        defects=tuple(settings.defects), capacity_mb=settings.tmem_capacity_mb,
                        prealloc_mb=settings.tmem_prealloc_mb, seed=settings.seed, trace=trace)


_children: List["subprocess.Popen[bytes]"] = []   # ours to reap (it outlives xend's use)


def spawn(opts: ServeOptions, timeout: float = START_TIMEOUT_S) -> "subprocess.Popen[bytes]":
    """Start the hypervisor process detached (own session, output to its log) and
    wait until it answers. Returns its process (the caller may reap it by pid;
    it is kept here too so it is never collected while it runs). Another process
    that won the race for the state directory counts as started (the returned
    process has then exited). Raises HypervisorStartError."""
    _children[:] = [c for c in _children if c.poll() is None]
    os.makedirs(opts.state_dir, exist_ok=True)
    log_path = paths(opts.state_dir)[2]
    deadline = time.monotonic() + timeout
    try:
        child, text = spawn_detached("xend_tmem.hypervisor.server", opts.argv(), log_path,
                                     timeout, cwd="/")
    except OSError as exc:
        raise HypervisorStartError(f"cannot start the hypervisor process: "
                                   f"{exc.strerror or exc}"
                                   + (f": {exc.filename}" if exc.filename else "")) from None
    if text != READY and time.monotonic() < deadline:
        try:
            child.wait(timeout=5)        # it closed the pipe: it is exiting
        except subprocess.TimeoutExpired:
            pass
    if text == READY:
        _children.append(child)
        return child
    if "already running" in text:
        pid = running_pid(opts.state_dir)
        child.wait(timeout=10)
        if pid:
            return child
    if child.poll() is None:
        child.kill()                     # ours and useless: do not leave it behind
        child.wait()
        raise HypervisorStartError(f"the hypervisor process (pid {child.pid}) did not answer "
                                   f"within {timeout:.0f} s (killed); see {log_path}")
    if text.startswith("Error: "):
        raise HypervisorStartError(f"cannot start the hypervisor: {text[len('Error: '):]}")
    raise HypervisorStartError(f"the hypervisor process exited during start (status "
                               f"{child.returncode}); see {log_path}")


if TYPE_CHECKING:
    # what makes the client a backend: mypy checks it against the whole interface
    _IS_A_BACKEND: Type[Hypervisor] = HypervisorClient


def connect(settings: "HypervisorSettings", state_dir: str) -> HypervisorClient:
    """Backend ``sim``: the hypervisor process of ``state_dir``, started if none runs."""
    client = HypervisorClient(state_dir)
    try:
        identity = client.server_identity()
    except HypervisorError as exc:
        if exc.code != errno.ECONNRESET:
            raise
        pid = spawn(options(settings, state_dir)).pid
        log.info("started the hypervisor process (pid %d, Xen %s) for %s", pid,
                 settings.xen_release, client.state_dir)
        identity = client.server_identity()
    running = (identity.get("release"), tuple(identity.get("defects") or ()))
    wanted = (settings.xen_release, tuple(settings.defects))
    if running != wanted:
        log.warning("the running hypervisor (pid %s) imitates Xen %s%s; the configuration "
                    "asks for Xen %s%s: that takes effect after 'xend-tmem hypervisor stop'",
                    identity.get("pid"), running[0],
                    f" with defects {','.join(running[1])}" if running[1] else "",
                    wanted[0], f" with defects {','.join(wanted[1])}" if wanted[1] else "")
    return client
