"""The daemon's jobs, without I/O: what each one is, its state, its numbered events, the queue.

A :class:`Job` is one request of the API (a storage migration, for now): its parameters, its
state (``queued`` → ``running`` → an outcome), the events it emitted (the CLI's JSON events, each
with a number so that a client can resume a stream after the last one it saw) and its final
report. :class:`JobTable` holds the jobs of a daemon and decides which queued job may start:
at most ``limits[kind]`` of a kind run at once, in the order they were asked for.

::

    table = JobTable({"storage-migration": 2})
    job = table.create("storage-migration", {...})
    for job in table.startable():   # the driver starts these
        job.start()
    job.add_event({"event": "phase", "phase": "copy"})
    job.finish("completed", report)
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ACTIVE", "FINAL", "Job", "JobEnd", "JobTable", "UnknownJob"]

#: The states of a job that has not ended.
ACTIVE = frozenset({"queued", "running"})
#: The outcomes a job ends with: a migration's (``completed``, ``rolled-back``, ``partial``,
#: ``in-doubt``), ``refused`` (nothing changed), ``cancelled`` (before it started) or ``failed``
#: (an error of the daemon itself, not of the migration).
FINAL = frozenset({"completed", "rolled-back", "partial", "in-doubt", "refused", "aborted", "cancelled",
                   "failed"})
#: Events a job keeps; the oldest progress events make room beyond that (phases, decisions and
#: the report are always kept).
MAX_EVENTS = 2000
#: Ended jobs a daemon remembers (the oldest are forgotten first).
KEEP_ENDED = 200


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: ``outcome`` (see :data:`dataplane.daemon.jobs.FINAL`), the ``report``
    event (as the CLI prints it) and the one-line ``error``."""

    outcome: str
    report: dict[str, Any] | None
    error: str | None = None


class UnknownJob(KeyError):
    """No job of that id."""


@dataclass
class Job:
    """One request: ``kind``, ``params`` (as validated), ``state``, ``events`` (numbered from 1),
    ``report`` once it ended, ``error`` (the one-line reason of a failure)."""

    id: str
    kind: str
    params: dict[str, Any]
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    _next_event: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def start(self) -> None:
        """queued → running. :raises ValueError: not queued."""
        if self.state != "queued":
            raise ValueError(f"job {self.id} is {self.state}, not queued")
        self.state = "running"
        self.started = time.time()

    def add_event(self, event: Mapping[str, Any]) -> int:
        """Record an event; returns its number."""
        n = next(self._next_event)
        self.events.append((n, dict(event)))
        if len(self.events) > MAX_EVENTS:
            drop = next((i for i, (_, e) in enumerate(self.events) if e.get("event") == "progress"), None)
            if drop is not None:
                del self.events[drop]
        return n

    def events_after(self, last: int) -> list[tuple[int, dict[str, Any]]]:
        """The events numbered above ``last`` (0: all that are kept)."""
        return [(n, e) for n, e in self.events if n > last]

    def finish(self, outcome: str, report: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """End the job with ``outcome`` (one of :data:`FINAL`). :raises ValueError: unknown outcome,
        or the job already ended."""
        if outcome not in FINAL:
            raise ValueError(f"unknown outcome {outcome!r}")
        if not self.active:
            raise ValueError(f"job {self.id} already ended ({self.state})")
        self.state = outcome
        self.ended = time.time()
        self.report = dict(report) if report is not None else None
        self.error = error

    def summary(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return {"id": self.id, "kind": self.kind, "state": self.state, "params": self.params,
                "created": self.created, "started": self.started, "ended": self.ended,
                "cancel_requested": self.cancel_requested, "error": self.error, "report": self.report,
                "last_event": self.events[-1][0] if self.events else 0}


class JobTable:
    """The jobs of one daemon, and the per-kind limit on how many run at once."""

    def __init__(self, limits: Mapping[str, int], keep_ended: int = KEEP_ENDED) -> None:
        self.limits = dict(limits)
        self.keep_ended = keep_ended
        self._jobs: dict[str, Job] = {}

    def create(self, kind: str, params: Mapping[str, Any]) -> Job:
        """A new queued job; the oldest ended jobs beyond ``keep_ended`` are forgotten.

        :raises ValueError: a kind without a limit (not served).
        """
        if kind not in self.limits:
            raise ValueError(f"unknown job kind {kind!r}")
        ended = [j.id for j in self._jobs.values() if not j.active]
        for old in ended[:max(0, len(ended) - self.keep_ended)]:
            del self._jobs[old]
        job = Job(f"{kind[:3]}-{secrets.token_hex(6)}", kind, dict(params))
        self._jobs[job.id] = job
        return job

    def adopt(self, job_id: str, kind: str, params: Mapping[str, Any]) -> Job:
        """A job of a previous run of the daemon, under its own id, started (its end follows).

        :raises ValueError: that id is taken.
        """
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} exists")
        job = Job(job_id, kind, dict(params))
        job.start()
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        """:raises UnknownJob: no such job."""
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def jobs(self, kind: str | None = None) -> list[Job]:
        """The jobs (of ``kind``), oldest first."""
        return [j for j in self._jobs.values() if kind is None or j.kind == kind]

    def running(self, kind: str) -> int:
        return sum(1 for j in self._jobs.values() if j.kind == kind and j.state == "running")

    def startable(self) -> list[Job]:
        """The queued jobs that may start now, oldest first, within each kind's limit."""
        out = []
        for kind, limit in self.limits.items():
            free = limit - self.running(kind)
            for job in self._jobs.values():
                if free <= 0:
                    break
                if job.kind == kind and job.state == "queued" and not job.cancel_requested:
                    out.append(job)
                    free -= 1
        return out

    def position(self, job: Job) -> int:
        """How many queued jobs of its kind are ahead of ``job`` (0 when it is next or running)."""
        if job.state != "queued":
            return 0
        ahead = 0
        for other in self._jobs.values():
            if other is job:
                break
            if other.kind == job.kind and other.state == "queued":
                ahead += 1
        return ahead
