"""The daemon's life cycle and xm's errors, against real daemon processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .xendtest import STILL_DOMAIN, wait_for, write_domain

pytestmark = pytest.mark.e2e


def xend_cmd(xend, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xend_tmem.xend.daemon", *args],
                          env=xend.env(), cwd=str(xend.root), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_start_status_stop_and_restart_after_a_crash(xends) -> None:
    xend = xends.write_config("a")
    r = xend_cmd(xend, "status")
    assert (r.returncode, r.stdout) == (3, "xend is not running\n")

    r = xend_cmd(xend, "start")
    assert r.returncode == 0, r.stderr
    try:
        r = xend_cmd(xend, "status")
        assert r.returncode == 0 and r.stdout.startswith("xend is running (pid ")
        pid = int(xend.pid_path.read_text())
        assert xend.xm("info").returncode == 0
        r = xend_cmd(xend, "start")                  # a second start changes nothing
        assert r.returncode == 0 and f"already running (pid {pid})" in r.stdout
    finally:
        r = xend_cmd(xend, "stop")
    assert r.returncode == 0, r.stderr
    assert not xend.socket_path.exists() and not xend.pid_path.exists()
    assert xend_cmd(xend, "status").returncode == 3

    # A daemon killed outright leaves its socket and pid file; the next start copes.
    assert xend_cmd(xend, "start").returncode == 0
    pid = int(xend.pid_path.read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: xend_cmd(xend, "status").returncode == 3)
    assert xend.socket_path.exists() and xend.pid_path.exists()
    r = xend_cmd(xend, "restart")
    assert r.returncode == 0, r.stderr
    try:
        assert xend.xm("info").returncode == 0
        assert int(xend.pid_path.read_text()) != pid
    finally:
        assert xend_cmd(xend, "stop").returncode == 0
    assert not xend.socket_path.exists() and not xend.pid_path.exists()


@pytest.mark.parametrize("overrides, named", [
    ({"bogus-key": 1}, "bogus-key"),
    ({"xend-relocation-port": "http"}, "xend-relocation-port"),
    ({"tmem": {"plan": "fastest"}}, "tmem.plan"),
    ({"checkpoint-plugins": ["no-such-plugin"]}, "no-such-plugin"),
])
def test_bad_configuration_stops_the_start_with_one_line(xends, overrides: dict,
                                                         named: str) -> None:
    xend = xends.write_config("a", **overrides)
    r = xend_cmd(xend, "foreground")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], r.stderr
    assert str(xend.config_path) in lines[0]
    assert not xend.socket_path.exists() and not xend.pid_path.exists()
    r = xend_cmd(xend, "start")                   # the detached start says the same
    assert r.returncode == 1 and named in r.stderr and "Traceback" not in r.stderr


def test_second_daemon_on_the_same_pid_file_is_refused(xends) -> None:
    a = xends.start("a")
    r = xend_cmd(a, "foreground")
    assert r.returncode == 1
    assert r.stderr.startswith("Error: xend is already running (pid ")
    assert a.xm("info").returncode == 0              # the first one is unharmed


def test_xm_against_a_stopped_daemon(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.stop()
    r = a.xm("list")
    assert r.returncode == 1
    assert r.stderr == ("Error: Unable to connect to xend: No such file or directory. "
                        "Is xend running?\n")
    assert r.stdout == ""


def test_unknown_domain_exits_3_everywhere(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    target = tmp_path / "nosuch.img"
    for args in (("pause", "nosuch"), ("unpause", "nosuch"), ("destroy", "nosuch"),
                 ("list", "nosuch"), ("save", "nosuch", str(target)),
                 ("migrate", "nosuch", "127.0.0.1"), ("tmem-list", "nosuch"),
                 ("tmem-freeze", "nosuch"), ("tmem-set", "nosuch", "weight=1"), ("pause", "42")):
        r = a.xm(*args)
        assert r.returncode == 3, (args, r.stderr)
        dom = args[1]
        assert r.stderr == f"Error: Domain '{dom}' does not exist.\n", args
    assert not target.exists()


def test_refusals_and_usage_errors(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    for args, message in (
            (("pause", "0"), "Error: Cannot pause privileged domain 0\n"),
            (("save", "Domain-0", str(tmp_path / "d0")),
             "Error: Cannot save privileged domain 0\n"),
            (("destroy", "0"), "Error: Cannot destroy privileged domain 0\n"),
            (("save", "still1", str(tmp_path / "no" / "dir" / "x.img")),
             f"Error: xm save: Unable to create file {tmp_path / 'no' / 'dir' / 'x.img'}\n"),
            (("restore", str(tmp_path / "missing.img")),
             f"Error: xm restore: Unable to read file {tmp_path / 'missing.img'}\n"),
            (("create", str(tmp_path / "still1.yaml")),
             "Error: Domain 'still1' already exists with ID '1'\n")):
        r = a.xm(*args)
        assert (r.returncode, r.stderr) == (1, message), args
    a.xm_ok("pause", "still1")
    assert a.domains()["still1"][3] == "--p---"
    r = a.xm("save", "still1", str(tmp_path / "p.img"))
    assert r.returncode == 1 and "it is not running" in r.stderr
    assert not (tmp_path / "p.img").exists()
    a.xm_ok("unpause", "still1")
    r = a.xm("save")                              # usage error
    assert r.returncode == 1 and "Error: " in r.stderr and "Traceback" not in r.stderr
    r = a.xm("migrate", "-p", "x", "still1", "h")
    assert r.returncode == 1 and "Error: " in r.stderr
    a.xm_ok("destroy", "still1")
    assert "still1" not in a.domains()


def test_sigterm_during_a_migration_cancels_it_and_exits_cleanly(xends, tmp_path: Path) -> None:
    import time
    from .xendtest import FakeStockXend
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    peer = FakeStockXend("stall")
    xm = subprocess.Popen([sys.executable, "-m", "xend_tmem.xend.xm", "migrate", "-p",
                           str(peer.port), "still1", "127.0.0.1"], env=a.env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "migrating-still1" in a.domains())
        started = time.monotonic()
        assert a.stop() == 0
        assert time.monotonic() - started < 10
        out, err = xm.communicate(timeout=30)
    finally:
        if xm.poll() is None:
            xm.kill()
            xm.communicate()
        peer.close()
    assert (xm.returncode, err) == (1, "Error: cancelled\n")
    assert "job 1 (migrate still1) cancelled" in a.log_text()
    assert "xend stopping" in a.log_text() and "ignored its cancellation" not in a.log_text()
    assert not a.socket_path.exists() and not a.pid_path.exists()
