"""Start a helper process detached and learn whether it came up, and stop one: what
``xend start|stop`` and ``xend-tmem hypervisor start|stop`` share.

The parent passes the write end of a pipe as ``--ready-fd N``; the child writes one
line on it, ``ok`` once it serves or ``Error: ...`` if it cannot start, and closes
it. The parent waits for that line (or for the pipe to close, the child having
exited) rather than polling a socket, so a start error reaches the operator's
terminal and not only a log file.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from . import fdwait

READY = "ok"
MAX_ANSWER = 64 << 10          # a child's answer is one line; more is not read


def spawn_detached(module: str, args: Sequence[str], log_path: str, timeout: float,
                   env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None
                   ) -> Tuple["subprocess.Popen[bytes]", str]:
    """Run ``python -m module *args --ready-fd N`` in a session of its own (stdin
    and stdout on /dev/null, stderr appended to ``log_path``) and wait up to
    ``timeout`` seconds for its answer.

    Returns the child and its answer: :data:`READY`, its ``Error: ...`` line, or
    ``""`` when it said nothing in time or closed the pipe silently. Raises
    :class:`OSError` when ``log_path`` cannot be opened or the process cannot be
    started (its ``filename`` says which); nothing runs then.
    """
    directory = os.path.dirname(log_path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(log_path, "ab") as errlog:
        read_fd, write_fd = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--ready-fd", str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=errlog, env=env, start_new_session=True, close_fds=True, cwd=cwd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
    answer = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb") as ready:
        while len(answer) < MAX_ANSWER:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _ = fdwait.wait(ready, read=True, timeout=min(left, 0.2))
            if readable:
                chunk = os.read(ready.fileno(), 4096)
                if not chunk:
                    break
                answer += chunk
    return child, answer.decode(errors="replace").strip()


def report_ready(fd: Optional[int], error: Optional[str]) -> None:
    """The child's side: ``error`` (a whole ``Error: ...`` line, or None when it
    serves) to stderr and, with a ready fd, :data:`READY` or the error on it."""
    if error is not None:
        print(error, file=sys.stderr)
    if fd is None:
        return
    try:
        os.write(fd, (error or READY).encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def terminate(pid: int, stopped: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """SIGTERM ``pid`` (when known: > 0) and wait up to ``timeout`` seconds until
    ``stopped()`` says it has released what it held; False if it did not."""
    if pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped():
            return True
        time.sleep(poll)
    return False


def remove_stale_socket(path: str, address: Optional[str] = None) -> bool:
    """Remove the unix socket ``path`` if nobody listens on it (a stopped process's
    leftover); True when it is gone, False when somebody answers there (the caller
    says who, and leaves it). ``address``: where to connect, if not ``path``."""
    if not os.path.exists(path):
        return True
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(address or path)
    except OSError:
        os.unlink(path)
        return True
    finally:
        probe.close()
    return False


def process_ended(pid: int) -> bool:
    """``pid`` is gone or has exited (a zombie its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    try:
        return stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X")
    except (ValueError, IndexError):
        return False


__all__ = ["READY", "process_ended", "remove_stale_socket", "report_ready", "spawn_detached",
           "terminate"]
