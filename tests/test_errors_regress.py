"""Issue 8 #5: errors read like the OS's, name what to do, and Ctrl-C is never
swallowed by a cleanup."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hooks import hookimpl
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.session import Outcome
from xend_tmem.xend import rpc, xm
from xend_tmem.xend.service import XendError, XendService

DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 64}}]}}


def make_service(state: Path, plugins=("tmem",), **hv_kw) -> XendService:
    hv = SimHypervisor(**hv_kw)
    return XendService(parse_toolstack_config({"xend-state-dir": str(state)}), hv,
                       get_plugin_manager(list(plugins), {}))


@pytest.fixture
def image(tmp_path_factory) -> Path:
    """A saved image of ``web1`` with 64 persistent tmem pages."""
    out = tmp_path_factory.mktemp("img") / "web1.img"
    s = make_service(tmp_path_factory.mktemp("st"))
    try:
        s.hv.create_domain(parse_domain_config(DOMAIN))
        job = s.jobs.get(s.job_save("web1", str(out), False))
        assert job.finished_event.wait(20) and job.state == "done", job.status()
    finally:
        s.stop(5)
    return out


def restore_status(s: XendService, path: Path) -> dict:
    job = s.jobs.get(s.job_restore(str(path)))
    assert job.finished_event.wait(20)
    return job.status()


@pytest.mark.parametrize("exc, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/srv/web1.img"),
     "/srv/web1.img: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/x"), "/srv/x: Permission denied"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
])
def test_every_oserror_reads_like_the_os(exc: OSError, text: str) -> None:
    fault = rpc.fault_for(exc)
    assert fault.faultCode == rpc.FAULT_GENERIC
    assert fault.faultString == text


def test_xm_save_names_the_command_and_the_path(mocker, capsys, tmp_path: Path) -> None:
    proxy = mocker.MagicMock(name="proxy")
    mocker.patch.object(xm, "server", return_value=proxy)
    mocker.patch.object(xm, "POLL_S", 0.0)
    target = tmp_path / "web1.img"
    proxy.xend.job.save.return_value = 1
    proxy.xend.job.status.return_value = {
        "state": "failed", "phase": "save", "done": 0, "total": None, "fault_code": 2,
        "error": f"{target}: No space left on device"}
    rc = xm.main(["save", "web1", str(target)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines()[-1] == f"Error: xm save: {target}: No space left on device"


def test_xm_sends_its_umask_with_a_save(mocker, tmp_path: Path) -> None:
    proxy = mocker.MagicMock(name="proxy")
    mocker.patch.object(xm, "server", return_value=proxy)
    mocker.patch.object(xm, "POLL_S", 0.0)
    proxy.xend.job.save.return_value = 1
    proxy.xend.job.status.return_value = {"state": "done", "phase": "tail", "done": 0,
                                          "total": None, "result": {"op": "save"}}
    old = os.umask(0o027)
    try:
        xm.main(["save", "-q", "web1", str(tmp_path / "web1.img")])
    finally:
        os.umask(old)
    args = proxy.xend.job.save.call_args.args
    assert args[:3] == ("web1", str(tmp_path / "web1.img"), False) and args[3] == 0o027


def test_tmem_full_on_restore_is_a_capacity_refusal(image: Path, tmp_path: Path) -> None:
    s = make_service(tmp_path / "st", tmem_capacity_pages=16)
    try:
        st = restore_status(s, image)
    finally:
        s.stop(5)
    assert st["state"] == "failed" and st["fault_code"] == 2, st
    msg = st["error"]
    assert "bad stream" not in msg, msg
    assert "tmem" in msg and "full" in msg, msg
    assert "tmem-capacity-mb" in msg and "xm tmem-flush" in msg, msg
    assert s.hv.list_domains()[-1].domid == 0          # nothing half-restored is left


def test_image_with_tmem_on_a_host_without_the_plugin(image: Path, tmp_path: Path) -> None:
    s = make_service(tmp_path / "st", plugins=())
    try:
        st = restore_status(s, image)
    finally:
        s.stop(5)
    assert st["state"] == "failed" and st["fault_code"] == 2, st
    assert "'tmem'" in st["error"] and "checkpoint-plugins" in st["error"], st


def test_value_errors_from_user_input_are_refusals(tmp_path: Path) -> None:
    s = make_service(tmp_path / "st")
    try:
        s.hv.create_domain(parse_domain_config(DOMAIN))
        for call in (lambda: s.tmem_flush("web1", "many"),
                     lambda: s.tmem_flush("web1", None),
                     lambda: s.job_restore(str(tmp_path / "x.img"), False, "wide"),
                     lambda: s.job_migrate("web1", "127.0.0.1", False, "http")):
            with pytest.raises(XendError) as err:
                call()
            fault = rpc.fault_for(err.value)
            assert fault.faultCode == rpc.FAULT_GENERIC and "internal" not in fault.faultString
        # a ValueError escaping a method is the user's input, not a bug
        fault = rpc.fault_for(ValueError("invalid literal for int() with base 10: 'x'"))
        assert fault.faultCode == rpc.FAULT_GENERIC, fault
        assert "internal error" not in fault.faultString
    finally:
        s.stop(5)


def test_ctrl_c_during_cleanup_propagates_after_the_other_cleanups() -> None:
    ran = []

    class Interrupted:
        @hookimpl
        def checkpoint_save_done(self, session, outcome) -> None:
            ran.append("interrupted")
            raise KeyboardInterrupt

    class Later:
        @hookimpl
        def checkpoint_save_done(self, session, outcome) -> None:
            ran.append("later")

    class Failing:
        @hookimpl
        def checkpoint_save_done(self, session, outcome) -> None:
            ran.append("failing")
            raise RuntimeError("boom")

    hooks = get_plugin_manager([], {}, extra=[Interrupted(), Failing(), Later()])
    with pytest.raises(KeyboardInterrupt):
        hooks.save_done(object(), Outcome())
    assert sorted(ran) == ["failing", "interrupted", "later"]
    ran.clear()
    hooks = get_plugin_manager([], {}, extra=[Failing(), Later()])
    errors = hooks.save_done(object(), Outcome())
    assert [n for n, _ in errors] and isinstance(errors[0][1], RuntimeError)
    assert sorted(ran) == ["failing", "later"]


def test_a_restore_that_fails_reading_the_sidecar_closes_the_image(tmp_path, image,
                                                                    monkeypatch) -> None:
    """An I/O error before the job starts (reading the checksum file) reaches the
    caller as the OS's error, and the image it had opened is closed."""
    from xend_tmem import integrity
    opened = []
    real_open = open

    def tracking_open(path, *a, **kw):
        f = real_open(path, *a, **kw)
        if str(path) == str(image):
            opened.append(f)
        return f

    def broken(*_a):
        raise OSError(errno.EIO, "Input/output error", str(image) + ".crc")

    monkeypatch.setattr("builtins.open", tracking_open)
    monkeypatch.setattr(integrity, "load_sidecar", broken)
    s = make_service(tmp_path / "st")
    try:
        with pytest.raises(OSError, match="Input/output error"):
            s.job_restore(str(image))
    finally:
        s.stop(5)
    assert len(opened) == 1 and opened[0].closed
