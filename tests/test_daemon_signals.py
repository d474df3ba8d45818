"""xend's signal handling and bounded shutdown (the source xend that ignored
SIGTERM after ``xend-tmem demo``).

Python runs a signal handler in the main thread between two bytecodes. xend's
main thread spends its life in the stop wait, holding that wait's lock for a few
bytecodes at a time; a SIGTERM handled there by a handler that sets the event
(``Event.set`` takes the same non-reentrant lock) waits for itself forever, and
every later SIGTERM queues behind it. The subprocess tests put the signal in
exactly that window, so they are deterministic; a deadlock is a timeout.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict

import pytest

from xend_tmem.errors import XendTmemError
from xend_tmem.xend.jobs import Job, JobTable

BOUND_S = 20.0          # a deadlocked daemon never ends; a working one ends at once

PRELUDE = """
import logging, os, signal, sys, threading
from xend_tmem.config import parse_toolstack_config
from xend_tmem.xend import daemon as xd

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
root = sys.argv[1]
cfg = parse_toolstack_config({
    "xend-unix-socket": os.path.join(root, "xmlrpc.sock"),
    "xend-pid-file": os.path.join(root, "xend.pid"),
    "xend-state-dir": os.path.join(root, "state"),
    "logfile": os.path.join(root, "xend.log"),
    "xend-relocation-server": False,
    "hypervisor": {"backend": "sim-inprocess"}})
xd.Daemon.start = lambda self: None    # only the signal handling and the main loop run
real_run = xd.Daemon.run
"""


def run_daemon(tmp_path: Path, body: str) -> "subprocess.CompletedProcess[str]":
    """``foreground`` in a child whose ``Daemon.run`` starts with ``body``; a
    daemon that does not stop within the bound fails the test (and is killed)."""
    script = PRELUDE + textwrap.dedent(body) + "\nsys.exit(xd.foreground(cfg))\n"
    try:
        return subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                              capture_output=True, text=True, timeout=BOUND_S)
    except subprocess.TimeoutExpired as exc:      # subprocess.run killed and reaped it
        pytest.fail(f"xend did not stop within {BOUND_S:.0f} s of its SIGTERM "
                    f"(stderr: {exc.stderr!r})")


def test_sigterm_while_the_main_thread_holds_the_stop_waits_lock(tmp_path: Path) -> None:
    r = run_daemon(tmp_path, """
        def run(self):
            # the lock Event.wait holds between bytecodes; the handler runs here
            with self.stop_event._cond:
                signal.raise_signal(signal.SIGTERM)
                sum(range(1000))
            print("handler returned", flush=True)
            real_run(self)
        xd.Daemon.run = run
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "handler returned\n"
    assert r.stderr.splitlines() == ["xend stopping"], r.stderr


def test_sigterm_from_another_process_wakes_the_main_loop(tmp_path: Path) -> None:
    # the stop is seen at once (the wakeup fd), not at the loop's next poll; a
    # second SIGTERM while it stops changes nothing
    r = run_daemon(tmp_path, """
        import time
        def run(self):
            t0 = time.monotonic()          # before the timers: 0.3 s is a lower bound
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            threading.Timer(0.35, os.kill, (os.getpid(), signal.SIGTERM)).start()
            real_run(self)
            print(f"{time.monotonic() - t0:.3f}", flush=True)
        xd.Daemon.run = run
    """)
    assert r.returncode == 0, r.stderr
    assert "xend stopping" in r.stderr.splitlines()
    assert 0.3 <= float(r.stdout) < BOUND_S


def test_sighup_reloads_in_the_main_loop_then_sigterm_stops(tmp_path: Path) -> None:
    r = run_daemon(tmp_path, """
        class Service:
            jobs = None
            def reload(self):
                print("reload in", threading.current_thread().name, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            def stop(self):
                print("service stopped", flush=True)
        class Jobs:
            def shutdown(self, timeout):
                return []
            def running(self):
                return []
        def run(self):
            self.service = Service()
            self.service.jobs = Jobs()
            os.kill(os.getpid(), signal.SIGHUP)
            real_run(self)
        xd.Daemon.run = run
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "reload in MainThread\nservice stopped\n"
    assert "xend stopping" in r.stderr.splitlines()


def test_the_wakeup_fd_is_closed_at_shutdown(tmp_path: Path) -> None:
    r = run_daemon(tmp_path, """
        def run(self):
            wake = self._wake
            self.stop()                       # from code, not a signal
            real_run(self)
            assert signal.set_wakeup_fd(-1) == -1
            for fd in wake:
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                raise AssertionError(f"fd {fd} left open")
            print("closed", flush=True)
        xd.Daemon.run = run
    """)
    assert (r.returncode, r.stdout) == (0, "closed\n"), r.stderr


def test_shutdown_cancels_waits_a_bounded_time_and_names_a_stuck_job() -> None:
    table = JobTable(max_running=2)
    release = threading.Event()
    started = threading.Event()

    def cooperative(job: Job) -> Dict[str, Any]:
        job.cancel.wait()
        raise XendTmemError("cancelled")

    def stuck(job: Job) -> Dict[str, Any]:       # ignores its cancellation
        started.set()
        release.wait()
        return {}

    polite = table.start("save", "web1", cooperative)
    rude = table.start("migrate", "web2", stuck)
    queued = table.start("save", "web3", cooperative)     # no free worker: never starts
    assert started.wait(10)
    try:
        left = table.shutdown(0.2)
        assert left == [rude]
        assert polite.state == "failed" and queued.state == "cancelled"
        assert "release.wait()" in rude.stack()           # where it is stuck
        with pytest.raises(XendTmemError, match="xend is stopping"):
            table.start("save", "web4", cooperative)
    finally:
        release.set()
    assert rude.finished_event.wait(10) and rude.stack() == ""
