"""Issue 8 #1: tmem administration never reaches a domain in a save, restore or
migration, on either side, in its ``-a`` forms too; ``tmem-list`` stays allowed."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from xend_tmem.checkpoint import restore_domain as real_restore_domain
from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend import service
from xend_tmem.xend.relocation.server import RelocationServer
from xend_tmem.xend.service import XendError, XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 8}}]}}


@pytest.fixture
def svc(tmp_path_factory):
    hv = SimHypervisor()
    hv.create_domain(parse_domain_config(DOMAIN))
    s = XendService(parse_toolstack_config({"xend-state-dir": str(tmp_path_factory.mktemp("st"))}),
                    hv, get_plugin_manager(["tmem"], {}))
    yield s
    s.stop(5)


def changers(s: XendService) -> List[Tuple[str, Callable[[object], object]]]:
    """Every tmem command that changes tmem, as xm calls it."""
    return [("destroy", s.tmem_destroy), ("freeze", s.tmem_freeze), ("thaw", s.tmem_thaw),
            ("flush", lambda d: s.tmem_flush(d, -1)),
            ("set weight", lambda d: s.tmem_set_weight(d, 3)),
            ("set cap", lambda d: s.tmem_set_cap(d, 0)),
            ("set compress", lambda d: s.tmem_set_compress(d, 0))]


def assert_all_refused(s: XendService, targets, name: str, doing: str) -> None:
    for dom in targets:
        for what, op in changers(s):
            with pytest.raises(XendError) as err:
                op(dom)
            msg = str(err.value)
            assert name in msg and doing in msg, (what, dom, msg)
        assert s.tmem_list(dom) is not None          # reading stays allowed


class Gate:
    """Holds an operation in the middle until released."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    def hold(self) -> None:
        self.inside.set()
        assert self.release.wait(20)


def test_save_refuses_every_tmem_change_per_domain_and_all(svc, tmp_path: Path, mocker) -> None:
    gate = Gate()
    real_save = service.save_domain

    def held_save(hv, domid, out, **kw):
        gate.hold()
        return real_save(hv, domid, out, **kw)

    mocker.patch.object(service, "save_domain", side_effect=held_save)
    job = svc.job_save("web1", str(tmp_path / "web1.img"), True)
    assert gate.inside.wait(10)
    try:
        assert_all_refused(svc, [1, "1", "web1", -1, "-1"], "web1", "saved")
    finally:
        gate.release.set()
    status = svc.jobs.get(job)
    assert status.finished_event.wait(20) and status.state == "done", status.status()
    svc.tmem_freeze(-1)                                       # released afterwards
    svc.tmem_thaw("web1")


def held_restore(gate: Gate):
    def restore(hv, inp, **kw):
        def created(domid: int) -> None:
            if kw.get("on_created") is not None:
                kw["on_created"](domid)
            gate.hold()
        return real_restore_domain(hv, inp, **{**kw, "on_created": created})
    return restore


def saved_image(svc: XendService, path: Path) -> None:
    st = svc.jobs.get(svc.job_save("web1", str(path), False))
    assert st.finished_event.wait(20) and st.state == "done", st.status()


def test_restore_marks_its_domain_busy(svc, tmp_path: Path, mocker) -> None:
    image = tmp_path / "web1.img"
    saved_image(svc, image)
    gate = Gate()
    mocker.patch.object(service, "restore_domain", side_effect=held_restore(gate))
    job = svc.jobs.get(svc.job_restore(str(image)))
    assert gate.inside.wait(10)
    try:
        domid = svc.domid("web1")
        assert_all_refused(svc, [domid, "web1", -1], "web1", "restored")
        with pytest.raises(XendError, match="web1"):
            svc.domain_destroy(domid)
    finally:
        gate.release.set()
    assert job.finished_event.wait(20) and job.state == "done", job.status()
    svc.tmem_set_weight("web1", 4)                            # released once restored
    svc.tmem_freeze(-1)


def test_incoming_migration_marks_its_domain_busy_until_it_runs(svc, tmp_path: Path,
                                                                 mocker) -> None:
    image = tmp_path / "web1.img"
    saved_image(svc, image)
    server = RelocationServer("127.0.0.1", 0, hosts_allow=[],
                              restore=svc.incoming_restore,
                              check_offer=svc.check_offer,
                              discard=svc.discard_domain)
    svc.relocation_servers = [server]
    gate = Gate()
    mocker.patch.object(service, "restore_domain", side_effect=held_restore(gate))
    done: List[Tuple[int, dict]] = []

    def incoming() -> None:
        with open(image, "rb") as f:
            done.append(svc.incoming_restore(f, "127.0.0.1", paused=True))

    t = threading.Thread(target=incoming)
    t.start()
    try:
        assert gate.inside.wait(10)
        assert_all_refused(svc, ["web1", -1], "web1", "migrated")
    finally:
        gate.release.set()
        t.join(20)
    domid = done[0][0]
    # restored, paused, awaiting the source's go: still not to be touched
    assert_all_refused(svc, [domid, -1], "web1", "migrated")
    server.unpause(domid)                                       # go: it runs here now
    svc.tmem_freeze(domid)
    svc.tmem_thaw(-1)


def test_discarded_incoming_domain_is_released(svc, tmp_path: Path) -> None:
    image = tmp_path / "web1.img"
    saved_image(svc, image)
    with open(image, "rb") as f:
        domid, _ = svc.incoming_restore(f, "127.0.0.1", paused=True)
    with pytest.raises(XendError, match="web1"):
        svc.tmem_destroy(-1)
    svc.discard_domain(domid)
    svc.tmem_destroy(-1)
    assert svc._busy == {}
