"""One error type per kind of failure a user can act on.

Every ``str()`` is a single line fit to follow ``Error: `` on a terminal.
"""
from __future__ import annotations

import os
from typing import Optional


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} ({value:#x})" if value > 9 else str(value)
    return repr(value)


def os_error_message(exc: OSError) -> str:
    """An OS error as the OS words it, with the path: ``/srv/x.img: No space
    left on device`` (Python's ``[Errno 28] ...: '/srv/x.img'`` is not for users)."""
    text = exc.strerror or (str(exc.args[0]) if exc.args else "") or type(exc).__name__
    if exc.filename is not None:
        text = f"{os.fsdecode(exc.filename)}: {text}"
        if exc.filename2 is not None:
            text += f" (and {os.fsdecode(exc.filename2)})"
    return text


class XendTmemError(Exception):
    """Base of every expected failure; anything else is a bug."""


class StreamError(XendTmemError):
    """A save image, libxc stream or tmem chunk is malformed or truncated.

    Carries where (byte offset), which field and what value, so the message can
    point an administrator at the exact byte.
    """

    def __init__(self, problem: str, *, offset: Optional[int] = None,
                 field: Optional[str] = None, value: object = None) -> None:
        self.problem = problem
        self.offset = offset
        self.field = field
        self.value = value
        parts = []
        if field is not None:
            if value is not None:
                shown = _show(value)
                parts.append(f"field {field} = {shown}")
            else:
                parts.append(f"field {field}")
        if offset is not None:
            parts.append(f"at offset {offset} ({offset:#x})")
        where = (" ".join(parts) + ": ") if parts else ""
        super().__init__(f"bad stream: {where}{problem}")


class HypervisorError(XendTmemError):
    """The hypervisor refused an operation (Xen: a negative return code)."""

    def __init__(self, op: str, message: str, *, code: int = -1) -> None:
        self.op = op
        self.code = code
        super().__init__(f"hypervisor refused {op}: {message}")


class NoSuchDomain(XendTmemError):
    """A domain id or name that does not exist (xm exits 3 for it)."""

    def __init__(self, dom: object) -> None:
        self.dom = dom
        super().__init__(f"Domain '{dom}' does not exist.")


class PeerError(XendTmemError):
    """The migration peer refused, hung up or broke the protocol."""


class ConfigError(XendTmemError):
    """A toolstack or domain configuration is invalid; names the key and file."""


class PluginError(XendTmemError):
    """A checkpoint plugin could not be loaded or broke the hook contract."""


class Cancelled(XendTmemError):
    """The operation was cancelled (Ctrl-C, peer hang-up, stop request)."""


class SaveError(XendTmemError):
    """The domain's state cannot be written in the stream format (e.g. Xen's T4:
    an all-ones OID, which the format reserves for its terminator)."""
