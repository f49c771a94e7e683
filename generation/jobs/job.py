"""Per-server job queues, served in turn: the order in which one worker runs the jobs.

A server with ten queued jobs delays another server's single job by at most one batch: the
queue takes one job from each server with work in turn (round robin), skipping paused ones.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from generation.errors import JobNotFound, QueueFull
from generation.origin import Origin, OriginKind
from generation.request import MAX_SEED, GenerationRequest

#: The most takes (variations of one request, each with its own seed) a job may ask for.
MAX_TAKES = 4


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ReplyAddress:
    """Where a job's requester waits for the answer: a chat platform's interaction webhook
    (application id and token) and the message it answered with, usable until ``expires_at``
    (a Unix time). Once the token is forgotten (None), the message can still be linked to."""

    application_id: int
    token: str | None = field(repr=False)
    expires_at: float
    message_id: int
    #: The largest file that may be attached through it, in bytes.
    max_upload_bytes: int


@dataclass(eq=False)
class Job:
    """One request on its way through the queue; ids are plain ints, never Discord objects."""

    id: int
    request: GenerationRequest
    guild_id: int
    channel_id: int
    user_id: int
    #: Variations of the request generated together; take ``k`` uses seed ``seed + k``.
    takes: int = 1
    #: What the job was made from (a re-roll of another job...), if anything.
    origin: Origin | None = None
    status: JobStatus = JobStatus.QUEUED
    reply: ReplyAddress | None = None
    #: Times the job has been started (a crash or a shutdown can make it run again).
    attempts: int = 0
    #: The worker running it now (None while it is not running).
    worker_id: str | None = None
    #: Decoding steps done and in all, while running.
    progress: tuple[int, int] = (0, 0)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    generation_seconds: float | None = None
    error: str | None = None
    #: Whether the requester has been told how the job ended, and where the result is.
    delivered: bool = False
    result_url: str | None = None
    #: When the retention policy deleted the job's result files, and the uploads it used.
    result_expired_at: float | None = None
    uploads_expired_at: float | None = None
    #: Tries at delivering the outcome that failed; why it is kept undelivered, if it is.
    delivery_attempts: int = 0
    delivery_failure: str | None = None
    #: The request's clips (melody, intro) are still in the store, not loaded: a job read
    #: back after a restart holds no audio until the worker loads it to run it.
    uploads_in_store: bool = False
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Why ``cancel_event`` was set: "cancelled", "timeout" or "shutdown".
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Ask a running generation to stop at its next step."""
        self.stop_reason = reason
        self.cancel_event.set()

    def take_requests(self) -> list[GenerationRequest]:
        """One request per take, each with its own seed, so any take can be repeated alone."""
        request = self.request.with_seed()
        assert request.seed is not None
        return [
            replace(request, seed=(request.seed + take) % (MAX_SEED + 1))
            for take in range(self.takes)
        ]

    @property
    def adoptable_turn(self) -> int | None:
        """The relay jam turn this job is another take of (a re-roll or an edit of that
        turn), which the jam can adopt in the turn's place; None for any other job."""
        origin = self.origin
        if origin is None or origin.turn is None or self.takes != 1:
            return None
        return origin.turn if origin.kind in (OriginKind.REROLL, OriginKind.EDIT) else None

    @property
    def jam_turn(self) -> tuple[int, int] | None:
        """The relay jam (its thread) and turn this job was made as, or as another take of."""
        origin = self.origin
        if origin is None or origin.jam is None or origin.turn is None:
            return None
        if origin.kind is OriginKind.JAM_TURN or self.adoptable_turn is not None:
            return origin.jam, origin.turn
        return None

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
    """One FIFO per server; :meth:`runnable` lists the jobs with the servers in turn.

    The next job comes from the server served least recently (a server never served, or
    back after a while, goes first), so a busy server delays another server's job by at
    most the batch running now.
    """

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._queues: dict[int, deque[Job]] = {}
        self._paused: set[int] = set()
        #: The turn at which each server was last served.
        self._served_at: dict[int, int] = {}
        self._turn = 0
        #: Jobs accepted but not yet queued: they count towards the limits.
        self._held: list[Job] = []
        #: The batch of jobs generating now.
        self.running: list[Job] = []

    def hold(self, job: Job) -> None:
        """Count ``job`` towards the limits until :meth:`add` queues it."""
        self._held.append(job)

    def add(self, job: Job) -> None:
        """Queue ``job`` at the back of its server's queue. Limits are the caller's to check
        (:meth:`check_room`)."""
        if job in self._held:
            self._held.remove(job)
        self._queues.setdefault(job.guild_id, deque()).append(job)

    def put_back(self, jobs: Sequence[Job]) -> None:
        """Return jobs taken to run (but never started) to the front of their queues."""
        for job in reversed(jobs):
            self._queues.setdefault(job.guild_id, deque()).appendleft(job)

    def check_room(self, guild_id: int, user_id: int, per_user: int | None = None) -> None:
        """Raise :class:`QueueFull` if the member or the server cannot queue another job.

        ``per_user`` overrides the member limit (a server's own setting).
        """
        per_user = self.limits.per_user if per_user is None else per_user
        live = [job for job in self._live() if job.guild_id == guild_id]
        if sum(job.user_id == user_id for job in live) >= per_user:
            raise QueueFull(
                f"You already have {per_user} jobs queued or running here: "
                "wait for one to finish, or cancel one."
            )
        if len(live) >= self.limits.per_guild:
            raise QueueFull(
                f"This server's queue is full ({self.limits.per_guild} jobs): try again later."
            )

    def runnable(self) -> list[Job]:
        """The queued jobs of servers that are not paused, in the order they take turns."""
        return self._in_turns({guild: list(jobs) for guild, jobs in self._serving().items()})

    def take(self, jobs: Sequence[Job]) -> None:
        """Take ``jobs`` out of the queue to run now; each one's server has had its turn."""
        for job in jobs:
            self.remove(job)
            self._turn += 1
            self._served_at[job.guild_id] = self._turn

    def service_order(self) -> list[Job]:
        """Every queued (or held) job, in the order the worker will run them, paused
        servers last; held jobs count as queued behind their server's other jobs."""
        queues = {guild: list(jobs) for guild, jobs in self._serving().items()}
        for job in self._held:
            if job.guild_id not in self._paused:
                queues.setdefault(job.guild_id, []).append(job)
        paused = [
            job for guild, jobs in self._queues.items() if guild in self._paused for job in jobs
        ]
        paused += [job for job in self._held if job.guild_id in self._paused]
        return self._in_turns(queues) + paused

    def _in_turns(self, queues: dict[int, list[Job]]) -> list[Job]:
        """The jobs of ``queues`` as the servers would take turns, in one pass: the server
        served least recently first (those never served in the order they came), then each
        server with jobs left goes to the back of the line."""
        line = deque(sorted(queues, key=lambda guild: self._served_at.get(guild, -1)))
        waiting = {guild: deque(jobs) for guild, jobs in queues.items()}
        order = []
        while line:
            guild_id = line.popleft()
            jobs = waiting[guild_id]
            order.append(jobs.popleft())
            if jobs:
                line.append(guild_id)
        return order

    def _serving(self) -> dict[int, deque[Job]]:
        return {guild: jobs for guild, jobs in self._queues.items() if guild not in self._paused}

    def running_in(self, guild_id: int) -> list[Job]:
        """A server's jobs generating now."""
        return [job for job in self.running if job.guild_id == guild_id]

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
        """Take a queued (or held) job out of the queue."""
        if job in self._held:
            self._held.remove(job)
            return
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
        yield from self.running
        yield from self._held
        for jobs in self._queues.values():
            yield from jobs
