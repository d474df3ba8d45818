"""xend's side of the everyday xm commands, in-process: shutdown/reboot completion,
the balloon, vcpus, consoles, reload (issue 8 #9)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from xend_tmem.config import load_toolstack_config
from xend_tmem.errors import ConfigError, HypervisorError
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend.service import XendError, XendService
from xend_tmem.xend.xm import format_uptime

BUSY = {"name": "web1", "memory": 8, "vcpus": 2,
        "workload": {"ram_dirty_pages_per_s": 10, "seed": 4}}


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "xend-config.yaml"
    path.write_text(yaml.safe_dump({"xend-state-dir": str(tmp_path / "state"),
                                    "logfile": str(tmp_path / "xend.log"),
                                    "loglevel": "DEBUG"}))
    return path


@pytest.fixture
def svc(cfg_path: Path) -> Iterator[XendService]:
    hv = SimHypervisor()
    config = load_toolstack_config(str(cfg_path))
    s = XendService(config, hv, get_plugin_manager(["tmem"], config.plugin_settings))
    root = logging.getLogger()
    level = root.level
    yield s
    s.stop(5)
    hv.close()
    root.setLevel(level)


def test_reboot_restarts_with_the_same_config_and_a_fresh_console(svc: XendService) -> None:
    domid = svc.domain_create_config(dict(BUSY), "web1.cfg")["domid"]
    svc.domain_set_memory_target("web1", 4)
    out = svc.domain_shutdown("web1", "reboot")
    assert out["acknowledged"]
    assert "Restarting system." in svc.domain_console(domid)
    assert svc.finish_shutdowns() == 0
    infos = {i.name: i for i in svc.hv.list_domains()}
    new = infos["web1"]
    assert new.domid != domid and (new.memory_mib, new.vcpus) == (8, 2)   # max again
    assert new.config.get("workload", {}).get("ram_dirty_pages_per_s") == 10
    assert "Restarting system." not in svc.domain_console("web1")


def test_a_paused_guest_acknowledges_only_when_unpaused(svc: XendService) -> None:
    svc.domain_create_config({"name": "p1", "memory": 4}, "p1.cfg")
    svc.domain_pause("p1")
    assert svc.domain_shutdown("p1", "poweroff")["acknowledged"] is False
    assert svc.finish_shutdowns() == 1                       # still outstanding
    assert "p1" in {i.name for i in svc.hv.list_domains()}
    svc.domain_unpause("p1")
    assert svc.finish_shutdowns() == 0
    assert "p1" not in {i.name for i in svc.hv.list_domains()}


def test_shutdown_refusals(svc: XendService) -> None:
    svc.domain_create_config({"name": "b1", "memory": 4}, "b1.cfg")
    with pytest.raises(XendError, match="privileged"):
        svc.domain_shutdown(0, "poweroff")
    with pytest.raises(XendError, match="shutdown reason"):
        svc.domain_shutdown("b1", "suspend")
    domid = svc.domid("b1")
    svc._claim(domid, "saved")
    try:
        with pytest.raises(XendError, match="being saved"):
            svc.domain_shutdown("b1", "poweroff")
    finally:
        svc._release(domid)


def test_balloon_vcpus_uptime_and_rings(svc: XendService) -> None:
    svc.domain_create_config({"name": "m1", "memory": 16, "vcpus": 3}, "m1.cfg")
    with pytest.raises(HypervisorError, match=r"1\.\.16 MiB"):
        svc.domain_set_memory_target("m1", 17)
    rows = svc.domain_vcpu_info("m1")
    assert [r["vcpu"] for r in rows] == [0, 1, 2] and {r["state"] for r in rows} == {"r--"}
    svc.domain_pause("m1")
    assert {r["state"] for r in svc.domain_vcpu_info("m1")} == {"--p"}
    assert {r["name"] for r in svc.domain_vcpu_info(None)} == {"Domain-0", "m1"}
    assert all(r["uptime"] >= 0 for r in svc.domain_uptime(None))
    assert "m1" in svc.node_dmesg_clear() and svc.node_dmesg() == ""
    with pytest.raises(XendError, match="Domain-0"):
        svc.domain_console(0)


def test_reload_applies_live_keys_and_names_the_others(svc: XendService, cfg_path: Path
                                                       ) -> None:
    doc = yaml.safe_load(cfg_path.read_text())
    doc.update({"loglevel": "ERROR", "xend-relocation-hosts-allow": "^a$ ^b$",
                "tmem": {"plan": "precopy"}, "xend-relocation-port": 9999})
    cfg_path.write_text(yaml.safe_dump(doc))
    old_hooks = svc.hooks
    lines = svc.reload()
    assert any(ln.startswith("loglevel: DEBUG -> ERROR") for ln in lines)
    assert logging.getLogger().level == logging.ERROR
    assert any(ln.startswith("xend-relocation-hosts-allow: ^a$ ^b$") for ln in lines)
    assert any(ln.startswith("tmem: plugin settings applied") for ln in lines)
    assert svc.hooks is not old_hooks and svc.hooks.settings["tmem"] == {"plan": "precopy"}
    assert any("xend-relocation-port" in ln and "restart" in ln for ln in lines)
    assert svc.config.relocation_port != 9999               # still the running value
    assert svc.config.relocation_hosts_allow == ("^a$", "^b$")
    assert svc.reload() == [ln for ln in lines if "xend-relocation-port" in ln]

    doc["tmem"] = {"plan": "fastest"}                        # a bad plugin value
    cfg_path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="plan"):
        svc.reload()
    assert svc.hooks.settings["tmem"] == {"plan": "precopy"}


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.9, "0:00:59"),
                                           (3725, "1:02:05"), (86400, "1 day, 0:00:00"),
                                           (2 * 86400 + 61, "2 days, 0:01:01")])
def test_uptime_format(seconds: float, text: str) -> None:
    assert format_uptime(seconds) == text
