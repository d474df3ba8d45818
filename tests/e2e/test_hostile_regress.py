"""Issue 8 #7 against a real daemon: hostile peers on the relocation port.

1000 idle and 300 long-line connections are opened and held; meanwhile the
daemon's memory grows by less than 64 MiB, a real migration to it completes,
and every malformed message (nested JSON, wrong types) gets an ``(err ...)``
reply without a traceback in its log.
"""
from __future__ import annotations

import json
import resource
import socket
import time
from pathlib import Path
from typing import List

import pytest

from xend_tmem.codec import sxp

from .xendtest import STILL_DOMAIN, write_domain

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IDLE = 1000
LONG = 300
GROWTH_LIMIT_KIB = 64 << 10


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def preflight(offer: str) -> bytes:
    return (sxp.to_string(["xend-tmem-preflight", ["offer", offer]]) + "\n").encode()


GOOD = {"protocol": 2, "migration": "m1", "domain": {"name": "x"}, "node": -1,
        "live": False, "plugins": {}}
MALFORMED = [
    preflight("[" * 20000 + "]" * 20000),
    preflight(json.dumps({**GOOD, "domain": "x", "plugins": {"nosuch": {"a": 1}}})),
    preflight(json.dumps({**GOOD, "plugins": ["tmem"]})),
    preflight(json.dumps({**GOOD, "node": "zero"})),
    preflight(json.dumps({**GOOD, "migration": 7})),
    b"(xend-tmem-preflight (offer (a b)))\n",
    b"(xend-tmem-query (migration (a b)))\n",
    b"(((\n",
]


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < IDLE + LONG + 200:
        pytest.skip(f"open file limit {want} too low for {IDLE + LONG} connections")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_hostile_peers_held_while_a_real_migration_completes(xends, tmp_path: Path,
                                                             many_fds) -> None:
    a = xends.start("a")
    b = xends.start("b")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    pid = b.proc.pid
    before = rss_kib(pid)
    held: List[socket.socket] = []
    t0 = time.monotonic()
    try:
        for _ in range(IDLE):
            held.append(socket.create_connection(("127.0.0.1", b.port), timeout=10))
        for _ in range(LONG):
            s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
            s.setblocking(False)
            try:
                s.send(b"x" * 4000)               # a long line, not ended
            except OSError:
                pass
            held.append(s)
        print(f"connections opened in {time.monotonic() - t0:.1f} s")
        time.sleep(1.0)
        during = rss_kib(pid)
        t0 = time.monotonic()
        r = a.xm("migrate", "-p", str(b.port), "still1", "127.0.0.1")
        assert r.returncode == 0, r.stderr
        assert b.domains()["still1"][3] == "r-----"
        after = rss_kib(pid)
        print(f"migration took {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        for payload in MALFORMED:
            with socket.create_connection(("127.0.0.1", b.port), timeout=10) as s, \
                    s.makefile("rb") as f:
                s.sendall(payload)
                reply = f.readline(1 << 16)
            assert reply.startswith(b"(err (type "), (payload[:60], reply[:200])
        print(f"malformed answered in {time.monotonic() - t0:.1f} s")
        grown = max(during, after) - before
        print(f"xend rss {before} KiB -> {during} KiB held -> {after} KiB after the migration")
        assert grown < GROWTH_LIMIT_KIB, f"grew by {grown} KiB"
    finally:
        for s in held:
            s.close()
    text = b.log_text()
    assert "Traceback" not in text and "RecursionError" not in text
    assert "malformed message" in text


def _cert(d: Path, name: str):
    import hashlib
    import ssl
    import subprocess
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=30)
    fp = hashlib.sha256(ssl.PEM_cert_to_DER_cert(crt.read_text())).hexdigest()
    return str(crt), str(key), ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()


@pytest.mark.slow
def test_xm_migrate_ssl_verifies_the_peer_both_ways(xends, tmp_path: Path) -> None:
    """Each host pins the other's certificate (CA file + fingerprint): a migration
    over TLS succeeds; a source whose certificate the receiver does not trust,
    or that pins another receiver certificate, is refused and keeps its domain."""
    import shutil
    from .xendtest import free_port
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    ca, cb, cc = (_cert(tmp_path, n) for n in ("a", "b", "c"))

    def tls(me, peer, port=None):
        return {"xend-relocation-ssl-server": True,
                "xend-relocation-ssl-port": port or free_port(),
                "xend-relocation-server-ssl-key-file": me[1],
                "xend-relocation-server-ssl-cert-file": me[0],
                "xend-relocation-ssl-ca-file": peer[0],
                "xend-relocation-ssl-peer-fingerprint": peer[2]}

    b_ssl = free_port()
    a = xends.start("a", **tls(ca, cb))
    b = xends.start("b", **tls(cb, ca, b_ssl))
    c = xends.start("c", **tls(cc, cb))           # trusts b, but b does not trust c
    d = xends.start("d", **tls(ca, (cb[0], cb[1], cc[2])))   # a's key pair; pins c's print
    for x in (a, c, d):
        x.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    r = c.xm("migrate", "--ssl", "-p", str(b_ssl), "still1", "127.0.0.1")
    assert r.returncode == 1 and "keeps running here" in r.stderr, r.stderr
    assert c.domains()["still1"][3] == "r-----"
    r = d.xm("migrate", "--ssl", "-p", str(b_ssl), "still1", "127.0.0.1")
    assert r.returncode == 1 and "xend-relocation-ssl-peer-fingerprint" in r.stderr, r.stderr
    assert d.domains()["still1"][3] == "r-----"
    out = a.xm_ok("migrate", "--ssl", "-p", str(b_ssl), "still1", "127.0.0.1")
    assert out.startswith(f"Migrated domain still1 to 127.0.0.1:{b_ssl}")
    assert b.domains()["still1"][3] == "r-----"
