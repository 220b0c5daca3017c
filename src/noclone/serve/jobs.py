"""A bounded queue of cloaking jobs for the per-image optimization methods (ASPL, AdvDM, PhotoGuard, FSMG).

One worker thread runs the jobs in order. A job holds its photos and, once done, its PNG results in memory only;
finished jobs expire `ttl_s` after they end, and a cancelled job is dropped at once (a running one stops at its
next optimization step). `submit` refuses new jobs while `max_jobs` are waiting or running.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a running job when it was cancelled or ran out of time."""


class JobsFull(Exception):
    """The queue already holds its maximum of jobs."""


@dataclass
class Job:
    """One request's photos and, when done, its results."""

    id: str
    method: str
    budget: float
    names: list[str]
    images: list[Image.Image] | None
    state: str = "queued"
    progress: float = 0.0
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    results: list[tuple[str, bytes]] | None = None
    error: str | None = None
    warning: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled or is past its time limit (called between steps)."""
        if self.cancel.is_set():
            raise JobCancelled("cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobCancelled("timed out")

    def describe(self) -> dict:
        """What GET /v1/jobs/{id} answers."""
        now = time.monotonic()
        out: dict[str, Any] = {"id": self.id, "state": self.state, "method": self.method, "budget": self.budget,
                               "budget_255": round(self.budget * 255, 2), "images": len(self.names),
                               "progress": round(self.progress, 3),
                               "images_done": len(self.names) if self.state == "done" else 0,
                               "elapsed_s": round((self.finished or now) - (self.started or now), 2)}
        if self.state == "done":
            out["result"] = f"/v1/jobs/{self.id}/result"
            out["files"] = [name for name, _ in self.results or []]
        if self.error:
            out["error"] = self.error
        if self.warning:
            out["warning"] = self.warning
        return out


Runner = Callable[[Job, Callable[[float], None]], list[tuple[str, bytes]]]


class JobQueue:
    """Jobs run one at a time by a worker thread; `runner(job, report)` does the work and returns (name, PNG)."""

    def __init__(self, runner: Runner, *, max_jobs: int = 8, ttl_s: float = 600.0, timeout_s: float = 1800.0,
                 on_done: Callable[[Job], None] | None = None):
        self.runner = runner
        self.max_jobs = max(1, max_jobs)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.on_done = on_done
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []          # queued ids, oldest first
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._durations: list[float] = []

    # --- lifecycle ---
    def start(self) -> None:
        """Start the worker thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="noclone-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, drop every result, and stop the worker."""
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel.set()
            self._jobs.clear()
            self._order.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- the API's operations ---
    def submit(self, method: str, budget: float, names: list[str], images: list[Image.Image],
               warning: str | None = None) -> Job:
        """Queue a job (JobsFull when `max_jobs` are already waiting or running)."""
        with self._lock:
            self._expire()
            if self.active() >= self.max_jobs:
                raise JobsFull
            job = Job(secrets.token_urlsafe(12), method, budget, list(names), list(images), warning=warning)
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._lock.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown, cancelled or expired."""
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancel (queued or running) or delete (finished) a job; its photos and results are dropped."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is None:
                return None
            if job_id in self._order:
                self._order.remove(job_id)
            job.cancel.set()
            if job.state in ("queued", "running"):
                job.state = "cancelled"
            job.images, job.results = None, None
            return job

    def active(self) -> int:
        """Jobs queued or running."""
        return sum(1 for job in self._jobs.values() if job.state in ("queued", "running"))

    def queued(self) -> int:
        """Jobs waiting for the worker."""
        return len(self._order)

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying a refused job (the mean job time times the queue)."""
        mean = sum(self._durations[-20:]) / len(self._durations[-20:]) if self._durations else 10.0
        return max(1, int(round(mean * max(1, self.active()))))

    def held(self) -> int:
        """Jobs held in memory (any state)."""
        with self._lock:
            return len(self._jobs)

    # --- the worker ---
    def _expire(self) -> None:
        now = time.monotonic()
        for job_id in [j.id for j in self._jobs.values() if j.finished is not None and now - j.finished > self.ttl_s]:
            job = self._jobs.pop(job_id)
            job.images, job.results = None, None

    def _next(self) -> Job | None:
        with self._lock:
            while not self._stopping:
                self._expire()
                if self._order:
                    job = self._jobs[self._order.pop(0)]
                    job.state, job.started = "running", time.monotonic()
                    job.deadline = job.started + self.timeout_s
                    return job
                self._lock.wait(timeout=min(5.0, max(0.05, self.ttl_s)))
            return None

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return

            def report(fraction: float, job: Job = job) -> None:
                job.check()
                job.progress = min(max(fraction, job.progress), 0.99)

            try:
                results = self.runner(job, report)
                job.check()
            except JobCancelled as exc:
                self._finish(job, "failed" if str(exc) == "timed out" else "cancelled",
                             error=f"the job ran past the {self.timeout_s:g} s limit" if str(exc) == "timed out"
                             else None)
                continue
            except Exception as exc:  # the job fails, the service goes on
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("job %s failed: %s", job.id, message)
                self._finish(job, "failed", error=message if _is_user_error(exc) else "the cloak failed on these photos")
                continue
            self._finish(job, "done", results=results)

    def _finish(self, job: Job, state: str, results: list[tuple[str, bytes]] | None = None,
                error: str | None = None) -> None:
        with self._lock:
            job.images = None  # the photos are no longer needed
            job.finished = time.monotonic()
            if job.started is not None:
                self._durations.append(job.finished - job.started)
            if job.cancel.is_set() and state != "failed":
                state = "cancelled"
            job.state, job.error = state, error
            if state == "done":
                job.results, job.progress = results, 1.0
            else:
                job.results = None
            if state == "cancelled":
                self._jobs.pop(job.id, None)
        if self.on_done is not None:
            self.on_done(job)


def _is_user_error(exc: Exception) -> bool:
    from noclone.errors import NocloneError

    return isinstance(exc, NocloneError)
