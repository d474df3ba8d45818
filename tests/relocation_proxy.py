"""A loopback TCP proxy between a migration's sender and a relocation server
that cuts the link or drops one handshake message (test helper).

It understands just enough of the extended relocation protocol to find the
messages: control lines, then (after ``receive``) the framed image, then
control lines again. Only the first connection is faulted; later ones (the
sender's query after a lost ``running``) pass through untouched.

Faults:

* ``("cut-bytes", n)``: close both sides once ``n`` bytes went sender -> receiver.
* ``("cut-before", msg)``: close both sides instead of forwarding ``msg``.
* ``("cut-after", msg)``: forward ``msg``, then close both sides.
* ``("drop", msg)``: swallow ``msg`` and keep the connection open.

``msg`` is ``received``, ``go`` or ``running`` (matched on the line's first word).

With ``crc32-frames`` negotiated (the receiver's ``ok`` says so) each frame
carries a CRC32 trailer and page-checksum frames have the length's top bit set;
the proxy follows both.
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import List, Optional, Tuple

Fault = Tuple[str, object]


class Proxy:
    def __init__(self, target_port: int, fault: Optional[Fault] = None) -> None:
        self.target_port = target_port
        self.fault = fault
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.seen: List[str] = []          # messages (first words) seen, both ways
        self.fired = threading.Event()     # the fault happened
        self.sent_up = 0                   # bytes sender -> receiver forwarded
        self.crc_frames = False            # crc32-frames negotiated on the first connection
        self._closing = threading.Event()
        self._threads: List[threading.Thread] = []
        self._socks: List[socket.socket] = []
        self._lock = threading.Lock()
        self._first = True
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._closing.set()
        _kill(self.listener)             # shutdown wakes the blocked accept()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _kill(s)
        for t in self._threads:
            t.join(5)

    # -- plumbing --------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                _kill(down)
                continue
            up.settimeout(None)
            down.settimeout(None)
            with self._lock:
                fault = self.fault if self._first else None
                self._first = False
                self._socks += [up, down]
            pair = _Pair(self, down, up, fault)
            for target in (pair.pump_up, pair.pump_down):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                self._threads.append(t)


def _kill(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


class _Pair:
    """One proxied connection: sender side ``down``, receiver side ``up``."""

    def __init__(self, proxy: Proxy, down: socket.socket, up: socket.socket,
                 fault: Optional[Fault]) -> None:
        self.proxy = proxy
        self.down = down
        self.up = up
        self.fault = fault
        self.cut = threading.Event()

    def _cut(self) -> None:
        self.cut.set()
        self.proxy.fired.set()
        _kill(self.down)
        _kill(self.up)

    def _message(self, line: bytes, to: socket.socket) -> bool:
        """Forward (or not) one control line; False once the link is cut."""
        word = line.strip(b"\n()").split(b" ")[0].decode(errors="replace")
        self.proxy.seen.append(word)
        if word == "ok" and b"crc32-frames" in line:
            self.proxy.crc_frames = True
        kind, arg = self.fault if self.fault else ("", None)
        if arg == word and kind == "drop":
            self.proxy.fired.set()
            return True
        if arg == word and kind == "cut-before":
            self._cut()
            return False
        if not self._send(to, line, count=to is self.up):
            return False
        if arg == word and kind == "cut-after":
            self._cut()
            return False
        return True

    def _send(self, to: socket.socket, data: bytes, count: bool) -> bool:
        if count and self.fault and self.fault[0] == "cut-bytes":
            room = int(self.fault[1]) - self.proxy.sent_up  # type: ignore[arg-type]
            if len(data) >= room:
                try:
                    to.sendall(data[:max(0, room)])
                except OSError:
                    pass
                self.proxy.sent_up += max(0, room)
                self._cut()
                return False
        try:
            to.sendall(data)
        except OSError:
            self._cut()
            return False
        if count:
            self.proxy.sent_up += len(data)
        return True

    def pump_up(self) -> None:
        """Sender -> receiver: lines, ``receive``, frames, lines."""
        f = self.down.makefile("rb")
        try:
            framed = False
            while not self.cut.is_set():
                if not framed:
                    line = f.readline(1 << 21)
                    if not line:
                        break
                    if not self._message(line, self.up):
                        return
                    if line.strip() in (b"receive", b"sslreceive"):
                        framed = "ok" in self.proxy.seen
                        if not framed:       # a stock sender: raw image to the end
                            while True:
                                data = f.read1(1 << 16)
                                if not data or not self._send(self.up, data, True):
                                    return
                        continue
                else:
                    head = f.read(4)
                    if len(head) < 4:
                        break
                    (n,) = struct.unpack(">I", head)
                    if self.proxy.crc_frames and n:
                        body = f.read((n & 0x7FFFFFFF) + 4)      # the bytes and their CRC32
                    else:
                        body = f.read(n) if n else b""
                    if not self._send(self.up, head + body, True):
                        return
                    if n == 0:
                        framed = False
            try:
                self.up.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            self._cut()
        finally:
            f.close()

    def pump_down(self) -> None:
        """Receiver -> sender: control lines only."""
        f = self.up.makefile("rb")
        try:
            while not self.cut.is_set():
                line = f.readline(1 << 21)
                if not line:
                    break
                if not self._message(line, self.down):
                    return
            try:
                self.down.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            self._cut()
        finally:
            f.close()
