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
