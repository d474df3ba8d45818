"""Issue 8 #1 end to end: every tmem administration command, ``-a`` and per
domain, during a live migration (on both hosts) and during a save, is refused
naming the busy domain; the destination's tmem equals the source's at suspend
(the ``tmem-digest`` plugin's two reports)."""
from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

from .xendtest import BUSY_DOMAIN, wait_for, write_domain

pytestmark = pytest.mark.e2e

PLUGINS = {"checkpoint-plugins": ["tmem", "tmem-digest"]}


def tmem_commands(dom: Sequence[str]) -> List[Tuple[str, ...]]:
    """Every tmem command that changes tmem, against ``dom`` (a domain or ``-a``)."""
    return [("tmem-destroy", *dom), ("tmem-freeze", *dom), ("tmem-thaw", *dom),
            ("tmem-flush", *dom), ("tmem-set", *dom, "weight=9"), ("tmem-set", *dom, "cap=3"),
            ("tmem-set", *dom, "compress=1")]


def assert_refused(xend, targets: Sequence[Sequence[str]], name: str, doing: str) -> None:
    for dom in targets:
        for cmd in tmem_commands(dom):
            r = xend.xm(*cmd)
            assert r.returncode == 1, (xend.name, cmd, r.stdout, r.stderr)
            err = r.stderr.strip()
            assert err.startswith("Error: ") and len(err.splitlines()) == 1, (cmd, err)
            assert name in err and doing in err, (xend.name, cmd, err)
        r = xend.xm("tmem-list", *dom)
        assert r.returncode == 0, (xend.name, dom, r.stderr)


class HoldingProxy:
    """Forwards a migration, but holds the sender's bytes after the first
    ``hold_after`` until :meth:`release` (the migration is then in flight on both
    hosts: the source streaming, the destination's domain created)."""

    def __init__(self, target_port: int, hold_after: int) -> None:
        self.target_port = target_port
        self.hold_after = hold_after
        self.held = threading.Event()
        self._release = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self._socks: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        first = True
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            self._spawn(self._pipe, client, upstream, first)
            self._spawn(self._pipe, upstream, client, False)
            first = False

    def _pipe(self, src: socket.socket, dst: socket.socket, hold: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if hold and not self._release.is_set() and sent + len(data) > self.hold_after:
                    cut = max(0, self.hold_after - sent)
                    dst.sendall(data[:cut])
                    sent += cut
                    data = data[cut:]
                    self.held.set()
                    self._release.wait(120)
                dst.sendall(data)
                sent += len(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        for s in [self.listener, *self._socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)


def digests(report: dict) -> Tuple[dict, dict]:
    src = report["plugins"]["tmem-digest"]
    dst = report["destination"]["plugins"]["tmem-digest"]
    return src, dst


def test_tmem_administration_refused_on_both_hosts_during_a_live_migration(
        xends, tmp_path: Path) -> None:
    a = xends.start("a", **PLUGINS)
    b = xends.start("b", **PLUGINS)
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    domid = a.domains()["web1"][0]
    proxy = HoldingProxy(b.port, hold_after=6 << 20)   # past a few image frames
    mig = subprocess.Popen([sys.executable, "-m", "xend_tmem.xend.xm", "migrate", "--live",
                            "--json", "-p", str(proxy.port), "web1", "127.0.0.1"],
                           env=a.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        if not proxy.held.wait(30):
            mig.kill()
            raise AssertionError(f"the migration never got going: {mig.communicate()}\n"
                                 f"{a.log_text()[-3000:]}\n{b.log_text()[-3000:]}")
        wait_for(lambda: "web1" in b.domains(), timeout=20)
        assert_refused(a, [[domid], ["migrating-web1"], ["-a"]], "migrating-web1", "migrated")
        assert_refused(b, [["web1"], ["-a"]], "web1", "migrat")
        proxy.release()
        out, err = mig.communicate(timeout=120)
    finally:
        proxy.close()
        if mig.poll() is None:
            mig.kill()
            mig.communicate()
    assert mig.returncode == 0, err
    src, dst = digests(json.loads(out))
    assert src["at"] == "suspend" and dst["at"] == "restore"
    assert src["persistent_pages"] > 0
    assert src["pools"] == dst["pools"]
    client = b.tmem_client("web1")
    assert (client["frozen"], client["weight"]) == ("0", "5")
    b.xm_ok("tmem-freeze", "-a")                              # allowed again afterwards
    b.xm_ok("tmem-thaw", "web1")


def test_tmem_administration_refused_during_a_save_and_the_restore_matches(
        xends, tmp_path: Path) -> None:
    a = xends.start("a", **PLUGINS)
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    domid = a.domains()["web1"][0]
    fifo = tmp_path / "web1.pipe"
    os.mkfifo(fifo)
    image = tmp_path / "web1.img"
    started, release = threading.Event(), threading.Event()
    received: List[int] = []

    def reader() -> None:            # a slow consumer: holds the save in flight
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        deadline = time.monotonic() + 60
        try:
            with open(image, "wb") as out:
                while True:
                    if started.is_set() and not release.wait(0):
                        release.wait(120)
                    ready, _, _ = select.select([fd], [], [], 60)
                    if not ready:
                        return
                    data = os.read(fd, 65536)
                    if not data:                # no writer yet
                        if received or time.monotonic() > deadline:
                            return
                        time.sleep(0.02)
                        continue
                    received.append(len(data))
                    out.write(data)
                    started.set()
        finally:
            os.close(fd)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    save = subprocess.Popen([sys.executable, "-m", "xend_tmem.xend.xm", "save", "--json",
                             "web1", str(fifo)], env=a.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(30), "the save never wrote to the FIFO"
        assert_refused(a, [[domid], ["migrating-web1"], ["-a"]], "migrating-web1", "saved")
        release.set()
        out, err = save.communicate(timeout=120)
    finally:
        release.set()
        if save.poll() is None:
            save.kill()
            save.communicate()
        t.join(30)
    assert save.returncode == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    at_suspend = json.loads(out)["plugins"]["tmem-digest"]
    r = a.xm("restore", "--json", str(image))
    assert r.returncode == 0, r.stderr
    restored = json.loads(r.stdout)["plugins"]["tmem-digest"]
    assert at_suspend["at"] == "suspend" and at_suspend["persistent_pages"] > 0
    assert restored["pools"] == at_suspend["pools"]
