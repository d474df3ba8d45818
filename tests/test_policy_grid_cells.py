"""The policy grid's own rules (benchmarks/policy_grid.py): B, the fixed plan
auto is judged against, is defined over every fixed plan, so every cell runs
them all (strict-busy-1g once ran only auto and precopy, and B was precopy
while late-freeze, never run, would have been B)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("policy_grid",
                                                  ROOT / "benchmarks" / "policy_grid.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["policy_grid"] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("policy_grid", None)


def test_every_cell_of_every_grid_runs_every_fixed_plan_and_auto(grid) -> None:
    for cells in (grid.DEFAULT_CELLS, grid.SMOKE_CELLS, grid.full_cells()):
        for cell in cells:
            assert set(cell.plans) == set(grid.FIXED) | {"auto"}, cell.name


def _row(plan: str, downtime: float, freeze: float, total: float, **kw: Any) -> Dict[str, Any]:
    return {"plan": plan, "ok": True, "downtime_ms": downtime, "guest_downtime_ms": downtime,
            "log_downtime_ms": downtime, "freeze_ms": freeze, "total_ms": total,
            "est_downtime_ms": downtime, "est_freeze_ms": freeze, "rate_cap_mbit": 62.5,
            "rate_mbit": 62.0, "warned": False, **kw}


def test_b_is_the_fixed_plan_meeting_the_limit_with_the_least_freeze(grid) -> None:
    cell = grid.Cell("strict-busy-1g", "1g", 256, 256, "busy", miss="strict")
    rows: List[Dict[str, Any]] = [
        _row("precopy", 235, 4937, 5175), _row("late-freeze", 283, 2987, 6061),
        _row("auto", 283, 2987, 6061)]
    rows.append({"plan": "after-suspend", "ok": False, "source_running": True,
                 "source_thawed": True, "rate_cap_mbit": 62.5,
                 "error": "Error: the 300 ms downtime limit cannot be met: ..."})
    checks = grid.check_cell(cell, rows, None)
    assert checks["auto vs B=late-freeze"] is True
    # auto on precopy against that B: its freeze window is far over B's + 10 %
    rows[2] = _row("auto", 235, 4937, 5175)
    assert grid.check_cell(cell, rows, None)["auto vs B=late-freeze"] is False


def test_the_guest_gap_may_fall_short_by_the_suspend_barrier_and_no_more(grid) -> None:
    cell = grid.Cell("busy-1g", "1g", 256, 256, "busy")

    def agrees(guest: float, barrier: Any) -> Any:
        row = _row("precopy", 37.0, 10, 100, guest_downtime_ms=guest)
        if barrier is not None:
            row["barrier_ms"] = barrier
        return grid.check_cell(cell, [row], None)["downtime agrees (guest, logs)"]

    assert agrees(37.0, None) is True
    assert agrees(31.0, None) is False          # 6 ms short, no barrier seen: over 5 ms
    assert agrees(31.0, 4.0) is True            # the guest acknowledged 4 ms after the call
    assert agrees(25.0, 4.0) is False           # short by more than the barrier + 5 ms
    assert agrees(43.0, 4.0) is False           # a barrier never makes the gap longer
