"""A pid file held under ``flock`` for a process's life: xend's and the hypervisor's.

The lock, not the file's existence, says whether the process runs: a file left by
a killed process is unlocked and simply taken over.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable, Optional

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(path: str) -> Optional[int]:
    """The pid of the process holding ``path``'s lock (-1 if unreadable), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return read_pid(path) or -1
            raise
        return None
    finally:
        os.close(fd)


class PidLock:
    """``path`` locked and holding our pid until :meth:`release`.

    :param busy: the error to raise when another process holds the lock (given
        that process's pid, if readable).
    """

    def __init__(self, path: str, busy: Callable[[Optional[int]], Exception]) -> None:
        self.path = path
        self.busy = busy
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _BUSY:
                raise self.busy(read_pid(self.path)) from None
            raise
        try:
            self.before_takeover()
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def before_takeover(self) -> None:
        """Locked, our pid not written yet: a subclass may refuse here."""

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
