"""The hypervisor process's wire format, shared by :mod:`.server` and :mod:`.client`.

A message is a little-endian u32 length and a :mod:`marshal` body (plain types
only: no pickle, so a message can name no class and run no code). A request is
``(method, args)``; a reply is ``(OK, result)`` or ``(ERR, error)`` where
``error`` is ``(class name, message, attributes, args)`` of an exception the
client raises again with the same type and text. File descriptors (the
connection's page buffer, a domain's RAM) travel beside a message as
``SCM_RIGHTS`` (:func:`socket.send_fds`). Page data never travels in a message:
it goes through the connection's shared buffer.
"""
from __future__ import annotations

import array
import marshal
import os
import socket
import struct
from typing import Any, List, Optional, Sequence, Tuple

OK = 0
ERR = 1
MARSHAL_VERSION = 4
MAX_MESSAGE = 256 << 20         # a dirty list of a 200 GiB guest; pages never travel here
MAX_FDS = 4
_HEADER = struct.Struct("<I")


SUN_PATH_MAX = 107               # sockaddr_un's sun_path less its NUL


class ShortPath:
    """A unix socket address usable whatever the path's length.

    ``sun_path`` holds 107 bytes; a deeper state directory (pytest's temporary
    directories are) is reached through ``/proc/self/fd/N/NAME`` with ``N`` an
    ``O_PATH`` descriptor of the directory, held while the address is in use.
    """

    def __init__(self, path: str) -> None:
        self.fd: Optional[int] = None
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            self.address = path
            return
        directory, name = os.path.split(path)
        self.fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.address = f"/proc/self/fd/{self.fd}/{name}"

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ConnectionLost(OSError):
    """The peer closed the connection or broke the framing."""


def encode(obj: Any) -> bytes:
    body = marshal.dumps(obj, MARSHAL_VERSION)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    """Send one message (and ``fds`` with its first byte)."""
    data = encode(obj)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> Tuple[Any, List[int]]:
    """One message and the descriptors that came with it; ConnectionLost at EOF."""
    fds: List[int] = []
    header = bytearray()
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while len(header) < _HEADER.size:
        data, anc, _flags, _addr = sock.recvmsg(_HEADER.size - len(header), space)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not data:
            close_fds(fds)
            raise ConnectionLost("connection closed")
        header += data
    (length,) = _HEADER.unpack(header)
    if length > MAX_MESSAGE:
        close_fds(fds)
        raise ConnectionLost(f"message of {length} bytes announced (limit {MAX_MESSAGE})")
    body = bytearray(length)
    view = memoryview(body)
    got_bytes = 0
    while got_bytes < length:
        n = sock.recv_into(view[got_bytes:])
        if not n:
            close_fds(fds)
            raise ConnectionLost("connection closed inside a message")
        got_bytes += n
    view.release()
    try:
        return marshal.loads(body), fds
    except (ValueError, EOFError, TypeError) as exc:
        close_fds(fds)
        raise ConnectionLost(f"malformed message: {exc}") from None


def close_fds(fds: Sequence[int]) -> None:
    """Close received descriptors nobody will use (errors ignored: best effort)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
