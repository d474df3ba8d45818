"""xend's XML-RPC server on a unix socket (the protocol and the client are in
:mod:`.rpc`): a thread per connection, exceptions sent as xend's faults, and
integers beyond 32 bits as ``<i8>``."""
from __future__ import annotations

import logging
import os
import socketserver
import threading
import xmlrpc.client
from typing import Any, Callable, Optional
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from .rpc import FAULT_GENERIC, FAULT_INTERNAL, RPC_PATH, fault_for

log = logging.getLogger("xend_tmem.xend.rpc")


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


def serve_in_thread(server: UnixXMLRPCServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="xmlrpc", daemon=True)
    thread.start()
    return thread


__all__ = ["UnixXMLRPCServer", "serve_in_thread"]
