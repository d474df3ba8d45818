"""xm <-> xend: XML-RPC (path ``/RPC2``, ``allow_none``) over a unix socket.

This is the transport xend used (SPEC §9), so method names and fault codes are
xend's: 1 internal error (a bug: the daemon logs the traceback), 2 a generic
refusal the user can act on, 3 no such domain (``xm`` exits 3 for it).

Two details xend did not need: integers beyond XML-RPC's 32-bit ``<int>`` are sent
as ``<i8>`` (Python's client reads them; byte counts of gigabyte-scale tmem do not
fit 32 bits), and each connection is served in its own thread so a client polling
a long operation's progress is never stuck behind it.

This module is what both ends share and the client (``xm`` imports it for
every command); the daemon's server is :mod:`.rpcserver`.
"""
from __future__ import annotations

import http.client
import os
import socket
import xmlrpc.client
from typing import Any, Optional

from ..errors import NoSuchDomain, XendTmemError, os_error_message

DEFAULT_SOCKET = "/var/run/xend/xmlrpc.sock"
ENV_SERVER = "XM_SERVER"
RPC_PATH = "/RPC2"

FAULT_INTERNAL = 1
FAULT_GENERIC = 2
FAULT_NO_SUCH_DOMAIN = 3


def fault_for(exc: BaseException) -> xmlrpc.client.Fault:
    """The XML-RPC fault xend would send for ``exc``."""
    if isinstance(exc, xmlrpc.client.Fault):
        return exc
    if isinstance(exc, NoSuchDomain):
        return xmlrpc.client.Fault(FAULT_NO_SUCH_DOMAIN, str(exc))
    if isinstance(exc, XendTmemError):
        return xmlrpc.client.Fault(FAULT_GENERIC, str(exc))
    if isinstance(exc, OSError):        # issue 8 #5: the OS's words and the path
        return xmlrpc.client.Fault(FAULT_GENERIC, os_error_message(exc))
    if isinstance(exc, ValueError):     # a request's value the method could not take
        return xmlrpc.client.Fault(FAULT_GENERIC, f"invalid value: {exc}")
    return xmlrpc.client.Fault(FAULT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.timeout is not None:
                sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__(use_builtin_types=False)
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path, self._timeout)


def server_path(value: Optional[str] = None) -> str:
    """The socket ``xm`` talks to: ``value``, else ``$XM_SERVER``, else xend's default.

    Accepts a plain path or xm's ``httpu://PATH`` form.
    """
    value = value or os.environ.get(ENV_SERVER) or DEFAULT_SOCKET
    if value.startswith("httpu://"):
        value = value[len("httpu://"):]
    return value


def connect(path: Optional[str] = None,
            timeout: Optional[float] = 60.0) -> xmlrpc.client.ServerProxy:
    """A client proxy for the daemon at ``path`` (see :func:`server_path`)."""
    path = server_path(path)
    return xmlrpc.client.ServerProxy("http://localhost" + RPC_PATH,
                                     transport=_UnixTransport(path, timeout),
                                     allow_none=True)


__all__ = ["connect", "server_path", "fault_for", "FAULT_INTERNAL", "FAULT_GENERIC",
           "FAULT_NO_SUCH_DOMAIN", "DEFAULT_SOCKET", "ENV_SERVER", "RPC_PATH"]
