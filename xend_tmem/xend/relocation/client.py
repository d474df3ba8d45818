"""The sending end of a migration (``xm migrate``, run by the xend daemon's
service): pre-flight, the image in frames through the save path, the commit
handshake, and the query that settles a migration whose outcome it could not
see; the messages are :mod:`.protocol`'s, the receiving end is :mod:`.server`.

Rate cap (``xm migrate -r MBIT``, ``migration.max-rate-mbit``): a token
bucket (:class:`RateLimiter`) paces every byte the sender writes -- frames,
CRCs and control lines.

Failure handling on the sender: an ``(err ...)`` the receiver sends while the
image is still streaming is noticed at the next write and stops the save at
once; the save path then resumes the source (tmem thawed). Any failure before
``go`` is sent resumes the source (the receiver, never cleared, destroys its
copy). When ``running`` does not come back after ``go`` the destination is
asked (:func:`query_migration`); if even that cannot tell, the source stays
paused (:class:`MigrationInDoubt`). Both sides journal each phase
(:mod:`xend_tmem.xend.journal`) so a xend killed mid-way is ended cleanly by
the next ``xend start``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import socket
import ssl as ssl_mod
import struct
import termios
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ... import fdwait, integrity
from ...codec import sxp
from ...crc import crc32
from ...errors import Cancelled, PeerError, XendTmemError
from ...hypervisor.interface import Hypervisor
from ...session import JournalFn
from .. import journal as jrn
from .protocol import (
    ABORTED, FRAME, INTEGRITY_FRAMES, IO_TIMEOUT_S, MAX_LINE, PREFLIGHT_OP, PROTOCOL, QUERY_OP,
    RECORDS_FLAG, RECV_BUFFER, RUNNING, UNKNOWN, TlsSettings, check_fingerprint,
    client_context, form_line, parse_reply, reply_error_message, timeout_from_env)

if TYPE_CHECKING:
    from ...plugins import CheckpointHooks

# one logger for both ends of the protocol, named for the package
log = logging.getLogger("xend_tmem.xend.relocation")

SETTLE_MAX_S = 0.05           # longest wait for the receiver's own queue before a suspend
DRAIN_MAX_S = 2.0             # longest wait for the receiver to catch up before a suspend
CONNECT_TIMEOUT_S = 10.0
# restore of what is left after the last byte, plus start
ACK_TIMEOUT_S = timeout_from_env("XEND_TMEM_TEST_ACK_TIMEOUT_S", 300.0)
# sender: how long to keep asking an unreachable peer before saying "in doubt"
QUERY_WINDOW_S = timeout_from_env("XEND_TMEM_TEST_QUERY_WINDOW_S", 30.0)
GUEST_REPORT_WAIT_S = 3.0     # sender: the receiver's (guest ...) line after running, at most

ProgressFn = Callable[[str, int, Optional[int]], None]


class MigrationInDoubt(PeerError):
    """The sender cannot tell whether the destination runs the domain: the
    source is kept paused (suspended) and its journal entry kept, for the next
    ``xend start`` to ask again."""


# -- the connection: rate cap, image writer, control lines --------------------

class RateLimiter:
    """A token bucket: the sender's rate cap (``xm migrate -r``,
    ``migration.max-rate-mbit``) over every byte it writes.

    Tokens accrue at ``rate_bps`` up to ``burst`` bytes (by default 10 ms worth,
    at least one 64 KiB chunk), so over any stretch longer than a few
    milliseconds the rate stays at the cap; :meth:`reserve` may drive the
    bucket into debt, and the caller waits the time it returns before sending.
    The bucket starts empty: a burst is earned by idle sending time, never given
    up front, so a short transfer does not start above the cap.
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
        self.tokens = 0.0             # empty at the start: no burst before the first byte,
        # so even a migration of a few MB stays within the cap from its first byte on
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
        self._send_all(memoryview(FRAME.pack(body.nbytes | flag)))
        self._send_all(body)
        if self.crc:
            self._send_all(memoryview(FRAME.pack(crc32(body))))

    def _send_records(self) -> None:
        """Page checksum records not sent yet, ahead of the pages they cover."""
        if self.page_log is None:
            return
        recs = memoryview(self.page_log.take_unsent_bytes())
        per = self.SLICE // integrity.RECORD_SIZE * integrity.RECORD_SIZE
        for i in range(0, recs.nbytes, per):
            self._frame(recs[i:i + per], RECORDS_FLAG)

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
        self._send_all(memoryview(FRAME.pack(0)))

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
                readable, writable = fdwait.wait(sock, read=True, write=True, timeout=0.2)
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
        data = form_line(form)
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
                fdwait.wait(sock, write=True, timeout=left)
    finally:
        sock.settimeout(saved)


# -- a migration and its query ------------------------------------------------

def _peer_report(text: Any) -> Optional[Dict[str, Any]]:
    """The receiver's restore report from its ``running`` answer (absent: None)."""
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def make_offer(hv: Hypervisor, domid: int, hooks: CheckpointHooks, *, live: bool, node: int,
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


def migrate(hv: Hypervisor, domid: int, host: str, port: int, *, live: bool,
            hooks: CheckpointHooks,
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
    from ...checkpoint import save_domain

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
        if why is None:
            if answer is None:
                why = f"{host} closed the connection after go"
            else:
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


__all__ = ["migrate", "query_migration", "make_offer", "MigrationInDoubt", "RateLimiter"]
