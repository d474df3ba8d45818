"""The main job: README's first command, at the small size."""
from __future__ import annotations

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
    assert "logs kept" not in r.stderr          # cleaned up after a success


@pytest.mark.e2e
def test_demo_bad_size_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "demo", "--tmem-mib", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: ")
