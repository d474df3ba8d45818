"""The migration commit handshake (received / go / running, and the query),
in-process: two xend services on simulated hypervisors, on loopback.

A proxy between them cuts the link at points from the first byte to after
``running`` and drops each handshake message alone; whatever happens the
domain never runs on two hosts at once, is never lost, and ends running on
exactly one host under its own name with its tmem thawed and whole. The
receiver's and sender's state machines are also driven directly by a scripted
peer.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from xend_tmem.checkpoint import save_domain
from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import PeerError
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.relocation.client import MigrationInDoubt, migrate, query_migration
from xend_tmem.xend.relocation.server import RelocationServer
from xend_tmem.xend.journal import Journal
from xend_tmem.xend.service import XendService

from relocation_proxy import Proxy

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [
              {"id": 0, "persistent": True, "bulk": {"pages": 64, "objects": 2}},
              {"id": 1, "persistent": False, "bulk": {"pages": 16}}]}}
NAMES = ("web1", "migrating-web1")
ACK_S = 1.0       # source: wait this long for received / running
GO_S = 2.0        # destination: wait this long for go


class Host:
    """A xend service with its relocation server, in-process."""

    def __init__(self, state: Path) -> None:
        state.mkdir()
        self.state = state
        self.hv = SimHypervisor()
        self.svc = XendService(parse_toolstack_config({"xend-state-dir": str(state)}), self.hv,
                               get_plugin_manager(["tmem"], {}))
        self.svc.ack_timeout = ACK_S
        self.svc.query_window = 3.0
        self.server = RelocationServer(
            "127.0.0.1", 0, hosts_allow=[], restore=self.svc.incoming_restore,
            check_offer=self.svc.check_offer, discard=self.svc.discard_domain, go_timeout=GO_S)
        self.svc.relocation_servers = [self.server]
        self.server.start()

    def copies(self) -> List:
        return [d for d in self.hv.list_domains() if d.name in NAMES]

    def journal_files(self) -> List[str]:
        d = self.state / "journal"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def stop(self) -> None:
        self.svc.stop(5)


@pytest.fixture
def hosts(tmp_path: Path):
    made: List[Host] = []

    def make() -> Host:
        h = Host(tmp_path / f"host{len(made)}")
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


class Monitor:
    """Samples both hosts while a migration runs: never running on both."""

    def __init__(self, a: Host, b: Host) -> None:
        self.hosts = (a, b)
        self.both = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            running = [any(d.running for d in h.copies()) for h in self.hosts]
            self.samples += 1
            if all(running):
                self.both += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def settle(*hs: Host, timeout: float = 15.0) -> None:
    """Wait until no host has a migration in flight (journal empty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(h.journal_files() for h in hs):
            return
        time.sleep(0.05)
    raise AssertionError(f"journals still hold {[h.journal_files() for h in hs]}")


def migrate_through(src: Host, dst: Host, fault) -> Dict:
    domid = src.svc.domid("web1")
    digest = src.hv.tmem_digest(domid)
    proxy = Proxy(dst.server.port, fault)
    mon = Monitor(src, dst)
    try:
        job = src.svc.jobs.get(src.svc.job_migrate("web1", "127.0.0.1", live=True,
                                                   port=proxy.port))
        assert job.finished_event.wait(30)
        settle(src, dst)
    finally:
        mon.stop()
        proxy.close()
    assert mon.both == 0 and mon.samples > 0
    where = [h for h in (src, dst) if h.copies()]
    assert len(where) == 1, [(h.state.name, h.copies()) for h in (src, dst)]
    (info,) = where[0].copies()
    assert info.name == "web1" and info.running
    host = where[0]
    assert host.hv.tmem_state(info.domid)["client"]["frozen"] is False
    assert "saving=0" in host.hv.tmem_list(info.domid) or "saving" not in host.hv.tmem_list(
        info.domid)
    assert host.hv.tmem_digest(info.domid) == digest
    status = job.status()
    return {"where": "source" if host is src else "destination", "status": status,
            "fired": proxy.fired.is_set(), "seen": list(proxy.seen), "bytes": proxy.sent_up}


def test_clean_migration_commits_through_the_proxy(hosts) -> None:
    src, dst = hosts(), hosts()
    src.hv.create_domain(parse_domain_config(DOMAIN))
    out = migrate_through(src, dst, None)
    assert out["where"] == "destination" and out["status"]["state"] == "done"
    # the handshake, in order, as the proxy saw it
    seen = out["seen"]
    assert [w for w in seen if w in ("received", "go", "running")] == ["received", "go",
                                                                       "running"]
    result = out["status"]["result"]
    assert result["extended"] is True and result["destination"]["name"] == "web1"
    assert len(result["migration"]) == 32


@pytest.fixture(scope="module")
def stream_bytes(tmp_path_factory) -> int:
    """How many bytes a clean migration sends (to place byte cuts)."""
    base = tmp_path_factory.mktemp("measure")
    src, dst = Host(base / "a"), Host(base / "b")
    try:
        src.hv.create_domain(parse_domain_config(DOMAIN))
        return migrate_through(src, dst, None)["bytes"]
    finally:
        src.stop()
        dst.stop()


# expected host: "source", "destination", or None where it depends on timing
FAULTS = [
    (("cut-bytes", 1), "source"),
    (("cut-bytes", 120), "source"),                 # inside the pre-flight offer
    (("cut-bytes", 0.05), "source"),                # first frames of the image
    (("cut-bytes", 0.5), "source"),                 # mid-image
    (("cut-bytes", -7), "source"),                  # inside the end-of-image frame
    (("cut-before", "received"), "source"),
    (("cut-after", "received"), "source"),          # go cannot arrive
    (("cut-before", "go"), "source"),
    (("cut-after", "go"), None),                    # go may or may not be through
    (("cut-before", "running"), "destination"),     # go was through: asked, it runs
    (("cut-after", "running"), "destination"),
    (("drop", "received"), "source"),
    (("drop", "go"), "source"),
    (("drop", "running"), "destination"),
]


@pytest.mark.parametrize("fault,expected", FAULTS, ids=[f"{f[0]}-{f[1]}" for f, _ in FAULTS])
def test_a_broken_migration_never_runs_twice_nor_is_lost(hosts, stream_bytes, fault,
                                                         expected) -> None:
    src, dst = hosts(), hosts()
    src.hv.create_domain(parse_domain_config(DOMAIN))
    kind, arg = fault
    if kind == "cut-bytes" and isinstance(arg, float):
        arg = int(stream_bytes * arg)
    elif kind == "cut-bytes" and arg < 0:
        arg = stream_bytes + arg
    out = migrate_through(src, dst, (kind, arg))
    assert out["fired"]
    print(f"fault {kind} {arg}: domain on the {out['where']}, job {out['status']['state']}: "
          f"{out['status'].get('error', '')}")
    if expected is not None:
        assert out["where"] == expected
    if out["where"] == "source":
        assert out["status"]["state"] == "failed"
        assert "web1" in out["status"]["error"] or "127.0.0.1" in out["status"]["error"]
    else:
        assert out["status"]["state"] == "done"


# -- the receiver's state machine, driven by a scripted sender ------------------------------

def _image(hooks) -> bytes:
    hv = SimHypervisor()
    domid = hv.create_domain(parse_domain_config(DOMAIN))
    import io
    buf = io.BytesIO()
    save_domain(hv, domid, buf, hooks=hooks, live=False, checkpoint=True)
    return buf.getvalue()


def _offer(mid: str) -> bytes:
    offer = {"protocol": 2, "migration": mid, "domain": {"name": "web1"}, "node": -1,
             "live": False, "plugins": {}}
    from xend_tmem.codec import sxp
    return (sxp.to_string(["xend-tmem-preflight", ["offer", json.dumps(offer)]]) + "\n").encode()


class ScriptedSender:
    def __init__(self, port: int, mid: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.f = self.sock.makefile("rb")
        self.sock.sendall(_offer(mid))
        assert self.f.readline() == b"(ok (protocol 2))\n"
        self.sock.sendall(b"receive\n")
        assert self.f.readline() == b"(ready receive)\n"

    def image(self, data: bytes) -> None:
        for i in range(0, len(data), 1 << 16):
            piece = data[i:i + (1 << 16)]
            self.sock.sendall(struct.pack(">I", len(piece)) + piece)
        self.sock.sendall(struct.pack(">I", 0))

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def query(port: int, mid: str) -> str:
    answer, _ = query_migration("127.0.0.1", port, mid, window=1.0)
    return answer


def _domains(hv) -> List:
    return [d for d in hv.list_domains() if d.name == "web1"]


def test_receiver_unpauses_only_on_go_and_answers_running(hosts) -> None:
    dst = hosts()
    s = ScriptedSender(dst.server.port, "m1")
    s.image(_image(dst.svc.hooks))
    assert s.f.readline().startswith(b"(received (domid ")
    (d,) = _domains(dst.hv)
    assert d.paused and not d.running
    assert [n.startswith("migrate-in-") for n in dst.journal_files()] == [True]
    s.sock.sendall(b"(go)\n")
    line = s.f.readline()
    assert line.startswith(b"(running (report ")
    assert _domains(dst.hv)[0].running
    s.close()
    settle(dst)
    assert query(dst.server.port, "m1") == "running"
    # remembered across a restart of xend too (the outcome file)
    assert Journal(str(dst.state)).outcome("m1") == "running"


def test_receiver_without_go_destroys_its_copy(hosts) -> None:
    dst = hosts()
    dst.server.go_timeout = 0.5
    s = ScriptedSender(dst.server.port, "m2")
    s.image(_image(dst.svc.hooks))
    assert s.f.readline().startswith(b"(received ")
    time.sleep(1.0)                                   # no go: the timeout passes
    assert _domains(dst.hv) == []
    assert query(dst.server.port, "m2") == "aborted"
    s.sock.sendall(b"(go)\n")                         # too late: nothing starts
    assert _domains(dst.hv) == []
    s.close()


def test_receiver_connection_lost_before_go_destroys_its_copy(hosts) -> None:
    dst = hosts()
    s = ScriptedSender(dst.server.port, "m3")
    s.image(_image(dst.svc.hooks))
    assert s.f.readline().startswith(b"(received ")
    s.close()
    settle(dst)
    assert _domains(dst.hv) == [] and query(dst.server.port, "m3") == "aborted"


def test_query_aborts_a_copy_awaiting_go_atomically(hosts) -> None:
    dst = hosts()
    s = ScriptedSender(dst.server.port, "m4")
    s.image(_image(dst.svc.hooks))
    assert s.f.readline().startswith(b"(received ")
    assert query(dst.server.port, "m4") == "aborted"
    assert _domains(dst.hv) == []
    s.sock.sendall(b"(go)\n")
    assert s.f.readline().startswith(b"(err ")        # go after the abort starts nothing
    assert _domains(dst.hv) == []
    s.close()
    assert query(dst.server.port, "nobody-knows-this-one") == "unknown"


def test_receiver_without_a_migration_id_refuses_the_preflight(hosts) -> None:
    dst = hosts()
    with socket.create_connection(("127.0.0.1", dst.server.port), timeout=10) as sock:
        f = sock.makefile("rb")
        sock.sendall(b'(xend-tmem-preflight (offer "{}"))\n')
        # malformed: an (err ...), never a refusal or silence (issue 8 #7)
        assert f.readline().startswith(b'(err (type Error) (value "malformed pre-flight offer: ')
        f.close()


# -- the sender's state machine, driven by a scripted receiver ------------------------------

class ScriptedReceiver:
    """Accepts one migration, answers ``received``, reads ``go``, then does
    ``after_go``; answers queries with ``query_answer``."""

    def __init__(self, after_go: str, query_answer: Optional[str]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.after_go = after_go
        self.query_answer = query_answer
        self.got: List[bytes] = []
        self.queries: List[str] = []
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as f:
            f.readline()
            conn.sendall(b"(ok (protocol 2))\n")
            f.readline()
            conn.sendall(b"(ready receive)\n")
            while True:
                (n,) = struct.unpack(">I", f.read(4))
                if not n:
                    break
                f.read(n)
            conn.sendall(b"(received (domid 7))\n")
            self.got.append(f.readline())
            if self.after_go == "running":
                conn.sendall(b'(running (report "{}"))\n')
            elif self.after_go == "close":
                pass
        while self.query_answer is not None:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                self.queries.append(f.readline().decode())
                conn.sendall(f"({self.query_answer})\n".encode())

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)      # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        self.t.join(5)
        assert not self.t.is_alive()


@pytest.fixture
def source():
    hv = SimHypervisor()
    return hv, hv.create_domain(parse_domain_config(DOMAIN)), get_plugin_manager(["tmem"], {})


def test_sender_go_then_running(source) -> None:
    hv, domid, hooks = source
    rx = ScriptedReceiver("running", None)
    journaled = []
    try:
        report = migrate(hv, domid, "127.0.0.1", rx.port, live=True, hooks=hooks,
                         migration_id="abc", on_received=journaled.append)
    finally:
        rx.close()
    assert rx.got == [b"(go)\n"] and journaled == [7]
    assert report["peer_domid"] == 7 and report["destination"] == {}
    assert hv.domain_info(domid).shutdown                 # suspended, for the caller
    assert hv.tmem_state(domid)["client"]["frozen"] is False    # done phase ran after go


@pytest.mark.parametrize("answer", ["running", "aborted", "unknown"])
def test_sender_without_running_asks_and_obeys(source, answer) -> None:
    hv, domid, hooks = source
    rx = ScriptedReceiver("close", answer)
    try:
        if answer == "running":
            report = migrate(hv, domid, "127.0.0.1", rx.port, live=False,
                             hooks=hooks, migration_id="q1", ack_timeout=2,
                             query_window=2)
            assert report["resolved_by_query"] == "running"
            assert hv.domain_info(domid).shutdown       # the caller destroys it
        elif answer == "aborted":
            with pytest.raises(PeerError, match=r"did not start domain web1 .* destroyed its "
                                                r"copy; the domain was resumed here"):
                migrate(hv, domid, "127.0.0.1", rx.port, live=False, hooks=hooks,
                        migration_id="q1", ack_timeout=2, query_window=2)
            assert hv.domain_info(domid).running
        else:
            with pytest.raises(MigrationInDoubt,
                               match=r"cannot tell whether domain web1 runs on 127\.0\.0\.1 .*"
                                     r"kept paused here as migrating-web1"):
                migrate(hv, domid, "127.0.0.1", rx.port, live=False, hooks=hooks,
                        migration_id="q1", ack_timeout=2, query_window=2)
            assert hv.domain_info(domid).shutdown and not hv.domain_info(domid).running
    finally:
        rx.close()
    assert rx.queries == ['(xend-tmem-query (migration q1))\n']
    assert hv.tmem_state(domid)["client"]["frozen"] is False


def test_sender_in_doubt_when_the_destination_is_unreachable(source) -> None:
    hv, domid, hooks = source
    rx = ScriptedReceiver("close", None)           # answers no query: port closed after
    try:
        with pytest.raises(MigrationInDoubt, match="kept paused here"):
            migrate(hv, domid, "127.0.0.1", rx.port, live=False, hooks=hooks,
                    migration_id="q2", ack_timeout=2, query_window=1)
    finally:
        rx.close()
    assert not hv.domain_info(domid).running


def test_service_keeps_an_in_doubt_source_paused_and_journaled(hosts, mocker) -> None:
    src = hosts()
    src.hv.create_domain(parse_domain_config(DOMAIN))
    rx = ScriptedReceiver("close", "unknown")
    src.svc.query_window = 1.0
    try:
        job = src.svc.jobs.get(src.svc.job_migrate("web1", "127.0.0.1", port=rx.port))
        assert job.finished_event.wait(30)
    finally:
        rx.close()
    st = job.status()
    assert st["state"] == "failed" and "kept paused here as migrating-web1" in st["error"]
    (info,) = src.copies()
    assert info.name == "migrating-web1" and not info.running
    (entry,) = src.svc.journal.entries()
    assert entry.doc["phase"] == "in-doubt" and entry.doc["migration"]


def test_a_start_that_fails_after_go_destroys_the_copy_and_the_source_resumes(hosts,
                                                                              source) -> None:
    from xend_tmem.errors import HypervisorError
    hv, domid, hooks = source
    dst = hosts()

    def broken_unpause(d: int) -> None:
        raise HypervisorError("unpause", f"domain {d} cannot run")

    dst.server.unpause = broken_unpause
    with pytest.raises(PeerError, match=r"did not start domain web1 .*cannot start domain web1"
                                        r".* destroyed its copy; the domain was resumed here"):
        migrate(hv, domid, "127.0.0.1", dst.server.port, live=False, hooks=hooks,
                name="web1", ack_timeout=5, query_window=2)
    assert hv.domain_info(domid).running
    assert hv.tmem_state(domid)["client"]["frozen"] is False
    settle(dst)
    assert dst.copies() == []
