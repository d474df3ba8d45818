"""xend's relocation protocol (SPEC §6): migration between daemons over TCP.

Stock protocol, unchanged::

    sender:   receive\\n                      (TLS port: sslreceive\\n)
    receiver: (ready receive)\\n              ((ready sslreceive)\\n)
    sender:   the xend image (SPEC §1), then closes its sending side
    receiver: on failure (err (type T) (value 'message')) and closes;
              on success xend closed without a word

Two extensions, both invisible to a stock xend on either end:

* **Pre-flight.** Before ``receive`` -- before the source is renamed, frozen or
  suspended -- the sender asks::

      (xend-tmem-preflight (offer "<JSON>"))\\n

  where the JSON is ``{"protocol": 1, "domain": {...}, "node": N, "live": bool,
  "plugins": {plugin_name: facts}}`` (``facts`` from the plugins'
  ``checkpoint_migrate_offer``). The receiver answers ``(ok (protocol 1))`` or
  ``(refused (reason "...") ...)``: it refuses a domain carrying state of a plugin
  it has not enabled, and whatever its plugins' ``checkpoint_migrate_check``
  refuses (tmem spec version, room). A stock xend answers an unknown operation
  with ``(err ...)`` and keeps reading, so the sender goes on with plain
  ``receive`` and no extension; if the connection closes instead (xend drops a
  host its hosts-allow rejects), that first error is what the sender reports.
* **Acknowledgement.** A receiver that accepted a pre-flight, after restoring
  and starting the domain, sends ``(ok (domid N) (name NAME) (report "<JSON>"))``
  (the report: its restore's figures and plugins' findings); the sender
  destroys its copy only then. Without pre-flight (a stock sender) the
  receiver closes silently on success, as xend did.

TLS (``xm migrate --ssl``, the ``xend-relocation-ssl-server`` port): the same
exchange inside TLS, the operation spelled ``sslreceive``. As in xend the sender
encrypts but does not verify the receiver's certificate. The image's end is a
TLS close_notify rather than a bare TCP half-close, so the session survives to
carry the acknowledgement back.

Access control: ``xend-relocation-hosts-allow`` patterns must match the *whole*
peer address or host name (``re.fullmatch``; xend's ``re.match`` let
``^10\\.0\\.0\\.1`` admit 10.0.0.10). A rejected peer gets an ``(err ...)``.

Failure handling on the sender: an ``(err ...)`` the receiver sends while the
image is still streaming is noticed at the next write and stops the save at
once; the save path then resumes the source (tmem thawed). A failure after the
image was sent (refused restore, no acknowledgement) resumes the source here.
The receiver removes a domain whose restore failed (the restore path does) or
whose acknowledgement could not be sent. One window is inherent to any
acknowledgement: if the link dies after the receiver sent its ``ok`` but before
the sender read it, both hosts hold the domain (the source resumed); the
sender's error then says to check the destination.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import ssl as ssl_mod
import threading
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Pattern, Sequence, Set, Tuple

from ..codec import sxp
from ..errors import Cancelled, PeerError, XendTmemError

log = logging.getLogger("xend_tmem.xend.relocation")

PROTOCOL = 1
PREFLIGHT_OP = "xend-tmem-preflight"
MAX_LINE = 1 << 20            # longest control line (a pre-flight offer) accepted
MAX_OPS = 16                  # control operations per connection before "receive"
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 60.0           # no byte moved for this long: the peer is gone
ACK_TIMEOUT_S = 300.0         # restore of what is left after the last byte, plus start
DRAIN_AFTER_ERROR_S = 2.0     # let the sender read our (err ...) before we close

ProgressFn = Callable[[str, int, Optional[int]], None]


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

RestoreFn = Callable[[BinaryIO, str], Tuple[int, Dict[str, Any]]]
CheckFn = Callable[[Dict[str, Any]], List[str]]
DiscardFn = Callable[[int], None]


class RelocationServer:
    """Listens for migrations and restores them; one thread per connection.

    :param restore: ``restore(stream, peer) -> (domid, report)``, builds and starts
        the domain from the image on ``stream``; raises on failure having removed it.
    :param check_offer: the receiving host's answer to a pre-flight offer: a list
        of reasons to refuse (empty = accept).
    :param discard: removes a restored domain whose acknowledgement failed.
    """

    def __init__(self, address: str, port: int, *, hosts_allow: Sequence[Pattern[str]],
                 restore: RestoreFn, check_offer: CheckFn, discard: DiscardFn,
                 ssl_context: Optional[ssl_mod.SSLContext] = None,
                 io_timeout: float = IO_TIMEOUT_S) -> None:
        self.hosts_allow = list(hosts_allow)
        self.restore = restore
        self.check_offer = check_offer
        self.discard = discard
        self.ssl_context = ssl_context
        self.io_timeout = io_timeout
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
        self._conns: Set[socket.socket] = set()
        self._threads: Set[threading.Thread] = set()
        self._accept_thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"relocation:{self.port}")
        self._accept_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, break open connections (their restores fail and are
        removed), and wait for the connection threads."""
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


class _Receiver:
    """One incoming connection: control lines, then at most one image."""

    def __init__(self, server: RelocationServer, conn: socket.socket, peer: str) -> None:
        self.server = server
        self.conn = conn
        self.peer = peer
        self.rfile = conn.makefile("rb")
        self.extended = False

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
        if not isinstance(offer, dict):
            self._send(_line(["refused", ["reason", "malformed pre-flight offer"]]))
            return
        try:
            reasons = list(self.server.check_offer(offer))
        except XendTmemError as exc:
            reasons = [str(exc)]
        if reasons:
            log.info("relocation: refused %s from %s: %s",
                     (offer.get("domain") or {}).get("name"), self.peer, "; ".join(reasons))
            self._send(_line(["refused", *(["reason", r] for r in reasons)]))
            return
        self.extended = True
        self._send(_line(["ok", ["protocol", str(PROTOCOL)]]))

    def _receive(self) -> None:
        self._send(_line(["ready", self.server.op]))
        log.info("relocation: receiving a domain from %s", self.peer)
        try:
            domid, report = self.server.restore(self.rfile, self.peer)
        except Exception as exc:
            if isinstance(exc, XendTmemError):
                message = str(exc)
            elif isinstance(exc, OSError):
                message = f"connection from {self.peer} lost: {exc.strerror or exc}"
            else:
                message = f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, (XendTmemError, OSError)):
                log.exception("relocation: restore from %s failed", self.peer)
            else:
                log.warning("relocation: restore from %s failed: %s", self.peer, message)
            try:
                self._send(err_line(type(exc).__name__, message))
            except OSError:
                return
            _drain(self.conn)
            return
        if not self.extended:
            return            # a stock sender expects no acknowledgement
        try:
            self._send(_line(["ok", ["domid", str(domid)], ["name", str(report.get("name", ""))],
                              ["report", json.dumps(report, sort_keys=True, default=str)]]))
        except OSError as exc:
            log.warning("relocation: acknowledgement to %s failed (%s): removing domain %d",
                        self.peer, exc, domid)
            self.server.discard(domid)



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
    I/O timeout) and for a peer that stopped reading altogether.
    """

    SLICE = 1 << 20

    def __init__(self, channel: "_Channel", cancel: Optional[threading.Event],
                 io_timeout: float) -> None:
        self.ch = channel
        self.cancel = cancel
        self.io_timeout = io_timeout

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        total = mv.nbytes
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
                sent = sock.send(mv[:self.SLICE])
            except socket.timeout:
                sent = 0
            except OSError as exc:
                self.ch.raise_peer_error(exc)
            mv = mv[sent:]
            last_progress = time.monotonic()
        return total

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

    def check_peer_error(self) -> None:
        """Between writes: has the receiver already said why it gave up?"""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return
        if readable:
            self.raise_peer_error(None)

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
    except socket.gaierror as exc:
        raise PeerError(f"can't connect to {host}:{port}: {exc.strerror or exc}") from None
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
    """End our sending side (the image's EOF) but keep reading (the answer).

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
    """The receiver's restore report from its acknowledgement (absent: None)."""
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def make_offer(hv, domid: int, hooks, *, live: bool, node: int) -> Dict[str, Any]:
    info = hv.domain_info(domid)
    return {
        "protocol": PROTOCOL,
        "domain": {"name": info.name, "memory_mib": info.memory_mib, "vcpus": info.vcpus},
        "node": node,
        "live": live,
        "plugins": hooks.migrate_offer(hv, domid),
    }


def migrate(hv, domid: int, host: str, port: int, *, live: bool, hooks,
            node: int = -1, use_ssl: bool = False, progress: Optional[ProgressFn] = None,
            cancel: Optional[threading.Event] = None,
            on_accepted: Optional[Callable[[], None]] = None,
            connect_timeout: float = CONNECT_TIMEOUT_S, io_timeout: float = IO_TIMEOUT_S,
            ack_timeout: float = ACK_TIMEOUT_S) -> Dict[str, Any]:
    """Send ``domid`` to the relocation server at ``host:port``; returns the save
    report plus ``peer_domid`` (when the receiver acknowledged) and ``extended``.

    On success the source domain is left suspended for the caller to destroy.
    On any failure it is running again (tmem thawed by the save path's done
    phase) and the error is a :class:`PeerError` naming the peer, or the save's.
    ``on_accepted`` runs once the receiver is ready, before anything is
    suspended or frozen (the daemon renames the source there).
    """
    from ..checkpoint import save_domain

    progress = progress or (lambda phase, done, total: None)
    progress("connect", 0, None)
    sock = _connect(host, port, use_ssl, connect_timeout)
    ch = _Channel(sock, host)
    op = "sslreceive" if use_ssl else "receive"
    try:
        sock.settimeout(io_timeout)
        progress("preflight", 0, None)
        offer = make_offer(hv, domid, hooks, live=live, node=node)
        ch.send_line([PREFLIGHT_OP, ["offer", json.dumps(offer, sort_keys=True)]])
        reply = ch.read_reply()
        stock_error: Optional[str] = None
        if reply is None:
            raise PeerError(f"{host} closed the connection (is this host allowed by its "
                            "xend-relocation-hosts-allow?)")
        if reply[0] == "ok":
            extended = True
        elif reply[0] == "refused":
            reasons = [str(c[1]) for c in sxp.children(reply, "reason") if len(c) > 1]
            raise PeerError(f"migration refused: {'; '.join(reasons) or 'no reason given'} "
                            f"(from {host})")
        elif reply[0] == "err":
            extended = False          # a stock xend: no pre-flight, no acknowledgement
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
        if on_accepted is not None:
            on_accepted()
        report = save_domain(hv, domid, _PeerWriter(ch, cancel, io_timeout), hooks=hooks,
                             live=live, progress=progress, cancel=cancel)
        sent_at = time.monotonic()
        # From here the source is suspended: any failure must resume it.
        try:
            progress("ack", int(report.get("bytes", 0)), None)
            try:
                _half_close(sock, io_timeout)
            except OSError as exc:
                ch.raise_peer_error(exc)
            reply = ch.read_reply(timeout=ack_timeout)
            if reply is not None and reply[0] == "err":
                raise PeerError(f"{reply_error_message(reply)} (from {host})")
            if extended:
                if reply is None:
                    raise PeerError(f"{host} closed the connection without confirming the "
                                    "restore; the domain was resumed here, check it there")
                if reply[0] != "ok":
                    raise PeerError(f"unexpected answer {sxp.to_string(reply)} (from {host})")
                peer_domid = sxp.child_value(reply, "domid")
                report["peer_domid"] = int(peer_domid) if str(peer_domid).isdigit() else None
                report["destination"] = _peer_report(sxp.child_value(reply, "report"))
                # suspend here until the destination confirmed the domain runs there
                report["resumed_after_s"] = round(
                    float(report.get("downtime_s", 0.0)) + time.monotonic() - sent_at, 6)
            elif reply is not None:
                raise PeerError(f"unexpected answer {sxp.to_string(reply)} (from {host})")
        except BaseException:
            try:
                hv.resume(domid)
            except XendTmemError as exc:
                log.error("migrate: could not resume domain %d: %s", domid, exc)
            raise
        report["extended"] = extended
        return report
    finally:
        ch.close()


__all__ = ["RelocationServer", "migrate", "host_allowed", "make_offer", "err_line",
           "parse_reply", "PREFLIGHT_OP", "PROTOCOL"]
