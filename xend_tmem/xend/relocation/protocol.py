"""xend's relocation protocol (SPEC §6): what both ends of a migration between
daemons say to each other over TCP, and how.

The messages, the image's framing and checksums, the limits every message is
held to, the words of the commit handshake and the query, and the TLS both
ends speak live here, once; the receiving end is :mod:`.server` (the xend
daemon's relocation server), the sending end :mod:`.client` (``xm migrate``).

Stock protocol, unchanged::

    sender:   receive\\n                      (TLS port: sslreceive\\n)
    receiver: (ready receive)\\n              ((ready sslreceive)\\n)
    sender:   the xend image (SPEC §1), then closes its sending side
    receiver: on failure (err (type T) (value 'message')) and closes;
              on success xend closed without a word

Extensions, all invisible to a stock xend on either end:

* **Pre-flight.** Before ``receive`` -- before the source is renamed, frozen or
  suspended -- the sender asks::

      (xend-tmem-preflight (offer "<JSON>"))\\n

  where the JSON is ``{"protocol": 2, "migration": "<uuid>", "domain": {...},
  "node": N, "live": bool, "plugins": {plugin_name: facts}}`` (``facts`` from
  the plugins' ``checkpoint_migrate_offer``). The receiver answers
  ``(ok (protocol 2))`` or ``(refused (reason "...") ...)``: it refuses a domain
  carrying state of a plugin it has not enabled, and whatever its plugins'
  ``checkpoint_migrate_check`` refuses (tmem spec version, room). A stock xend
  answers an unknown operation with ``(err ...)`` and keeps reading, so the
  sender goes on with plain ``receive`` and no extension; if the connection
  closes instead (xend drops a host its hosts-allow rejects), that first error
  is what the sender reports.
* **Framed image.** After an accepted pre-flight the image travels in frames
  (u32 big-endian length, then that many bytes; length 0 ends the image), so
  the connection stays open both ways for the commit handshake (and over TLS
  no close_notify is needed to end the image).
* **Integrity** (issue 8 #4). The offer lists ``"integrity": ["crc32-frames"]``;
  a receiver that supports it answers ``(ok (protocol 2) (integrity
  crc32-frames))``. Then every frame is followed by the CRC32 (u32 BE) of its
  bytes, and frames whose length has the top bit set carry page checksum
  records (:mod:`xend_tmem.integrity`) ahead of the pages they cover. The
  receiver checks each page as it arrives and fails the restore -- before the
  domain can run -- naming the first bad page; the source keeps running.
* **Commit handshake** (xl's "domain received, ready to unpause" / "domain is
  yours, you are cleared to unpause" / "my copy unpause results")::

      receiver: (received (domid N))\\n        image restored, domain paused
      sender:   (go)\\n                         journaled first, sent at once
      receiver: (running (report "<JSON>"))\\n  unpaused; its restore's figures
      receiver: (guest (downtime_ms N))\\n      the guest's heartbeat gap, or (guest)

  ``running`` goes out as soon as the domain is unpaused (its journal
  bookkeeping follows it); the guest's own figure is measured after it and
  sent on its own line, which the sender waits for a few seconds at most, so
  it delays nothing. The sender times ``downtime_ms`` from its suspend to
  ``running`` received (``restore_ms``, ``handshake_ms`` its parts).
  The receiver unpauses only on ``go``; without it (connection lost, or no
  ``go`` within its timeout) it destroys its copy. The sender's done phase
  (tmem's SAVE_END) runs after ``go`` is out and delays nothing. A sender that
  cannot tell whether ``go`` arrived (no ``running``) keeps its domain paused
  and asks, on a new connection::

      (xend-tmem-query (migration "<uuid>"))\\n
      receiver: (running)\\n | (aborted)\\n | (unknown)\\n

  The answer is decisive: a receiver still waiting for ``go`` aborts its copy
  (destroys it) and answers ``aborted`` atomically, so a late ``go`` can no
  longer start it. ``running``: the sender destroys its copy; ``aborted``: it
  resumes it; ``unknown``: it keeps it paused and says so. The domain never runs
  on two hosts.

TLS (``xm migrate --ssl``, the ``xend-relocation-ssl-server`` port): the same
exchange inside TLS, the operation spelled ``sslreceive``. A stock image ends
with a TLS close_notify rather than a bare TCP half-close. As in xend, by
default the sender encrypts but does not verify the receiver; with
``xend-relocation-ssl-ca-file`` (a CA, or the peer's own self-signed
certificate) the peer's certificate must verify against it, and with
``xend-relocation-ssl-peer-fingerprint`` (sha256 of the peer's certificate) it
must be exactly that certificate -- in both directions: the server then asks
the client for its certificate (the host's own key pair,
``xend-relocation-server-ssl-{cert,key}-file``). Python's ``ssl`` has no verify
callback, so a server can only request client certificates it can verify: it
needs the CA file; the client can pin by fingerprint alone.

Limits on messages, so a hostile peer cannot drive an unbounded allocation: a
control line before the pre-flight is at most :data:`MAX_OP_LINE` bytes, a
pre-flight line :data:`MAX_OFFER_LINE` (its JSON nested at most
:data:`MAX_JSON_DEPTH` deep, its migration id :data:`MAX_MIGRATION_ID`
characters), an image frame :data:`MAX_FRAME`, a reply line :data:`MAX_LINE`.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import ssl as ssl_mod
import struct
from dataclasses import dataclass
from typing import Any, List, Optional

from ...codec import sxp
from ...errors import ConfigError, PeerError, XendTmemError

PROTOCOL = 2
PREFLIGHT_OP = "xend-tmem-preflight"
INTEGRITY_FRAMES = "crc32-frames"   # a CRC32 after each image frame (pre-flight option)
QUERY_OP = "xend-tmem-query"

MAX_LINE = 1 << 20            # longest reply line a sender accepts (a report)
RECV_BUFFER = 1 << 20         # the receiver's socket queue (SO_RCVBUF): one 1 MiB frame
                              # in flight while it processes the last (bounded: see drain)
MAX_OP_LINE = 4 << 10         # longest control line before the pre-flight
MAX_OFFER_LINE = 64 << 10     # longest pre-flight line
MAX_JSON_DEPTH = 16           # deepest nesting of a pre-flight offer
MAX_MIGRATION_ID = 64
MAX_FRAME = 4 << 20           # longest image frame accepted

FRAME = struct.Struct(">I")
RECORDS_FLAG = 0x80000000    # with crc32-frames: a frame of page checksum records

IO_TIMEOUT_S = 60.0           # no byte moved for this long: the peer is gone

# -- the answers to a query, and the outcomes both ends journal ---------------

RUNNING = "running"
ABORTED = "aborted"
UNKNOWN = "unknown"


def timeout_from_env(env: str, default: float) -> float:
    """A timeout, shortened by the crash-recovery tests through ``env`` (test only)."""
    try:
        value = float(os.environ[env])
    except (KeyError, ValueError):
        return default
    return value if value > 0 else default


# -- messages -----------------------------------------------------------------

def err_line(kind: str, message: str) -> bytes:
    """xend's error reply, on one line."""
    message = " ".join(str(message).split())
    return (sxp.to_string(["err", ["type", kind], ["value", message]]) + "\n").encode()


def form_line(form: Any) -> bytes:
    """One message on one line."""
    return (sxp.to_string(form) + "\n").encode()


def parse_reply(raw: bytes, host: str) -> List[Any]:
    """One reply line as an SXP list (a bare atom becomes a one-element list)."""
    try:
        text = raw.decode("utf-8")
        form = sxp.parse(text, comments=False)
    except (UnicodeDecodeError, XendTmemError):
        raise PeerError(f"unintelligible answer {raw[:80]!r} (from {host})") from None
    return form if isinstance(form, list) and form else [form]


def reply_error_message(form: List[Any]) -> str:
    """The ``value`` of an ``(err ...)`` reply."""
    value = sxp.child_value(form, "value")
    return str(value) if value is not None else sxp.to_string(form)


def json_depth(text: str, limit: int) -> int:
    """Nesting depth of JSON ``text`` (strings skipped), counting stops past
    ``limit``: checked before parsing, as ``json.loads`` recurses per level."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def offer_problem(offer: Any) -> Optional[str]:
    """What is malformed in a decoded pre-flight offer (None: well-formed)."""
    if not isinstance(offer, dict):
        return "the offer is not a JSON object"
    mid = offer.get("migration")
    if not isinstance(mid, str) or not 0 < len(mid) <= MAX_MIGRATION_ID or \
            not all(c.isalnum() or c in "-_" for c in mid):
        return f"migration must be an id of 1 to {MAX_MIGRATION_ID} letters, digits, - or _"
    if "protocol" in offer and not _is_int(offer["protocol"]):
        return "protocol must be a number"
    domain = offer.get("domain")
    if not isinstance(domain, dict):
        return "domain must be a mapping"
    if "name" in domain and not isinstance(domain["name"], str):
        return "domain name must be a string"
    for key in ("memory_mib", "vcpus"):
        if key in domain and not _is_int(domain[key]):
            return f"domain {key} must be a number"
    if "node" in offer and offer["node"] is not None and not _is_int(offer["node"]):
        return "node must be a number"
    if "live" in offer and not isinstance(offer["live"], bool):
        return "live must be true or false"
    plugins = offer.get("plugins")
    if plugins is not None and not isinstance(plugins, dict):
        return "plugins must be a mapping"
    for pname, facts in (plugins or {}).items():
        if facts is not None and not isinstance(facts, dict):
            return f"plugin {pname}'s facts must be a mapping"
    if "integrity" in offer and not isinstance(offer["integrity"], list):
        return "integrity must be a list"
    return None


# -- TLS ----------------------------------------------------------------------

@dataclass(frozen=True)
class TlsSettings:
    """This host's key pair and how the peer's certificate is verified.

    ``ca_file``: the peer's certificate must verify against it (a CA or the
    peer's self-signed certificate). ``peer_fingerprint``: sha256 hex of the
    peer's certificate, which must match exactly. Neither: xend's behaviour,
    encrypted but unverified."""

    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    ca_file: Optional[str] = None
    peer_fingerprint: Optional[str] = None

    @property
    def verifies(self) -> bool:
        return bool(self.ca_file or self.peer_fingerprint)


def server_context(tls: TlsSettings) -> ssl_mod.SSLContext:
    """The relocation server's context: its key pair; with a CA file it
    requires and verifies the client's certificate."""
    if tls.peer_fingerprint and not tls.ca_file:
        raise ConfigError("xend-relocation-ssl-peer-fingerprint on a TLS relocation server needs "
                          "xend-relocation-ssl-ca-file (the peer's certificate or its CA)")
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_SERVER)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl_mod.CERT_REQUIRED
    return ctx


def client_context(tls: Optional[TlsSettings]) -> ssl_mod.SSLContext:
    """The sender's context: verifies the server against the CA file when
    given (the fingerprint is checked after the handshake) and presents this
    host's certificate so a verifying server accepts it."""
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False       # peers are named by address; the CA/pin vouches
    if tls is not None and tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl_mod.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl_mod.CERT_NONE
    if tls is not None and tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    return ctx


def cert_fingerprint(sock: ssl_mod.SSLSocket) -> Optional[str]:
    """sha256 hex of the peer's certificate (None: it sent none)."""
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def check_fingerprint(sock: ssl_mod.SSLSocket, pinned: Optional[str], who: str) -> None:
    """Raise :class:`PeerError` unless the peer's certificate is the pinned one."""
    if not pinned:
        return
    got = cert_fingerprint(sock)
    if got is None:
        raise PeerError(f"{who} presented no certificate, but "
                        "xend-relocation-ssl-peer-fingerprint requires one")
    if not hmac.compare_digest(got, pinned.lower()):
        raise PeerError(f"certificate of {who} has sha256 fingerprint {got}, not the one in "
                        "xend-relocation-ssl-peer-fingerprint")


__all__ = ["PROTOCOL", "PREFLIGHT_OP", "QUERY_OP", "INTEGRITY_FRAMES", "err_line", "parse_reply",
           "offer_problem", "TlsSettings", "server_context", "client_context",
           "check_fingerprint"]
