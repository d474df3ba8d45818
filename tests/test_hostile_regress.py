"""Regression tests for issue 8 #7: the relocation server under hostile peers.

In-process: a xend service on a simulated hypervisor with its relocation
server on loopback, driven by raw sockets. Each test names the defect it pins:
no connection cap (one thread per connection), no overall deadline for the
control phase, 1 MiB line buffers before the pre-flight, tracebacks and no
reply for malformed pre-flights, a default hosts-allow that admits everyone,
host names trusted on reverse DNS alone, TLS that never verifies the peer, and
``xm restore`` echoing the first bytes of whatever file it was given.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from xend_tmem.config import parse_toolstack_config
from xend_tmem.errors import ConfigError, XendTmemError
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.relocation import server as relocation_server
from xend_tmem.xend.relocation.client import query_migration
from xend_tmem.xend.relocation.protocol import TlsSettings
from xend_tmem.xend.relocation.server import RelocationServer, host_allowed
from xend_tmem.xend.service import XendService

LOGGER = "xend_tmem.xend.relocation"


class Host:
    def __init__(self, state: Path, **server_kw) -> None:
        state.mkdir(parents=True, exist_ok=True)
        self.hv = SimHypervisor()
        self.svc = XendService(parse_toolstack_config({"xend-state-dir": str(state)}), self.hv,
                               get_plugin_manager(["tmem"], {}))
        self.server = RelocationServer(
            "127.0.0.1", 0, hosts_allow=[], restore=self.svc.incoming_restore,
            check_offer=self.svc.check_offer, discard=self.svc.discard_domain, **server_kw)
        self.svc.relocation_servers = [self.server]
        self.server.start()

    def stop(self) -> None:
        self.svc.stop(5)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path / "host")
    yield h
    h.stop()


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def ask(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload``; the first reply line (b'' if the server closed)."""
    with connect(port, timeout) as s, s.makefile("rb") as f:
        s.sendall(payload)
        try:
            return f.readline(1 << 16)
        except socket.timeout:
            return b"<no reply within %d s>" % timeout


def preflight(offer_json: str) -> bytes:
    from xend_tmem.codec import sxp
    return (sxp.to_string(["xend-tmem-preflight", ["offer", offer_json]]) + "\n").encode()


GOOD = {"protocol": 2, "migration": "m1", "domain": {"name": "web1"}, "node": -1,
        "live": False, "plugins": {}}

MALFORMED: List[Tuple[str, bytes]] = [
    ("nested-json", preflight("[" * 20000 + "]" * 20000)),
    ("nested-json-in-field", preflight(json.dumps({**GOOD, "plugins": None})[:-1]
                                       + ', "x": ' + "{\"a\": " * 5000 + "1" + "}" * 5000
                                       + "}")),
    ("refused-domain-not-a-mapping", preflight(json.dumps(
        {**GOOD, "domain": "web1", "plugins": {"nosuch": {"pages": 1}}}))),
    ("domain-a-list", preflight(json.dumps({**GOOD, "domain": ["web1"]}))),
    ("plugins-a-list", preflight(json.dumps({**GOOD, "plugins": ["tmem"]}))),
    ("plugin-facts-a-string", preflight(json.dumps({**GOOD, "plugins": {"tmem": "x"}}))),
    ("node-a-string", preflight(json.dumps({**GOOD, "node": "zero"}))),
    ("migration-a-number", preflight(json.dumps({**GOOD, "migration": 7}))),
    ("offer-an-array", preflight("[1, 2]")),
    ("offer-not-json", preflight("{not json")),
    ("offer-a-list", b"(xend-tmem-preflight (offer (a b)))\n"),
    ("no-offer", b"(xend-tmem-preflight)\n"),
    ("query-without-id", b"(xend-tmem-query)\n"),
    ("query-id-a-list", b"(xend-tmem-query (migration (a b)))\n"),
    ("bad-sxp", b"(((\n"),
    ("not-utf8", b"\xff\xfe\n"),
    ("unknown-op", b"(frobnicate)\n"),
]


@pytest.mark.parametrize("payload", [p for _, p in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_every_malformed_message_gets_an_err_reply_and_one_log_line(host: Host, payload: bytes,
                                                                    caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    reply = ask(host.server.port, payload)
    assert reply.startswith(b"(err (type "), reply[:200]
    assert reply.endswith(b")\n")
    time.sleep(0.1)
    mine = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(mine) == 1, [r.getMessage() for r in mine]
    assert mine[0].exc_info is None and "\n" not in mine[0].getMessage()
    # the server is still whole: a good pre-flight is answered on a new connection
    assert ask(host.server.port, preflight(json.dumps({**GOOD, "migration": "m9"}))) == \
        b"(ok (protocol 2))\n"


def test_a_long_line_before_the_preflight_is_refused_quickly(host: Host) -> None:
    started = time.monotonic()
    reply = ask(host.server.port, b"a" * 5000, timeout=4)           # no newline at all
    assert reply.startswith(b"(err "), reply[:100]
    assert b"too long" in reply
    assert time.monotonic() - started < 3


def test_a_preflight_offer_has_its_own_bounded_limit(host: Host) -> None:
    big = preflight(json.dumps({**GOOD, "pad": "x" * (200 << 10)}))
    reply = ask(host.server.port, big[:-1], timeout=4)               # no newline at all
    assert reply.startswith(b"(err ") and b"too long" in reply, reply[:100]


def test_the_control_phase_has_an_overall_deadline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(relocation_server, "CONTROL_DEADLINE_S", 1.0, raising=False)
    h = Host(tmp_path / "h")
    try:
        with connect(h.server.port, timeout=0.5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got = b""
            started = time.monotonic()
            # a byte every 0.2 s never trips a per-receive timeout
            while time.monotonic() - started < 4 and not got.endswith(b"\n"):
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                try:
                    got += s.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not got:
                    break
            elapsed = time.monotonic() - started
        assert elapsed < 3, f"still open after {elapsed:.1f} s"
        assert got.startswith(b"(err ") and b"within" in got, got
    finally:
        h.stop()


def test_idle_connections_do_not_each_cost_a_thread(host: Host) -> None:
    before = threading.active_count()
    socks = []
    try:
        for _ in range(300):
            socks.append(connect(host.server.port))
        time.sleep(1.0)
        grown = threading.active_count() - before
        assert grown <= 80, f"{grown} threads for 300 idle connections"
        # a real peer is still served while they are held
        assert ask(host.server.port, preflight(json.dumps(GOOD))) == b"(ok (protocol 2))\n"
    finally:
        for s in socks:
            s.close()


# -- access control ---------------------------------------------------------------------------

def test_the_builtin_default_admits_only_localhost() -> None:
    patterns = parse_toolstack_config({}).hosts_allow_patterns()
    no_names = lambda a: []          # noqa: E731
    assert host_allowed(patterns, "127.0.0.1", no_names)
    assert host_allowed(patterns, "::1", no_names)
    assert not host_allowed(patterns, "10.0.0.1", no_names)
    assert not host_allowed(patterns, "192.168.1.10", no_names)
    # an explicitly empty setting is xend's "every host", as SPEC §9 says
    everyone = parse_toolstack_config({"xend-relocation-hosts-allow": ""}).hosts_allow_patterns()
    assert host_allowed(everyone, "10.0.0.1", no_names)


def test_host_names_must_be_forward_confirmed(monkeypatch) -> None:
    forward = {"good.example": "10.9.9.9"}

    def gethostbyaddr(addr):
        if addr == "10.9.9.9":
            return "good.example", ["alias.example"], [addr]
        if addr == "10.6.6.6":            # an attacker's reverse zone claims the good name
            return "good.example", [], [addr]
        raise socket.herror(1, "unknown host")

    def getaddrinfo(name, *args, **kw):
        if name not in forward:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (forward[name], 0))]

    monkeypatch.setattr(socket, "gethostbyaddr", gethostbyaddr)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    patterns = [re.compile(r"good\.example")]
    assert host_allowed(patterns, "10.9.9.9")
    assert not host_allowed(patterns, "10.6.6.6")


# -- TLS peer verification ------------------------------------------------------------------------

def make_cert(d: Path, name: str) -> Tuple[str, str, str]:
    """A self-signed EC certificate: (cert, key, sha256 fingerprint hex)."""
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=30)
    der = ssl.PEM_cert_to_DER_cert(crt.read_text())
    import hashlib
    return str(crt), str(key), hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return {n: make_cert(d, n) for n in ("a", "b", "c")}


def test_config_has_tls_peer_verification_keys(certs) -> None:
    crt, _, fp = certs["a"]
    colons = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    cfg = parse_toolstack_config({"xend-relocation-ssl-ca-file": crt,
                                  "xend-relocation-ssl-peer-fingerprint": colons})
    assert cfg.relocation_ssl_ca_file == crt
    assert cfg.relocation_ssl_peer_fingerprint == fp
    with pytest.raises(ConfigError, match="xend-relocation-ssl-peer-fingerprint"):
        parse_toolstack_config({"xend-relocation-ssl-peer-fingerprint": "abc"})


def tls_host(tmp_path: Path, me, peer_fp=None, ca=None) -> Host:
    tls = TlsSettings(cert_file=me[0], key_file=me[1], ca_file=ca,
                      peer_fingerprint=peer_fp)
    return Host(tmp_path / f"tls-{time.monotonic_ns()}", tls=tls)


def query_tls(port: int, tls) -> Tuple[str, str]:
    return query_migration("127.0.0.1", port, "nobody", use_ssl=True, tls=tls,
                           window=0.5)


def test_tls_pinned_both_directions(tmp_path: Path, certs) -> None:
    a, b, c = certs["a"], certs["b"], certs["c"]
    # the server admits only b's certificate: Python's ssl has no verify callback, so a
    # server requests client certificates only with a CA file (here b's own certificate)
    h = tls_host(tmp_path, a, peer_fp=b[2], ca=b[0])
    try:
        ok = TlsSettings(cert_file=b[0], key_file=b[1], peer_fingerprint=a[2])
        assert query_tls(h.server.port, ok) == ("unknown", "127.0.0.1 answered unknown")
        # the client refuses a server whose certificate is not the pinned one
        wrong = TlsSettings(cert_file=b[0], key_file=b[1], peer_fingerprint=c[2])
        answer, detail = query_tls(h.server.port, wrong)
        assert answer == "unknown" and "fingerprint" in detail, detail
        # the server refuses a client presenting another certificate
        other = TlsSettings(cert_file=c[0], key_file=c[1], peer_fingerprint=a[2])
        answer, detail = query_tls(h.server.port, other)
        assert answer == "unknown" and "answered" not in detail, detail
    finally:
        h.stop()


def test_tls_client_verifies_the_server_against_a_ca_file(tmp_path: Path, certs) -> None:
    a, b = certs["a"], certs["b"]
    h = tls_host(tmp_path, a)
    try:
        good = TlsSettings(ca_file=a[0])
        assert query_tls(h.server.port, good)[1] == "127.0.0.1 answered unknown"
        bad = TlsSettings(ca_file=b[0])
        answer, detail = query_tls(h.server.port, bad)
        assert answer == "unknown" and "verify failed" in detail, detail
    finally:
        h.stop()


# -- xm restore of an arbitrary file -----------------------------------------------------------

def test_restore_of_an_arbitrary_file_does_not_echo_its_content(host: Host,
                                                               tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$SECRETHASH:19000:0:99999:7:::\n")
    from xmlrpc.client import Fault
    with pytest.raises((XendTmemError, Fault)) as info:
        host.svc.domain_restore(str(secret))
    text = str(info.value)
    assert "root" not in text and "SECRET" not in text and "$6$" not in text, text
    assert str(secret) in text or "not a xend save image" in text
