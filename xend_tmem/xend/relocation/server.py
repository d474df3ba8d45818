"""The relocation server: the receiving end of migrations, run by the xend
daemon on ``xend-relocation-port`` (and its TLS port); the messages are
:mod:`.protocol`'s, the sending end is :mod:`.client`.

One thread per connection reads its control lines (a pre-flight, a query),
then at most one image, which it restores paused; it then plays the
receiver's half of the commit handshake (``received``, wait for ``go``,
unpause, ``running``). Each incoming migration (:class:`Incoming`) changes
state under the server's lock, so ``go`` and a query cannot both win, and is
journaled (:mod:`xend_tmem.xend.journal`) so a xend killed mid-way is ended
cleanly by the next ``xend start``. A stock sender (no pre-flight) gets xend's
behaviour: restore, run, close without a word.

Access control: ``xend-relocation-hosts-allow`` patterns must match the *whole*
peer address or host name (``re.fullmatch``; xend's ``re.match`` let
``^10\\.0\\.0\\.1`` admit 10.0.0.10). A host name counts only when forward-
confirmed: the reverse lookup's name must resolve back to the peer's address.
A rejected peer gets an ``(err ...)``.

Hostile peers: before ``receive`` a connection is in its control phase, which
has an overall deadline (:data:`CONTROL_DEADLINE_S`, however slowly bytes
trickle in) and small line limits (:data:`.protocol.MAX_OP_LINE`, a pre-flight
line :data:`.protocol.MAX_OFFER_LINE`); at most :data:`MAX_CONTROL_CONNECTIONS`
connections are in it at once (a new one evicts the oldest) and at most
:data:`MAX_RECEIVING` images stream in at once. Every malformed message gets an
``(err ...)`` reply and one log line.
"""
from __future__ import annotations

import io
import json
import logging
import socket
import ssl as ssl_mod
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Pattern, Sequence, Set, Tuple

from ... import integrity
from ...codec import sxp
from ...crc import crc32
from ...errors import PeerError, XendTmemError
from ...hypervisor.interface import Hypervisor
from .. import journal as jrn
from .protocol import (
    ABORTED, FRAME, INTEGRITY_FRAMES, IO_TIMEOUT_S, MAX_FRAME, MAX_JSON_DEPTH, MAX_LINE,
    MAX_MIGRATION_ID, MAX_OFFER_LINE, MAX_OP_LINE, PREFLIGHT_OP, PROTOCOL, QUERY_OP,
    RECORDS_FLAG, RECV_BUFFER, RUNNING, UNKNOWN, TlsSettings, check_fingerprint, err_line,
    form_line, json_depth, offer_problem, parse_reply, server_context, timeout_from_env)

# one logger for both ends of the protocol, named for the package
log = logging.getLogger("xend_tmem.xend.relocation")

MAX_CONTROL_CONNECTIONS = 64  # connections before "receive" at once (oldest evicted)
MAX_RECEIVING = 8             # images streaming in at once
MAX_OPS = 16                  # control operations per connection before "receive"
MAX_REMEMBERED = 256          # finished incoming migrations a query can still ask about

# receiver: no "go" this long after "received": abort
GO_TIMEOUT_S = timeout_from_env("XEND_TMEM_TEST_GO_TIMEOUT_S", 60.0)
STARTING_WAIT_S = 30.0       # a query waits this long for a start in progress
CONTROL_DEADLINE_S = 30.0    # from accept to "receive" (or the last answer), at most
SWEEP_EVERY_S = 1.0           # the accept loop looks for connections past that deadline
SWEEP_GRACE_S = 5.0
DRAIN_AFTER_ERROR_S = 2.0     # let the sender read our (err ...) before we close
GUEST_BEAT_WAIT_S = 2.0       # receiver: the guest's first beat after unpause, at most

# restore(stream, peer, paused=..., on_created=..., page_check=...) -> (domid, report)
RestoreFn = Callable[..., Tuple[int, Dict[str, Any]]]
CheckFn = Callable[[Dict[str, Any]], List[str]]
DiscardFn = Callable[[int], None]

# states of an incoming migration (the receiver's side of the handshake)
STREAMING = "streaming"
AWAITING_GO = "awaiting-go"
STARTING = "starting"        # go arrived, unpausing


# -- access control (xend-relocation-hosts-allow) -----------------------------

def host_allowed(patterns: Sequence[Pattern[str]], address: str,
                 names: Optional[Callable[[str], List[str]]] = None) -> bool:
    """Does any pattern match the whole address, or one of its forward-confirmed
    host names (``names``: the lookup, :func:`confirmed_names` by default)?"""
    if not patterns:
        return True
    if any(p.fullmatch(address) for p in patterns):
        return True
    lookup = names or confirmed_names
    return any(p.fullmatch(n) for n in lookup(address) for p in patterns)


def _plain_address(address: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``; a scope id dropped."""
    address = address.split("%", 1)[0]
    return address[7:] if address.lower().startswith("::ffff:") and "." in address else address


def reverse_names(address: str) -> List[str]:
    """The reverse lookup's name and aliases (unconfirmed: anyone's reverse zone
    can claim any name)."""
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except (OSError, UnicodeError):
        return []
    return [name, *aliases]


def confirmed_names(address: str) -> List[str]:
    """Host names of ``address`` that resolve back to it (forward-confirmed
    reverse DNS): only those may match a hosts-allow pattern."""
    want = _plain_address(address)
    out: List[str] = []
    for name in reverse_names(address)[:8]:
        try:
            infos = socket.getaddrinfo(name, None)
        except (OSError, UnicodeError):
            continue
        if any(_plain_address(str(info[4][0])) == want for info in infos):
            out.append(name)
    return out


# -- the server and its incoming migrations -----------------------------------

class Incoming:
    """One incoming migration with a pre-flight; its state changes under the
    server's lock so ``go`` and a query cannot both win."""

    def __init__(self, migration_id: str, peer: str, name: str) -> None:
        self.migration_id = migration_id
        self.peer = peer
        self.name = name
        self.state = STREAMING
        self.domid: Optional[int] = None
        self.entry: Optional[jrn.Entry] = None


class _FramedReader:
    """The framed image as a file that ends at the zero-length frame.

    With ``crc`` (``crc32-frames`` negotiated) each frame carries the CRC32 of
    its bytes after them, and frames whose length has the top bit set carry
    page checksum records (:mod:`xend_tmem.integrity`) for ``page_check``
    rather than image bytes. A data frame is read whole and checked before any
    of it is handed out; one that fails its CRC is noted in ``page_check`` and
    still delivered, so the page it holds is named when its own checksum
    fails (the restore fails before the domain ever runs)."""

    def __init__(self, rfile: io.BufferedIOBase, peer: str, crc: bool = False) -> None:
        self.rfile = rfile
        self.peer = peer
        self.left = 0
        self.ended = False
        self.crc = crc
        self.page_check: Optional[integrity.PageCheck] = \
            integrity.PageCheck(source="the migration stream's checksums") if crc else None
        self._buf = memoryview(b"")
        self._frames = 0
        self._offset = 0          # image bytes handed out
        self.ended_at: Optional[float] = None   # when the end frame arrived (restore_ms)

    def _exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise ConnectionError(f"connection from {self.peer} lost in the middle of the image")
        return data

    def _next_frame(self) -> bool:
        """Read frames until one with image bytes; False at the end frame."""
        while True:
            (n,) = FRAME.unpack(self._exact(FRAME.size))
            if n == 0:
                self.ended = True
                self.ended_at = time.monotonic()
                return False
            records = bool(self.crc and n & RECORDS_FLAG)
            n &= ~RECORDS_FLAG if self.crc else 0xFFFFFFFF
            if n > MAX_FRAME:
                raise PeerError(f"image frame of {n} bytes from {self.peer} (at most {MAX_FRAME})")
            if not self.crc:
                self.left = n
                return True
            body = self._exact(n)
            (want,) = FRAME.unpack(self._exact(FRAME.size))
            self._frames += 1
            assert self.page_check is not None
            if records:
                if crc32(body) != want:
                    raise integrity.IntegrityError(
                        f"page checksum frame {self._frames} from {self.peer} failed its "
                        "CRC32: the stream was corrupted in transit")
                self.page_check.add_expected(body)
                continue
            if crc32(body) != want:
                self.page_check.frame_bad(
                    f"frame {self._frames}, image bytes {self._offset}..{self._offset + n - 1}, "
                    "failed its CRC32")
            self._buf = memoryview(body)
            return True

    def readinto(self, buf: Any) -> int:
        mv = memoryview(buf).cast("B")
        if self.ended or not mv.nbytes:
            return 0
        if self.crc:
            if not self._buf.nbytes and not self._next_frame():
                return 0
            got = min(mv.nbytes, self._buf.nbytes)
            mv[:got] = self._buf[:got]
            self._buf = self._buf[got:]
            self._offset += got
            return got
        if not self.left and not self._next_frame():
            return 0
        got = self.rfile.readinto(mv[:min(self.left, mv.nbytes)])
        if not got:
            raise ConnectionError(f"connection from {self.peer} lost in the middle of the image")
        self.left -= got
        self._offset += got
        return got

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, n) if n >= 0 else 1 << 16)
        got = self.readinto(buf)
        return bytes(buf[:got])


class RelocationServer:
    """Listens for migrations and restores them; one thread per connection.

    :param restore: ``restore(stream, peer, paused=bool, on_created=fn) ->
        (domid, report)``: builds the domain from the image on ``stream``,
        calling ``on_created(domid)`` as soon as it exists; raises on failure
        having removed it. ``paused`` True (a sender that speaks the commit
        handshake) leaves it paused for ``go``.
    :param check_offer: the receiving host's answer to a pre-flight offer: a list
        of reasons to refuse (empty = accept).
    :param discard: removes a restored domain that must not run here.
    :param unpause: starts a restored domain once ``go`` arrived.
    :param journal: where incoming migrations are journaled (None: not at all).
    :param restore_cost: this host's expected restore-finishing work for an
        accepted offer, in ms (end of image -> restored: plugins' checks such as
        tmem-digest's hashing); the pre-flight answer carries it as
        ``(restore-ms N)`` so the sender's downtime estimate includes it.
    """

    def __init__(self, address: str, port: int, *, hosts_allow: Sequence[Pattern[str]],
                 restore: RestoreFn, check_offer: CheckFn, discard: DiscardFn,
                 unpause: Optional[DiscardFn] = None, journal: Optional[jrn.Journal] = None,
                 ssl_context: Optional[ssl_mod.SSLContext] = None,
                 io_timeout: float = IO_TIMEOUT_S, go_timeout: float = GO_TIMEOUT_S,
                 tls: Optional[TlsSettings] = None, peer_fingerprint: Optional[str] = None,
                 max_connections: Optional[int] = None,
                 control_deadline: Optional[float] = None,
                 hv: Optional[Hypervisor] = None,
                 restore_cost: Optional[Callable[[Dict[str, Any]], float]] = None) -> None:
        self.hv = hv
        self.restore_cost = restore_cost
        if tls is not None and ssl_context is None:
            ssl_context = server_context(tls)
        self.peer_fingerprint = peer_fingerprint or (tls.peer_fingerprint if tls else None)
        self.max_connections = max_connections or MAX_CONTROL_CONNECTIONS
        self.control_deadline = control_deadline or CONTROL_DEADLINE_S
        self.hosts_allow = list(hosts_allow)
        self.restore = restore
        self.check_offer = check_offer
        self.discard = discard
        self.unpause = unpause
        self.journal = journal
        self.ssl_context = ssl_context
        self.io_timeout = io_timeout
        self.go_timeout = go_timeout
        self.op = "sslreceive" if ssl_context is not None else "receive"
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # a bounded receive queue (inherited by accepted connections): what the
            # sender wrote and this host has not read yet is downtime if the source
            # suspends then, and the sender can neither see nor drain this queue
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            self._sock.bind((address, port))
            self._sock.listen(min(socket.SOMAXCONN, 1024))   # a burst of peers is not dropped
        except OSError:
            self._sock.close()
            raise
        self.address = address
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)    # an incoming's state moved
        self._conns: Set[socket.socket] = set()
        # connections still in their control phase, oldest first (evictable)
        self._control: "OrderedDict[socket.socket, float]" = OrderedDict()
        self._receiving = 0
        self._threads: Set[threading.Thread] = set()
        self._accept_thread: Optional[threading.Thread] = None
        self._migrations: "OrderedDict[str, Incoming]" = OrderedDict()

    def bind(self, *, unpause: DiscardFn, journal: Optional[jrn.Journal],
             hv: Optional[Hypervisor] = None) -> None:
        """The daemon's service supplies how to start a domain, its journal and
        its hypervisor (read for the guest's heartbeat, ``guest_downtime_ms``)."""
        self.unpause = unpause
        self.journal = journal
        if hv is not None:
            self.hv = hv

    def last_beat(self, domid: int) -> Tuple[int, int]:
        """The restored guest's last heartbeat ``(ns, count)`` (``(0, 0)``: no
        hypervisor bound, or a guest that never beats)."""
        if self.hv is None:
            return (0, 0)
        try:
            ns, count = self.hv.guest_heartbeat(domid)
        except (XendTmemError, OSError) as exc:
            log.debug("relocation: no heartbeat of domain %d: %s", domid, exc)
            return (0, 0)
        return int(ns), int(count)

    def guest_gap(self, domid: int, beat: Tuple[int, int]) -> Optional[float]:
        """The guest's own downtime: its last beat before the move to its first
        beat here (:func:`xend_tmem.heartbeat.guest_gap_ms`); None if it did
        not beat within :data:`GUEST_BEAT_WAIT_S`."""
        from ...heartbeat import guest_gap_ms
        if self.hv is None or beat[0] <= 0:
            return None
        try:
            return guest_gap_ms(self.hv, domid, beat[0], GUEST_BEAT_WAIT_S, beat[1])
        except (XendTmemError, OSError) as exc:
            log.debug("relocation: no heartbeat of domain %d after unpause: %s", domid, exc)
            return None

    def start(self) -> None:
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"relocation:{self.port}")
        self._accept_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, break open connections (their restores fail and are
        removed; copies awaiting ``go`` are destroyed), and wait for the
        connection threads."""
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads + ([self._accept_thread] if self._accept_thread else []):
            t.join(max(0.0, deadline - time.monotonic()))

    def _sweep(self) -> None:
        """Shut connections still in their control phase well past its deadline
        (a TLS handshake trickling in is bounded only here)."""
        late = time.monotonic() - self.control_deadline - SWEEP_GRACE_S
        with self._lock:
            stale = [c for c, t in self._control.items() if t < late]
        for conn in stale:
            log.debug("relocation: closing a connection past its control deadline")
            _shutdown(conn)

    def _accept_loop(self) -> None:
        self._sock.settimeout(SWEEP_EVERY_S)
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                self._sweep()
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            evicted: List[socket.socket] = []
            with self._lock:
                while len(self._control) >= self.max_connections:
                    old, _ = self._control.popitem(last=False)
                    evicted.append(old)
                self._conns.add(conn)
                self._control[conn] = time.monotonic()
            for old in evicted:
                # its thread sees the connection end and finishes quietly
                log.debug("relocation: %d connections before receive: evicting the oldest",
                          self.max_connections)
                _shutdown(old)
            t = threading.Thread(target=self._serve, args=(conn, addr[0]), daemon=True,
                                 name=f"relocation-peer:{addr[0]}")
            with self._lock:
                self._threads.add(t)
            try:
                t.start()
            except RuntimeError as exc:       # no thread left: drop this one
                log.warning("relocation: connection from %s dropped: %s", addr[0], exc)
                with self._lock:
                    self._threads.discard(t)
                    self._conns.discard(conn)
                    self._control.pop(conn, None)
                conn.close()

    def left_control(self, raw: socket.socket) -> bool:
        """The connection starts streaming an image: no longer evictable. False
        when it was evicted meanwhile or too many images stream in already."""
        with self._lock:
            if self._control.pop(raw, None) is None:
                return False
            if self._receiving >= MAX_RECEIVING:
                return False
            self._receiving += 1
            return True

    def _serve(self, raw: socket.socket, peer: str) -> None:
        conn = raw
        deadline = time.monotonic() + self.control_deadline
        receiving = [False]
        try:
            conn.settimeout(min(self.io_timeout, self.control_deadline))
            if not host_allowed(self.hosts_allow, peer):
                log.warning("relocation: rejected connection from %s (xend-relocation-hosts-allow)",
                            peer)
                self._send_quietly(conn, err_line(
                    "PermissionDenied",
                    f"host {peer} is not allowed by xend-relocation-hosts-allow"))
                _drain(conn)
                return
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
                try:
                    check_fingerprint(conn, self.peer_fingerprint, f"client {peer}")
                except PeerError as exc:
                    log.warning("relocation: rejected TLS connection from %s: %s", peer, exc)
                    self._send_quietly(conn, err_line("PermissionDenied", str(exc)))
                    return
            _Receiver(self, conn, peer, deadline, raw, receiving).run()
        except (OSError, ssl_mod.SSLError) as exc:
            log.warning("relocation: connection from %s lost: %s", peer, exc)
        except Exception:
            log.exception("relocation: connection from %s failed", peer)
        finally:
            for sock in {conn, raw}:
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(raw)
                self._control.pop(raw, None)
                if receiving[0]:
                    self._receiving -= 1
                self._threads.discard(threading.current_thread())

    @staticmethod
    def _send_quietly(conn: socket.socket, data: bytes) -> None:
        try:
            conn.sendall(data)
        except OSError:
            pass

    # -- incoming migrations (the receiver's half of the handshake) -------------------
    def begin_incoming(self, migration_id: str, peer: str, name: str) -> Incoming:
        inc = Incoming(migration_id, peer, name)
        if self.journal is not None:
            inc.entry = self.journal.begin(jrn.MIGRATE_IN, migration=migration_id, peer=peer,
                                           domain=name, phase=STREAMING)
        with self._lock:
            self._migrations[migration_id] = inc
            while len(self._migrations) > MAX_REMEMBERED:
                oldest = next(iter(self._migrations.values()))
                if oldest.state not in (RUNNING, ABORTED):
                    break
                self._migrations.popitem(last=False)
        return inc

    def created(self, inc: Incoming, domid: int) -> None:
        """The restore made its domain: journal the id before anything else."""
        with self._lock:
            inc.domid = domid
            aborted = inc.state == ABORTED
        if inc.entry is not None:
            inc.entry.update(domid=domid)
        if aborted:
            raise PeerError(f"migration {inc.migration_id} was aborted here by a query")

    def restored(self, inc: Incoming, domid: int) -> bool:
        """The image is in, the domain paused: now awaiting ``go``. ``False``
        if a query aborted the migration meanwhile (the copy is destroyed)."""
        with self._lock:
            inc.domid = domid
            ready = inc.state == STREAMING
            if ready:
                inc.state = AWAITING_GO
        if ready:
            if inc.entry is not None:
                inc.entry.update(phase=AWAITING_GO, domid=domid)
            return True
        self.discard(domid)      # a query aborted it while it streamed
        return False

    def go(self, inc: Incoming) -> bool:
        """``go`` arrived: start the domain unless a query aborted it first.

        A query arriving while it starts waits for the outcome; if the start
        fails the copy is destroyed (the source, told so, resumes its own)."""
        with self._changed:
            if inc.state != AWAITING_GO:
                return False
            inc.state = STARTING
        try:
            if inc.entry is not None:
                inc.entry.update(phase="go")
            jrn.killpoint("incoming-go")
            if self.unpause is None or inc.domid is None:
                raise XendTmemError("relocation server cannot start domains (not bound to xend)")
            self.unpause(inc.domid)
        except BaseException:
            with self._changed:
                inc.state = ABORTED
                self._changed.notify_all()
            self._destroy_copy(inc, "it could not be started")
            raise
        with self._changed:
            inc.state = RUNNING
            self._changed.notify_all()
        log.info("relocation: domain %s (%s) cleared by %s: running here", inc.name,
                 inc.domid, inc.peer)
        return True

    def settle(self, inc: Incoming) -> None:
        """After ``running`` went out: remember the outcome for later queries and
        drop the journal entry. Kept out of the downtime: until it is done a
        query is answered from memory, and a crash before it leaves the entry in
        phase ``go``, which the next start completes (the domain runs here)."""
        if self.journal is not None:
            self.journal.record_outcome(inc.migration_id, RUNNING)
        if inc.entry is not None:
            inc.entry.remove()

    def abort(self, inc: Incoming, why: str) -> bool:
        """No ``go`` (or a failure): destroy the copy unless it already runs."""
        with self._lock:
            if inc.state in (STARTING, RUNNING, ABORTED):
                return inc.state == ABORTED
            inc.state = ABORTED
        self._destroy_copy(inc, why)
        return True

    def _destroy_copy(self, inc: Incoming, why: str) -> None:
        if inc.domid is not None:
            log.warning("relocation: destroying domain %s (%d) from %s: %s", inc.name,
                        inc.domid, inc.peer, why)
            self.discard(inc.domid)
        if self.journal is not None:
            self.journal.record_outcome(inc.migration_id, ABORTED)
        if inc.entry is not None:
            inc.entry.remove()

    def resolve(self, migration_id: str) -> str:
        """A query: ``running``, ``aborted`` (a copy awaiting ``go`` is destroyed
        now, atomically with respect to ``go``) or ``unknown``."""
        with self._changed:
            inc = self._migrations.get(migration_id)
            if inc is not None:
                self._changed.wait_for(lambda: inc.state != STARTING, STARTING_WAIT_S)
            if inc is not None and inc.state in (STREAMING, AWAITING_GO):
                inc.state = ABORTED
                destroy = True
            else:
                destroy = False
        if inc is not None:
            if destroy:
                self._destroy_copy(inc, "the source asked and had no answer to go")
                return ABORTED
            return inc.state if inc.state in (RUNNING, ABORTED) else UNKNOWN
        if self.journal is not None:
            known = self.journal.outcome(migration_id)
            if known in (RUNNING, ABORTED):
                return known
        return UNKNOWN


# -- one connection: control lines, then at most one image --------------------

class _ControlLineError(Exception):
    """The control phase ends: the reason goes to the peer as ``(err ...)``."""


class _Receiver:
    """One incoming connection: control lines, then at most one image."""

    def __init__(self, server: RelocationServer, conn: socket.socket, peer: str,
                 deadline: Optional[float] = None, raw: Optional[socket.socket] = None,
                 receiving: Optional[List[bool]] = None) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.deadline = deadline if deadline is not None else \
            time.monotonic() + server.control_deadline
        self.raw = raw if raw is not None else conn
        self.receiving = receiving if receiving is not None else [False]
        self.rfile = conn.makefile("rb")
        self.extended = False
        self.integrity: List[str] = []
        self.migration_id = ""
        self.name = ""

    def _malformed(self, what: str) -> None:
        """One log line and an ``(err ...)`` for a message we cannot act on."""
        log.warning("relocation: malformed message from %s: %s", self.peer, what)
        self._send(err_line("Error", what))

    def _control_line(self) -> bytes:
        """The next control line, bounded in size (:data:`MAX_OP_LINE`, a
        pre-flight :data:`MAX_OFFER_LINE`) and in time (the control deadline,
        however slowly it trickles in). b'' at a clean end of the connection."""
        got = bytearray()
        limit = MAX_OP_LINE
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _ControlLineError(
                    f"no complete request within {self.server.control_deadline:.0f} s")
            self.conn.settimeout(min(self.server.io_timeout, left))
            try:
                data = self.rfile.peek(1)[:limit + 1 - len(got)]
            except socket.timeout:
                continue
            if not data:
                if got:
                    raise _ControlLineError("connection ended inside a request")
                return b""
            nl = data.find(b"\n")
            take = len(data) if nl < 0 else nl + 1
            got += self.rfile.read(take)
            if nl >= 0:
                return bytes(got)
            if limit == MAX_OP_LINE and got.lstrip().startswith(b"(" + PREFLIGHT_OP.encode()):
                limit = MAX_OFFER_LINE
            if len(got) > limit:
                raise _ControlLineError(f"control line too long (at most {limit} bytes)")

    def run(self) -> None:
        try:
            for _ in range(MAX_OPS):
                try:
                    raw = self._control_line()
                except _ControlLineError as exc:
                    log.warning("relocation: connection from %s ended: %s", self.peer, exc)
                    self._send_quietly(err_line("Error", str(exc)))
                    return
                if not raw:
                    return
                if not raw.strip():
                    continue
                try:
                    form = sxp.parse(raw.decode("utf-8"), comments=False)
                except (UnicodeDecodeError, XendTmemError, RecursionError) as exc:
                    reason = exc.reason if isinstance(exc, UnicodeDecodeError) else exc
                    self._malformed(f"cannot parse request: {reason}")
                    continue
                op = form[0] if isinstance(form, list) and form else form
                if op == self.server.op:
                    self._receive()
                    return
                if op == PREFLIGHT_OP:
                    self._preflight(form)
                elif op == QUERY_OP:
                    self._query(form)
                elif op == "quit":
                    return
                else:
                    self._malformed(f"Invalid operation {str(op)[:64]}")
            self._malformed("too many operations on one connection")
        finally:
            self.rfile.close()

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def _preflight(self, form: Any) -> None:
        raw = sxp.child_value(form, "offer")
        if not isinstance(raw, str):
            self._malformed("malformed pre-flight offer: (xend-tmem-preflight (offer JSON))")
            return
        if json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            self._malformed(f"malformed pre-flight offer: nested deeper than {MAX_JSON_DEPTH}")
            return
        try:
            offer = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            self._malformed(f"malformed pre-flight offer: not JSON ({str(exc)[:80]})")
            return
        problem = offer_problem(offer)
        if problem is not None:
            self._malformed(f"malformed pre-flight offer: {problem}")
            return
        mid = offer["migration"]
        try:
            reasons = list(self.server.check_offer(offer))
        except XendTmemError as exc:
            reasons = [str(exc)]
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            self._malformed(f"malformed pre-flight offer: {type(exc).__name__}: "
                            f"{str(exc)[:80]}")
            return
        name = offer["domain"].get("name")
        if reasons:
            log.info("relocation: refused %s from %s: %s", name, self.peer, "; ".join(reasons))
            self._send(form_line(["refused", *(["reason", r] for r in reasons)]))
            return
        self.extended = True
        self.migration_id = mid
        self.name = str(name or "")
        wanted = offer.get("integrity") or []
        self.integrity = [INTEGRITY_FRAMES] if INTEGRITY_FRAMES in wanted else []
        answer: List[Any] = ["ok", ["protocol", str(PROTOCOL)]]
        if self.integrity:
            answer.append(["integrity", *self.integrity])
        cost = self._restore_cost(offer)
        if cost is not None:
            answer.append(["restore-ms", f"{cost:.1f}"])
        self._send(form_line(answer))

    def _restore_cost(self, offer: Dict[str, Any]) -> Optional[float]:
        """This host's expected end of image -> restored time for the offer
        (None: not known); a failing estimate never fails the pre-flight."""
        if self.server.restore_cost is None:
            return None
        try:
            cost = float(self.server.restore_cost(offer))
        except (XendTmemError, TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("relocation: no restore estimate for %s: %s", self.name, exc)
            return None
        return cost if cost >= 0 and cost == cost and cost < 1e9 else None

    def _query(self, form: Any) -> None:
        mid = sxp.child_value(form, "migration")
        if not isinstance(mid, str) or not 0 < len(mid) <= MAX_MIGRATION_ID:
            self._malformed("a query names a migration: (xend-tmem-query (migration ID))")
            return
        answer = self.server.resolve(mid)
        log.info("relocation: %s asked about migration %s: %s", self.peer, mid, answer)
        self._send(form_line([answer]))

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, XendTmemError):
            message = str(exc)
        elif isinstance(exc, OSError):
            message = f"connection from {self.peer} lost: {exc.strerror or exc}"
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
        if not isinstance(exc, (XendTmemError, OSError)):
            log.error("relocation: restore from %s failed", self.peer, exc_info=exc)
        else:
            log.warning("relocation: restore from %s failed: %s", self.peer, message)
        try:
            self._send(err_line(type(exc).__name__, message))
        except OSError:
            return
        _drain(self.conn)

    def _receive(self) -> None:
        if not self.server.left_control(self.raw):
            self._malformed(f"too many migrations in progress here (at most {MAX_RECEIVING}) "
                            "or the connection was evicted: retry later")
            return
        self.receiving[0] = True
        self.conn.settimeout(self.server.io_timeout)
        self._send(form_line(["ready", self.server.op]))
        log.info("relocation: receiving a domain from %s", self.peer)
        if not self.extended:
            self._receive_stock()
            return
        server = self.server
        inc = server.begin_incoming(self.migration_id, self.peer, self.name)
        try:
            reader = _FramedReader(self.rfile, self.peer,
                                   crc=INTEGRITY_FRAMES in self.integrity)
            domid, report = server.restore(reader, self.peer,
                                           paused=True,
                                           on_created=lambda d: server.created(inc, d),
                                           page_check=reader.page_check)
        except Exception as exc:  # noqa: BLE001 - any failed restore: copy gone, peer told
            server.abort(inc, "its restore failed")
            self._fail(exc)
            return
        restored_at = time.monotonic()
        report = dict(report)
        if reader.ended_at is not None:
            # the part of the downtime this host spent: end of image -> restored, paused
            report["restore_ms"] = round((restored_at - reader.ended_at) * 1000.0, 3)
        # the image's last heartbeat, read while the restored guest cannot beat
        # (it stays stopped until unpause), so nothing is read between go and running
        beat = server.last_beat(domid)
        if not server.restored(inc, domid):
            self._send_quietly(err_line("Error", f"migration {inc.migration_id} was aborted "
                                                 "here by a query"))
            return
        try:
            self._send(form_line(["received", ["domid", str(domid)]]))
            jrn.killpoint("incoming-received")
            reply = self._read_go()
        except (OSError, PeerError) as exc:
            if server.abort(inc, f"no go from {self.peer} ({exc})"):
                log.warning("relocation: domain %s (%d) from %s destroyed here: %s; the "
                            "source keeps it", inc.name, domid, self.peer, exc)
            return
        if reply != ["go"]:
            what = "connection closed" if reply is None else f"got {sxp.to_string(reply)}"
            server.abort(inc, f"no go from {self.peer} ({what})")
            self._send_quietly(err_line("Error", f"expected (go), {what}: domain destroyed here"))
            return
        try:
            started = server.go(inc)
        except Exception as exc:  # noqa: BLE001 - any failed start: copy gone, peer told
            log.error("relocation: domain %s (%d) from %s could not be started: %s",
                      inc.name, domid, self.peer, exc)
            self._send_quietly(err_line(type(exc).__name__, f"cannot start domain {inc.name} "
                                        f"({domid}) here: {exc}; the copy here was destroyed"))
            return
        if not started:
            self._send_quietly(err_line("Error", f"migration {inc.migration_id} was aborted "
                                                 "here by a query: domain destroyed here"))
            return
        try:
            self._send(form_line(["running", ["report", json.dumps(report, sort_keys=True,
                                                               default=str)]]))
        except OSError as exc:
            log.warning("relocation: domain %s runs here; telling %s failed: %s", inc.name,
                        self.peer, exc)
            return
        finally:
            server.settle(inc)
        # after running (which it never delays): how long the guest itself saw
        # no time pass, from its heartbeat; the source waits briefly for this
        gap = server.guest_gap(domid, beat)
        form: List[Any] = ["guest"]
        if gap is not None:
            form.append(["downtime_ms", f"{gap:.3f}"])
            log.info("relocation: domain %s (%d): the guest noticed %.3f ms of downtime",
                     inc.name, domid, gap)
        self._send_quietly(form_line(form))

    def _read_go(self) -> Optional[List[Any]]:
        self.conn.settimeout(self.server.go_timeout)
        try:
            raw = self.rfile.readline(MAX_LINE + 1)
        except socket.timeout:
            raise PeerError(f"no go within {self.server.go_timeout:.0f} s") from None
        if not raw:
            return None
        return parse_reply(raw, self.peer)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self._send(data)
        except OSError:
            pass

    def _receive_stock(self) -> None:
        """A sender without pre-flight: restore and run, close silently (xend)."""
        server = self.server
        entry = (server.journal.begin(jrn.MIGRATE_IN, migration="", peer=self.peer, domain="",
                                      phase=STREAMING) if server.journal is not None else None)
        try:
            if server.unpause is None:
                server.restore(self.rfile, self.peer, paused=False, on_created=None)
                return
            domid, _ = server.restore(self.rfile, self.peer, paused=True,
                                      on_created=(lambda d: entry.update(domid=d))
                                      if entry else None)
            # The stock protocol has no commit: once the image is in, the
            # domain is this host's (the sender destroys its copy at our close,
            # and our death closes too), so it is started here, even by recovery.
            if entry is not None:
                entry.update(phase="restored")
            server.unpause(domid)
        except Exception as exc:  # noqa: BLE001 - any failure goes to the peer as (err ...)
            self._fail(exc)
        finally:
            if entry is not None:
                entry.remove()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _drain(conn: socket.socket) -> None:
    """After an ``(err ...)``: read what the sender still pushes for a moment.

    Closing a socket with unread data makes the kernel send a reset, which can
    destroy our error line before the sender reads it.
    """
    deadline = time.monotonic() + DRAIN_AFTER_ERROR_S
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.2)
    except OSError:
        return
    while time.monotonic() < deadline:
        try:
            if not conn.recv(1 << 16):
                return
        except socket.timeout:
            continue
        except OSError:
            return


__all__ = ["RelocationServer", "Incoming", "host_allowed", "confirmed_names"]
