"""Issue 8 #8: beside a real xend (same default socket, pid file and port) the
daemon refuses to start with a clear message instead of clashing; ``xm`` finds
its daemon through ``XEND_CONFIG`` (``XM_SERVER`` still wins)."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from xend_tmem.config import parse_toolstack_config
from xend_tmem.xend import rpc, rpcserver, xm
from xend_tmem.xend.daemon import Daemon, StartError


def config(tmp_path: Path, **overrides):
    settings = {"xend-unix-socket": str(tmp_path / "xmlrpc.sock"),
                "xend-pid-file": str(tmp_path / "xend.pid"),
                "xend-state-dir": str(tmp_path / "state"),
                "logfile": str(tmp_path / "xend.log"),
                "xend-relocation-server": False,
                "hypervisor": {"backend": "sim-inprocess"}}
    settings.update(overrides)
    return parse_toolstack_config(settings)


@pytest.fixture
def stock_xend(tmp_path: Path):
    """An XML-RPC server on the socket that answers as a stock xend would: its
    own methods, and a fault for any other."""
    server = rpcserver.UnixXMLRPCServer(str(tmp_path / "xmlrpc.sock"))
    server.register_function(lambda *a: [], "xend.domains")
    thread = rpcserver.serve_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def keep_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)          # a started daemon changes into its state dir


def start_refused(cfg) -> str:
    d = Daemon(cfg)
    try:
        with pytest.raises(StartError) as err:
            d.start()
    finally:
        d.shutdown()
    return str(err.value)


def test_a_socket_answered_by_another_xend_is_refused_and_left_alone(tmp_path: Path,
                                                                    stock_xend) -> None:
    sock = tmp_path / "xmlrpc.sock"
    msg = start_refused(config(tmp_path))
    assert str(sock) in msg and "not xend-tmem" in msg, msg
    assert "xend-unix-socket" in msg, msg               # what to change
    assert sock.exists()
    # the other daemon still answers
    assert rpc.connect(str(sock), timeout=5).xend.domains() == []


def test_a_pid_file_of_a_process_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "xend.pid"
        pid_file.write_text(f"{other.pid}\n")
        msg = start_refused(config(tmp_path))
        assert str(other.pid) in msg and str(pid_file) in msg and "xend-pid-file" in msg, msg
        assert pid_file.read_text() == f"{other.pid}\n"            # not clobbered
        assert not (tmp_path / "xmlrpc.sock").exists()
    finally:
        other.kill()
        other.wait()


def test_a_stale_pid_file_is_still_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "xend.pid").write_text(f"{dead.pid}\n")
    d = Daemon(config(tmp_path))
    try:
        d.start()
        assert (tmp_path / "xend.pid").read_text().strip() == str(os.getpid())
        assert rpc.connect(str(tmp_path / "xmlrpc.sock"), timeout=5).xend_tmem.identify()[
            "product"] == "xend-tmem"
    finally:
        d.shutdown()


def test_a_relocation_port_in_use_names_the_key(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        msg = start_refused(config(tmp_path, **{"xend-relocation-server": True,
                                                "xend-relocation-address": "127.0.0.1",
                                                "xend-relocation-port": port}))
    finally:
        busy.close()
    assert f"127.0.0.1:{port}" in msg and "xend-relocation-port" in msg, msg


def connected_to(mocker) -> str:
    connect = mocker.patch.object(xm.rpc, "connect")
    xm.server()
    call = connect.call_args
    return call.args[0] if call.args else call.kwargs["path"]


def test_xm_finds_the_socket_through_xend_config(tmp_path: Path, monkeypatch, mocker) -> None:
    cfg = tmp_path / "xend-config.yaml"
    cfg.write_text(yaml.safe_dump({"xend-unix-socket": "run/xmlrpc.sock"}))
    monkeypatch.delenv("XM_SERVER", raising=False)
    monkeypatch.setenv("XEND_CONFIG", str(cfg))
    assert connected_to(mocker) == str(tmp_path / "run" / "xmlrpc.sock")
    monkeypatch.setenv("XM_SERVER", "/elsewhere.sock")                 # XM_SERVER wins
    assert connected_to(mocker) == "/elsewhere.sock"


def test_xm_with_a_broken_xend_config_says_which_file(tmp_path: Path, monkeypatch,
                                                      capsys) -> None:
    monkeypatch.delenv("XM_SERVER", raising=False)
    monkeypatch.setenv("XEND_CONFIG", str(tmp_path / "missing.yaml"))
    assert xm.main(["list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert str(tmp_path / "missing.yaml") in err and "XEND_CONFIG" in err, err
