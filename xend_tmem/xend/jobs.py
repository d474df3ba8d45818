"""Long operations (save, restore, migrate) run as jobs the client polls.

xend ran a save inside the XML-RPC call, so ``xm`` could show nothing until it
returned. Here the call starts a job and returns its id; ``xend.job.status(id)``
reports phase, bytes and (at the end) the result or the fault, and
``xend.job.cancel(id)`` asks the job to stop (Ctrl-C in ``xm``). The blocking
xend methods are a job plus a wait, so both styles share one code path.

Each job is a :class:`concurrent.futures.Future` of the daemon's job pool. The
pool's threads cannot be interrupted, so a running job stops by noticing its
``cancel`` event (the checkpoint path polls it); a job still queued for a free
worker is cancelled outright.
"""
from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

from ..errors import Cancelled, XendTmemError
from .rpc import FAULT_GENERIC, fault_for

log = logging.getLogger("xend_tmem.xend.jobs")

KEEP_FINISHED_S = 600.0       # a finished job's result stays readable this long
MAX_FINISHED = 256
MAX_RUNNING = 64              # jobs running at once; more wait ("queued") for a worker

Work = Callable[["Job"], Dict[str, Any]]


class NoSuchJob(XendTmemError):
    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job {job_id} (finished jobs are kept {KEEP_FINISHED_S:.0f} s)")


class Job:
    """One operation; progress fields are written by its worker thread."""

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
        self.cancel = threading.Event()        # the operation polls it: the way to stop it
        self.finished_event = threading.Event()   # set once the outcome and cleanup are done
        self.reported = threading.Event()      # a client has read the final status
        self.future: Optional[Future[Optional[Dict[str, Any]]]] = None   # its value: ``result``
        self.thread_id: Optional[int] = None    # the worker running it (a stuck job's stack)

    def progress(self, phase: str, done: int, total: Optional[int]) -> None:
        """The checkpoint path's progress callback."""
        if phase != self.phase:
            # the path reports after each piece of work, so a phase began where the
            # previous one last reported (unless the counter restarted)
            self.phase_start = self.done if self.done <= int(done) else int(done)
        self.phase = phase
        self.done = int(done)
        self.total = int(total) if total is not None else None

    def request_cancel(self) -> None:
        """Ask the job to stop: a queued one never starts, a running one sees ``cancel``."""
        self.cancel.set()
        if self.future is not None:
            self.future.cancel()      # only succeeds while it waits for a worker

    def stack(self) -> str:
        """Where the worker running this job is now ("" if none is): what a job
        that ignored its cancellation waits for."""
        frame = sys._current_frames().get(self.thread_id) if self.thread_id else None
        return "".join(traceback.format_stack(frame)) if frame is not None else ""

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

    def _end(self, result: Optional[Dict[str, Any]], exc: Optional[BaseException]) -> None:
        """Record the outcome: the result, or the exception as the job's fault."""
        if exc is None:
            self.result = result
            self.state = "done"
            log.info("job %d (%s %s) done", self.id, self.op, self.target)
            return
        fault = fault_for(exc)
        self.fault_code, self.error = fault.faultCode, fault.faultString
        self.state = "cancelled" if isinstance(exc, Cancelled) else "failed"
        if isinstance(exc, Cancelled):
            self.fault_code = FAULT_GENERIC
        if isinstance(exc, XendTmemError):
            log.warning("job %d (%s %s) %s: %s", self.id, self.op, self.target, self.state, exc)
        else:
            log.error("job %d (%s %s) failed", self.id, self.op, self.target, exc_info=exc)


class JobTable:
    """All jobs of a daemon; each runs ``work(job) -> result dict`` on the job pool."""

    def __init__(self, max_running: int = MAX_RUNNING) -> None:
        self._jobs: Dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="xend-job")
        self._closed = False

    def start(self, op: str, target: str, work: Work,
              cleanup: Optional[Callable[[], None]] = None) -> Job:
        """Run ``work`` on the pool; ``cleanup`` runs after it on every path, a job
        cancelled before it started included (it releases what the synchronous
        part of the request acquired)."""
        with self._lock:
            self._prune()
            job = Job(next(self._ids), op, target)
            self._jobs[job.id] = job
        try:
            job.future = self._pool.submit(self._run, job, work, cleanup)
        except BaseException as exc:
            with self._lock:
                del self._jobs[job.id]
            if cleanup is not None:
                cleanup()
            if isinstance(exc, RuntimeError) and self._closed:
                raise XendTmemError(f"xend is stopping: no new {op} of {target}") from None
            raise
        job.future.add_done_callback(lambda f: self._never_ran(job, f, cleanup))
        return job

    @staticmethod
    def _run(job: Job, work: Work,
             cleanup: Optional[Callable[[], None]]) -> Optional[Dict[str, Any]]:
        """A worker: the operation, its outcome and its cleanup, then ``finished``."""
        me = threading.current_thread()
        pool_name, me.name = me.name, f"job-{job.id}-{job.op}"     # the log says which job
        job.thread_id = me.ident
        result: Optional[Dict[str, Any]] = None
        error: Optional[BaseException] = None
        try:
            if job.cancel.is_set():
                raise Cancelled(f"{job.op} of {job.target} cancelled before it started")
            result = work(job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's fault
            error = exc
        try:
            job._end(result, error)
        finally:
            try:
                if cleanup is not None:
                    cleanup()
            finally:
                job.finished = time.monotonic()
                job.thread_id = None
                job.finished_event.set()
                me.name = pool_name
        if error is not None:
            raise error
        return result

    @staticmethod
    def _never_ran(job: Job, future: Future[Optional[Dict[str, Any]]],
                   cleanup: Optional[Callable[[], None]]) -> None:
        """A job cancelled while it waited for a worker: :meth:`_run` never ran."""
        if not future.cancelled():
            return
        try:
            job._end(None, Cancelled(f"{job.op} of {job.target} cancelled before it started"))
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
            job.request_cancel()

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

    def shutdown(self, timeout: float, reported_within: float = 0.0) -> List[Job]:
        """Cancel every job, wait at most ``timeout`` s for them, then close the
        pool: no new job, queued ones cancelled, idle workers end. Never waits
        longer: returns the jobs still running (they ignored their cancellation),
        whose non-daemon workers the interpreter would join at exit forever, so
        the caller must not exit normally while there are any."""
        self.cancel_all()
        self.wait_all(timeout, reported_within)
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.running()

    def _prune(self) -> None:
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.finished is not None),
                          key=lambda j: j.finished or 0.0)
        excess = len(finished) - MAX_FINISHED
        for i, job in enumerate(finished):
            if i < excess or now - (job.finished or now) > KEEP_FINISHED_S:
                del self._jobs[job.id]


__all__ = ["Job", "JobTable", "NoSuchJob"]
