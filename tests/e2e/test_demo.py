"""The main job: README's first command, at the small size."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.e2e
def test_demo_small_migrates_and_verifies():
    r = subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "demo", "--size", "small"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("Migrated domain demo1 to 127.0.0.1:")
    assert "tmem: plan " in out and "pages invalidated" in out
    assert "verified: the destination's persistent tmem equals the source's at suspend" in out
    assert "demo1 is running on the destination" in out
    # the downtime against its estimate (the destination's digest announced at
    # pre-flight is part of both), and whether they agree within 25 %
    assert "tmem-digest check hashes all persistent tmem before the guest runs" in out
    m = re.search(r"downtime ([0-9.]+) ms against ([0-9.]+) ms expected before the suspend "
                  r"\(off by ([0-9]+) ms, ([0-9]+)% of the (actual|estimate)\): "
                  r"(within|NOT within) 25%", out)
    assert m, out
    actual, est, pct = float(m[1]), float(m[2]), int(m[4])
    # the figure printed is the one the verdict is about
    assert m[5] == ("actual" if actual >= est else "estimate")
    assert abs(pct - 100 * abs(actual - est) / max(actual, est)) <= 1
    assert (m[6] == "within") == (abs(actual - est) <= max(0.25 * max(actual, est), 5.0))
    assert "logs kept" not in r.stderr          # cleaned up after a success


@pytest.mark.e2e
def test_demo_bad_size_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "demo", "--tmem-mib", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: ")
