"""Helpers for the end-to-end tests: real xend daemons as subprocesses on loopback.

Each daemon gets its own directory (config, socket, pid file, log, state) and a
free relocation port on 127.0.0.1; tests drive it only through ``xm`` (run as
a subprocess with ``XM_SERVER`` / ``XEND_CONFIG`` set). Each daemon's state
directory gets its own hypervisor process (started by the daemon; it outlives
xend as Xen outlives its toolstack). At teardown every daemon is stopped with
SIGTERM and must exit 0 and leave neither socket nor pid file; then its
hypervisor is stopped with ``xend-tmem hypervisor stop --force``, and any
hypervisor or guest process still alive is killed and reaped by pid.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
XM_TIMEOUT_S = 60.0
REAP_TIMEOUT_S = 10.0

# A small domain with both kinds of pool and a busy guest: 32 MiB RAM, 4 MiB of
# persistent tmem that must travel, 2 MiB of ephemeral tmem that arrives empty.
BUSY_DOMAIN: Dict[str, Any] = {
    "name": "web1", "memory": 32, "vcpus": 1,
    "workload": {"ram_dirty_pages_per_s": 300, "tmem_puts_per_s": 2000,
                 "tmem_gets_per_s": 100, "tmem_flushes_per_s": 20, "seed": 7},
    "tmem": {"version": 1, "client": {"weight": 5, "cap": 0},
             "pools": [{"id": 0, "persistent": True,
                        "bulk": {"pages": 1024, "objects": 8, "seed": 1}},
                       {"id": 1, "persistent": False,
                        "bulk": {"pages": 512, "objects": 4, "seed": 2}}]},
}

# The same without a workload: nothing changes by itself, so states compare exactly.
STILL_DOMAIN: Dict[str, Any] = {k: v for k, v in BUSY_DOMAIN.items() if k != "workload"}
STILL_DOMAIN = {**STILL_DOMAIN, "name": "still1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Xend:
    """One daemon under test."""

    name: str
    root: Path
    port: int
    settings: Dict[str, Any]
    proc: Optional[subprocess.Popen] = None
    stopped: bool = False
    extra_env: Dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.root / "xend-config.yaml"

    @property
    def socket_path(self) -> Path:
        return self.root / "xmlrpc.sock"

    @property
    def pid_path(self) -> Path:
        return self.root / "xend.pid"

    @property
    def log_path(self) -> Path:
        return self.root / "xend.log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def hv_pid_path(self) -> Path:
        return self.state_dir / "hypervisor.pid"

    @property
    def hv_log_path(self) -> Path:
        return self.state_dir / "hypervisor.log"

    def hypervisor_pid(self) -> Optional[int]:
        """The pid in the hypervisor's pid file (None without one)."""
        try:
            text = self.hv_pid_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def hypervisor_cmd(self, *args: str, timeout: float = XM_TIMEOUT_S
                       ) -> subprocess.CompletedProcess:
        """Run ``xend-tmem hypervisor ARGS`` with this daemon's configuration."""
        return subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "hypervisor", *args],
                              env=self.env(), cwd=str(self.root), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def xend_cmd(self, *args: str, timeout: float = XM_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run ``xend ARGS`` (start, stop, restart, status) with this configuration."""
        return subprocess.run([sys.executable, "-m", "xend_tmem.xend.daemon", *args],
                              env=self.env(), cwd=str(self.root), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["XM_SERVER"] = str(self.socket_path)
        env["XEND_CONFIG"] = str(self.config_path)
        env.update(self.extra_env)
        return env

    def xm(self, *args: str, timeout: float = XM_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run ``xm ARGS`` against this daemon, off a terminal."""
        return subprocess.run([sys.executable, "-m", "xend_tmem.xend.xm", *args],
                              env=self.env(), cwd=str(self.root), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def xm_ok(self, *args: str) -> str:
        r = self.xm(*args)
        assert r.returncode == 0, f"xm {' '.join(args)} failed ({r.returncode}): {r.stderr}"
        return r.stdout

    def domains(self) -> Dict[str, List[str]]:
        """``xm list`` as {name: [id, mem, vcpus, state, time]}."""
        lines = self.xm_ok("list").splitlines()
        assert lines[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
        return {parts[0]: parts[1:] for parts in (ln.split() for ln in lines[1:])}

    def tmem_client(self, dom: str) -> Dict[str, str]:
        """The ``key=value`` facts of ``xm tmem-list DOM``'s client line."""
        out = self.xm_ok("tmem-list", dom)
        line = next(ln for ln in out.splitlines() if ln.startswith("client "))
        return dict(part.split("=", 1) for part in line.split() if "=" in part)

    def tmem_pools(self, dom: str) -> Dict[int, Dict[str, str]]:
        out = self.xm_ok("tmem-list", "-l", dom)
        pools = {}
        for ln in out.splitlines():
            ln = ln.strip()
            if ln.startswith("pool "):
                head, rest = ln.split(":", 1)
                facts = dict(p.split("=", 1) for p in rest.split() if "=" in p)
                facts["kind"] = rest.split()[0]
                pools[int(head.split()[1])] = facts
        return pools

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop_hypervisor(self) -> List[str]:
        """``xend-tmem hypervisor stop --force``, then kill and reap by pid whatever
        hypervisor or guest process is left; returns the problems found."""
        problems: List[str] = []
        pid = self.hypervisor_pid()
        if pid is None and not (self.state_dir / "hypervisor.sock").exists():
            return problems                     # this daemon never started one
        guests = children_of(pid) if pid else []
        r = self.hypervisor_cmd("stop", "--force")
        if r.returncode != 0:
            problems.append(f"hypervisor of {self.name}: stop --force exited {r.returncode}: "
                            f"{r.stderr.strip()}")
        for p in ([pid] if pid else []) + guests:
            if kill_and_reap(p):
                problems.append(f"hypervisor of {self.name}: process {p} had to be killed")
        if (self.state_dir / "hypervisor.sock").exists():
            problems.append(f"hypervisor of {self.name} left hypervisor.sock behind")
        return problems

    def stop(self) -> int:
        if self.proc is None or self.stopped:
            return 0
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"xend {self.name} ignored SIGTERM; "
                                     f"log:\n{self.log_text()}") from None
        return self.proc.returncode


class XendFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.daemons: List[Xend] = []

    def write_config(self, name: str, **overrides: Any) -> Xend:
        root = self.base / name
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        settings: Dict[str, Any] = {
            "xend-unix-socket": "xmlrpc.sock",
            "xend-pid-file": "xend.pid",
            "xend-state-dir": "state",
            "logfile": "xend.log",
            "loglevel": "DEBUG",
            "xend-relocation-server": True,
            "xend-relocation-address": "127.0.0.1",
            "xend-relocation-port": port,
            "xend-relocation-hosts-allow": "",
            "hypervisor": {"backend": "sim", "xen-release": "4.0.2", "tmem-capacity-mb": 256},
            "checkpoint-plugins": ["tmem"],
        }
        settings.update(overrides)
        (root / "xend-config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        xend = Xend(name=name, root=root, port=settings["xend-relocation-port"], settings=settings)
        self.daemons.append(xend)
        return xend

    def start(self, name: str, **overrides: Any) -> Xend:
        xend = self.write_config(name, **overrides)
        self.launch(xend)
        return xend

    def launch(self, xend: Xend) -> Xend:
        xend.stopped = False
        with open(xend.root / "stderr.txt", "ab") as err:
            xend.proc = subprocess.Popen(
                [sys.executable, "-m", "xend_tmem.xend.daemon", "foreground"],
                env=xend.env(), cwd=str(xend.root), stdin=subprocess.DEVNULL,
                stdout=err, stderr=err)
        if xend not in self.daemons:
            self.daemons.append(xend)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if xend.proc.poll() is not None:
                err_text = (xend.root / "stderr.txt").read_text()
                raise AssertionError(f"xend {xend.name} exited ({xend.proc.returncode}): "
                                     f"{err_text}\n{xend.log_text()}")
            if xend.socket_path.exists() and xend.xm("info").returncode == 0:
                return xend
            time.sleep(0.05)
        raise AssertionError(f"xend {xend.name} did not come up; log:\n{xend.log_text()}")

    def stop_all(self) -> List[str]:
        """Stop every daemon, then its hypervisor (see the module doc)."""
        problems = []
        for xend in self.daemons:
            if not xend.stopped:
                rc = xend.stop()
                if rc != 0:
                    problems.append(f"xend {xend.name} exited {rc}")
            if xend.xend_cmd("status").returncode == 0:
                xend.xend_cmd("stop")            # one (re)started with ``xend start|restart``
            for leftover in (xend.socket_path, xend.pid_path):
                if leftover.exists():
                    problems.append(f"xend {xend.name} left {leftover.name} behind")
        for xend in self.daemons:
            problems.extend(xend.stop_hypervisor())
        return problems


def children_of(pid: int) -> List[int]:
    """Pids whose parent is ``pid`` (the guest processes of a hypervisor)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    try:
        pid_done, _ = os.waitpid(pid, os.WNOHANG)   # our child: reap it
        return pid_done == pid
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] == "Z"   # dead; its parent reaps it


def kill_and_reap(pid: int, grace: float = 5.0) -> bool:
    """Wait ``grace`` seconds for ``pid`` to end, else SIGKILL it and wait until it is
    gone; True if it had to be killed."""
    deadline = time.monotonic() + grace
    while not _gone(pid):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    else:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + REAP_TIMEOUT_S
    while not _gone(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} survived SIGKILL")
        time.sleep(0.02)
    return True


def write_domain(directory: Path, spec: Dict[str, Any], **changes: Any) -> Path:
    spec = {**spec, **changes}
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def report_field(stdout: str, prefix: str) -> str:
    """The first report line starting with ``prefix``."""
    for line in stdout.splitlines():
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} in:\n{stdout}")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def run_in_pty(argv: Sequence[str], env: Dict[str, str], cwd: str,
               timeout: float = XM_TIMEOUT_S) -> tuple:
    """Run a command with stdin/stdout/stderr on a pseudo-terminal; (rc, output)."""
    import pty
    import select as select_mod
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=slave, stdout=slave,
                                stderr=slave, close_fds=True)
    finally:
        os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select_mod.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:         # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break                   # exited and nothing more to read
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode("utf-8", "replace")


class FakeStockXend:
    """A relocation peer that behaves like a stock xend (no tmem extensions).

    It answers the pre-flight question as xend answered any unknown operation,
    accepts ``receive`` and reads the image. ``mode``: ``"ok"`` closes silently
    after the image (xend's success), ``"err"`` answers with an ``(err ...)``,
    ``"stall"`` stops reading until :attr:`release` is set, then hangs up.
    """

    def __init__(self, mode: str) -> None:
        import threading
        self.mode = mode
        self.ops: List[str] = []
        self.received = 0
        self.head = b""
        self.release = threading.Event()
        self.done = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn, conn.makefile("rb") as rfile:
            try:
                while True:
                    line = rfile.readline()
                    if not line:
                        return
                    op = line.strip().decode()
                    self.ops.append(op.split()[0].strip("("))
                    if op == "receive":
                        break
                    conn.sendall(b"(err (type Error) (value 'Invalid operation "
                                 + op.split()[0].strip("(").encode() + b"'))\n")
                conn.sendall(b"(ready receive)\n")
                if self.mode == "stall":
                    self.head = rfile.read(16)
                    self.release.wait(60)
                    return
                while True:
                    data = rfile.read1(1 << 20)
                    if not data:
                        break
                    if not self.head:
                        self.head = data[:16]
                    self.received += len(data)
                if self.mode == "err":
                    conn.sendall(b"(err (type XendError) (value 'restore failed: disk full'))\n")
            finally:
                self.done.set()

    def close(self) -> None:
        self.release.set()
        self.sock.close()
        self.thread.join(5)
