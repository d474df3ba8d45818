"""Crash recovery at ``xend start``: each kind of journal entry a killed xend
leaves is ended cleanly (in-process simulated hypervisor; a mock of the
interface for the order of the hypervisor calls)."""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import List, Optional
from unittest.mock import call, create_autospec

import pytest

from hooks import tmem as tmem_plugin
from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.interface import DomainInfo, Hypervisor
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend import journal as jrn
from xend_tmem.xend.service import XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 40, "objects": 2}}]}}


def make_service(hv, state: Path) -> XendService:
    return XendService(parse_toolstack_config({"xend-state-dir": str(state)}), hv,
                       get_plugin_manager(["tmem"], {}))


@pytest.fixture
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def sim():
    hv = SimHypervisor()
    domid = hv.create_domain(parse_domain_config(DOMAIN))
    return hv, domid


def frozen_source(hv, domid: int, live: bool = False) -> dict:
    """What a xend killed mid-save leaves: renamed, suspended, tmem frozen."""
    digest = hv.tmem_digest(domid)
    hv.rename_domain(domid, "migrating-web1")
    if live:
        hv.enable_logdirty(domid)
    hv.suspend(domid)
    assert hv.save_begin(domid, live) is True
    return digest


def assert_resumed(hv, domid: int, digest) -> None:
    info = hv.domain_info(domid)
    assert info.name == "web1" and info.running
    assert hv.tmem_state(domid)["client"]["frozen"] is False
    assert "saving=0" in hv.tmem_list(domid)
    assert hv.tmem_digest(domid) == digest


def test_interrupted_save_resumes_thaws_and_removes_the_partial_file(sim, state,
                                                                     tmp_path: Path) -> None:
    hv, domid = sim
    digest = frozen_source(hv, domid)
    tmp = tmp_path / ".web1.img.abc.part"
    tmp.write_bytes(b"LinuxGuestRecord" + bytes(4096))
    svc = make_service(hv, state)
    e = svc.journal.begin(jrn.SAVE, domain="web1", domid=domid, path=str(tmp_path / "web1.img"),
                          tmp=str(tmp), checkpoint=False, phase="saving")
    e.note("tmem", {"save_begin": True})
    lines = make_service(hv, state).recover()        # a fresh xend on the same state dir
    assert_resumed(hv, domid, digest)
    assert list(tmp_path.iterdir()) == []
    assert len(lines) == 1 and "interrupted" in lines[0] and "tmem thawed" in lines[0] \
        and "partial file" in lines[0]
    assert svc.journal.entries() == []


def test_save_that_had_written_its_image_is_finished(sim, state, tmp_path: Path) -> None:
    hv, domid = sim
    frozen_source(hv, domid)
    hv.save_end(domid)                               # the done phase had run
    tmp = tmp_path / ".web1.img.abc.part"
    tmp.write_bytes(b"complete image")
    svc = make_service(hv, state)
    svc.journal.begin(jrn.SAVE, domain="web1", domid=domid, path=str(tmp_path / "web1.img"),
                      tmp=str(tmp), checkpoint=False, phase="written")
    (line,) = svc.recover()
    assert (tmp_path / "web1.img").read_bytes() == b"complete image" and not tmp.exists()
    assert [d.name for d in hv.list_domains()] == ["Domain-0"]
    assert "destroyed as xm save does" in line
    assert ["xend_recovered", line] in svc.node_info()


def test_domain_ids_are_not_trusted_blindly(sim, state) -> None:
    hv, domid = sim
    svc = make_service(hv, state)
    # the entry names another domain than the one now holding that id: leave it alone
    svc.journal.begin(jrn.SAVE, domain="db2", domid=domid, path="/x.img", tmp="/nonexistent",
                      phase="saving")
    (line,) = svc.recover()
    assert "the domain is gone" in line
    assert hv.domain_info(domid).running and hv.domain_info(domid).name == "web1"


def test_half_restored_domain_is_destroyed_and_a_finished_one_started(state) -> None:
    hv = SimHypervisor()
    half = hv.create_domain_shell("web1", 1024, 1, {"name": "web1", "memory": 4})
    done = hv.create_domain_shell("db2", 1024, 1, {"name": "db2", "memory": 4})
    svc = make_service(hv, state)
    svc.journal.begin(jrn.RESTORE, path="/a.img", paused=False, phase="restoring", domid=half)
    svc.journal.begin(jrn.RESTORE, path="/b.img", paused=False, phase="restored", domid=done)
    svc.journal.begin(jrn.RESTORE, path="/c.img", paused=False, phase="restoring")
    lines = svc.recover()
    assert [d.name for d in hv.list_domains()] == ["Domain-0", "db2"]
    assert hv.domain_info(done).running
    assert any("half-restored domain web1" in x for x in lines)
    assert any("before a domain existed" in x for x in lines)


def test_incoming_migration_without_go_is_destroyed_with_go_started(state) -> None:
    hv = SimHypervisor()
    waiting = hv.create_domain_shell("web1", 1024, 1, {"name": "web1", "memory": 4})
    cleared = hv.create_domain_shell("db2", 1024, 1, {"name": "db2", "memory": 4})
    svc = make_service(hv, state)
    svc.journal.begin(jrn.MIGRATE_IN, migration="m1", peer="10.0.0.1", domain="web1",
                      domid=waiting, phase="awaiting-go")
    svc.journal.begin(jrn.MIGRATE_IN, migration="m2", peer="10.0.0.1", domain="db2",
                      domid=cleared, phase="go")
    lines = svc.recover()
    assert [d.name for d in hv.list_domains()] == ["Domain-0", "db2"]
    assert hv.domain_info(cleared).running
    assert svc.journal.outcome("m1") == "aborted" and svc.journal.outcome("m2") == "running"
    assert "never got go" in lines[0] and "cleared to run" in lines[1]


class Peer:
    """Answers relocation queries with a fixed word."""

    def __init__(self, answer: str) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.asked: List[str] = []
        self.answer = answer
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                self.asked.append(f.readline().decode())
                conn.sendall(f"({self.answer})\n".encode())

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.t.join(5)


@pytest.mark.parametrize("phase,answer,outcome", [
    ("streaming", None, "resumed"),
    ("go-sent", "running", "destroyed"),
    ("go-sent", "aborted", "resumed"),
    ("go-sent", "unknown", "kept"),
    ("in-doubt", "running", "destroyed"),
    ("done", None, "destroyed"),
])
def test_outgoing_migration(sim, state, phase: str, answer: Optional[str], outcome: str) -> None:
    hv, domid = sim
    digest = frozen_source(hv, domid, live=True)
    peer = Peer(answer) if answer else None
    try:
        svc = make_service(hv, state)
        svc.query_window = 1.0
        e = svc.journal.begin(jrn.MIGRATE_OUT, domain="web1", domid=domid, host="127.0.0.1",
                              port=peer.port if peer else 9, ssl=False, migration="mid-1",
                              phase=phase)
        e.note("tmem", {"save_begin": True})
        (line,) = svc.recover()
    finally:
        if peer:
            peer.close()
    if peer:
        assert peer.asked == ["(xend-tmem-query (migration mid-1))\n"]
    if outcome == "resumed":
        assert_resumed(hv, domid, digest)
        assert svc.journal.entries() == []
    elif outcome == "destroyed":
        assert [d.name for d in hv.list_domains()] == ["Domain-0"]
        assert "destroyed" in line and svc.journal.entries() == []
    else:
        info = hv.domain_info(domid)
        assert info.name == "migrating-web1" and not info.running
        (left,) = svc.journal.entries()
        assert left.doc["phase"] == "in-doubt"
        assert "kept paused here" in line and "xm destroy migrating-web1" in line


def test_recovery_order_on_the_interface(state) -> None:
    """Plugins first (SAVE_END), then log-dirty off, resume, and the name back."""
    hv = create_autospec(Hypervisor, instance=True)
    hv.list_domains.return_value = [DomainInfo(domid=0, name="Domain-0", memory_mib=0, vcpus=1),
                                    DomainInfo(domid=5, name="migrating-web1", memory_mib=4,
                                               vcpus=1, shutdown=True)]
    svc = make_service(hv, state)
    e = svc.journal.begin(jrn.MIGRATE_OUT, domain="web1", domid=5, host="h", port=1,
                          migration="m", phase="streaming")
    e.note("tmem", {"save_begin": True})
    svc.recover()
    assert hv.mock_calls[1:] == [call.save_end(5), call.disable_logdirty(5), call.resume(5),
                                 call.rename_domain(5, "web1")]


@pytest.mark.parametrize("notes,ends", [({}, False), ({"save_begin": False}, False),
                                        ({"save_begin": True}, True),
                                        ({"save_begin": "issued"}, True)])
def test_tmem_recover_ends_only_a_begun_save(notes, ends: bool) -> None:
    hv = create_autospec(Hypervisor, instance=True)
    tmem_plugin.checkpoint_recover(hv=hv, domid=3, notes=notes)
    assert hv.save_end.mock_calls == ([call(3)] if ends else [])


def test_a_save_journals_what_the_tmem_plugin_owes(sim, state, tmp_path: Path) -> None:
    """A real save through the service: the notes are written as SAVE_BEGIN goes,
    and the entry is gone when the job ends."""
    hv, domid = sim
    svc = make_service(hv, state)
    seen = []
    real_begin = hv.save_begin

    def spy_begin(d, live):
        (entry,) = svc.journal.entries()
        seen.append(entry.doc.get("notes"))
        return real_begin(d, live)

    hv.save_begin = spy_begin
    job = svc.jobs.get(svc.job_save("web1", str(tmp_path / "web1.img")))
    assert job.finished_event.wait(20) and job.state == "done", job.error
    assert seen == [{"tmem": {"save_begin": "issued"}}]
    assert svc.journal.entries() == []
    svc.stop(5)
