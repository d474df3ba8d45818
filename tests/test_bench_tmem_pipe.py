"""benchmarks/tmem_pipe.py runs end to end and its ratios are of the baselines
they name (a tiny transfer: nothing here is a timing assertion)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "tmem_pipe.py"


@pytest.fixture(scope="module")
def report() -> dict:
    r = subprocess.run([sys.executable, str(BENCH), "--mib", "4", "--runs", "1", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_pair_moved_the_pages_and_ratios_name_their_baselines(report):
    run = report["runs"][0]
    assert run["page_data_mib"] == 4
    assert run["bytes"] > 4 << 20           # records carry their OIDs and indices
    assert run["ratio"] == pytest.approx(run["raw_s"] / run["tmem_s"])
    assert run["ratio_prealloc"] == pytest.approx(run["raw_prealloc_s"] / run["tmem_prealloc_s"])
    assert run["ratio_unheld"] == pytest.approx(run["raw_unheld_s"] / run["tmem_s"])
    assert run["ratio_prealloc_unheld"] == pytest.approx(
        run["raw_unheld_s"] / run["tmem_prealloc_s"])
    assert run["ratio_commit_floor_beside_pipe"] == pytest.approx(
        run["raw_s"] / max(run["raw_s"], run["commit_beside_pipe_s"]))
    assert report["median"]["runs"] == 1
    for key in ("raw_s", "raw_prealloc_s", "raw_unheld_s", "commit_beside_pipe_s"):
        assert run[key] > 0


def test_memory_figures_are_whole_processes(report):
    run = report["runs"][0]
    assert run["save_held_mib"] > run["page_data_mib"]      # the interpreter is counted
    assert run["save_total_mib"] >= run["save_held_mib"]
    assert run["restore_total_mib"] >= run["restore_held_mib"]
