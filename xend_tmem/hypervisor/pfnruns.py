"""Contiguous runs of guest page frame numbers: how RAM is copied, by the
simulator and by the toolstack's mapping alike (one range check, one rule)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..errors import HypervisorError


def pfn_runs(pfns: Sequence[int], limit: int, op: str) -> List[Tuple[int, int]]:
    """Contiguous runs ``(first_pfn, count)`` of ``pfns``, range-checked."""
    n = len(pfns)
    if n > 1:                            # a save's batch: one run, compared in C
        first = pfns[0]
        if (type(first) is int and 0 <= first and first + n <= limit
                and (pfns == range(first, first + n) if isinstance(pfns, range)
                     else list(pfns) == list(range(first, first + n)))):
            return [(first, n)]
    runs: List[Tuple[int, int]] = []
    start = prev = -2
    for pfn in pfns:
        if isinstance(pfn, bool) or not isinstance(pfn, int) or not 0 <= pfn < limit:
            shown = f"{pfn:#x}" if isinstance(pfn, int) else repr(pfn)
            raise HypervisorError(op, f"pfn {shown} is outside the domain's {limit} pages")
        if pfn == prev + 1:
            prev = pfn
            continue
        if start >= 0:
            runs.append((start, prev - start + 1))
        start = prev = pfn
    if start >= 0:
        runs.append((start, prev - start + 1))
    return runs
