"""Regression test for issue 8 #2: split brain on a lost acknowledgement.

A loopback proxy cuts the migration connection at twenty points from the
first byte to after the acknowledgement, and drops each handshake message
alone. The domain never runs on two hosts, is never lost, and every failed
migration's message says where the domain is and what to do.

Two xend services with their relocation servers run in-process (the commit
handshake under test is the relocation module's; ``test_crash_recovery``
covers the daemons being killed).
"""
from __future__ import annotations

import re

import pytest

from test_handshake import DOMAIN, Host, migrate_through, stream_bytes  # noqa: F401
from xend_tmem.domconfig import parse_domain_config

pytestmark = pytest.mark.e2e

# where the domain is, and what the administrator does next
WHERE = re.compile(r"domain web1 (keeps running|is running|runs|was resumed and runs|"
                   r"is kept paused) (here|on 127\.0\.0\.1)")
ACTION = re.compile(r"(retry|xm migrate|xm destroy|xm unpause|nothing to do)")

# (fault, expected host): fractions and negative numbers are of the clean stream's length
CUTS = [
    (("cut-bytes", 1), "source"),
    (("cut-bytes", 40), "source"),                  # inside the pre-flight's operation
    (("cut-bytes", 150), "source"),                 # inside the pre-flight offer
    (("cut-before", "ok"), "source"),               # the pre-flight answer lost
    (("cut-after", "ok"), "source"),
    (("cut-before", "ready"), "source"),
    (("cut-after", "ready"), "source"),
    (("cut-bytes", 0.02), "source"),
    (("cut-bytes", 0.1), "source"),
    (("cut-bytes", 0.25), "source"),
    (("cut-bytes", 0.5), "source"),
    (("cut-bytes", 0.75), "source"),
    (("cut-bytes", 0.95), "source"),
    (("cut-bytes", -7), "source"),                  # inside the end-of-image frame
    (("cut-before", "received"), "source"),         # the acknowledgement lost
    (("cut-after", "received"), "source"),          # reset right after the acknowledgement
    (("cut-before", "go"), "source"),
    (("cut-after", "go"), None),                    # go may or may not be through
    (("cut-before", "running"), "destination"),
    (("cut-after", "running"), "destination"),
]
DROPS = [
    (("drop", "received"), "source"),               # the acknowledgement alone
    (("drop", "go"), "source"),
    (("drop", "running"), "destination"),
]


@pytest.fixture
def two(tmp_path):
    made = [Host(tmp_path / "a"), Host(tmp_path / "b")]
    yield made
    for h in made:
        h.stop()


@pytest.mark.parametrize("fault,expected", CUTS + DROPS,
                         ids=[f"{f[0]}-{f[1]}" for f, _ in CUTS + DROPS])
def test_cut_never_runs_twice_and_always_says_where(two, stream_bytes, fault,
                                                    expected) -> None:
    src, dst = two
    src.hv.create_domain(parse_domain_config(DOMAIN))
    kind, arg = fault
    if kind == "cut-bytes" and isinstance(arg, float):
        arg = int(stream_bytes * arg)
    elif kind == "cut-bytes" and arg < 0:
        arg = stream_bytes + arg
    # migrate_through asserts: never on both hosts (sampled), on exactly one at the end,
    # running under its own name with its tmem thawed and whole
    out = migrate_through(src, dst, (kind, arg))
    assert out["fired"]
    if expected is not None:
        assert out["where"] == expected, out
    status = out["status"]
    if out["where"] == "destination":
        assert status["state"] == "done", status
        return
    assert status["state"] == "failed", status
    message = status["error"]
    assert WHERE.search(message), f"no 'where' in: {message}"
    assert ACTION.search(message), f"no 'what to do' in: {message}"
    assert "here" not in message or "127.0.0.1" in message or "this host" in message, message


def test_twenty_cut_points() -> None:
    assert len(CUTS) == 20
