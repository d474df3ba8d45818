"""The relocation server's bounds under hostile peers (issue 8 #7): eviction of
the oldest waiting connection at the cap, and the sweep that ends a TLS
handshake trickling in past the control deadline."""
from __future__ import annotations

import socket
import time
from pathlib import Path

from test_hostile_regress import GOOD, Host, ask, make_cert, preflight
from xend_tmem.xend.relocation import server as relocation_server
from xend_tmem.xend.relocation.protocol import TlsSettings


def _closed(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_at_the_cap_the_oldest_waiting_connection_is_evicted(tmp_path: Path) -> None:
    import json
    h = Host(tmp_path / "h", max_connections=4)
    try:
        socks = [socket.create_connection(("127.0.0.1", h.server.port), timeout=5)
                 for _ in range(4)]
        time.sleep(0.3)
        assert ask(h.server.port, preflight(json.dumps(GOOD))) == b"(ok (protocol 2))\n"
        assert _closed(socks[0], 2.0)              # the oldest made room
        assert not _closed(socks[3], 0.3)          # the newest still waits
        for s in socks:
            s.close()
    finally:
        h.stop()


def test_a_tls_handshake_trickling_in_is_ended_by_the_sweep(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(relocation_server, "CONTROL_DEADLINE_S", 1.0)
    monkeypatch.setattr(relocation_server, "SWEEP_GRACE_S", 0.5)
    crt, key, _ = make_cert(tmp_path, "srv")
    h = Host(tmp_path / "h", tls=TlsSettings(cert_file=crt, key_file=key),
             io_timeout=30.0)
    try:
        with socket.create_connection(("127.0.0.1", h.server.port), timeout=5) as s:
            hello = b"\x16\x03\x01\x02\x00" + b"\x01" * 40     # a ClientHello that never ends
            started = time.monotonic()
            closed = False
            for b in hello:
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    closed = True
                    break
                if _closed(s, 0.2):
                    closed = True
                    break
            assert closed, "still open"
            assert time.monotonic() - started < 4.5
    finally:
        h.stop()
