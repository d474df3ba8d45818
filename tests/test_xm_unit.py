"""xm's parsing, messages and exit codes with a mocked daemon; the progress display,
the report, and the XML-RPC transport on a real unix socket."""
from __future__ import annotations

import io
import json
import os
import xmlrpc.client
from typing import Any, Dict, List

import pytest

from xend_tmem.errors import ConfigError, NoSuchDomain
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend import progress, rpc, rpcserver, xm


@pytest.fixture
def proxy(mocker):
    """A mocked ServerProxy handed to every xm command."""
    p = mocker.MagicMock(name="proxy")
    mocker.patch.object(xm, "server", return_value=p)
    mocker.patch.object(xm, "POLL_S", 0.0)
    return p


def run(capsys, *argv: str):
    rc = xm.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def done_job(proxy, result: Dict[str, Any], statuses: List[Dict[str, Any]] = ()) -> None:
    final = {"state": "done", "phase": "tail", "done": result.get("bytes", 0), "total": None,
             "result": result}
    proxy.xend.job.status.side_effect = [*statuses, final]


SAVE_RESULT = {
    "op": "save", "domain": "web1", "domid": 3, "path": "/x/web1.img", "checkpoint": False,
    "bytes": 72 << 20, "elapsed_s": 0.5, "rounds": 1, "pages_sent": 16384, "downtime_ms": 500.0,
    "live": False,
    "plugins": {"tmem": {"plan": "non-live", "reason": "the guest is suspended",
                         "tmem_bytes": 8 << 20, "pages": 2048, "invalidations": 0,
                         "freeze_ms": 0.0, "pools": 2}},
}
TMEM_HOOKS = get_plugin_manager(["tmem"], {})
SAVE_RESULT["report_lines"] = progress.report_lines(SAVE_RESULT, TMEM_HOOKS)  # as xend renders it


# -- errors and exit codes --------------------------------------------------------

def test_unknown_domain_exits_3(proxy, capsys) -> None:
    proxy.xend.domain.pause.side_effect = xmlrpc.client.Fault(3, "Domain 'web9' does not exist.")
    assert run(capsys, "pause", "web9") == (3, "", "Error: Domain 'web9' does not exist.\n")


@pytest.mark.parametrize("code", [1, 2])
def test_other_faults_exit_1(proxy, capsys, code: int) -> None:
    proxy.xend.domain.destroy.side_effect = xmlrpc.client.Fault(code, "Cannot destroy it")
    assert run(capsys, "destroy", "web1") == (1, "", "Error: Cannot destroy it\n")


@pytest.mark.parametrize("exc, text", [
    (FileNotFoundError(2, "No such file or directory"), "No such file or directory"),
    (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
    (PermissionError(13, "Permission denied"), "Permission denied"),
])
def test_no_daemon(proxy, capsys, exc: OSError, text: str) -> None:
    proxy.xend.domains_with_state.side_effect = exc
    rc, out, err = run(capsys, "list")
    assert (rc, out) == (1, "")
    assert err == f"Error: Unable to connect to xend: {text}. Is xend running?\n"


def test_daemon_gone_mid_call(proxy, capsys) -> None:
    import http.client
    proxy.xend.node.info.side_effect = http.client.RemoteDisconnected("closed")
    rc, _, err = run(capsys, "info")
    assert rc == 1 and err.startswith("Error: lost the connection to xend")


@pytest.mark.parametrize("argv, call, reply, wanted", [
    (["domid", "web1"], "xend.domain", [1, 2], "list, not a struct"),
    (["list"], "xend.domains_with_state", [{"name": "a"}, 3], "list, not an array of structs"),
    (["tmem-freeable"], "xend.node.tmem_query_freeable_mb", True, "bool, not an int"),
    (["info"], "xend.node.info", [["host"]], "list, not an array of (key, value) pairs"),
    (["save", "web1", "/tmp/x.img"], "xend.job.save", "7", "str, not an int"),
])
def test_a_reply_of_the_wrong_shape_is_one_error_line(proxy, capsys, argv, call, reply,
                                                      wanted) -> None:
    """A xend that answers with another type (an older or newer one) is named, not a
    traceback."""
    obj = proxy
    for part in call.split("."):
        obj = getattr(obj, part)
    obj.return_value = reply
    rc, _, err = run(capsys, *argv)
    assert (rc, err) == (1, f"Error: xend answered {call} with {wanted} "
                            "(an older or newer xend?)\n")


@pytest.mark.parametrize("argv", [[], ["save"], ["save", "web1"], ["frobnicate"],
                                  ["migrate", "-p", "x", "web1", "h"], ["list", "--bogus"]])
def test_usage_errors_exit_1_with_error_prefix(proxy, capsys, argv: List[str]) -> None:
    with pytest.raises(SystemExit) as info:
        rc = xm.main(argv)
        raise SystemExit(rc)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Error: " in err and "Traceback" not in err


def test_help_exits_0(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        xm.main(["-h"])
    assert info.value.code == 0
    assert "migrate" in capsys.readouterr().out


# -- domain commands ---------------------------------------------------------------

def test_list_table_matches_xms_columns(proxy, capsys) -> None:
    proxy.xend.domains_with_state.return_value = [
        {"domid": 3, "name": "web1", "memory": 64, "vcpus": 1, "state": "r-----", "cpu_time": 1.25},
        {"domid": 0, "name": "Domain-0", "memory": 1024, "vcpus": 2, "state": "r-----",
         "cpu_time": 12.0},
    ]
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "Name" + " " * 36 + "    ID   Mem VCPUs      State   Time(s)"
    assert lines[1] == "Domain-0" + " " * 32 + "     0  1024     2     r-----     12.0"
    assert lines[2] == "web1" + " " * 36 + "     3    64     1     r-----      1.2"
    proxy.xend.domains_with_state.assert_called_once_with(False, "all", False)


def test_list_long_prints_sxp_and_named_domains(proxy, capsys) -> None:
    proxy.xend.domain.return_value = {"domid": 3, "name": "web1", "memory": 64, "vcpus": 1,
                                      "state": "-b----", "cpu_time": 0.0,
                                      "sxp": "(domain\n    (name web1)\n)"}
    rc, out, _ = run(capsys, "list", "-l", "web1")
    assert (rc, out) == (0, "(domain\n    (name web1)\n)\n")
    rc, out, _ = run(capsys, "list", "--state", "paused", "web1")
    assert rc == 0 and out.splitlines()[1:] == []


def test_create_makes_the_path_absolute(proxy, capsys, tmp_path, monkeypatch) -> None:
    (tmp_path / "web1.yaml").write_text("name: web1\n")
    monkeypatch.chdir(tmp_path)
    proxy.xend.domain.create.return_value = {"domid": 4, "name": "web1"}
    rc, out, _ = run(capsys, "create", "web1.yaml")
    assert rc == 0
    assert out == 'Using config file "web1.yaml".\nStarted domain web1 (id=4)\n'
    proxy.xend.domain.create.assert_called_once_with(str(tmp_path / "web1.yaml"))
    rc, _, err = run(capsys, "create", "absent.yaml")
    assert (rc, err) == (1, f"Error: xm create: Unable to read file {tmp_path / 'absent.yaml'}\n")


# -- save / restore / migrate -----------------------------------------------------

def test_save_sends_an_absolute_path_and_prints_the_report(proxy, capsys, tmp_path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    proxy.xend.job.save.return_value = 7
    done_job(proxy, SAVE_RESULT)
    rc, out, err = run(capsys, "save", "-c", "web1", "web1.img")
    assert rc == 0 and err == ""                   # stderr is no terminal under pytest
    umask = os.umask(0o022)
    os.umask(umask)
    # the 4th argument is xm's umask: a new image gets 0666 & ~umask (issue 8 #3)
    proxy.xend.job.save.assert_called_once_with("web1", str(tmp_path / "web1.img"), True, umask)
    proxy.xend.job.status.assert_called_with(7)
    assert out.splitlines() == SAVE_RESULT["report_lines"]
    assert "plan non-live (the guest is suspended)" in out
    assert "8.0 MiB of tmem (2048 pages), 0 pages invalidated, guest tmem frozen 0.0 ms" in out
    assert "downtime: 500.0 ms until the image was complete" in out


def test_save_to_an_unwritable_place(proxy, capsys, tmp_path) -> None:
    target = tmp_path / "missing" / "x.img"
    rc, out, err = run(capsys, "save", "web1", str(target))
    assert (rc, out, err) == (1, "", f"Error: xm save: Unable to create file {target}\n")
    proxy.xend.job.save.assert_not_called()


def test_restore_json_and_unreadable_file(proxy, capsys, tmp_path) -> None:
    image = tmp_path / "i.img"
    image.write_bytes(b"LinuxGuestRecord")
    result = {"op": "restore", "domain": "web1", "domid": 5, "path": str(image), "bytes": 10,
              "elapsed_s": 0.1, "pages": 4, "plugins": {"tmem": {"pages": 3}}}
    proxy.xend.job.restore.return_value = 1
    done_job(proxy, result)
    rc, out, _ = run(capsys, "restore", "-p", "--json", str(image))
    assert rc == 0 and json.loads(out) == result
    proxy.xend.job.restore.assert_called_once_with(str(image), True)
    rc, _, err = run(capsys, "restore", str(tmp_path / "nope.img"))
    assert (rc, err) == (1, f"Error: xm restore: Unable to read file {tmp_path / 'nope.img'}\n")


def test_migrate_options_map_to_xends_arguments(proxy, capsys) -> None:
    proxy.xend.job.migrate.return_value = 2
    done_job(proxy, {**SAVE_RESULT, "op": "migrate", "host": "h", "port": 9000, "live": True})
    assert run(capsys, "migrate", "-l", "-p", "9000", "-n", "0", "-s", "-c", "web1", "h")[0] == 0
    proxy.xend.job.migrate.assert_called_once_with("web1", "h", True, 9000, 0, True, True)
    proxy.xend.job.migrate.reset_mock()
    done_job(proxy, {**SAVE_RESULT, "op": "migrate", "host": "h", "port": 8002, "live": False})
    assert run(capsys, "migrate", "web1", "h")[0] == 0
    proxy.xend.job.migrate.assert_called_once_with("web1", "h", False, 0, -1, None, False)


def test_failed_job_prints_its_fault(proxy, capsys, tmp_path) -> None:
    proxy.xend.job.migrate.return_value = 9
    proxy.xend.job.status.side_effect = [
        {"state": "running", "phase": "preflight", "done": 0, "total": None},
        {"state": "failed", "phase": "preflight", "done": 0, "total": None, "fault_code": 2,
         "error": "migration refused: no room (from h)"},
    ]
    rc, out, err = run(capsys, "migrate", "web1", "h")
    assert (rc, out, err) == (1, "", "Error: migration refused: no room (from h)\n")


def test_ctrl_c_cancels_the_job_and_waits_for_it(proxy, capsys) -> None:
    proxy.xend.job.migrate.return_value = 4
    proxy.xend.job.status.side_effect = [
        KeyboardInterrupt(),
        {"state": "running", "phase": "rounds", "done": 5, "total": 10},
        {"state": "cancelled", "phase": "rounds", "done": 5, "total": 10, "fault_code": 2,
         "error": "cancelled"},
    ]
    rc, out, err = run(capsys, "migrate", "web1", "h")
    proxy.xend.job.cancel.assert_called_once_with(4)
    assert rc == 1 and err.endswith("Error: cancelled\n") and "Cancelling" in err


def test_progress_drawn_on_a_terminal_only(proxy, mocker, capsys) -> None:
    tty = io.StringIO()
    mocker.patch.object(tty, "isatty", return_value=True)
    mocker.patch.object(xm.sys, "stderr", tty)
    statuses = [{"state": "running", "phase": p, "done": d, "total": 100 << 20}
                for p, d in (("rounds", 1 << 20), ("rounds", 50 << 20), ("tmem", 90 << 20))]
    proxy.xend.job.save.return_value = 1
    done_job(proxy, SAVE_RESULT, statuses)
    assert xm.main(["save", "web1", "/tmp/web1.img"]) == 0
    shown = tty.getvalue()
    assert "\r" in shown and "save: memory rounds" in shown and "save: tmem" in shown
    assert shown.rstrip("\n").rsplit("\r", 1)[-1].startswith("save: done  72.0 MiB in 0.50 s")
    report = capsys.readouterr().out
    assert report.splitlines() == SAVE_RESULT["report_lines"]

    tty.truncate(0)
    tty.seek(0)
    done_job(proxy, SAVE_RESULT, statuses)
    assert xm.main(["save", "--quiet", "web1", "/tmp/web1.img"]) == 0
    assert tty.getvalue() == ""


# -- tmem commands ------------------------------------------------------------------

def test_tmem_commands(proxy, capsys) -> None:
    proxy.xend.node.tmem_list.return_value = "client 3 (web1): pools=2\n"
    assert run(capsys, "tmem-list", "-l", "web1") == (0, "client 3 (web1): pools=2\n", "")
    proxy.xend.node.tmem_list.assert_called_once_with("web1", True)
    assert run(capsys, "tmem-freeze", "-a")[0] == 0
    proxy.xend.node.tmem_freeze.assert_called_once_with(-1)
    assert run(capsys, "tmem-thaw", "3")[0] == 0
    proxy.xend.node.tmem_thaw.assert_called_once_with("3")
    assert run(capsys, "tmem-flush", "-p", "10", "web1")[0] == 0
    proxy.xend.node.tmem_flush.assert_called_once_with("web1", 10)
    assert run(capsys, "tmem-set", "-a", "weight=3", "compress=1")[0] == 0
    proxy.xend.node.tmem_set_weight.assert_called_once_with(-1, 3)
    proxy.xend.node.tmem_set_compress.assert_called_once_with(-1, 1)
    proxy.xend.node.tmem_set_cap.assert_not_called()
    proxy.xend.node.tmem_query_freeable_mb.return_value = 12
    assert run(capsys, "tmem-freeable") == (0, "12\n", "")


@pytest.mark.parametrize("argv, message", [
    (["tmem-list"], "give a domain or -a"),
    (["tmem-freeze", "-a", "web1"], "either a domain or -a"),
    (["tmem-set", "web1"], "nothing to set"),
    (["tmem-set", "web1", "colour=3"], "expected weight=N, cap=N or compress=N"),
    (["tmem-set", "web1", "cap=-1"], "cap must be a non-negative integer"),
])
def test_tmem_usage_errors(proxy, capsys, argv: List[str], message: str) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and err.startswith("Error: ") and message in err


def test_info_is_key_colon_value(proxy, capsys) -> None:
    proxy.xend.node.info.return_value = [["host", "vm"], ["tmem_spec_version", 1]]
    assert run(capsys, "info") == (0, "host                   : vm\n"
                                      "tmem_spec_version      : 1\n", "")


# -- progress display and report ---------------------------------------------------------

def test_human_units() -> None:
    assert progress.human_bytes(0) == "0 B"
    assert progress.human_bytes(1536) == "1.5 KiB"
    assert progress.human_bytes(3 << 30) == "3.0 GiB"
    assert progress.human_duration(75) == "1:15"
    assert progress.human_duration(3725) == "1:02:05"


def test_display_rate_eta_and_redraw_throttle() -> None:
    now = [0.0]
    out = io.StringIO()
    d = progress.ProgressDisplay(out, "migrate", clock=lambda: now[0], tty=True)
    d.update("rounds", 0, 100 << 20)
    assert d.rate() is None and d.drawn == 1
    now[0] = 1.0
    d.update("rounds", 10 << 20, 100 << 20)
    assert d.rate() == pytest.approx(10 << 20)
    assert "ETA 0:09" in out.getvalue().rsplit("\r", 1)[-1]
    assert " 10%" in out.getvalue().rsplit("\r", 1)[-1]
    now[0] = 1.05
    d.update("rounds", 11 << 20, 100 << 20)          # too soon: no redraw
    assert d.drawn == 2
    d.update("tmem", 12 << 20, 100 << 20)            # a new phase redraws at once
    assert d.drawn == 3 and "migrate: tmem" in out.getvalue().rsplit("\r", 1)[-1]
    d.finish(None)
    assert out.getvalue().endswith("\r")


def test_report_lines_for_each_operation() -> None:
    lines = progress.report_lines({**SAVE_RESULT, "op": "migrate", "host": "h", "port": 8002,
                                   "live": True, "peer_domid": 4, "downtime_ms": 40.5,
                                   "handshake_ms": 28.1, "guest_downtime_ms": 41.0,
                                   "est_downtime_ms": 35.0},
                                  TMEM_HOOKS)
    assert lines[0].startswith("Migrated domain web1 to h:8002 (live), now id=4 there: 72.0 MiB")
    assert lines[-1] == ("downtime: 40.5 ms until the destination ran it, the guest noticed "
                         "41.0 ms, expected 35.0 ms")
    assert "2 pools" in lines[2]
    lines = progress.report_lines({"op": "save", "domain": "x", "path": "/p", "bytes": 1,
                                   "elapsed_s": 0, "plugins": {}})
    assert "tmem: not carried (no checkpoint plugin handled this domain)" in lines


# -- the transport --------------------------------------------------------------------

def test_rpc_over_a_unix_socket_with_faults_and_big_ints(tmp_path) -> None:
    path = str(tmp_path / "run" / "x.sock")
    server = rpcserver.UnixXMLRPCServer(path)

    def nosuch(dom):
        raise NoSuchDomain(dom)

    def bad_config():
        raise ConfigError("web1.yaml: memory: expected an int")

    server.register_function(lambda: {"bytes": 5 << 40, "none": None}, "xend.big")
    server.register_function(nosuch, "xend.nosuch")
    server.register_function(bad_config, "xend.bad")
    server.register_function(lambda: 1 // 0, "xend.bug")
    rpcserver.serve_in_thread(server)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        client = rpc.connect(path)
        assert client.xend.big() == {"bytes": 5 << 40, "none": None}
        for method, code, text in (("nosuch", 3, "Domain 'w' does not exist."),
                                   ("bad", 2, "web1.yaml: memory: expected an int"),
                                   ("bug", 1, "internal error: ZeroDivisionError"),
                                   ("missing", 2, "does not know the method")):
            with pytest.raises(xmlrpc.client.Fault) as info:
                getattr(client.xend, method)(*(["w"] if method == "nosuch" else []))
            assert info.value.faultCode == code and text in info.value.faultString
    finally:
        server.shutdown()
        server.server_close()
    assert not os.path.exists(path)


def test_server_path_from_environment(monkeypatch) -> None:
    monkeypatch.delenv("XM_SERVER", raising=False)
    assert rpc.server_path() == "/var/run/xend/xmlrpc.sock"
    monkeypatch.setenv("XM_SERVER", "httpu:///tmp/a.sock")
    assert rpc.server_path() == "/tmp/a.sock"
    assert rpc.server_path("/x.sock") == "/x.sock"


def test_migrate_knobs_go_to_the_daemon_as_options(proxy, capsys) -> None:
    proxy.xend.job.migrate.return_value = 2
    done_job(proxy, {**SAVE_RESULT, "op": "migrate", "host": "h", "port": 8002, "live": True})
    assert run(capsys, "migrate", "-l", "-r", "200", "--downtime-limit-ms", "50",
               "--max-iters", "5", "--plan", "late-freeze", "web1", "h")[0] == 0
    proxy.xend.job.migrate.assert_called_once_with(
        "web1", "h", True, 0, -1, None, False,
        {"resource_mbit": 200.0, "downtime_limit_ms": 50.0, "max_iters": 5,
         "plan": "late-freeze"})
    proxy.xend.job.migrate.reset_mock()
    done_job(proxy, {**SAVE_RESULT, "op": "migrate", "host": "h", "port": 8002, "live": True})
    assert run(capsys, "migrate", "--resource", "1000", "web1", "h")[0] == 0
    proxy.xend.job.migrate.assert_called_once_with("web1", "h", False, 0, -1, None, False,
                                                   {"resource_mbit": 1000.0})


@pytest.mark.parametrize("argv, message", [
    (["-r", "0"], "-r/--resource: a rate in Mbit/s"),
    (["--downtime-limit-ms", "0.5"], "--downtime-limit-ms: 1..3600000"),
    (["--max-iters", "0"], "--max-iters: 1..1000"),
])
def test_migrate_knobs_out_of_range_are_usage_errors(proxy, capsys, argv, message) -> None:
    rc, out, err = run(capsys, "migrate", *argv, "web1", "h")
    assert rc == 1 and err.startswith("usage: xm migrate") and f"Error: {message}" in err
    proxy.xend.job.migrate.assert_not_called()


def test_migrate_plan_must_be_a_plan(proxy, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        xm.main(["migrate", "--plan", "fastest", "web1", "h"])
    assert exc.value.code == 1
    assert "Error: argument --plan: invalid choice: 'fastest'" in capsys.readouterr().err
    proxy.xend.job.migrate.assert_not_called()


def test_migrate_cancel_waits_for_the_job_to_end(proxy, capsys) -> None:
    proxy.xend.job.migrate_cancel.return_value = 7
    proxy.xend.job.status.side_effect = [
        {"state": "running", "phase": "rounds", "done": 5, "total": 10},
        {"state": "cancelled", "phase": "rounds", "done": 5, "total": 10, "fault_code": 2,
         "error": "cancelled"},
    ]
    rc, out, err = run(capsys, "migrate-cancel", "web1")
    proxy.xend.job.migrate_cancel.assert_called_once_with("web1")
    assert (rc, out, err) == (0, "Migration of web1 cancelled: cancelled\n", "")
    proxy.xend.job.status.side_effect = [{"state": "done", "phase": "done", "done": 1,
                                          "total": 1, "result": {}}]
    rc, out, err = run(capsys, "migrate-cancel", "web1")
    assert rc == 1 and "had already completed" in err
