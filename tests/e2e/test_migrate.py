"""xm migrate between real daemons (and a stock-xend stand-in) on loopback."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .xendtest import (BUSY_DOMAIN, STILL_DOMAIN, FakeStockXend, report_field, run_in_pty,
                       wait_for, write_domain)

pytestmark = pytest.mark.e2e


def pools_by_kind(xend, dom: str) -> dict:
    return {p["kind"]: int(p["pages"]) for p in xend.tmem_pools(dom).values()}


def assert_untouched(xend, dom: str, domid: str) -> None:
    """Still there under its own name, running, its tmem neither frozen nor saving."""
    doms = xend.domains()
    assert dom in doms and f"migrating-{dom}" not in doms
    assert doms[dom][0] == domid and doms[dom][3] == "r-----"
    client = xend.tmem_client(dom)
    assert (client["frozen"], client["saving"]) == ("0", "0")


def test_live_migration_moves_the_domain_and_its_tmem(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    b = xends.start("b")
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    time.sleep(0.3)                                     # let the guest run a little
    r = a.xm("migrate", "--live", "-p", str(b.port), "web1", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                               # off a terminal: the report only
    head = r.stdout.splitlines()[0]
    assert head.startswith(f"Migrated domain web1 to 127.0.0.1:{b.port} (live), now id=1 there: ")
    plan = report_field(r.stdout, "tmem: plan ")
    assert any(p in plan for p in ("precopy", "late-freeze", "after-suspend"))
    assert "pages invalidated" in report_field(r.stdout, "tmem: ") or \
        "pages invalidated" in r.stdout
    assert re.fullmatch(r"downtime: [\d.]+ (ms|s) until the (destination ran it|image was sent)"
                        r"(, the guest noticed [\d.]+ (ms|s))?, expected [\d.]+ (ms|s)",
                        report_field(r.stdout, "downtime: "))
    assert "web1" not in a.domains() and "migrating-web1" not in a.domains()
    assert "tmem plan" in a.log_text()          # what the pre-flight test relies on
    assert b.domains()["web1"][3] == "r-----"
    kinds = pools_by_kind(b, "web1")
    # ephemeral pages are never carried (the engine tests prove they arrive empty);
    # the guest's workload travelled in its config and refills them there
    assert kinds["persistent"] > 0
    client = b.tmem_client("web1")
    assert (client["frozen"], client["saving"], client["weight"]) == ("0", "0", "5")


def test_non_live_migration_is_exact_and_json_report(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    b = xends.start("b")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    r = a.xm("migrate", "--json", "-p", str(b.port), "still1", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["op"] == "migrate" and report["live"] is False and report["peer_domid"] == 1
    assert report["plugins"]["tmem"]["pages"] == 1024
    assert "still1" not in a.domains()
    assert pools_by_kind(b, "still1") == {"persistent": 1024, "ephemeral": 0}


def test_hosts_allow_must_match_the_whole_address(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    # xend's re.match would have let 127.0.0.1 in through the prefix 127\.0\.0\.
    b = xends.start("b", **{"xend-relocation-hosts-allow": r"^10\.0\.0\.1$ 127\.0\.0\."})
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    domid = a.domains()["web1"][0]
    r = a.xm("migrate", "-l", "-p", str(b.port), "web1", "127.0.0.1")
    assert r.returncode == 1
    assert r.stderr == ("Error: host 127.0.0.1 is not allowed by xend-relocation-hosts-allow "
                        "(from 127.0.0.1); domain web1 keeps running here, untouched: nothing "
                        "to do here, retry xm migrate once 127.0.0.1 accepts it\n")
    assert_untouched(a, "web1", domid)
    assert "web1" not in b.domains()
    assert "rejected connection from 127.0.0.1" in b.log_text()

    c = xends.start("c", **{"xend-relocation-hosts-allow": r"10\.0\.0\.1 127\.0\.0\.1"})
    a.xm_ok("migrate", "-p", str(c.port), "web1", "127.0.0.1")
    assert "web1" in c.domains()


def test_receiver_without_the_plugin_refuses_at_preflight(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    b = xends.start("b", **{"checkpoint-plugins": []})
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    domid = a.domains()["web1"][0]
    fallbacks = int(a.tmem_client("web1")["swap_fallbacks"])
    r = a.xm("migrate", "-l", "-p", str(b.port), "web1", "127.0.0.1")
    assert r.returncode == 1
    assert r.stderr.startswith("Error: migration refused: ")
    assert "checkpoint plugin 'tmem' is not enabled" in r.stderr
    assert r.stderr.endswith("(from 127.0.0.1); domain web1 keeps running here, untouched: "
                             "nothing to do here, retry xm migrate once 127.0.0.1 accepts it\n")
    assert_untouched(a, "web1", domid)
    # never frozen: a busy guest whose tmem had been frozen would have had puts refused
    assert int(a.tmem_client("web1")["swap_fallbacks"]) == fallbacks
    assert "web1" not in b.domains()
    # the save path never started: it logs its tmem plan at setup, before any freeze
    assert "tmem plan" not in a.log_text()
    # a domain without tmem is welcome there
    plain = write_domain(tmp_path, {"name": "plain", "memory": 8})
    a.xm_ok("create", str(plain))
    a.xm_ok("migrate", "-p", str(b.port), "plain", "127.0.0.1")
    assert "plain" in b.domains()


def test_migration_to_a_stock_xend(xends, tmp_path: Path) -> None:
    """No pre-flight answer, no acknowledgement: xend's protocol, xend's outcome."""
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    peer = FakeStockXend("ok")
    try:
        out = a.xm_ok("migrate", "-p", str(peer.port), "still1", "127.0.0.1")
        assert peer.done.wait(10)
    finally:
        peer.close()
    assert peer.ops[-1] == "receive" and peer.head == b"LinuxGuestRecord"
    assert peer.received > 32 << 20                     # RAM + persistent tmem
    assert "now id=" not in out.splitlines()[0]         # nobody confirmed anything
    assert "still1" not in a.domains()                  # xend destroyed the source, so do we

    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    domid = a.domains()["still1"][0]
    peer = FakeStockXend("err")
    try:
        r = a.xm("migrate", "-p", str(peer.port), "still1", "127.0.0.1")
    finally:
        peer.close()
    assert r.returncode == 1
    assert r.stderr == ("Error: restore failed: disk full (from 127.0.0.1); domain still1 keeps "
                        "running here (it was not started on 127.0.0.1, whose copy is "
                        "destroyed): retry xm migrate\n")
    assert_untouched(a, "still1", domid)


def test_second_operation_refused_and_ctrl_c_resumes_the_source(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    domid = a.domains()["still1"][0]
    peer = FakeStockXend("stall")
    first = subprocess.Popen([sys.executable, "-m", "xend_tmem.xend.xm", "migrate", "-p",
                              str(peer.port), "still1", "127.0.0.1"],
                             env=a.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "migrating-still1" in a.domains())
        for args in (("migrate", domid, "127.0.0.1"), ("save", domid, str(tmp_path / "x.img")),
                     ("destroy", domid), ("pause", domid)):
            r = a.xm(*args)
            assert r.returncode == 1, args
            assert "migrating-still1" in r.stderr and "being migrated" in r.stderr, r.stderr
        assert not (tmp_path / "x.img").exists()
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
        peer.close()
    assert first.returncode == 1, err
    assert "Cancelling" in err and err.rstrip().endswith("Error: cancelled")
    assert_untouched(a, "still1", domid)


def test_progress_on_a_terminal_and_only_the_report_off_it(xends, tmp_path: Path) -> None:
    import re
    a = xends.start("a")
    b = xends.start("b")
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    rc, screen = run_in_pty([sys.executable, "-m", "xend_tmem.xend.xm", "migrate", "-l", "-p",
                             str(b.port), "web1", "127.0.0.1"], env=a.env(), cwd=str(a.root))
    assert rc == 0, screen
    # the status line is redrawn in place: carriage returns not followed by a newline
    assert re.search(r"\r(?!\n)", screen), screen
    frames = [f for f in re.split(r"\r\n|\r|\n", screen) if f.startswith("migrate: ")]
    assert frames, screen
    assert any(re.search(r"\d+(\.\d)? (B|KiB|MiB)", f) for f in frames)
    assert frames[-1].startswith("migrate: done") and "/s" in frames[-1]
    lines = [ln.strip() for ln in re.split(r"\r\n|\n", screen)]
    report_at = next(i for i, ln in enumerate(lines) if ln.startswith("Migrated domain web1"))
    assert any(ln.startswith("tmem: plan ") for ln in lines[report_at:])
    assert any(ln.startswith("downtime: ") for ln in lines[report_at:])

    r = b.xm("migrate", "-l", "-p", str(a.port), "web1", "127.0.0.1")   # and back, piped
    assert r.returncode == 0 and r.stderr == ""
    assert "\r" not in r.stdout
    assert r.stdout.splitlines()[0].startswith("Migrated domain web1 to 127.0.0.1:")
    assert all(ln.startswith(("Migrated domain", "tmem: ", "downtime: "))
               for ln in r.stdout.splitlines()), r.stdout


def test_migration_over_tls(xends, tmp_path: Path) -> None:
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    from .xendtest import free_port
    ssl_port = free_port()
    a = xends.start("a")
    b = xends.start("b", **{"xend-relocation-ssl-server": True,
                            "xend-relocation-ssl-port": ssl_port,
                            "xend-relocation-server-ssl-key-file": str(key),
                            "xend-relocation-server-ssl-cert-file": str(cert)})
    assert f"127.0.0.1:{ssl_port} (ssl)" in b.xm_ok("info")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    r = a.xm("migrate", "--ssl", "-p", str(b.port), "still1", "127.0.0.1")   # plain port
    assert r.returncode == 1
    assert r.stderr.startswith(f"Error: TLS handshake with 127.0.0.1:{b.port} failed: "), r.stderr
    assert a.domains()["still1"][3] == "r-----"
    out = a.xm_ok("migrate", "--ssl", "-p", str(ssl_port), "still1", "127.0.0.1")
    assert out.startswith(f"Migrated domain still1 to 127.0.0.1:{ssl_port} (non-live), now id=1")
    assert pools_by_kind(b, "still1") == {"persistent": 1024, "ephemeral": 0}
