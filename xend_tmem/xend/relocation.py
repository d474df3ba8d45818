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
* **Integrity** (issue 8 #4). The offer lists ``"integrity": ["crc32-frames"]``;
  a receiver that supports it answers ``(ok (protocol 2) (integrity
  crc32-frames))``. Then every frame is followed by the CRC32 (u32 BE) of its
  bytes, and frames whose length has the top bit set carry page checksum
  records (:mod:`xend_tmem.integrity`) ahead of the pages they cover. The
  receiver checks each page as it arrives and fails the restore -- before the
  domain can run -- naming the first bad page; the source keeps running.
* **Commit handshake** (xl's "domain received, ready to unpause" / "domain is
  yours, you are cleared to unpause" / "my copy unpause results")::

      receiver: (received (domid N))\\n        image restored, domain paused
      sender:   (go)\\n                         journaled first, sent at once
      receiver: (running (report "<JSON>"))\\n  unpaused; its restore's figures
      receiver: (guest (downtime_ms N))\\n      the guest's heartbeat gap, or (guest)

  ``running`` goes out as soon as the domain is unpaused (its journal
  bookkeeping follows it); the guest's own figure is measured after it and
  sent on its own line, which the sender waits for a few seconds at most, so
  it delays nothing. The sender times ``downtime_ms`` from its suspend to
  ``running`` received (``restore_ms``, ``handshake_ms`` its parts).
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
exchange inside TLS, the operation spelled ``sslreceive``. A stock image ends
with a TLS close_notify rather than a bare TCP half-close. As in xend, by
default the sender encrypts but does not verify the receiver; with
``xend-relocation-ssl-ca-file`` (a CA, or the peer's own self-signed
certificate) the peer's certificate must verify against it, and with
``xend-relocation-ssl-peer-fingerprint`` (sha256 of the peer's certificate) it
must be exactly that certificate -- in both directions: the server then asks
the client for its certificate (the host's own key pair,
``xend-relocation-server-ssl-{cert,key}-file``). Python's ``ssl`` has no verify
callback, so a server can only request client certificates it can verify: it
needs the CA file; the client can pin by fingerprint alone.

Access control: ``xend-relocation-hosts-allow`` patterns must match the *whole*
peer address or host name (``re.fullmatch``; xend's ``re.match`` let
``^10\\.0\\.0\\.1`` admit 10.0.0.10). A host name counts only when forward-
confirmed: the reverse lookup's name must resolve back to the peer's address.
A rejected peer gets an ``(err ...)``.

Hostile peers: before ``receive`` a connection is in its control phase, which
has an overall deadline (:data:`CONTROL_DEADLINE_S`, however slowly bytes
trickle in) and small line limits (:data:`MAX_OP_LINE`, a pre-flight line
:data:`MAX_OFFER_LINE`); at most :data:`MAX_CONTROL_CONNECTIONS` connections
are in it at once (a new one evicts the oldest) and at most
:data:`MAX_RECEIVING` images stream in at once. Every malformed message gets an
``(err ...)`` reply and one log line.

Rate cap (``xm migrate -r MBIT``, ``migration.max-rate-mbit``): a token
bucket (:class:`RateLimiter`) paces every byte the sender writes -- frames,
CRCs and control lines.

Failure handling on the sender: an ``(err ...)`` the receiver sends while the
image is still streaming is noticed at the next write and stops the save at
once; the save path then resumes the source (tmem thawed). Any failure before
``go`` is sent resumes the source (the receiver, never cleared, destroys its
copy). Both sides journal each phase (:mod:`.journal`) so a xend killed
mid-way is ended cleanly by the next ``xend start``.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import ssl as ssl_mod
import struct
import termios
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Pattern, Sequence, Set, Tuple

from .. import integrity
from ..codec import sxp
from ..errors import Cancelled, ConfigError, PeerError, XendTmemError
from ..hypervisor.interface import Hypervisor
from ..session import JournalFn
from . import journal as jrn

log = logging.getLogger("xend_tmem.xend.relocation")

PROTOCOL = 2
PREFLIGHT_OP = "xend-tmem-preflight"
INTEGRITY_FRAMES = "crc32-frames"   # a CRC32 after each image frame (pre-flight option)
QUERY_OP = "xend-tmem-query"
MAX_LINE = 1 << 20            # longest reply line a sender accepts (a report)
RECV_BUFFER = 1 << 20         # the receiver's socket queue (SO_RCVBUF): one 1 MiB frame
                              # in flight while it processes the last (bounded: see drain)
SETTLE_MAX_S = 0.05           # longest wait for the receiver's own queue before a suspend
DRAIN_MAX_S = 2.0             # longest wait for the receiver to catch up before a suspend
MAX_OP_LINE = 4 << 10         # longest control line before the pre-flight
MAX_OFFER_LINE = 64 << 10     # longest pre-flight line
MAX_JSON_DEPTH = 16           # deepest nesting of a pre-flight offer
MAX_CONTROL_CONNECTIONS = 64  # connections before "receive" at once (oldest evicted)
MAX_RECEIVING = 8             # images streaming in at once
MAX_MIGRATION_ID = 64
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
CONTROL_DEADLINE_S = 30.0    # from accept to "receive" (or the last answer), at most
SWEEP_EVERY_S = 1.0           # the accept loop looks for connections past that deadline
SWEEP_GRACE_S = 5.0
DRAIN_AFTER_ERROR_S = 2.0     # let the sender read our (err ...) before we close
GUEST_BEAT_WAIT_S = 2.0       # receiver: the guest's first beat after unpause, at most
GUEST_REPORT_WAIT_S = 3.0     # sender: the receiver's (guest ...) line after running, at most
_FRAME = struct.Struct(">I")
_RECORDS_FLAG = 0x80000000    # with crc32-frames: a frame of page checksum records

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


# -- TLS ----------------------------------------------------------------------

@dataclass(frozen=True)
class TlsSettings:
    """This host's key pair and how the peer's certificate is verified.

    ``ca_file``: the peer's certificate must verify against it (a CA or the
    peer's self-signed certificate). ``peer_fingerprint``: sha256 hex of the
    peer's certificate, which must match exactly. Neither: xend's behaviour,
    encrypted but unverified."""

    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    ca_file: Optional[str] = None
    peer_fingerprint: Optional[str] = None

    @property
    def verifies(self) -> bool:
        return bool(self.ca_file or self.peer_fingerprint)


def server_context(tls: TlsSettings) -> ssl_mod.SSLContext:
    """The relocation server's context: its key pair; with a CA file it
    requires and verifies the client's certificate."""
    if tls.peer_fingerprint and not tls.ca_file:
        raise ConfigError("xend-relocation-ssl-peer-fingerprint on a TLS relocation server needs "
                          "xend-relocation-ssl-ca-file (the peer's certificate or its CA)")
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_SERVER)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl_mod.CERT_REQUIRED
    return ctx


def client_context(tls: Optional[TlsSettings]) -> ssl_mod.SSLContext:
    """The sender's context: verifies the server against the CA file when
    given (the fingerprint is checked after the handshake) and presents this
    host's certificate so a verifying server accepts it."""
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False       # peers are named by address; the CA/pin vouches
    if tls is not None and tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl_mod.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl_mod.CERT_NONE
    if tls is not None and tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    return ctx


def cert_fingerprint(sock: ssl_mod.SSLSocket) -> Optional[str]:
    """sha256 hex of the peer's certificate (None: it sent none)."""
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def check_fingerprint(sock: ssl_mod.SSLSocket, pinned: Optional[str], who: str) -> None:
    """Raise :class:`PeerError` unless the peer's certificate is the pinned one."""
    if not pinned:
        return
    got = cert_fingerprint(sock)
    if got is None:
        raise PeerError(f"{who} presented no certificate, but "
                        "xend-relocation-ssl-peer-fingerprint requires one")
    if not hmac.compare_digest(got, pinned.lower()):
        raise PeerError(f"certificate of {who} has sha256 fingerprint {got}, not the one in "
                        "xend-relocation-ssl-peer-fingerprint")


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
    """The framed image as a file that ends at the zero-length frame.

    With ``crc`` (``crc32-frames`` negotiated) each frame carries the CRC32 of
    its bytes after them, and frames whose length has the top bit set carry
    page checksum records (:mod:`xend_tmem.integrity`) for ``page_check``
    rather than image bytes. A data frame is read whole and checked before any
    of it is handed out; one that fails its CRC is noted in ``page_check`` and
    still delivered, so the page it holds is named when its own checksum
    fails (the restore fails before the domain ever runs)."""

    def __init__(self, rfile: BinaryIO, peer: str, crc: bool = False) -> None:
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
            (n,) = _FRAME.unpack(self._exact(_FRAME.size))
            if n == 0:
                self.ended = True
                self.ended_at = time.monotonic()
                return False
            records = bool(self.crc and n & _RECORDS_FLAG)
            n &= ~_RECORDS_FLAG if self.crc else 0xFFFFFFFF
            if n > MAX_FRAME:
                raise PeerError(f"image frame of {n} bytes from {self.peer} (at most {MAX_FRAME})")
            if not self.crc:
                self.left = n
                return True
            body = self._exact(n)
            (want,) = _FRAME.unpack(self._exact(_FRAME.size))
            self._frames += 1
            assert self.page_check is not None
            if records:
                if zlib.crc32(body) != want:
                    raise integrity.IntegrityError(
                        f"page checksum frame {self._frames} from {self.peer} failed its "
                        "CRC32: the stream was corrupted in transit")
                self.page_check.add_expected(body)
                continue
            if zlib.crc32(body) != want:
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
        from ..heartbeat import guest_gap_ms
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


class _ControlLineError(Exception):
    """The control phase ends: the reason goes to the peer as ``(err ...)``."""


def json_depth(text: str, limit: int) -> int:
    """Nesting depth of JSON ``text`` (strings skipped), counting stops past
    ``limit``: checked before parsing, as ``json.loads`` recurses per level."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def offer_problem(offer: Any) -> Optional[str]:
    """What is malformed in a decoded pre-flight offer (None: well-formed)."""
    if not isinstance(offer, dict):
        return "the offer is not a JSON object"
    mid = offer.get("migration")
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_MIGRATION_ID or \
            not all(c.isalnum() or c in "-_" for c in mid):
        return f"migration must be an id of 1 to {MAX_MIGRATION_ID} letters, digits, - or _"
    if "protocol" in offer and not _is_int(offer["protocol"]):
        return "protocol must be a number"
    domain = offer.get("domain")
    if not isinstance(domain, dict):
        return "domain must be a mapping"
    if "name" in domain and not isinstance(domain["name"], str):
        return "domain name must be a string"
    for key in ("memory_mib", "vcpus"):
        if key in domain and not _is_int(domain[key]):
            return f"domain {key} must be a number"
    if "node" in offer and offer["node"] is not None and not _is_int(offer["node"]):
        return "node must be a number"
    if "live" in offer and not isinstance(offer["live"], bool):
        return "live must be true or false"
    plugins = offer.get("plugins")
    if plugins is not None and not isinstance(plugins, dict):
        return "plugins must be a mapping"
    for pname, facts in (plugins or {}).items():
        if facts is not None and not isinstance(facts, dict):
            return f"plugin {pname}'s facts must be a mapping"
    if "integrity" in offer and not isinstance(offer["integrity"], list):
        return "integrity must be a list"
    return None


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
            self._send(_line(["refused", *(["reason", r] for r in reasons)]))
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
        self._send(_line(answer))

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
        if not self.server.left_control(self.raw):
            self._malformed(f"too many migrations in progress here (at most {MAX_RECEIVING}) "
                            "or the connection was evicted: retry later")
            return
        self.receiving[0] = True
        self.conn.settimeout(self.server.io_timeout)
        self._send(_line(["ready", self.server.op]))
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
                                           on_created=lambda d: server.created(inc, d))
        except Exception as exc:
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
        self._send_quietly(_line(form))

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


# -- sender -------------------------------------------------------------------

class RateLimiter:
    """A token bucket: the sender's rate cap (``xm migrate -r``,
    ``migration.max-rate-mbit``) over every byte it writes.

    Tokens accrue at ``rate_bps`` up to ``burst`` bytes (by default 10 ms worth,
    at least one 64 KiB chunk), so over any stretch longer than a few
    milliseconds the rate stays at the cap; :meth:`reserve` may drive the
    bucket into debt, and the caller waits the time it returns before sending.
    ``clock`` is injectable so the arithmetic is tested without sleeping.
    """

    MIN_CHUNK = 16 << 10
    MAX_CHUNK = 1 << 20

    def __init__(self, rate_bps: float, burst: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate_bps > 0:
            raise ValueError(f"a rate cap must be positive, not {rate_bps!r}")
        self.rate = float(rate_bps)
        self.burst = int(burst if burst is not None else max(64 << 10, self.rate * 0.01))
        self.clock = clock
        self.tokens = float(self.burst)
        self.stamp = clock()
        self.sent = 0                 # bytes reserved and not refunded: the bytes written
        # how much to hand the socket at once: ~2 ms at the cap
        self.chunk = int(min(self.MAX_CHUNK, max(self.MIN_CHUNK, self.rate * 0.002)))

    def _refill(self) -> None:
        now = self.clock()
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def pause(self) -> float:
        """The sender stops sending on purpose (a drain): the tokens so far,
        for :meth:`resume`."""
        self._refill()
        return self.tokens

    def resume(self, tokens: float) -> None:
        """After a :meth:`pause`: its time earned no tokens, so the rate over
        the sending time alone stays at the cap."""
        self.tokens = tokens
        self.stamp = self.clock()

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes' tokens; the seconds to wait before sending them."""
        self._refill()
        self.tokens -= n
        self.sent += n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self, n: int) -> None:
        """``n`` reserved bytes were not sent after all."""
        if n > 0:
            self.tokens = min(float(self.burst), self.tokens + n)
            self.sent -= n


def _pace(limiter: Optional[RateLimiter], n: int, cancel: Optional[threading.Event]) -> None:
    """Wait until ``n`` more bytes fit under the rate cap (a cancel ends the wait)."""
    if limiter is None:
        return
    wait = limiter.reserve(n)
    deadline = time.monotonic() + wait
    while wait > 0:
        if cancel is not None and cancel.is_set():
            limiter.refund(n)
            raise Cancelled("cancelled")
        time.sleep(min(wait, 0.05))
        wait = deadline - time.monotonic()


class _PeerWriter:
    """The socket as a file for the save path.

    Sends in slices while watching for an early ``(err ...)`` from the receiver,
    for a cancel request (a stalled receiver must not make Ctrl-C wait for the
    I/O timeout) and for a peer that stopped reading altogether. ``framed``:
    each slice goes as one frame of the extended protocol.
    """

    SLICE = 1 << 20

    def __init__(self, channel: "_Channel", cancel: Optional[threading.Event],
                 io_timeout: float, framed: bool = False,
                 page_log: Optional[integrity.PageLog] = None) -> None:
        self.ch = channel
        self.cancel = cancel
        self.io_timeout = io_timeout
        self.framed = framed
        # crc32-frames negotiated: a CRC32 after each frame, page records ahead of pages
        self.page_log = page_log
        self.crc = page_log is not None

    def _frame(self, body: memoryview, flag: int = 0) -> None:
        self._send_all(memoryview(_FRAME.pack(body.nbytes | flag)))
        self._send_all(body)
        if self.crc:
            self._send_all(memoryview(_FRAME.pack(zlib.crc32(body))))

    def _send_records(self) -> None:
        """Page checksum records not sent yet, ahead of the pages they cover."""
        if self.page_log is None:
            return
        recs = memoryview(self.page_log.take_unsent_bytes())
        per = self.SLICE // integrity.RECORD_SIZE * integrity.RECORD_SIZE
        for i in range(0, recs.nbytes, per):
            self._frame(recs[i:i + per], _RECORDS_FLAG)

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        total = mv.nbytes
        self._send_records()
        while mv.nbytes:
            piece = mv[:self.SLICE]
            if self.framed:
                self._frame(piece)
            else:
                self._send_all(piece)
            mv = mv[piece.nbytes:]
        return total

    def end(self) -> None:
        """The zero-length frame: the image is complete."""
        self._send_records()
        self._send_all(memoryview(_FRAME.pack(0)))

    def _send_all(self, mv: memoryview) -> None:
        sock = self.ch.sock
        limiter = self.ch.limiter
        last_progress = time.monotonic()
        while mv.nbytes:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("cancelled")
            piece = mv
            if limiter is not None:
                piece = mv[:limiter.chunk]
                _pace(limiter, piece.nbytes, self.cancel)
            try:
                readable, writable, _ = select.select([sock], [sock], [], 0.2)
            except (OSError, ValueError) as exc:
                self.ch.raise_peer_error(exc if isinstance(exc, OSError) else None)
            if readable:
                self.ch.raise_peer_error(None)
            if not writable:
                if limiter is not None:
                    limiter.refund(piece.nbytes)
                if time.monotonic() - last_progress > self.io_timeout:
                    raise PeerError(f"{self.ch.host} stopped reading for "
                                    f"{self.io_timeout:.0f} s")
                continue
            try:
                sent = sock.send(piece)
            except socket.timeout:
                sent = 0
            except (ssl_mod.SSLWantWriteError, ssl_mod.SSLWantReadError):
                sent = 0
            except OSError as exc:
                self.ch.raise_peer_error(exc)
            if limiter is not None:
                limiter.refund(piece.nbytes - sent)
            self.ch.note_sent(sent)
            mv = mv[sent:]
            last_progress = time.monotonic()

    def flush(self) -> None:
        return None

    def in_flight(self) -> int:
        """Bytes written to the socket the receiver has not acknowledged yet
        (the send queue, ``SIOCOUTQ``; 0 where the platform cannot tell). What
        the receiver acknowledged and has not read is at most its bounded
        queue (:data:`RECV_BUFFER`), a few ms at the rates it keeps up with."""
        try:
            raw = fcntl.ioctl(self.ch.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError, AttributeError):
            return 0
        return max(0, int(struct.unpack("i", raw)[0]))

    def drain(self, timeout: float = DRAIN_MAX_S, settle: bool = False) -> float:
        """Wait (at most ``timeout`` s) until the receiver has taken what was
        written, so it is not left to read while the guest is stopped: the host
        calls this after every round, before it weighs a suspend. ``settle``
        (just before the suspend): a receiver that was behind also has its own
        queue full (up to :data:`RECV_BUFFER`, which this host cannot see); wait
        the time it needs for that at the rate it just took this host's queue
        (at most :data:`SETTLE_MAX_S`). Returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + max(0.0, timeout)
        limiter = self.ch.limiter
        tokens = limiter.pause() if limiter is not None else 0.0
        queued = self.in_flight()
        while self.in_flight() > 0 and time.monotonic() < deadline:
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("cancelled")
            time.sleep(0.0005)
        waited = time.monotonic() - t0
        if settle and queued > 0 and waited > 0.001 and self.in_flight() == 0:
            time.sleep(min(RECV_BUFFER * waited / queued, SETTLE_MAX_S))
        waited = time.monotonic() - t0
        self.ch.drained_s += waited
        if limiter is not None:
            limiter.resume(tokens)
        return waited


class _Channel:
    """The sender's connection: control lines and (through :class:`_PeerWriter`)
    the image, every byte under the rate cap ``limiter`` when there is one."""

    def __init__(self, sock: socket.socket, host: str,
                 limiter: Optional[RateLimiter] = None) -> None:
        self.sock = sock
        self.host = host
        self.rfile = sock.makefile("rb")
        self.limiter = limiter
        self.wire_bytes = 0                      # every byte written, lines included
        self.first_at: Optional[float] = None    # first and last byte handed to the socket
        self.last_at: Optional[float] = None
        self.image_end: Optional[Tuple[int, float]] = None   # (wire bytes, time) at the end frame
        self.drained_s = 0.0       # waits for the receiver to catch up (drain): no sending

    def note_sent(self, n: int) -> None:
        if n > 0:
            now = time.monotonic()
            if self.first_at is None:
                self.first_at = now
            self.last_at = now
            self.wire_bytes += n

    def send_line(self, form: Any) -> None:
        data = _line(form)
        _pace(self.limiter, len(data), None)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.raise_peer_error(exc)
        self.note_sent(len(data))

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


def _connect(host: str, port: int, use_ssl: bool, timeout: float,
             tls: Optional[TlsSettings] = None) -> socket.socket:
    """A connection to ``host:port``; over TLS verified as ``tls`` says (none:
    xend's encrypted-but-unverified TLS)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise PeerError(f"can't connect to {host}:{port}: {exc.strerror or exc}") from None
    if not use_ssl:
        return sock
    try:
        ctx = client_context(tls)
    except (OSError, ssl_mod.SSLError) as exc:
        sock.close()
        raise PeerError(f"cannot load the relocation TLS files: {exc}") from None
    try:
        tsock = ctx.wrap_socket(sock, server_hostname=host)
    except (OSError, ssl_mod.SSLError) as exc:
        sock.close()
        raise PeerError(f"TLS handshake with {host}:{port} failed: {exc}") from None
    try:
        check_fingerprint(tsock, tls.peer_fingerprint if tls else None, f"{host}:{port}")
    except PeerError:
        tsock.close()
        raise
    return tsock


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
        "integrity": [INTEGRITY_FRAMES],
    }


def query_migration(host: str, port: int, migration_id: str, *, use_ssl: bool = False,
                    window: float = QUERY_WINDOW_S,
                    connect_timeout: float = CONNECT_TIMEOUT_S,
                    tls: Optional[TlsSettings] = None) -> Tuple[str, str]:
    """Ask the destination how migration ``migration_id`` ended: ``(answer,
    detail)`` with answer ``running``, ``aborted`` or ``unknown`` (``unknown``
    also when the peer cannot be reached within ``window`` seconds; the detail
    says why). A peer still awaiting ``go`` aborts its copy and says ``aborted``."""
    deadline = time.monotonic() + window
    last = "no attempt"
    while True:
        try:
            sock = _connect(host, port, use_ssl, min(connect_timeout, max(1.0, window)), tls)
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
            query_window: float = QUERY_WINDOW_S,
            tls: Optional[TlsSettings] = None,
            limits: Any = None, rate_cap_bps: Optional[float] = None,
            settings: Optional[Dict[str, Dict[str, Any]]] = None,
            overhead_ms: float = 0.0,
            guest_wait: float = GUEST_REPORT_WAIT_S) -> Dict[str, Any]:
    """Send ``domid`` to the relocation server at ``host:port``; returns the save
    report plus ``peer_domid``, ``destination`` (the receiver's report),
    ``migration`` (its id) and ``extended``.

    Timing (issue 7), on this host's monotonic clock: ``downtime_ms`` runs
    from the suspend to ``running`` received, with its parts ``restore_ms``
    (the receiver's end of image -> restored, from its report) and
    ``handshake_ms`` (``received`` -> ``running`` as seen here);
    ``guest_downtime_ms`` is the guest's own figure, its heartbeat's gap,
    which the receiver sends after ``running`` (waited for ``guest_wait`` s at
    most). No figure is computed from another. ``limits`` (the host's stop
    rule with ``xm migrate``'s overrides), ``rate_cap_bps`` (a cap on every
    byte written: frames, CRCs and control lines) and ``settings`` (plugin
    sections for this save, e.g. ``tmem.plan``) go to the save path, with
    ``overhead_ms``, the suspend -> running cost expected beyond the image
    (the daemon's last measurement for this destination), for the estimates.

    On success the source domain is left suspended for the caller to destroy.
    On a failure before ``go`` it is running again (tmem thawed by the save
    path's done phase) and the error is a :class:`PeerError` naming the peer,
    or the save's. ``on_accepted`` runs once the receiver is ready, before
    anything is suspended or frozen (the daemon renames the source there);
    ``on_received(peer_domid)`` runs when the receiver reported the domain
    restored, just before ``go`` is sent (the daemon journals it there; if it
    raises, ``go`` is not sent). When the outcome cannot be told even by a
    query, :class:`MigrationInDoubt` is raised and the source stays suspended.
    Every failure's message ends saying where the domain is and what to do.
    ``tls``: how the receiver's certificate is verified (``use_ssl``).
    """
    from ..checkpoint import save_domain

    progress = progress or (lambda phase, done, total: None)
    mid = migration_id or uuid.uuid4().hex
    label = name or hv.domain_info(domid).name
    progress("connect", 0, None)
    try:
        sock = _connect(host, port, use_ssl, connect_timeout, tls)
    except PeerError as exc:
        raise PeerError(_untouched(str(exc), label, host)) from None
    ch = _Channel(sock, host, RateLimiter(rate_cap_bps) if rate_cap_bps else None)
    op = "sslreceive" if use_ssl else "receive"
    state: Dict[str, Any] = {"go": False, "accepted": False}
    page_log: Optional[integrity.PageLog] = None
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
            agreed = [c[1:] for c in reply[1:] if isinstance(c, list) and c[:1] == ["integrity"]]
            if any(INTEGRITY_FRAMES in c for c in agreed):
                page_log = integrity.PageLog()    # frame CRCs and page checksums
            if str(sxp.child_value(reply, "protocol")) != str(PROTOCOL):
                raise PeerError(f"{host} speaks relocation protocol "
                                f"{sxp.child_value(reply, 'protocol')}, this host {PROTOCOL}: "
                                "upgrade both hosts")
            # the destination's own restore-finishing estimate: part of the downtime
            state["est_restore_ms"] = _restore_ms(reply)
            overhead_ms += state["est_restore_ms"]
        elif reply[0] == "refused":
            reasons = [str(c[1]) for c in sxp.children(reply, "reason") if len(c) > 1]
            raise PeerError(f"migration refused: {'; '.join(reasons) or 'no reason given'} "
                            f"(from {host})")
        elif reply[0] == "err" and reply_error_message(reply).startswith(
                "malformed pre-flight offer"):
            raise PeerError(f"{host} could not read this host's pre-flight: "
                            f"{reply_error_message(reply)}")
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
        writer = _PeerWriter(ch, cancel, io_timeout, framed=extended, page_log=page_log)

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
            ch.image_end = (ch.wire_bytes, ch.last_at or time.monotonic())
            answer = ch.read_reply(timeout=ack_timeout)
            state["received_at"] = time.monotonic()
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
                return
            jrn.killpoint("migrate-go-sent")
            # running is awaited here, before the done phase, so its arrival is
            # timed as it happens; the receiver never waits for this host's
            # done phase (it started the domain on go). After go nothing
            # raises: the outcome is settled below, by a query if need be.
            try:
                state["answer"] = ch.read_reply(timeout=ack_timeout)
            except PeerError as exc:
                state["go_error"] = str(exc)
            state["running_at"] = time.monotonic()

        report = save_domain(hv, domid, writer, hooks=hooks, live=live, progress=progress,
                             cancel=cancel, name=name, journal=journal, commit=commit,
                             page_log=page_log, limits=limits, rate_cap_bps=rate_cap_bps,
                             settings=settings, overhead_ms=overhead_ms)
        _wire_figures(report, ch, rate_cap_bps)
        report["extended"] = extended
        report["est_restore_ms"] = state.get("est_restore_ms")
        if page_log is not None:
            report["integrity"] = f"{page_log.count} page checksums and a CRC32 per frame"
        report["migration"] = mid
        if not extended:
            return report
        report["peer_domid"] = state.get("peer_domid")
        why = state.get("go_error")
        answer: Optional[List[Any]] = state.get("answer")
        if answer is not None and answer[0] == RUNNING:
            dest = _peer_report(sxp.child_value(answer, "report"))
            report["destination"] = dest
            _handshake_figures(report, state, dest)
            report["guest_downtime_ms"] = _guest_figure(ch, guest_wait)
            return report
        if why is None and answer is None:
            why = f"{host} closed the connection after go"
        elif why is None and answer is not None:
            said = reply_error_message(answer) if answer[0] == "err" else sxp.to_string(answer)
            why = f"{host} answered {said}"
        return _resolve_in_doubt(hv, domid, label, host, port, use_ssl, mid, why, report,
                                 query_window, tls)
    except PeerError as exc:
        if state["go"] or isinstance(exc, MigrationInDoubt):
            raise       # after go the messages say where it is
        if not state["accepted"]:
            raise PeerError(_untouched(str(exc), label, host)) from None
        raise PeerError(_resumed(str(exc), label, host)) from None
    except (Cancelled, MigrationInDoubt):
        raise
    except XendTmemError as exc:
        # the save's own failure before go: the source was resumed; say so, keep the type
        if not state["go"] and exc.args and isinstance(exc.args[0], str):
            exc.args = (_resumed(exc.args[0], label, host) if state["accepted"]
                        else _untouched(exc.args[0], label, host),) + exc.args[1:]
        raise
    finally:
        ch.close()


def _restore_ms(reply: List[Any]) -> float:
    """``(restore-ms N)`` of a pre-flight answer (0 when absent or malformed:
    an older receiver)."""
    value = sxp.child_value(reply, "restore-ms")
    try:
        ms = float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    return ms if 0.0 <= ms < 1e9 else 0.0


def _wire_figures(report: Dict[str, Any], ch: "_Channel",
                  rate_cap_bps: Optional[float]) -> None:
    """What went over the wire: every byte written (frames, CRCs, lines) and the
    rate from the first to the last, against the cap."""
    report["wire_bytes"] = ch.wire_bytes
    # the rate while the image streamed: first byte to the end frame (the
    # handshake's waits, and the waits for the receiver to drain before a
    # suspend is weighed, are not sending time)
    sent, end = ch.image_end or (ch.wire_bytes, ch.last_at)
    span = (end - ch.first_at - ch.drained_s) if ch.first_at is not None and end else 0.0
    report["send_mbit"] = round(sent * 8 / span / 1e6, 3) if span > 0 else None
    report["rate_cap_mbit"] = round(rate_cap_bps * 8 / 1e6, 3) if rate_cap_bps else None


def _handshake_figures(report: Dict[str, Any], state: Dict[str, Any],
                       dest: Optional[Dict[str, Any]]) -> None:
    """``downtime_ms`` = suspend -> running received; its parts ``restore_ms``
    (the receiver's own figure) and ``handshake_ms`` (received -> running here)."""
    sus = report.get("suspended_mono")
    running_at = state.get("running_at")
    if isinstance(sus, (int, float)) and running_at is not None:
        report["image_ms"] = report.get("downtime_ms")    # suspend -> image complete
        report["downtime_ms"] = round((running_at - float(sus)) * 1000.0, 3)
    received_at = state.get("received_at")
    if received_at is not None and running_at is not None:
        report["handshake_ms"] = round((running_at - received_at) * 1000.0, 3)
    restore = (dest or {}).get("restore_ms")
    report["restore_ms"] = (float(restore) if isinstance(restore, (int, float))
                            and not isinstance(restore, bool) else None)


def _guest_figure(ch: "_Channel", wait: float) -> Optional[float]:
    """The receiver's ``(guest (downtime_ms N))`` after ``running``, waited for
    ``wait`` seconds at most (an older receiver sends none: None)."""
    try:
        line = ch.read_reply(timeout=wait)
    except PeerError:
        return None
    if not line or line[0] != "guest":
        return None
    value = sxp.child_value(line, "downtime_ms")
    try:
        return round(float(value), 3) if value is not None else None
    except (TypeError, ValueError):
        return None


def _untouched(why: str, name: str, host: str) -> str:
    """A failure before the receiver took the image: nothing was moved."""
    return (f"{why}; domain {name} keeps running here, untouched: nothing to do here, "
            f"retry xm migrate once {host} accepts it")


def _resumed(why: str, name: str, host: str) -> str:
    """A failure after ``receive`` and before ``go``: the receiver destroys its
    copy (never cleared to run it); the source was resumed."""
    return (f"{why}; domain {name} keeps running here (it was not started on {host}, "
            f"whose copy is destroyed): retry xm migrate")


def _resolve_in_doubt(hv: Hypervisor, domid: int, name: str, host: str, port: int,
                      use_ssl: bool, mid: str, why: str, report: Dict[str, Any],
                      window: float, tls: Optional[TlsSettings] = None) -> Dict[str, Any]:
    """``go`` went out but ``running`` did not come back: ask the destination."""
    log.error("migrate: domain %s: cannot tell whether %s started it (%s); it stays paused "
              "here while %s:%d is asked about migration %s", name, host, why, host, port, mid)
    answer, detail = query_migration(host, port, mid, use_ssl=use_ssl, window=window, tls=tls)
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
                f"resumed here: {exc}; domain {name} is kept paused here as "
                f"migrating-{name}: see xm log, then xm unpause or xm destroy it") from None
        raise PeerError(f"{host} did not start domain {name} ({why}) and destroyed its copy; "
                        f"the domain was resumed here: domain {name} runs here, nothing lost; "
                        "retry xm migrate")
    raise MigrationInDoubt(
        f"cannot tell whether domain {name} runs on {host} ({why}; asking it: {detail}): "
        f"domain {name} is kept paused here as migrating-{name}; xend keeps asking {host} "
        f"and settles it, or once you know it runs on {host}, xm destroy migrating-{name} "
        "here")


__all__ = ["RelocationServer", "Incoming", "migrate", "query_migration", "host_allowed",
           "confirmed_names", "make_offer", "err_line", "parse_reply", "MigrationInDoubt",
           "PREFLIGHT_OP", "QUERY_OP", "PROTOCOL", "TlsSettings", "server_context",
           "client_context", "check_fingerprint", "offer_problem", "INTEGRITY_FRAMES",
           "RateLimiter"]
