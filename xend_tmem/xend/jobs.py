"""Long operations (save, restore, migrate) run as jobs the client polls.

xend ran a save inside the XML-RPC call, so ``xm`` could show nothing until it
returned. Here the call starts a job and returns its id; ``xend.job.status(id)``
reports phase, bytes and (at the end) the result or the fault, and
``xend.job.cancel(id)`` asks the job to stop (Ctrl-C in ``xm``). The blocking
xend methods are a job plus a wait, so both styles share one code path.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from ..errors import Cancelled, XendTmemError
from .rpc import FAULT_GENERIC, fault_for

log = logging.getLogger("xend_tmem.xend.jobs")

KEEP_FINISHED_S = 600.0       # a finished job's result stays readable this long
MAX_FINISHED = 256


class NoSuchJob(XendTmemError):
    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job {job_id} (finished jobs are kept {KEEP_FINISHED_S:.0f} s)")


class Job:
    """One running operation; progress fields are written by its worker thread."""

    def __init__(self, job_id: int, op: str, target: str) -> None:
        self.id = job_id
        self.op = op
        self.target = target
        self.state = "running"
        self.phase = "queued"
        self.phase_start = 0      # ``done`` when the phase began: a display's bar per phase
        self.done = 0
        self.total: Optional[int] = None
        self.started = time.monotonic()
        self.finished: Optional[float] = None
        self.result: Optional[Dict[str, Any]] = None
        self.fault_code: Optional[int] = None
        self.error: Optional[str] = None
        self.cancel = threading.Event()
        self.finished_event = threading.Event()
        self.reported = threading.Event()      # a client has read the final status
        self.thread: Optional[threading.Thread] = None

    def progress(self, phase: str, done: int, total: Optional[int]) -> None:
        """The checkpoint path's progress callback."""
        if phase != self.phase:
            # the path reports after each piece of work, so a phase began where the
            # previous one last reported (unless the counter restarted)
            self.phase_start = self.done if self.done <= int(done) else int(done)
        self.phase = phase
        self.done = int(done)
        self.total = int(total) if total is not None else None

    def status(self) -> Dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        out: Dict[str, Any] = {
            "id": self.id, "op": self.op, "target": self.target, "state": self.state,
            "phase": self.phase, "phase_start": self.phase_start, "done": self.done,
            "total": self.total,
            "elapsed_s": round(end - self.started, 3),
        }
        if self.result is not None:
            out["result"] = self.result
        if self.error is not None:
            out["fault_code"] = self.fault_code
            out["error"] = self.error
        if self.finished is not None:
            self.reported.set()
        return out


class JobTable:
    """All jobs of a daemon; each runs ``work(job) -> result dict`` in a thread."""

    def __init__(self) -> None:
        self._jobs: Dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, op: str, target: str, work: Callable[[Job], Dict[str, Any]],
              cleanup: Optional[Callable[[], None]] = None) -> Job:
        """Run ``work`` in a new thread; ``cleanup`` runs after it on every path
        (it releases what the synchronous part of the request acquired)."""
        with self._lock:
            self._prune()
            job = Job(next(self._ids), op, target)
            self._jobs[job.id] = job
        job.thread = threading.Thread(target=self._run, args=(job, work, cleanup), daemon=True,
                                      name=f"job-{job.id}-{op}")
        try:
            job.thread.start()
        except BaseException:
            with self._lock:
                del self._jobs[job.id]
            if cleanup is not None:
                cleanup()
            raise
        return job

    def _run(self, job: Job, work: Callable[[Job], Dict[str, Any]],
             cleanup: Optional[Callable[[], None]]) -> None:
        try:
            result = work(job)
            job.result = result
            job.state = "done"
            log.info("job %d (%s %s) done", job.id, job.op, job.target)
        except Exception as exc:   # every failure becomes the job's fault
            fault = fault_for(exc)
            job.fault_code, job.error = fault.faultCode, fault.faultString
            job.state = "cancelled" if isinstance(exc, Cancelled) else "failed"
            if isinstance(exc, Cancelled):
                job.fault_code = FAULT_GENERIC
            if isinstance(exc, XendTmemError):
                log.warning("job %d (%s %s) %s: %s", job.id, job.op, job.target, job.state, exc)
            else:
                log.exception("job %d (%s %s) failed", job.id, job.op, job.target)
        finally:
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                job.finished = time.monotonic()
                job.finished_event.set()

    def get(self, job_id: Any) -> Job:
        try:
            key = int(job_id)
        except (TypeError, ValueError):
            raise NoSuchJob(job_id) from None
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            raise NoSuchJob(job_id)
        return job

    def running(self) -> List[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.finished is None]

    def cancel_all(self) -> None:
        for job in self.running():
            job.cancel.set()

    def wait_all(self, timeout: float, reported_within: float = 0.0) -> bool:
        """Wait for every running job; ``False`` if some are still running.

        ``reported_within``: then give each client polling a job that just ended
        this long to read the outcome (so ``xm`` can say "cancelled" rather than
        lose its daemon mid-poll).
        """
        deadline = time.monotonic() + timeout
        jobs = self.running()
        for job in jobs:
            if not job.finished_event.wait(max(0.0, deadline - time.monotonic())):
                return False
        grace = time.monotonic() + reported_within
        for job in jobs:
            job.reported.wait(max(0.0, grace - time.monotonic()))
        return True

    def _prune(self) -> None:
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.finished is not None),
                          key=lambda j: j.finished or 0.0)
        excess = len(finished) - MAX_FINISHED
        for i, job in enumerate(finished):
            if i < excess or now - (job.finished or now) > KEEP_FINISHED_S:
                del self._jobs[job.id]


__all__ = ["Job", "JobTable", "NoSuchJob"]
