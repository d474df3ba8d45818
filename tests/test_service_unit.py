"""The daemon's rules around the engine, in-process: temp files, names, busy
domains, refusals, and loading plugins without letting a broken one stop xend."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import ConfigError, NoSuchDomain, PluginError, SaveError
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend import daemon, service
from xend_tmem.xend.service import XendError, XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 8}}]}}


@pytest.fixture
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def svc(state_dir: Path):
    hv = SimHypervisor()
    hv.create_domain(parse_domain_config(DOMAIN))
    s = XendService(parse_toolstack_config({"xend-state-dir": str(state_dir)}), hv,
                    get_plugin_manager(["tmem"], {}))
    yield s
    s.stop(5)


def wait(s: XendService, job_id: int) -> dict:
    job = s.jobs.get(job_id)
    assert job.finished_event.wait(20)
    return job.status()


def test_failed_save_removes_its_temp_file_and_gives_the_name_back(svc, tmp_path: Path,
                                                                    mocker) -> None:
    names_during = []

    def failing_save(hv, domid, out, **kw):
        names_during.append(svc.hv.domain_info(domid).name)
        names_during.append(kw["name"])                      # what the image carries
        out.write(b"LinuxGuestRecord" + bytes(1000))
        raise SaveError("cannot write this")

    mocker.patch.object(service, "save_domain", side_effect=failing_save)
    st = wait(svc, svc.job_save("web1", str(tmp_path / "web1.img"), False))
    assert st["state"] == "failed" and st["error"] == "cannot write this" and st["fault_code"] == 2
    assert names_during == ["migrating-web1", "web1"]
    assert svc.journal.entries() == []                     # the job ended: nothing owed
    assert os.listdir(tmp_path) == []
    assert svc.hv.domain_info(svc.domid("web1")).name == "web1"
    assert svc._busy == {}


def test_save_success_renames_into_place_and_destroys_the_source(svc, tmp_path: Path) -> None:
    target = tmp_path / "web1.img"
    st = wait(svc, svc.job_save("web1", str(target), False))
    assert st["state"] == "done", st
    assert st["result"]["plugins"]["tmem"]["pages"] == 8
    # the image and its page checksums beside it (issue 8 #4)
    assert sorted(os.listdir(tmp_path)) == ["web1.img", "web1.img.crc"]
    assert target.read_bytes()[:16] == b"LinuxGuestRecord"
    with pytest.raises(NoSuchDomain):
        svc.domid("web1")


def test_checkpoint_keeps_the_domain_and_its_name(svc, tmp_path: Path) -> None:
    st = wait(svc, svc.job_save("1", str(tmp_path / "cp.img"), True))
    assert st["state"] == "done"
    info = svc.hv.domain_info(1)
    assert info.name == "web1" and info.running


def test_cancelled_save_leaves_nothing(svc, tmp_path: Path, mocker) -> None:
    started = threading.Event()

    def slow_save(hv, domid, out, *, cancel, **kw):
        started.set()
        assert cancel.wait(10)
        from xend_tmem.errors import Cancelled
        raise Cancelled("cancelled")

    mocker.patch.object(service, "save_domain", side_effect=slow_save)
    job_id = svc.job_save("web1", str(tmp_path / "x.img"), False)
    assert started.wait(10)
    with pytest.raises(XendError, match="Cannot save domain migrating-web1: it is being saved"):
        svc.job_save(1, str(tmp_path / "y.img"), False)
    with pytest.raises(XendError, match="being saved"):
        svc.domain_destroy(1)
    assert svc.job_cancel(job_id) is True
    st = wait(svc, job_id)
    assert (st["state"], st["error"]) == ("cancelled", "cancelled")
    assert os.listdir(tmp_path) == [] and svc.hv.domain_info(1).name == "web1"


@pytest.mark.parametrize("call, message", [
    (lambda s, p: s.job_save(0, p, False), "Cannot save privileged domain 0"),
    (lambda s, p: s.job_migrate("Domain-0", "h"), "Cannot migrate privileged domain 0"),
    (lambda s, p: s.job_save("web1", "relative.img", False), "must be absolute"),
    (lambda s, p: s.job_save("web1", os.path.dirname(p), False), "it is a directory"),
    (lambda s, p: s.job_save("web1", "/nonexistent-dir/x.img", False), "Unable to create file"),
    (lambda s, p: s.job_restore(p + ".missing"), "Unable to read file"),
    (lambda s, p: s.job_migrate("web1", "h", port=70000), "bad port"),
    (lambda s, p: s.domains_with_state(False, "asleep"), "Invalid state"),
    (lambda s, p: s.tmem_set_weight("web1", -1), "weight must be 0..4294967295"),
])
def test_refusals(svc, tmp_path: Path, call, message: str) -> None:
    with pytest.raises(XendError, match=message):
        call(svc, str(tmp_path / "x.img"))
    assert svc._busy == {}
    assert svc.hv.domain_info(1).running


def test_paused_domain_is_not_saved(svc, tmp_path: Path) -> None:
    svc.domain_pause("web1")
    with pytest.raises(XendError, match=r"web1: it is not running \(state --p---\)"):
        svc.job_save("web1", str(tmp_path / "x.img"), False)
    assert os.listdir(tmp_path) == []


def test_preflight_check_offer(svc) -> None:
    bare = XendService(parse_toolstack_config({"checkpoint-plugins": []}), SimHypervisor(),
                       get_plugin_manager([], {}), journal=svc.journal)
    offer = {"domain": {"name": "web1"}, "node": -1,
             "plugins": svc.hooks.migrate_offer(svc.hv, 1)}
    assert bare.check_offer({**offer, "domain": {"name": "new"}}) == [
        "the domain carries tmem state but checkpoint plugin 'tmem' is not enabled on this host"]
    assert svc.check_offer(offer) == ["a domain named web1 already exists here (id 1)"]
    assert svc.check_offer({**offer, "domain": {"name": "x"}, "node": 3}) == [
        "no NUMA node 3 on this host (it has node 0 only)"]
    assert bare.check_offer({"domain": {"name": "x"}, "plugins": {}}) == []
    assert bare.check_offer({"plugins": []}) == ["malformed pre-flight offer"]


def test_list_and_domain_sxp(svc) -> None:
    rows = svc.domains_with_state(True, "running", False)
    assert [r["name"] for r in rows] == ["Domain-0", "web1"]
    sxp = rows[1]["sxp"]
    assert sxp.startswith("(domain\n    (domid 1)\n    (name web1)") and "(state r-----)" in sxp
    assert svc.domain("web1")["domid"] == 1


def test_create_refuses_a_duplicate_name(svc, tmp_path: Path) -> None:
    path = tmp_path / "web1.yaml"
    path.write_text("name: web1\nmemory: 4\n")
    with pytest.raises(XendError, match="Domain 'web1' already exists with ID '1'"):
        svc.domain_create(str(path))
    path.write_text("name: web2\nmemory: nope\n")
    with pytest.raises(ConfigError, match="memory"):
        svc.domain_create(str(path))


def test_a_broken_plugin_is_left_out_not_fatal(mocker) -> None:
    real = daemon.get_plugin_manager

    def fake(enabled, settings):
        if "tmem" in enabled:
            raise PluginError("checkpoint plugin 'tmem' failed to load: ImportError: boom")
        return real(enabled, settings)

    mocker.patch.object(daemon, "get_plugin_manager", side_effect=fake)
    hooks, errors = daemon.load_hooks(parse_toolstack_config({}))
    assert hooks.enabled == [] and errors == [
        "checkpoint plugin 'tmem' failed to load: ImportError: boom"]


def test_a_plugins_configuration_error_is_fatal_and_names_the_file() -> None:
    cfg = parse_toolstack_config({"tmem": {"plan": "fastest"}}, "/etc/xen/x.yaml")
    with pytest.raises(ConfigError, match=r"^/etc/xen/x\.yaml: tmem\.plan: "):
        daemon.load_hooks(cfg)


def test_pid_file_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "xend.pid")
    assert daemon.running_pid(path) is None
    first = daemon.PidFile(path)
    first.acquire()
    assert daemon.running_pid(path) == os.getpid()
    with pytest.raises(daemon.StartError, match="already running"):
        daemon.PidFile(path).acquire()
    first.release()
    assert not os.path.exists(path) and daemon.running_pid(path) is None
    Path(path).write_text("999999\n")             # a stale file from a killed daemon
    assert daemon.running_pid(path) is None
    again = daemon.PidFile(path)
    again.acquire()
    assert Path(path).read_text() == f"{os.getpid()}\n"
    again.release()


def test_migrate_overrides_replace_the_migration_section(state_dir: Path) -> None:
    hv = SimHypervisor()
    s = XendService(parse_toolstack_config({
        "xend-state-dir": str(state_dir),
        "migration": {"max-rate-mbit": 800, "downtime-limit-ms": 120, "max-iters": 9,
                      "on-limit-miss": "strict"},
        "tmem": {"plan": "precopy"}}), hv, get_plugin_manager(["tmem"], {"tmem": {
            "plan": "precopy"}}))
    limits, cap, settings = s._migrate_overrides({})
    assert (limits.downtime_limit_ms, limits.max_iters, limits.on_limit_miss) == (
        120.0, 9, "strict")
    assert cap == 800e6 / 8
    assert settings == {"tmem": {"plan": "precopy", "downtime-limit-ms": 120.0}}
    limits, cap, settings = s._migrate_overrides(
        {"resource_mbit": 200, "downtime_limit_ms": 40, "max_iters": 3, "plan": "late-freeze"})
    assert (limits.downtime_limit_ms, limits.max_iters, limits.on_limit_miss) == (
        40.0, 3, "strict")
    assert cap == 25e6
    assert settings == {"tmem": {"plan": "late-freeze", "downtime-limit-ms": 40.0}}
    for bad, message in (({"resource_mbit": 0}, "-r/--resource"),
                         ({"downtime_limit_ms": True}, "--downtime-limit-ms"),
                         ({"max_iters": 2.5}, "--max-iters"),
                         ({"plan": "fastest"}, "--plan must be one of"),
                         ({"rate": 1}, "unknown migrate option 'rate'")):
        with pytest.raises(XendError, match=message):
            s._migrate_overrides(bad)
    bare = XendService(parse_toolstack_config({"xend-state-dir": str(state_dir),
                                               "checkpoint-plugins": []}),
                       hv, get_plugin_manager([], {}), journal=s.journal)
    with pytest.raises(XendError, match="checkpoint plugin 'tmem' is not enabled"):
        bare._migrate_overrides({"plan": "precopy"})
    assert bare._migrate_overrides({})[2] is None
    s.stop(5)


def test_migrate_cancel_finds_the_job_by_domain(svc, mocker) -> None:
    started = threading.Event()

    def stalled(hv, domid, host, port, *, cancel, on_accepted, **kw):
        on_accepted()                                          # renamed migrating-web1
        started.set()
        assert cancel.wait(20)
        from xend_tmem.errors import Cancelled
        raise Cancelled("cancelled")

    mocker.patch.object(service.relocation_client, "migrate", side_effect=stalled)
    with pytest.raises(XendError, match="no migration of domain web1 is in progress here"):
        svc.job_migrate_cancel("web1")
    job_id = svc.job_migrate("web1", "127.0.0.1", live=True, port=9)
    assert started.wait(10)
    assert svc.job_migrate_cancel("migrating-web1") == job_id
    st = wait(svc, job_id)
    assert (st["state"], st["error"]) == ("cancelled", "cancelled")
    assert svc.hv.domain_info(1).name == "web1" and svc._outgoing == {}
    with pytest.raises(XendError, match="no migration of domain web1"):
        svc.job_migrate_cancel("web1")
