"""The hypervisor outlives xend: restarts keep every domain; its own command stops it.

Digests are read straight from the hypervisor process through a client of its
socket (the interface's ``ram_digest``/``tmem_digest``), independent of xend.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from xend_tmem.hypervisor.client import HypervisorClient

from .xendtest import BUSY_DOMAIN, STILL_DOMAIN, Xend, wait_for, write_domain

pytestmark = pytest.mark.e2e

PAUSED_DOMAIN = {**STILL_DOMAIN, "name": "still2"}


def _setup(xend: Xend, tmp_path: Path) -> None:
    for spec in (STILL_DOMAIN, PAUSED_DOMAIN, BUSY_DOMAIN):
        xend.xm_ok("create", str(write_domain(tmp_path, spec)))
    xend.xm_ok("pause", "still2")


def _listing(xend: Xend) -> Dict[str, Tuple[str, ...]]:
    """``xm list`` without the cpu time: name -> (id, mem, vcpus, state)."""
    return {name: tuple(row[:4]) for name, row in xend.domains().items()}


def _pool_shape(xend: Xend, dom: str) -> Dict[int, Dict[str, str]]:
    """A busy guest's pools without the page counts its workload changes."""
    return {i: {k: v for k, v in facts.items() if k != "pages"}
            for i, facts in xend.tmem_pools(dom).items()}


def _snapshot(xend: Xend, hv: HypervisorClient) -> Dict[str, Any]:
    ids = {name: int(row[0]) for name, row in _listing(xend).items()}
    return {
        "list": _listing(xend),
        "tmem-list": {d: xend.xm_ok("tmem-list", "-l", d) for d in ("still1", "still2")},
        "busy pools": _pool_shape(xend, "web1"),
        "ram": {d: hv.ram_digest(ids[d]) for d in ("still1", "still2")},
        "tmem": {d: hv.tmem_digest(ids[d]) for d in ("still1", "still2")},
    }


def _ram_writes(hv: HypervisorClient, domid: int) -> int:
    return hv.guest_stats(domid)["ram_writes"]


def _busy_keeps_running(hv: HypervisorClient, domid: int) -> None:
    first = _ram_writes(hv, domid)
    wait_for(lambda: _ram_writes(hv, domid) > first, timeout=10)


@pytest.mark.parametrize("how", ["restart", "stop-start"])
def test_xend_restart_keeps_every_domain(xends, tmp_path: Path, how: str) -> None:
    a = xends.start("a")
    _setup(a, tmp_path)
    hv = HypervisorClient(str(a.state_dir))
    try:
        hv_pid = a.hypervisor_pid()
        web1 = int(_listing(a)["web1"][0])
        _busy_keeps_running(hv, web1)
        before = _snapshot(a, hv)
        assert before["list"]["still2"][3] == "--p---"
        assert before["list"]["web1"][3] == "r-----"
        xend_pid = int(a.pid_path.read_text())
        if how == "restart":
            r = a.xend_cmd("restart")
            assert r.returncode == 0, r.stderr
        else:
            assert a.xend_cmd("stop").returncode == 0
            assert a.proc is not None and a.proc.wait(15) == 0
            assert a.xm("list").returncode == 1                  # xend is down ...
            _busy_keeps_running(hv, web1)                         # ... the guest is not
            r = a.xend_cmd("start")
            assert r.returncode == 0, r.stderr
        assert int(a.pid_path.read_text()) != xend_pid
        assert a.hypervisor_pid() == hv_pid                       # the same hypervisor
        after = _snapshot(a, hv)
        assert after == before
        _busy_keeps_running(hv, web1)
        log = a.log_text()
        tail = log[log.rindex("xend starting"):]
        for name in ("still1", "still2", "web1"):
            dom_id, _, _, state = before["list"][name]
            assert f"found domain {name} (id {dom_id}, state {state})" in tail
        assert "attached to the sim hypervisor (Xen 4.0.2" in tail
        # the restarted xend drives the old domains as before
        a.xm_ok("unpause", "still2")
        image = tmp_path / "still1.img"
        a.xm_ok("save", "still1", str(image))
        a.xm_ok("restore", str(image))
        restored = int(_listing(a)["still1"][0])
        assert hv.tmem_digest(restored) == before["tmem"]["still1"]
    finally:
        hv.close()


def test_xend_killed_leaves_the_domains_to_the_next_start(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    _setup(a, tmp_path)
    before = _listing(a)
    assert a.proc is not None
    a.proc.kill()
    a.proc.wait()
    a.stopped = True
    r = a.xend_cmd("start")
    assert r.returncode == 0, r.stderr
    assert _listing(a) == before


def test_hypervisor_command(xends, tmp_path: Path) -> None:
    a = xends.write_config("a")
    r = a.hypervisor_cmd("status")
    assert (r.returncode, r.stdout) == (3, "the hypervisor is not running\n")
    r = a.hypervisor_cmd("stop")
    assert (r.returncode, r.stdout) == (0, "the hypervisor is not running\n")
    r = a.hypervisor_cmd("start")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    pid = a.hypervisor_pid()
    assert pid
    r = a.hypervisor_cmd("start")
    assert (r.returncode, r.stdout) == (0, f"the hypervisor is already running (pid {pid})\n")
    r = a.hypervisor_cmd("status")
    assert (r.returncode, r.stdout) == (
        0, f"the hypervisor is running (pid {pid}, Xen 4.0.2, 0 guest domains)\n")
    xends.launch(a)                                   # xend attaches to the running one
    a.xm_ok("create", str(write_domain(tmp_path, STILL_DOMAIN)))
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    assert a.hypervisor_pid() == pid
    assert "attached to the sim hypervisor" in a.log_text()
    assert a.stop() == 0
    r = a.hypervisor_cmd("stop")
    assert r.returncode == 1
    assert r.stderr == ("Error: 2 domains are running (still1, web1): stopping the hypervisor "
                        "destroys them; use --force\n")
    assert a.hypervisor_pid() == pid
    guests = _guest_pids(pid)
    r = a.hypervisor_cmd("stop", "--force")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "destroyed domain still1 (id 1)\ndestroyed domain web1 (id 2)\n"
    assert a.hypervisor_cmd("status").returncode == 3
    assert not (a.state_dir / "hypervisor.sock").exists()
    assert not (a.state_dir / "hypervisor.pid").exists()
    for g in guests:                                  # the guests went with their domains
        wait_for(lambda g=g: not Path(f"/proc/{g}").exists() or _zombie(g), timeout=10)
    log = a.hv_log_path.read_text()
    assert "hypervisor running: pid" in log and "hypervisor stopped" in log


def test_bad_hypervisor_settings_are_one_line_errors(xends) -> None:
    a = xends.write_config("a", hypervisor={"backend": "sim", "xen-release": "9.9.9"})
    r = a.hypervisor_cmd("start")
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "xen-release" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    b = xends.write_config("b", hypervisor={"backend": "nope"})
    r = b.xend_cmd("foreground")
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "nope" in r.stderr


def _guest_pids(pid: int) -> List[int]:
    from .xendtest import children_of
    return children_of(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] == "Z"


def test_time_passes_for_the_guest_only_while_it_runs(xends, tmp_path: Path) -> None:
    a = xends.start("a")
    a.xm_ok("create", str(write_domain(tmp_path, BUSY_DOMAIN)))
    hv = HypervisorClient(str(a.state_dir))
    try:
        web1 = int(_listing(a)["web1"][0])
        _busy_keeps_running(hv, web1)
        a.xm_ok("pause", "web1")
        frozen = _ram_writes(hv, web1)
        time.sleep(0.3)
        assert _ram_writes(hv, web1) == frozen       # pause is a barrier the guest obeys
        a.xm_ok("unpause", "web1")
        _busy_keeps_running(hv, web1)
    finally:
        hv.close()
