"""xm <-> xend: XML-RPC (path ``/RPC2``, ``allow_none``) over a unix socket.

This is the transport xend used (SPEC §9), so method names and fault codes are
xend's: 1 internal error (a bug: the daemon logs the traceback), 2 a generic
refusal the user can act on, 3 no such domain (``xm`` exits 3 for it).

Two details xend did not need: integers beyond XML-RPC's 32-bit ``<int>`` are sent
as ``<i8>`` (Python's client reads them; byte counts of gigabyte-scale tmem do not
fit 32 bits), and each connection is served in its own thread so a client polling
a long operation's progress is never stuck behind it.
"""
from __future__ import annotations

import http.client
import logging
import os
import socket
import socketserver
import threading
import xmlrpc.client
from typing import Any, Callable, Optional
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from ..errors import NoSuchDomain, XendTmemError, os_error_message

log = logging.getLogger("xend_tmem.xend.rpc")

DEFAULT_SOCKET = "/var/run/xend/xmlrpc.sock"
ENV_SERVER = "XM_SERVER"
RPC_PATH = "/RPC2"

FAULT_INTERNAL = 1
FAULT_GENERIC = 2
FAULT_NO_SUCH_DOMAIN = 3


class _Marshaller(xmlrpc.client.Marshaller):
    """xmlrpc's marshaller, but ints outside 32 bits go out as ``<i8>``."""

    # xmlrpc's class-level table, copied so the override stays in this class
    dispatch = dict(xmlrpc.client.Marshaller.dispatch)  # noqa: RUF012

    # self typed as the base class: dispatch entries are called with any Marshaller
    def _dump_int(self: xmlrpc.client.Marshaller, value: int,
                  write: Callable[[str], Any]) -> None:
        tag = "int" if -2 ** 31 <= value < 2 ** 31 else "i8"
        write(f"<value><{tag}>{int(value)}</{tag}></value>\n")

    dispatch[int] = _dump_int


def _dumps_response(result: Any) -> str:
    body = _Marshaller("utf-8", allow_none=True).dumps(result)
    return "<?xml version='1.0'?>\n<methodResponse>\n" + body + "</methodResponse>\n"


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


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = (RPC_PATH,)
    disable_nagle_algorithm = False     # TCP_NODELAY does not apply to unix sockets

    def address_string(self) -> str:        # unix sockets have no peer address
        return "local"

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        return None          # xm polls jobs several times a second: no line per request

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("rpc: " + format, *args)


class UnixXMLRPCServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer,
                       SimpleXMLRPCDispatcher):
    """Threaded XML-RPC server on a unix socket; exceptions become xend's faults."""

    daemon_threads = True
    allow_reuse_address = False
    logRequests = False       # read by SimpleXMLRPCRequestHandler

    def __init__(self, path: str, mode: int = 0o600) -> None:
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding="utf-8",
                                        use_builtin_types=False)
        self.socket_path = path
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        socketserver.UnixStreamServer.__init__(self, path, _Handler, bind_and_activate=False)
        try:
            old_umask = os.umask(0o177)
            try:
                self.server_bind()
            finally:
                os.umask(old_umask)
            os.chmod(path, mode)
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    # typeshed declares str, but CPython's SimpleXMLRPCDispatcher returns (and
    # SimpleXMLRPCRequestHandler writes) bytes, as this does
    def _marshaled_dispatch(  # type: ignore[override]
            self, data: bytes, dispatch_method: Optional[Callable[..., Any]] = None,
            path: Optional[str] = None) -> bytes:
        try:
            params, method = xmlrpc.client.loads(data, use_builtin_types=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable request gets a fault
            response = _dumps_response(xmlrpc.client.Fault(FAULT_INTERNAL, f"bad request: {exc}"))
            return response.encode("utf-8", "xmlcharrefreplace")
        if method not in self.funcs:
            fault = xmlrpc.client.Fault(FAULT_GENERIC, f"xend does not know the method {method!r} "
                                                       "(is it an older or newer xend?)")
            return _dumps_response(fault).encode("utf-8", "xmlcharrefreplace")
        try:
            result = self._dispatch(method, params)
            response = _dumps_response((result,))
        except Exception as exc:   # every failure must reach the client as a fault
            fault = fault_for(exc)
            if fault.faultCode == FAULT_INTERNAL and not isinstance(exc, xmlrpc.client.Fault):
                log.exception("internal error in %s", method)
            elif isinstance(exc, ValueError):   # the user's value, or a bug: keep the trace
                log.warning("%s refused: %s", method, fault.faultString, exc_info=exc)
            else:
                log.info("%s refused: %s", method, fault.faultString)
            response = _dumps_response(fault)
        return response.encode("utf-8", "xmlcharrefreplace")

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("rpc connection failed")

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass


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


def serve_in_thread(server: UnixXMLRPCServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="xmlrpc", daemon=True)
    thread.start()
    return thread


__all__ = ["UnixXMLRPCServer", "connect", "server_path", "fault_for", "serve_in_thread",
           "FAULT_INTERNAL", "FAULT_GENERIC", "FAULT_NO_SUCH_DOMAIN", "DEFAULT_SOCKET",
           "ENV_SERVER"]
