"""xend's relocation protocol (SPEC §6): migration between daemons over TCP.

Stock protocol, unchanged::

    sender:   receive\\n                      (TLS port: sslreceive\\n)
    receiver: (ready receive)\\n              ((ready sslreceive)\\n)
    sender:   the xend image (SPEC §1), then closes its sending side
    receiver: on failure (err (type T) (value 'message')) and closes;
              on success xend closed without a word

Extensions, all invisible to a stock xend on either end:

* **Pre-flight.** Before ``receive`` -- before the source is renamed, frozen or
  suspended -- the sender asks::

      (xend-tmem-preflight (offer "<JSON>"))\\n

  where the JSON is ``{"protocol": 2, "migration": "<uuid>", "domain": {...},
  "node": N, "live": bool, "plugins": {plugin_name: facts}}`` (``facts`` from
  the plugins' ``checkpoint_migrate_offer``). The receiver answers
  ``(ok (protocol 2))`` or ``(refused (reason "...") ...)``: it refuses a domain
  carrying state of a plugin it has not enabled, and whatever its plugins'
  ``checkpoint_migrate_check`` refuses (tmem spec version, room). A stock xend
  answers an unknown operation with ``(err ...)`` and keeps reading, so the
  sender goes on with plain ``receive`` and no extension; if the connection
  closes instead (xend drops a host its hosts-allow rejects), that first error
  is what the sender reports.
* **Framed image.** After an accepted pre-flight the image travels in frames
  (u32 big-endian length, then that many bytes; length 0 ends the image), so
  the connection stays open both ways for the commit handshake (and over TLS
  no close_notify is needed to end the image).
* **Commit handshake** (xl's "domain received, ready to unpause" / "domain is
  yours, you are cleared to unpause" / "my copy unpause results")::

      receiver: (received (domid N))\\n        image restored, domain paused
      sender:   (go)\\n                         journaled first, sent at once
      receiver: (running (report "<JSON>"))\\n  unpaused; its restore's figures

  The receiver unpauses only on ``go``; without it (connection lost, or no
  ``go`` within its timeout) it destroys its copy. The sender's done phase
  (tmem's SAVE_END) runs after ``go`` is out and delays nothing. A sender that
  cannot tell whether ``go`` arrived (no ``running``) keeps its domain paused
  and asks, on a new connection::

      (xend-tmem-query (migration "<uuid>"))\\n
      receiver: (running)\\n | (aborted)\\n | (unknown)\\n

  The answer is decisive: a receiver still waiting for ``go`` aborts its copy
  (destroys it) and answers ``aborted`` atomically, so a late ``go`` can no
  longer start it. ``running``: the sender destroys its copy; ``aborted``: it
  resumes it; ``unknown``: it keeps it paused and says so. The domain never runs
  on two hosts.

TLS (``xm migrate --ssl``, the ``xend-relocation-ssl-server`` port): the same
exchange inside TLS, the operation spelled ``sslreceive``. As in xend the sender
encrypts but does not verify the receiver's certificate. A stock image ends with
a TLS close_notify rather than a bare TCP half-close.

Access control: ``xend-relocation-hosts-allow`` patterns must match the *whole*
peer address or host name (``re.fullmatch``; xend's ``re.match`` let
``^10\\.0\\.0\\.1`` admit 10.0.0.10). A rejected peer gets an ``(err ...)``.

Failure handling on the sender: an ``(err ...)`` the receiver sends while the
image is still streaming is noticed at the next write and stops the save at
once; the save path then resumes the source (tmem thawed). Any failure before
``go`` is sent resumes the source (the receiver, never cleared, destroys its
copy). Both sides journal each phase (:mod:`.journal`) so a xend killed
mid-way is ended cleanly by the next ``xend start``.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl as ssl_mod
import struct
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Pattern, Sequence, Set, Tuple

from ..codec import sxp
from ..errors import Cancelled, PeerError, XendTmemError
from ..hypervisor.interface import Hypervisor
from ..session import JournalFn
from . import journal as jrn

log = logging.getLogger("xend_tmem.xend.relocation")

PROTOCOL = 2
PREFLIGHT_OP = "xend-tmem-preflight"
QUERY_OP = "xend-tmem-query"
MAX_LINE = 1 << 20            # longest control line (a pre-flight offer) accepted
MAX_OPS = 16                  # control operations per connection before "receive"
MAX_FRAME = 4 << 20           # longest image frame accepted
MAX_REMEMBERED = 256          # finished incoming migrations a query can still ask about


def _seconds(env: str, default: float) -> float:
    """A timeout, shortened by the crash-recovery tests through ``env`` (test only)."""
    try:
        value = float(os.environ[env])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 60.0           # no byte moved for this long: the peer is gone
# restore of what is left after the last byte, plus start
ACK_TIMEOUT_S = _seconds("XEND_TMEM_TEST_ACK_TIMEOUT_S", 300.0)
# receiver: no "go" this long after "received": abort
GO_TIMEOUT_S = _seconds("XEND_TMEM_TEST_GO_TIMEOUT_S", 60.0)
# sender: how long to keep asking an unreachable peer before saying "in doubt"
QUERY_WINDOW_S = _seconds("XEND_TMEM_TEST_QUERY_WINDOW_S", 30.0)
STARTING_WAIT_S = 30.0       # a query waits this long for a start in progress
DRAIN_AFTER_ERROR_S = 2.0     # let the sender read our (err ...) before we close
_FRAME = struct.Struct(">I")

ProgressFn = Callable[[str, int, Optional[int]], None]


class MigrationInDoubt(PeerError):
    """The sender cannot tell whether the destination runs the domain: the
    source is kept paused (suspended) and its journal entry kept, for the next
    ``xend start`` to ask again."""


# -- wire helpers -------------------------------------------------------------

def err_line(kind: str, message: str) -> bytes:
    """xend's error reply, on one line."""
    message = " ".join(str(message).split())
    return (sxp.to_string(["err", ["type", kind], ["value", message]]) + "\n").encode()


def _line(form: Any) -> bytes:
    return (sxp.to_string(form) + "\n").encode()


def parse_reply(raw: bytes, host: str) -> List[Any]:
    """One reply line as an SXP list (a bare atom becomes a one-element list)."""
    try:
        text = raw.decode("utf-8")
        form = sxp.parse(text, comments=False)
    except (UnicodeDecodeError, XendTmemError):
        raise PeerError(f"unintelligible answer {raw[:80]!r} (from {host})") from None
    return form if isinstance(form, list) and form else [form]


def reply_error_message(form: List[Any]) -> str:
    """The ``value`` of an ``(err ...)`` reply."""
    value = sxp.child_value(form, "value")
    return str(value) if value is not None else sxp.to_string(form)


def host_allowed(patterns: Sequence[Pattern[str]], address: str,
                 names: Optional[Callable[[str], List[str]]] = None) -> bool:
    """Does any pattern match the whole address, or one of its host names?"""
    if not patterns:
        return True
    if any(p.fullmatch(address) for p in patterns):
        return True
    lookup = names or reverse_names
    return any(p.fullmatch(n) for n in lookup(address) for p in patterns)


def reverse_names(address: str) -> List[str]:
    try:
        name, aliases, _ = socket.gethostbyaddr(address)
    except (OSError, UnicodeError):
        return []
    return [name, *aliases]


# -- receiver -----------------------------------------------------------------

# restore(stream, peer, paused=..., on_created=...) -> (domid, report)
RestoreFn = Callable[..., Tuple[int, Dict[str, Any]]]
CheckFn = Callable[[Dict[str, Any]], List[str]]
DiscardFn = Callable[[int], None]

# states of an incoming migration (the receiver's side of the handshake)
STREAMING = "streaming"
AWAITING_GO = "awaiting-go"
STARTING = "starting"        # go arrived, unpausing
RUNNING = "running"
ABORTED = "aborted"
UNKNOWN = "unknown"


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
    """The framed image as a file that ends at the zero-length frame."""

    def __init__(self, rfile: BinaryIO, peer: str) -> None:
        self.rfile = rfile
        self.peer = peer
        self.left = 0
        self.ended = False

    def _exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise ConnectionError(f"connection from {self.peer} lost in the middle of the image")
        return data

    def readinto(self, buf: Any) -> int:
        mv = memoryview(buf).cast("B")
        if self.ended or not mv.nbytes:
            return 0
        if not self.left:
            (n,) = _FRAME.unpack(self._exact(_FRAME.size))
            if n == 0:
                self.ended = True
                return 0
            if n > MAX_FRAME:
                raise PeerError(f"image frame of {n} bytes from {self.peer} (at most {MAX_FRAME})")
            self.left = n
        got = self.rfile.readinto(mv[:min(self.left, mv.nbytes)])
        if not got:
            raise ConnectionError(f"connection from {self.peer} lost in the middle of the image")
        self.left -= got
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
    """

    def __init__(self, address: str, port: int, *, hosts_allow: Sequence[Pattern[str]],
                 restore: RestoreFn, check_offer: CheckFn, discard: DiscardFn,
                 unpause: Optional[DiscardFn] = None, journal: Optional[jrn.Journal] = None,
                 ssl_context: Optional[ssl_mod.SSLContext] = None,
                 io_timeout: float = IO_TIMEOUT_S, go_timeout: float = GO_TIMEOUT_S) -> None:
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
            self._sock.bind((address, port))
            self._sock.listen(8)
        except OSError:
            self._sock.close()
            raise
        self.address = address
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)    # an incoming's state moved
        self._conns: Set[socket.socket] = set()
        self._threads: Set[threading.Thread] = set()
        self._accept_thread: Optional[threading.Thread] = None
        self._migrations: "OrderedDict[str, Incoming]" = OrderedDict()

    def bind(self, *, unpause: DiscardFn, journal: Optional[jrn.Journal]) -> None:
        """The daemon's service supplies how to start a domain and its journal."""
        self.unpause = unpause
        self.journal = journal

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

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr[0]), daemon=True,
                                 name=f"relocation-peer:{addr[0]}")
            with self._lock:
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        conn = raw
        try:
            conn.settimeout(self.io_timeout)
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
            _Receiver(self, conn, peer).run()
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
        if self.journal is not None:
            self.journal.record_outcome(inc.migration_id, RUNNING)
        if inc.entry is not None:
            inc.entry.remove()
        log.info("relocation: domain %s (%s) cleared by %s: running here", inc.name,
                 inc.domid, inc.peer)
        return True

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


class _Receiver:
    """One incoming connection: control lines, then at most one image."""

    def __init__(self, server: RelocationServer, conn: socket.socket, peer: str) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.rfile = conn.makefile("rb")
        self.extended = False
        self.migration_id = ""
        self.name = ""

    def run(self) -> None:
        try:
            for _ in range(MAX_OPS):
                raw = self.rfile.readline(MAX_LINE + 1)
                if not raw:
                    return
                if len(raw) > MAX_LINE:
                    self._send(err_line("Error", "control line too long"))
                    return
                if not raw.strip():
                    continue
                try:
                    form = sxp.parse(raw.decode("utf-8"), comments=False)
                except (UnicodeDecodeError, XendTmemError) as exc:
                    self._send(err_line("Error", f"cannot parse request: {exc}"))
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
                    self._send(err_line("Error", f"Invalid operation {op}"))
            self._send(err_line("Error", "too many operations on one connection"))
        finally:
            self.rfile.close()

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def _preflight(self, form: Any) -> None:
        raw = sxp.child_value(form, "offer")
        try:
            offer = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            offer = None
        mid = offer.get("migration") if isinstance(offer, dict) else None
        if not isinstance(offer, dict) or not isinstance(mid, str) or not 0 < len(mid) <= 64:
            self._send(_line(["refused", ["reason", "malformed pre-flight offer"]]))
            return
        try:
            reasons = list(self.server.check_offer(offer))
        except XendTmemError as exc:
            reasons = [str(exc)]
        domain = offer.get("domain")
        name = domain.get("name") if isinstance(domain, dict) else None
        if reasons:
            log.info("relocation: refused %s from %s: %s", name, self.peer, "; ".join(reasons))
            self._send(_line(["refused", *(["reason", r] for r in reasons)]))
            return
        self.extended = True
        self.migration_id = mid
        self.name = str(name or "")
        self._send(_line(["ok", ["protocol", str(PROTOCOL)]]))

    def _query(self, form: Any) -> None:
        mid = sxp.child_value(form, "migration")
        if not isinstance(mid, str) or not mid:
            self._send(err_line("Error", "a query names a migration: (xend-tmem-query "
                                         "(migration ID))"))
            return
        answer = self.server.resolve(mid)
        log.info("relocation: %s asked about migration %s: %s", self.peer, mid, answer)
        self._send(_line([answer]))

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
        self._send(_line(["ready", self.server.op]))
        log.info("relocation: receiving a domain from %s", self.peer)
        if not self.extended:
            self._receive_stock()
            return
        server = self.server
        inc = server.begin_incoming(self.migration_id, self.peer, self.name)
        try:
            domid, report = server.restore(_FramedReader(self.rfile, self.peer), self.peer,
                                           paused=True,
                                           on_created=lambda d: server.created(inc, d))
        except Exception as exc:
            server.abort(inc, "its restore failed")
            self._fail(exc)
            return
        if not server.restored(inc, domid):
            self._send_quietly(err_line("Error", f"migration {inc.migration_id} was aborted "
                                                 "here by a query"))
            return
        try:
            self._send(_line(["received", ["domid", str(domid)]]))
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
        except Exception as exc:
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
            self._send(_line(["running", ["report", json.dumps(report, sort_keys=True,
                                                               default=str)]]))
        except OSError as exc:
            log.warning("relocation: domain %s runs here; telling %s failed: %s", inc.name,
                        self.peer, exc)

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
        except Exception as exc:
            self._fail(exc)
        finally:
            if entry is not None:
                entry.remove()


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


# -- sender -------------------------------------------------------------------

class _PeerWriter:
    """The socket as a file for the save path.

    Sends in slices while watching for an early ``(err ...)`` from the receiver,
    for a cancel request (a stalled receiver must not make Ctrl-C wait for the
    I/O timeout) and for a peer that stopped reading altogether. ``framed``:
    each slice goes as one frame of the extended protocol.
    """

    SLICE = 1 << 20

    def __init__(self, channel: "_Channel", cancel: Optional[threading.Event],
                 io_timeout: float, framed: bool = False) -> None:
        self.ch = channel
        self.cancel = cancel
        self.io_timeout = io_timeout
        self.framed = framed

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        total = mv.nbytes
        while mv.nbytes:
            piece = mv[:self.SLICE]
            if self.framed:
                self._send_all(memoryview(_FRAME.pack(piece.nbytes)))
            self._send_all(piece)
            mv = mv[piece.nbytes:]
        return total

    def end(self) -> None:
        """The zero-length frame: the image is complete."""
        self._send_all(memoryview(_FRAME.pack(0)))

    def _send_all(self, mv: memoryview) -> None:
        sock = self.ch.sock
        last_progress = time.monotonic()
        while mv.nbytes:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("cancelled")
            try:
                readable, writable, _ = select.select([sock], [sock], [], 0.2)
            except (OSError, ValueError) as exc:
                self.ch.raise_peer_error(exc if isinstance(exc, OSError) else None)
            if readable:
                self.ch.raise_peer_error(None)
            if not writable:
                if time.monotonic() - last_progress > self.io_timeout:
                    raise PeerError(f"{self.ch.host} stopped reading for "
                                    f"{self.io_timeout:.0f} s")
                continue
            try:
                sent = sock.send(mv)
            except socket.timeout:
                sent = 0
            except (ssl_mod.SSLWantWriteError, ssl_mod.SSLWantReadError):
                sent = 0
            except OSError as exc:
                self.ch.raise_peer_error(exc)
            mv = mv[sent:]
            last_progress = time.monotonic()

    def flush(self) -> None:
        return None


class _Channel:
    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self.rfile = sock.makefile("rb")

    def send_line(self, form: Any) -> None:
        try:
            self.sock.sendall(_line(form))
        except OSError as exc:
            self.raise_peer_error(exc)

    def read_reply(self, timeout: Optional[float] = None) -> Optional[List[Any]]:
        """The next reply line, or ``None`` when the peer closed."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            raw = self.rfile.readline(MAX_LINE + 1)
        except socket.timeout:
            raise PeerError(f"no answer from {self.host} within {self.sock.gettimeout():.0f} s") \
                from None
        except OSError as exc:
            raise PeerError(f"connection to {self.host} lost: {exc.strerror or exc}") from None
        if not raw:
            return None
        if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
            raise PeerError(f"answer too long or cut short (from {self.host})")
        return parse_reply(raw, self.host)

    def raise_peer_error(self, exc: Optional[OSError]) -> None:
        self.sock.settimeout(2.0)
        try:
            reply = self.read_reply()
        except PeerError:
            reply = None
        if reply and reply[0] == "err":
            raise PeerError(f"{reply_error_message(reply)} (from {self.host})")
        if exc is None and reply is None:
            raise PeerError(f"{self.host} closed the connection during the transfer")
        if exc is None:
            raise PeerError(f"unexpected answer {sxp.to_string(reply)} during the transfer "
                            f"(from {self.host})")
        raise PeerError(f"connection to {self.host} lost: {exc.strerror or exc}")

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


def _connect(host: str, port: int, use_ssl: bool, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerError(f"can't connect to {host}:{port}: {exc.strerror or exc}") from None
    if not use_ssl:
        return sock
    # xend's TLS migration encrypted the stream but never verified the peer; so do we.
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl_mod.CERT_NONE
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except (OSError, ssl_mod.SSLError) as exc:
        sock.close()
        raise PeerError(f"TLS handshake with {host}:{port} failed: {exc}") from None


def _half_close(sock: socket.socket, timeout: float) -> None:
    """End our sending side (a stock image's EOF) but keep reading (the answer).

    Over TLS a bare TCP FIN is an unclean end that breaks the receiver's TLS
    session; a close_notify is the TLS way. ``unwrap`` would also wait for the
    peer's close_notify, so it runs non-blocking and stops once ours is out.
    """
    if not isinstance(sock, ssl_mod.SSLSocket):
        sock.shutdown(socket.SHUT_WR)
        return
    saved = sock.gettimeout()
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.unwrap()
                return
            except ssl_mod.SSLWantReadError:
                return                     # ours is sent; the peer's is not awaited
            except ssl_mod.SSLWantWriteError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out ending the TLS stream") from None
                select.select([], [sock], [], left)
    finally:
        sock.settimeout(saved)


def _peer_report(text: Any) -> Optional[Dict[str, Any]]:
    """The receiver's restore report from its ``running`` answer (absent: None)."""
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def make_offer(hv: Hypervisor, domid: int, hooks, *, live: bool, node: int,
               name: Optional[str] = None, migration_id: str = "") -> Dict[str, Any]:
    """The pre-flight offer; ``name`` is the domain's real name (the source may
    already be called ``migrating-NAME``)."""
    info = hv.domain_info(domid)
    return {
        "protocol": PROTOCOL,
        "migration": migration_id,
        "domain": {"name": name or info.name, "memory_mib": info.memory_mib,
                   "vcpus": info.vcpus},
        "node": node,
        "live": live,
        "plugins": hooks.migrate_offer(hv, domid),
    }


def query_migration(host: str, port: int, migration_id: str, *, use_ssl: bool = False,
                    window: float = QUERY_WINDOW_S,
                    connect_timeout: float = CONNECT_TIMEOUT_S) -> Tuple[str, str]:
    """Ask the destination how migration ``migration_id`` ended: ``(answer,
    detail)`` with answer ``running``, ``aborted`` or ``unknown`` (``unknown``
    also when the peer cannot be reached within ``window`` seconds; the detail
    says why). A peer still awaiting ``go`` aborts its copy and says ``aborted``."""
    deadline = time.monotonic() + window
    last = "no attempt"
    while True:
        try:
            sock = _connect(host, port, use_ssl, min(connect_timeout, max(1.0, window)))
            ch = _Channel(sock, host)
            try:
                sock.settimeout(min(IO_TIMEOUT_S, max(2.0, window)))   # a hung peer
                ch.send_line([QUERY_OP, ["migration", migration_id]])
                reply = ch.read_reply()
            finally:
                ch.close()
            if reply and reply[0] in (RUNNING, ABORTED, UNKNOWN):
                return str(reply[0]), f"{host} answered {reply[0]}"
            last = (f"{host} answered {sxp.to_string(reply)}" if reply is not None
                    else f"{host} closed the connection")
            if reply and reply[0] == "err":
                return UNKNOWN, f"{host} does not know the query: {reply_error_message(reply)}"
        except PeerError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            return UNKNOWN, last
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def migrate(hv: Hypervisor, domid: int, host: str, port: int, *, live: bool, hooks,
            node: int = -1, use_ssl: bool = False, progress: Optional[ProgressFn] = None,
            cancel: Optional[threading.Event] = None,
            on_accepted: Optional[Callable[[], None]] = None,
            on_received: Optional[Callable[[int], None]] = None,
            name: Optional[str] = None, migration_id: Optional[str] = None,
            journal: Optional[JournalFn] = None,
            connect_timeout: float = CONNECT_TIMEOUT_S, io_timeout: float = IO_TIMEOUT_S,
            ack_timeout: float = ACK_TIMEOUT_S,
            query_window: float = QUERY_WINDOW_S) -> Dict[str, Any]:
    """Send ``domid`` to the relocation server at ``host:port``; returns the save
    report plus ``peer_domid``, ``destination`` (the receiver's report),
    ``migration`` (its id) and ``extended``.

    On success the source domain is left suspended for the caller to destroy.
    On a failure before ``go`` it is running again (tmem thawed by the save
    path's done phase) and the error is a :class:`PeerError` naming the peer,
    or the save's. ``on_accepted`` runs once the receiver is ready, before
    anything is suspended or frozen (the daemon renames the source there);
    ``on_received(peer_domid)`` runs when the receiver reported the domain
    restored, just before ``go`` is sent (the daemon journals it there; if it
    raises, ``go`` is not sent). When the outcome cannot be told even by a
    query, :class:`MigrationInDoubt` is raised and the source stays suspended.
    """
    from ..checkpoint import save_domain

    progress = progress or (lambda phase, done, total: None)
    mid = migration_id or uuid.uuid4().hex
    label = name or hv.domain_info(domid).name
    progress("connect", 0, None)
    sock = _connect(host, port, use_ssl, connect_timeout)
    ch = _Channel(sock, host)
    op = "sslreceive" if use_ssl else "receive"
    state: Dict[str, Any] = {"go": False, "accepted": False}
    try:
        sock.settimeout(io_timeout)
        progress("preflight", 0, None)
        offer = make_offer(hv, domid, hooks, live=live, node=node, name=name, migration_id=mid)
        ch.send_line([PREFLIGHT_OP, ["offer", json.dumps(offer, sort_keys=True)]])
        reply = ch.read_reply()
        stock_error: Optional[str] = None
        if reply is None:
            raise PeerError(f"{host} closed the connection (is this host allowed by its "
                            "xend-relocation-hosts-allow?)")
        if reply[0] == "ok":
            extended = True
            if str(sxp.child_value(reply, "protocol")) != str(PROTOCOL):
                raise PeerError(f"{host} speaks relocation protocol "
                                f"{sxp.child_value(reply, 'protocol')}, this host {PROTOCOL}: "
                                "upgrade both hosts")
        elif reply[0] == "refused":
            reasons = [str(c[1]) for c in sxp.children(reply, "reason") if len(c) > 1]
            raise PeerError(f"migration refused: {'; '.join(reasons) or 'no reason given'} "
                            f"(from {host})")
        elif reply[0] == "err":
            extended = False          # a stock xend: no pre-flight, no handshake
            stock_error = reply_error_message(reply)
        else:
            raise PeerError(f"unexpected answer {sxp.to_string(reply)} (from {host})")
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        ch.send_line(op)
        reply = ch.read_reply()
        if reply is None:
            raise PeerError(f"{stock_error or 'connection closed before the transfer'} "
                            f"(from {host})")
        if reply[0] == "err":
            raise PeerError(f"{reply_error_message(reply)} (from {host})")
        if reply != ["ready", op]:
            raise PeerError(f"unexpected answer {sxp.to_string(reply)} (from {host})")
        state["accepted"] = True
        if on_accepted is not None:
            on_accepted()
        writer = _PeerWriter(ch, cancel, io_timeout, framed=extended)

        def commit() -> None:
            """The stream is complete: the receiver's answer, and ``go``."""
            progress("commit", 0, None)
            if not extended:
                try:
                    _half_close(sock, io_timeout)
                except OSError as exc:
                    ch.raise_peer_error(exc)
                answer = ch.read_reply(timeout=ack_timeout)
                if answer is not None and answer[0] == "err":
                    raise PeerError(f"{reply_error_message(answer)} (from {host})")
                if answer is not None:
                    raise PeerError(f"unexpected answer {sxp.to_string(answer)} (from {host})")
                return
            writer.end()
            state["sent_at"] = time.monotonic()
            answer = ch.read_reply(timeout=ack_timeout)
            if answer is None:
                raise PeerError(f"{host} closed the connection before confirming the restore "
                                f"of domain {label}")
            if answer[0] == "err":
                raise PeerError(f"{reply_error_message(answer)} (from {host})")
            if answer[0] != "received":
                raise PeerError(f"unexpected answer {sxp.to_string(answer)} (from {host})")
            peer_domid = sxp.child_value(answer, "domid")
            state["peer_domid"] = int(peer_domid) if str(peer_domid).isdigit() else None
            if on_received is not None:
                on_received(state["peer_domid"] if state["peer_domid"] is not None else -1)
            state["go"] = True               # from here the source is not resumed blindly
            try:
                ch.send_line(["go"])
            except PeerError as exc:
                state["go_error"] = str(exc)
            jrn.killpoint("migrate-go-sent")

        report = save_domain(hv, domid, writer, hooks=hooks, live=live, progress=progress,
                             cancel=cancel, name=name, journal=journal, commit=commit)
        report["extended"] = extended
        report["migration"] = mid
        if not extended:
            return report
        report["peer_domid"] = state.get("peer_domid")
        why = state.get("go_error")
        answer: Optional[List[Any]] = None
        if why is None:
            try:
                answer = ch.read_reply(timeout=ack_timeout)
            except PeerError as exc:
                why = str(exc)
        if answer is not None and answer[0] == RUNNING:
            report["destination"] = _peer_report(sxp.child_value(answer, "report"))
            # suspend here until the destination confirmed the domain runs there
            report["resumed_after_s"] = round(
                float(report.get("downtime_s", 0.0)) + time.monotonic() - state["sent_at"], 6)
            return report
        if why is None and answer is None:
            why = f"{host} closed the connection after go"
        elif why is None and answer is not None:
            said = reply_error_message(answer) if answer[0] == "err" else sxp.to_string(answer)
            why = f"{host} answered {said}"
        return _resolve_in_doubt(hv, domid, label, host, port, use_ssl, mid, why, report,
                                 query_window)
    except PeerError as exc:
        if state["go"] or not state["accepted"]:
            raise       # after go the messages say where it is; before, nothing was touched
        raise PeerError(f"{exc}; domain {label} was not started on {host} and keeps running "
                        "here") from None
    finally:
        ch.close()


def _resolve_in_doubt(hv: Hypervisor, domid: int, name: str, host: str, port: int,
                      use_ssl: bool, mid: str, why: str, report: Dict[str, Any],
                      window: float) -> Dict[str, Any]:
    """``go`` went out but ``running`` did not come back: ask the destination."""
    log.error("migrate: domain %s: cannot tell whether %s started it (%s); it stays paused "
              "here while %s:%d is asked about migration %s", name, host, why, host, port, mid)
    answer, detail = query_migration(host, port, mid, use_ssl=use_ssl, window=window)
    report["resolved_by_query"] = answer
    if answer == RUNNING:
        log.info("migrate: %s runs domain %s (%s): the copy here is destroyed", host, name,
                 detail)
        return report
    if answer == ABORTED:
        try:
            hv.resume(domid)
        except XendTmemError as exc:
            raise MigrationInDoubt(
                f"{host} aborted its copy of domain {name} ({why}), but it could not be "
                f"resumed here: {exc}; it is paused here") from None
        raise PeerError(f"{host} did not start domain {name} ({why}) and destroyed its copy; "
                        "the domain was resumed here")
    raise MigrationInDoubt(
        f"cannot tell whether domain {name} runs on {host} ({why}; asking it: {detail}): it is "
        f"kept paused here as migrating-{name}; xend keeps asking {host} and settles it, or "
        f"once you know it runs on {host}, xm destroy migrating-{name} here")


__all__ = ["RelocationServer", "Incoming", "migrate", "query_migration", "host_allowed",
           "make_offer", "err_line", "parse_reply", "MigrationInDoubt", "PREFLIGHT_OP",
           "QUERY_OP", "PROTOCOL"]
