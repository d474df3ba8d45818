"""The simulated hypervisor as a long-lived process of its own (``xend-tmem hypervisor``).

On Xen the hypervisor outlives the toolstack: restarting xend never touches a
guest. This process plays that part for the simulator: it holds a
:class:`~xend_tmem.hypervisor.sim.SimHypervisor` (domains, their RAM, tmem, the
guest workloads) and serves the :class:`~xend_tmem.hypervisor.interface.Hypervisor`
calls of any number of toolstack clients (:mod:`.client`) on a unix socket.

Files in the state directory: ``hypervisor.sock`` (the socket),
``hypervisor.pid`` (held under ``flock`` for the process's life: the lock on
the state directory, so two hypervisors never share one) and
``hypervisor.log``. The process runs in its own session (a terminal hang-up or
xend's death does not reach it) and stops on SIGTERM/SIGINT, destroying its
domains as a host shutdown would.

Transport (:mod:`.wire`): one marshal-encoded request per call. Each
connection starts with ``hello`` carrying a memfd (the connection's page
buffer, mapped by both sides): tmem page batches (``save_get_pages``,
``restore_put_pages``) and single pages of the guest ops are copied through it,
never in a message. ``memory_fd`` hands a domain's RAM memfd over with
``SCM_RIGHTS``; the client maps it and reads/writes RAM without a round trip
(Xen's foreign mapping).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import mmap
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from .. import errors as errors_mod
from ..detach import remove_stale_socket, report_ready
from ..pidlock import PidLock, lock_holder
from ..errors import HypervisorError, XendTmemError
from ..xen import OID_BYTES_V1, PAGE_SIZE
from . import wire
from .interface import Hypervisor

log = logging.getLogger("xend_tmem.hypervisor")

SOCKET_NAME = "hypervisor.sock"
PID_NAME = "hypervisor.pid"
LOG_NAME = "hypervisor.log"
PROTOCOL = 1
MIN_BUFFER = 1 << 20
MAX_BUFFER = 256 << 20
LOG_FORMAT = "[%(asctime)s %(process)d] %(levelname)s (%(name)s) %(message)s"
MAX_RECORD = PAGE_SIZE + OID_BYTES_V1 + 4   # a 4 KiB page's record with a three-word OID

# Calls that lend a buffer of the caller's own side: the client answers them itself
# (its shared buffers, or declining), they never cross the socket.
LENDING = frozenset({"save_pages_lending", "save_get_pages_held", "restore_lend_slots",
                     "restore_put_lent"})
# Every interface call a client may make, plus the RAM hand-over.
CALLS = frozenset(name for name in dir(Hypervisor)
                  if not name.startswith("_") and callable(getattr(Hypervisor, name))
                  and name != "close" and name not in LENDING) | {"memory_fd"}
# Calls that change domains: logged at INFO (the hypervisor's own record).
_LOGGED = frozenset({"create_domain", "create_domain_shell", "destroy_domain",
                     "rename_domain"})
_BUILTIN_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, KeyError, IndexError,
                                                  OverflowError)}


def paths(state_dir: str) -> Tuple[str, str, str]:
    """``(socket, pid file, log file)`` of the hypervisor of ``state_dir``."""
    return (os.path.join(state_dir, SOCKET_NAME), os.path.join(state_dir, PID_NAME),
            os.path.join(state_dir, LOG_NAME))


# -- the lock on the state directory --------------------------------------------

class AlreadyRunning(XendTmemError):
    """Another hypervisor process holds the state directory."""

    def __init__(self, pid: Optional[int], path: str) -> None:
        self.pid = pid
        super().__init__(f"the hypervisor is already running (pid {pid}, pid file {path})")


def running_pid(state_dir: str) -> Optional[int]:
    """The pid of the hypervisor holding ``state_dir``'s lock (-1 if unreadable), or None."""
    return lock_holder(paths(state_dir)[1])


# -- errors across the wire --------------------------------------------------------

def error_tuple(exc: BaseException) -> Tuple[str, str, Dict[str, Any], Tuple[Any, ...]]:
    """``(class name, message, attributes, args)``: enough to raise it again."""
    attrs: Dict[str, Any] = {}
    for key, value in vars(exc).items():
        try:
            wire.encode(value)
        except ValueError:
            continue
        attrs[key] = value
    try:
        wire.encode(exc.args)
        args: Tuple[Any, ...] = tuple(exc.args)
    except ValueError:
        args = (str(exc),)
    return type(exc).__name__, str(exc), attrs, args


def raise_error(method: str, err: Sequence[Any]) -> NoReturn:
    """Raise the exception a server reply describes, same type and text."""
    name, text, attrs, args = err
    cls = getattr(errors_mod, name, None)
    if isinstance(cls, type) and issubclass(cls, XendTmemError):
        exc: BaseException = cls.__new__(cls)
        Exception.__init__(exc, text)
        for key, value in attrs.items():
            setattr(exc, key, value)
        raise exc
    builtin = _BUILTIN_ERRORS.get(name)
    if builtin is not None:
        raise builtin(*args)
    raise RuntimeError(f"the hypervisor process failed in {method}: {name}: {text} "
                       f"(traceback in its log)")


# -- one client connection --------------------------------------------------------

class _Connection:
    """A client's connection and its shared page buffer."""

    def __init__(self, server: "HypervisorServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buf: Optional[mmap.mmap] = None
        self.view: Optional[memoryview] = None

    def run(self) -> None:
        try:
            self._hello()
            while True:
                try:
                    request, fds = wire.recv(self.sock)
                except (wire.ConnectionLost, OSError):
                    return
                wire.close_fds(fds)
                self._serve(request)
        except (wire.ConnectionLost, OSError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            self.close()

    def _hello(self) -> None:
        request, fds = wire.recv(self.sock)
        try:
            if (not isinstance(request, tuple) or len(request) != 2 or request[0] != "hello"
                    or len(fds) != 1):
                raise wire.ConnectionLost("the first message must be hello with one buffer fd")
            size = os.fstat(fds[0]).st_size
            if not MIN_BUFFER <= size <= MAX_BUFFER:
                raise wire.ConnectionLost(f"page buffer of {size} bytes (allowed "
                                          f"{MIN_BUFFER}..{MAX_BUFFER})")
            self.buf = mmap.mmap(fds[0], size)
            self.view = memoryview(self.buf)
        finally:
            wire.close_fds(fds)
        wire.send(self.sock, (wire.OK, self.server.identity))

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:       # a view still exported: dropped with the object
                pass
            self.buf = None
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.forget(self)

    def _serve(self, request: Any) -> None:
        if (not isinstance(request, tuple) or len(request) != 2 or not isinstance(request[0], str)
                or not isinstance(request[1], tuple)):
            raise wire.ConnectionLost("malformed request")
        method, args = request
        fds: List[int] = []
        try:
            if method not in CALLS:
                raise HypervisorError(method, "no such hypervisor call")
            handler = getattr(self, "_h_" + method, None)
            if handler is not None:
                result = handler(*args)
                if method == "memory_fd":
                    result, fds = result
            else:
                result = getattr(self.server.hv, method)(*args)
                if method in _LOGGED:
                    log.info("%s%r -> %r", method, _short(args), result)
            reply = (wire.OK, _plain(result))
        except Exception as exc:        # every failure goes back to the caller
            if not isinstance(exc, (XendTmemError, *_BUILTIN_ERRORS.values())):
                log.exception("%s failed", method)
            reply = (wire.ERR, error_tuple(exc))
        try:
            wire.send(self.sock, reply, fds)
        except ValueError as exc:       # a result marshal cannot carry: a bug, say so
            log.exception("%s: cannot send the reply", method)
            wire.send(self.sock, (wire.ERR, error_tuple(RuntimeError(str(exc)))))

    # -- calls whose pages travel through the buffer -------------------------------
    def _data(self, nbytes: int) -> memoryview:
        assert self.view is not None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) \
                or not 0 <= nbytes <= len(self.view):
            raise ValueError(f"buffer length {nbytes!r} is not 0..{len(self.view)}")
        return self.view[:nbytes]

    def _out(self, data: Optional[bytes], op: str) -> int:
        assert self.view is not None
        if data is None:
            return -1
        if len(data) > len(self.view):
            raise HypervisorError(op, f"a page of {len(data)} bytes does not fit the "
                                      f"connection's {len(self.view)}-byte buffer")
        self.view[:len(data)] = data
        return len(data)

    def _h_save_get_pages(self, domid: int, pool_id: int, max_pages: int,
                          with_crcs: bool = False) -> Tuple[int, int, int]:
        """Records into the shared buffer from offset 0; with ``with_crcs``
        their pages' CRC32s (u32 each) after room for ``max_pages`` records.
        Returns ``(count, record bytes, crc offset or -1)``."""
        assert self.view is not None
        hv = self.server.hv
        crc_off = -1
        crcs = None
        if isinstance(max_pages, int) and not isinstance(max_pages, bool) and max_pages > 0:
            rs = self.server.record_size(domid, pool_id)
            fit = len(self.view) // (rs + 4 if with_crcs else rs)
            if not fit:
                raise HypervisorError("SAVE_GET_PAGES", "a page does not fit the connection's "
                                                        f"{len(self.view)}-byte buffer")
            max_pages = min(max_pages, fit)
            if with_crcs:
                crc_off = (max_pages * rs + 3) & ~3
                crcs = self.view[crc_off:crc_off + 4 * max_pages]
        try:
            count, records = hv.save_get_pages(domid, pool_id, max_pages,
                                               out=self.view[:crc_off] if crcs is not None
                                               else self.view, crcs=crcs)
        finally:
            if crcs is not None:
                crcs.release()
        with memoryview(records) as got:
            return count, got.nbytes, crc_off

    def _h_restore_put_pages(self, domid: int, pool_id: int, nbytes: int, count: int,
                             crc_off: int = -1) -> None:
        """Records at offset 0 of the shared buffer; with ``crc_off`` >= 0 the
        ``count`` CRC32s their pages must have, from there."""
        if crc_off < 0:
            with self._data(nbytes) as records:
                self.server.hv.restore_put_pages(domid, pool_id, records, count)
            return
        assert self.view is not None
        if isinstance(crc_off, bool) or not isinstance(crc_off, int) or crc_off < nbytes \
                or isinstance(count, bool) or not isinstance(count, int) or count < 0 \
                or crc_off + 4 * count > len(self.view):
            raise ValueError(f"CRC offset {crc_off!r} for {count!r} records does not fit "
                             f"the {len(self.view)}-byte buffer")
        with self._data(nbytes) as records, self.view[crc_off:crc_off + 4 * count] as crcs:
            self.server.hv.restore_put_pages(domid, pool_id, records, count, crcs=crcs)

    def _h_ram_page_crcs(self, domid: int, pfns: Any) -> int:
        """The CRCs into the shared buffer (none in the reply); returns their count."""
        assert self.view is not None
        if not isinstance(pfns, (list, tuple)) or 4 * len(pfns) > len(self.view):
            what = len(pfns) if isinstance(pfns, (list, tuple)) else repr(pfns)
            raise HypervisorError("ram_page_crcs",
                                  f"{what} pfns do not fit the connection's buffer")
        with self.view[:4 * len(pfns)] as out:
            self.server.hv.ram_page_crcs(domid, pfns, out)
        return len(pfns)

    def _h_restore_put_page(self, domid: int, pool_id: int, oid: Any, index: int,
                            nbytes: int) -> None:
        with self._data(nbytes) as data:
            self.server.hv.restore_put_page(domid, pool_id, oid, index, data)

    def _h_guest_put(self, domid: int, pool_id: int, oid: Any, index: int, nbytes: int) -> bool:
        with self._data(nbytes) as data:
            stored: bool = self.server.hv.guest_put(domid, pool_id, oid, index, data)
            return stored

    def _h_guest_get(self, domid: int, pool_id: int, oid: Any, index: int) -> int:
        return self._out(self.server.hv.guest_get(domid, pool_id, oid, index), "guest_get")

    def _h_save_get_next_page(self, domid: int, pool_id: int) -> Optional[Tuple[Any, int, int]]:
        got = self.server.hv.save_get_next_page(domid, pool_id)
        if got is None:
            return None
        oid, index, data = got
        return tuple(oid), index, self._out(data, "SAVE_GET_NEXT_PAGE")

    def _h_memory_fd(self, domid: int) -> Tuple[int, List[int]]:
        fd = self.server.hv.memory_fd(domid)
        return os.fstat(fd).st_size, [fd]

    def _h_read_pages(self, domid: int, pfns: Any) -> None:
        raise HypervisorError("read_pages", "guest RAM is read through the client's mapping")

    def _h_write_pages(self, domid: int, pfns: Any, data: Any) -> None:
        raise HypervisorError("write_pages", "guest RAM is written through the client's mapping")


def _short(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a if not isinstance(a, dict) else {"name": a.get("name")} for a in args)


def _plain(value: Any) -> Any:
    """Results as plain types: dataclasses (DomainInfo, HostInfo) become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, memoryview):
        return bytes(value)
    return value


# -- the server ---------------------------------------------------------------------

class HypervisorServer:
    """Accepts clients on ``sock_path`` and serves each on a thread of its own."""

    def __init__(self, hv: Any, sock_path: str, identity: Dict[str, Any]) -> None:
        self.hv = hv
        self.sock_path = sock_path
        self.identity = identity
        self.stop_event = threading.Event()
        self._conns: List[_Connection] = []
        self._lock = threading.Lock()
        self.listener: Optional[socket.socket] = None

    def record_size(self, domid: int, pool_id: int) -> int:
        """Bytes of one ``save_get_pages`` record of that pool (its page size + header);
        a pool that does not exist gets the 4 KiB size and the call's own refusal."""
        try:
            with self.hv._lock:
                client = self.hv._domains[domid].client
                size: int = client.pools[pool_id].store.record_size
                return size
        except (AttributeError, KeyError, IndexError, TypeError):
            return MAX_RECORD

    def bind(self) -> None:
        _clear_stale_socket(self.sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            with wire.ShortPath(self.sock_path) as address:
                sock.bind(address)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.settimeout(0.25)
        self.listener = sock

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def serve(self) -> None:
        assert self.listener is not None
        while not self.stop_event.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stop_event.is_set():
                    break
                raise
            sock.settimeout(None)
            conn = _Connection(self, sock)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=conn.run, name="hv-conn", daemon=True).start()

    def close(self) -> None:
        """Stop listening and cut every client off (they see ECONNRESET)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.sock_path)
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _clear_stale_socket(path: str) -> None:
    with wire.ShortPath(path) as address:
        if remove_stale_socket(path, address):
            return                    # nobody listened: a dead hypervisor's leftover
    raise AlreadyRunning(None, path)


# -- the process ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What the hypervisor process is configured with (``hypervisor:`` section)."""

    state_dir: str
    release: str = "4.0.2"
    defects: Tuple[str, ...] = ()
    capacity_mb: int = 1024
    prealloc_mb: int = 0
    seed: Optional[int] = None
    trace: bool = False

    def argv(self) -> List[str]:
        """Command-line arguments of ``python -m xend_tmem.hypervisor.server``."""
        out = ["--state-dir", self.state_dir, "--release", self.release,
               "--capacity-mb", str(self.capacity_mb), "--prealloc-mb", str(self.prealloc_mb)]
        if self.defects:
            out += ["--defects", ",".join(self.defects)]
        if self.seed is not None:
            out += ["--seed", str(self.seed)]
        if self.trace:
            out.append("--trace")
        return out


def make_sim(opts: ServeOptions) -> Any:
    """The simulated hypervisor of the process: guests run as processes of their own."""
    from .sim import SimHypervisor
    return SimHypervisor(release=opts.release, defects=opts.defects,
                         tmem_capacity_pages=opts.capacity_mb * 256, seed=opts.seed,
                         tmem_prealloc_mib=min(opts.prealloc_mb, opts.capacity_mb),
                         trace=[] if opts.trace else None, guest_processes=True)


def _setup_logging(path: str) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def serve(opts: ServeOptions, ready: Optional[Callable[[Optional[str]], None]] = None) -> int:
    """Run the hypervisor until SIGTERM/SIGINT; ``ready(None)`` once it answers, or
    ``ready(error)`` if it cannot start. Returns the exit status."""
    sock_path, pid_path, log_path = paths(opts.state_dir)
    lock = PidLock(pid_path, lambda pid: AlreadyRunning(pid, pid_path))
    handler: Optional[logging.Handler] = None
    server: Optional[HypervisorServer] = None
    hv: Any = None
    report = ready or (lambda error: None)
    try:
        os.makedirs(opts.state_dir, exist_ok=True)
        lock.acquire()
        handler = _setup_logging(log_path)
        hv = make_sim(opts)
        started = time.time()
        hv.backend_name, hv.host_pid, hv.host_started = "sim", os.getpid(), started
        identity = {"protocol": PROTOCOL, "pid": os.getpid(), "started": started,
                    "release": hv.profile.release, "defects": tuple(hv.profile.defects)}
        server = HypervisorServer(hv, sock_path, identity)
        server.bind()
    except (XendTmemError, ValueError) as exc:
        report(str(exc))
        _finish(server, hv, lock, handler)
        return 1
    except OSError as exc:
        report(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        _finish(server, hv, lock, handler)
        return 1
    # Event.set takes the event's lock: safe in a handler here because the main
    # thread (where handlers run) only ever calls is_set, which takes no lock
    stop = server.stop_event.set
    signal.signal(signal.SIGTERM, lambda *_: stop())
    signal.signal(signal.SIGINT, lambda *_: stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info("hypervisor running: pid %d, Xen %s%s, tmem %d MiB, socket %s", os.getpid(),
             opts.release, f" with defects {','.join(opts.defects)}" if opts.defects else "",
             opts.capacity_mb, sock_path)
    report(None)
    try:
        server.serve()
    finally:
        log.info("hypervisor stopping")
        _finish(server, hv, lock, handler)
    return 0


def _finish(server: Optional[HypervisorServer], hv: Any, lock: PidLock,
            handler: Optional[logging.Handler]) -> None:
    if server is not None:
        server.close()
    if hv is not None:
        try:
            names = [f"{d.name} ({d.domid})" for d in hv.list_domains() if d.domid != 0]
            if names:
                log.info("destroying %d domains: %s", len(names), ", ".join(names))
            hv.close()                   # stops and reaps the guest processes
        except Exception:
            log.exception("stopping the guests failed")
    if handler is not None:
        log.info("hypervisor stopped")
        logging.getLogger().removeHandler(handler)
        handler.close()
    lock.release()


def _report_to(fd: Optional[int]) -> Callable[[Optional[str]], None]:
    def report(error: Optional[str]) -> None:
        report_ready(fd, f"Error: {error}" if error is not None else None)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xend_tmem.hypervisor.server",
                                description="The simulated hypervisor process.")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--release", default="4.0.2")
    p.add_argument("--defects", default="")
    p.add_argument("--capacity-mb", type=int, default=1024)
    p.add_argument("--prealloc-mb", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--trace", action="store_true", help="keep the tmem control-op trace")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = ServeOptions(state_dir=os.path.abspath(args.state_dir), release=args.release,
                        defects=tuple(d for d in args.defects.split(",") if d),
                        capacity_mb=args.capacity_mb, prealloc_mb=args.prealloc_mb,
                        seed=args.seed, trace=args.trace)
    return serve(opts, _report_to(args.ready_fd))


if __name__ == "__main__":
    sys.exit(main())
