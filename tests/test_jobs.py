"""The job table on concurrent.futures: outcome, fault, cancellation, cleanup."""
from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List

import pytest

from xend_tmem.errors import Cancelled, XendTmemError
from xend_tmem.xend.jobs import Job, JobTable, NoSuchJob
from xend_tmem.xend.rpc import FAULT_GENERIC


@pytest.fixture
def table() -> Iterator[JobTable]:
    t = JobTable(max_running=1)
    yield t
    t.cancel_all()
    assert t.wait_all(10)


def test_result_status_and_cleanup(table: JobTable) -> None:
    cleaned: List[int] = []

    def work(job: Job) -> Dict[str, Any]:
        job.progress("pages", 3, 10)
        return {"bytes": 3}

    job = table.start("save", "web1", work, cleanup=lambda: cleaned.append(1))
    assert job.finished_event.wait(10)
    st = job.status()
    assert (st["state"], st["result"], st["phase"], st["done"], st["total"]) == \
        ("done", {"bytes": 3}, "pages", 3, 10)
    assert cleaned == [1] and job.reported.is_set()
    assert job.future is not None and job.future.result(0) == {"bytes": 3}
    assert table.get(str(job.id)) is job and table.running() == []


def test_failure_is_the_jobs_fault(table: JobTable) -> None:
    def work(job: Job) -> Dict[str, Any]:
        raise XendTmemError("disk full")

    job = table.start("save", "web1", work)
    assert job.finished_event.wait(10)
    st = job.status()
    assert st["state"] == "failed" and "disk full" in st["error"] and "result" not in st


def test_cancel_reaches_a_running_job(table: JobTable) -> None:
    started = threading.Event()

    def work(job: Job) -> Dict[str, Any]:
        started.set()
        if job.cancel.wait(10):
            raise Cancelled("migration cancelled")
        return {}

    job = table.start("migrate", "web1", work)
    assert started.wait(10)
    table.cancel_all()
    assert job.finished_event.wait(10)
    assert job.state == "cancelled" and job.fault_code == FAULT_GENERIC


def test_queued_job_cancelled_never_runs_but_cleans_up(table: JobTable) -> None:
    release = threading.Event()
    ran: List[str] = []
    cleaned: List[str] = []

    def blocker(job: Job) -> Dict[str, Any]:
        release.wait(10)
        return {}

    def second(job: Job) -> Dict[str, Any]:
        ran.append("second")
        return {}

    first = table.start("save", "a", blocker)
    queued = table.start("save", "b", second, cleanup=lambda: cleaned.append("b"))
    assert queued.status()["phase"] == "queued"
    queued.request_cancel()
    assert queued.finished_event.wait(10)
    assert queued.state == "cancelled" and cleaned == ["b"]
    assert not table.wait_all(0.05)           # the first still runs
    release.set()
    assert first.finished_event.wait(10) and ran == []


def test_cancel_flag_set_while_queued_stops_it_at_start(table: JobTable) -> None:
    """``xend.job.cancel`` sets the event only; the job sees it when a worker frees."""
    release = threading.Event()
    ran: List[str] = []
    table.start("save", "a", lambda job: (release.wait(10), {})[1])
    queued = table.start("save", "b", lambda job: (ran.append("b"), {})[1])
    queued.cancel.set()
    release.set()
    assert queued.finished_event.wait(10)
    assert queued.state == "cancelled" and ran == []


def test_unknown_job() -> None:
    t = JobTable()
    with pytest.raises(NoSuchJob):
        t.get(99)
    with pytest.raises(NoSuchJob):
        t.get("x")
