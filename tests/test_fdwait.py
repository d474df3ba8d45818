"""Waits on descriptors numbered past select(2)'s FD_SETSIZE (1024).

A test session (or a xend with many peers and domains) holds more than 1024
descriptors; select.select() then raised "filedescriptor out of range".
"""
from __future__ import annotations

import os
import pathlib
import resource
import socket
from typing import Iterator, Tuple

import pytest

from xend_tmem import fdwait

HIGH = 1500


@pytest.fixture
def high_pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= HIGH + 2:
        if hard != resource.RLIM_INFINITY and hard <= HIGH + 2:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {HIGH + 2}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH + 16, hard))
    a, b = socket.socketpair()
    fa, fb = os.dup2(a.fileno(), HIGH), os.dup2(b.fileno(), HIGH + 1)
    a.close()
    b.close()
    ha, hb = socket.socket(fileno=fa), socket.socket(fileno=fb)
    try:
        yield ha, hb
    finally:
        ha.close()
        hb.close()
        if soft <= HIGH + 2:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_descriptor_above_fd_setsize_is_waited_on(high_pair) -> None:
    a, b = high_pair
    assert a.fileno() >= 1024
    assert fdwait.wait(a, read=True, timeout=0.01) == (False, False)     # nothing yet
    assert fdwait.wait(a, read=True, write=True, timeout=0.01) == (False, True)
    b.sendall(b"x")
    assert fdwait.wait(a.fileno(), read=True, timeout=1.0) == (True, False)


def test_end_of_file_counts_as_readable(high_pair) -> None:
    a, b = high_pair
    b.close()
    readable, _ = fdwait.wait(a, read=True, timeout=1.0)
    assert readable and a.recv(1) == b""


def test_only_what_was_asked_is_reported(high_pair) -> None:
    a, b = high_pair
    b.sendall(b"x")
    assert fdwait.wait(a, write=True, timeout=0.01) == (False, True)


def test_a_closed_descriptor_is_an_error() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        fdwait.wait(r, read=True, timeout=0.01)


def test_no_module_waits_with_select() -> None:
    """Only fdwait itself calls select(2), and only below FD_SETSIZE (for its
    microsecond timeouts: the guest's heartbeat)."""
    root = pathlib.Path(fdwait.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "select.select(" in p.read_text() and p != pathlib.Path(fdwait.__file__)]
    assert offenders == []
