"""A job: one request on its way through the queue, and where its requester waits. The
queue itself lives in the store (:mod:`generation.jobs.store`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum

from generation.audio.stems import STEMS
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


@dataclass(frozen=True)
class ClipRecord:
    """A clip a job was given, as the store files it: its length and content hash."""

    seconds: float
    sha256: str


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
    #: Each clip the job was given, by option ("melody", "continuation"), as the store
    #: knows it without decoding it (kept after the clip expires).
    clips: dict[str, ClipRecord] = field(default_factory=dict)
    #: The worker running it (an id from :class:`generation.jobs.store.WorkerInfo`).
    worker_id: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    #: Why ``cancel_event`` was set: "cancelled", "timeout", "shutdown", "failed" (one of
    #: its takes failed: the others stop), or "lost" (the worker's lease ran out: the job is
    #: another's now).
    stop_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Ask a running generation to stop at its next step."""
        self.stop_reason = reason
        self.cancel_event.set()

    def take_requests(self) -> list[GenerationRequest]:
        """One request per take, each with its own seed, so any take can be repeated alone;
        a stems job's take ``k`` is the stem ``STEMS[k]`` of its track."""
        request = self.request.with_seed()
        assert request.seed is not None
        if self.origin is not None and self.origin.kind is OriginKind.STEMS:
            return [replace(request, stem=stem) for stem in STEMS[: self.takes]]
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


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A claimable job as the ETA forecast needs it, read without its request."""

    job_id: int
    guild_id: int
    model: str
    duration: float
    takes: int
    #: Jobs with equal keys can share a batch (:func:`generation.request.batch_key`).
    batch_key: str
