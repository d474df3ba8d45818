"""The xend save image header (SPEC §1): signature, big-endian length, SXP config.

``xm save`` files and ``xm migrate`` connections both start with these bytes;
the libxc stream (:mod:`.legacy`) follows directly. The config is untrusted
input: its length is bounded before anything is read and parse errors are
reported at their byte offset in the stream.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..binio import StreamReader, StreamWriter
from ..errors import StreamError
from . import sxp

SIGNATURE = b"LinuxGuestRecord"
QEMU_SIGNATURE = b"QemuDeviceModelRecord"      # HVM: device-model state to end of file
MAX_CONFIG = 16 << 20
_LEN = struct.Struct(">i")

assert len(SIGNATURE) == 16 and len(QEMU_SIGNATURE) == 21


@dataclass(frozen=True)
class ImageHeader:
    config_text: str
    config: Any              # parsed SXP: ['domain', ['domid', '3'], ...]
    guest: str               # 'pv' or 'hvm'
    offset_after: int        # stream offset of the libxc stream's first byte


def is_image(first16: bytes) -> bool:
    """True if ``first16`` (the file's first 16 bytes) is a xend image signature."""
    return bytes(first16[:16]) == SIGNATURE


def guest_kind(config: Any) -> str:
    """'hvm' for ``(image (hvm ...))``, else 'pv' (``(image (linux ...))``)."""
    image = sxp.child(config, "image")
    return "hvm" if image is not None and sxp.child(image, "hvm") is not None else "pv"


def write_header(w: StreamWriter, config_sxp_text: str) -> None:
    """Signature, length, config text; the libxc stream is written next."""
    data = config_sxp_text.encode("utf-8")
    if len(data) > MAX_CONFIG:
        raise ValueError(f"domain config is {len(data)} bytes; a reader accepts at most "
                         f"{MAX_CONFIG}")
    w.write(SIGNATURE)
    w.write(_LEN.pack(len(data)))
    w.write(data)


def read_header(r: StreamReader, max_config: int = MAX_CONFIG) -> ImageHeader:
    """Read and check the image header; the reader is left at the libxc stream."""
    at = r.offset
    got = r.fill(16)
    found = bytes(r.buf[r.pos:r.pos + min(got, 16)])
    if found != SIGNATURE:
        if got < 16 and SIGNATURE.startswith(found):
            raise StreamError(f"stream ends after {got} bytes, inside the image signature",
                              offset=at, field="signature")
        # never echo what was found: xend may read files the user cannot (issue 8 #7)
        raise StreamError(f"not a xend save image: it does not start with xend's signature "
                          f"{SIGNATURE.decode()}", offset=at, field="signature")
    r.skip(16)
    len_at = r.offset
    n = _LEN.unpack(r.read_exact(4, "config length"))[0]
    if n < 0 or n > max_config:
        raise StreamError(f"config length must be 0..{max_config}", offset=len_at,
                          field="config length", value=n)
    cfg_at = r.offset
    raw = r.read_exact(n, "config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StreamError(f"config is not UTF-8 text ({e.reason})", offset=cfg_at + e.start,
                          field="config") from None
    try:
        config = sxp.parse(text, comments=False)
    except sxp.SxpSyntaxError as e:
        raise StreamError(f"config is not valid SXP: {e.problem}",
                          offset=cfg_at + len(text[:e.pos].encode("utf-8")),
                          field="config") from None
    if not isinstance(config, list) or not config or config[0] != "domain":
        head = config[0] if isinstance(config, list) and config else config
        raise StreamError("config must be a (domain ...) expression, starts with "
                          f"{repr(head)[:60]}",
                          offset=cfg_at, field="config")
    return ImageHeader(text, config, guest_kind(config), r.offset)


__all__ = ["SIGNATURE", "QEMU_SIGNATURE", "MAX_CONFIG", "ImageHeader", "is_image",
           "guest_kind", "write_header", "read_header"]
