"""Per-server job queues, served in turn: the order in which one worker runs the jobs.

A server with ten queued jobs delays another server's single job by at most one job: the
queue takes one job from each server with work in turn (round robin), skipping paused ones.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import JobNotFound, QueueFull
from .request import GenerationRequest


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Job:
    """One request on its way through the queue; ids are plain ints, never Discord objects."""

    id: int
    request: GenerationRequest
    guild_id: int
    channel_id: int
    user_id: int
    status: JobStatus = JobStatus.QUEUED
    #: Decoding steps done and in all, while running.
    progress: tuple[int, int] = (0, 0)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction_done(self) -> float:
        done, total = self.progress
        return done / total if total else 0.0


@dataclass(frozen=True)
class QueueLimits:
    """How many live (queued or running) jobs a member and a server may have."""

    per_user: int = 3
    per_guild: int = 20


class FairQueue:
    """One FIFO per server; :meth:`next_job` serves the servers in turn."""

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._queues: OrderedDict[int, deque[Job]] = OrderedDict()
        self._paused: set[int] = set()
        self._ids = itertools.count(1)
        self.running: Job | None = None

    def submit(
        self, request: GenerationRequest, *, guild_id: int, channel_id: int, user_id: int
    ) -> Job:
        """Queue ``request``.

        Raises:
            QueueFull: the member or the server has reached its limit.
        """
        self.check_room(guild_id, user_id)
        job = Job(next(self._ids), request, guild_id, channel_id, user_id)
        self._queues.setdefault(guild_id, deque()).append(job)
        return job

    def check_room(self, guild_id: int, user_id: int) -> None:
        """Raise :class:`QueueFull` if the member or the server cannot queue another job."""
        live = [job for job in self._live() if job.guild_id == guild_id]
        if sum(job.user_id == user_id for job in live) >= self.limits.per_user:
            raise QueueFull(
                f"You already have {self.limits.per_user} jobs queued or running here: "
                "wait for one to finish, or cancel one."
            )
        if len(live) >= self.limits.per_guild:
            raise QueueFull(
                f"This server's queue is full ({self.limits.per_guild} jobs): try again later."
            )

    def next_job(self) -> Job | None:
        """Take the next job to run, from the next server in turn that is not paused."""
        for guild_id, jobs in self._queues.items():
            if guild_id in self._paused:
                continue
            job = jobs.popleft()
            del self._queues[guild_id]
            if jobs:
                self._queues[guild_id] = jobs  # to the back of the line
            return job
        return None

    def service_order(self) -> list[Job]:
        """Every queued job, in the order the worker will run them (paused servers last)."""
        queues = [list(jobs) for guild, jobs in self._queues.items() if guild not in self._paused]
        order = [job for turn in itertools.zip_longest(*queues) for job in turn if job]
        paused = [
            job for guild, jobs in self._queues.items() if guild in self._paused for job in jobs
        ]
        return order + paused

    def queued(self, guild_id: int) -> list[Job]:
        """A server's queued jobs, in the order they will run."""
        return [job for job in self.service_order() if job.guild_id == guild_id]

    def position(self, job: Job) -> int:
        """1 for the job that runs next, and so on."""
        return self.service_order().index(job) + 1

    def get(self, job_id: int) -> Job:
        """A queued or running job by id.

        Raises:
            JobNotFound: no live job has that id.
        """
        for job in self._live():
            if job.id == job_id:
                return job
        raise JobNotFound(f"There is no queued or running job #{job_id}.")

    def remove(self, job: Job) -> None:
        """Take a queued job out of its server's queue."""
        jobs = self._queues[job.guild_id]
        jobs.remove(job)
        if not jobs:
            del self._queues[job.guild_id]

    def pause(self, guild_id: int) -> None:
        self._paused.add(guild_id)

    def resume(self, guild_id: int) -> None:
        self._paused.discard(guild_id)

    def is_paused(self, guild_id: int) -> bool:
        return guild_id in self._paused

    def _live(self) -> Iterator[Job]:
        if self.running is not None:
            yield self.running
        for jobs in self._queues.values():
            yield from jobs
