"""What every job store offers, whatever its database: the types the job system shares,
the :class:`JobStore` protocol and :func:`open_store`, which picks the store from the address.

The queue lives in the store: the fair order, the claim and the lease are store operations, so
a gateway and any number of workers can share one database. SQLite (:mod:`.sqlite`) is the
embedded default for one process; PostgreSQL (:mod:`.postgres`) serves many.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import numpy as np

from generation.errors import GenerationError
from generation.jobs.estimates import WorkAhead
from generation.jobs.job import Job, JobStatus, QueueEntry, ReplyAddress
from generation.jobs.retention import Retention


class StoreError(GenerationError):
    """The database cannot be opened or used; the message says what to do."""


class Expired(GenerationError):
    """What a job left behind (its track, or the audio it was given) was deleted by the
    retention policy; the message says when."""

    @classmethod
    def track(cls, job: Job) -> Expired:
        return cls(
            f"The track of job #{job.id} expired on {_date(job.result_expired_at)} and is no "
            "longer kept (old tracks are deleted to save space)."
        )

    @classmethod
    def uploads(cls, job: Job) -> Expired:
        return cls(
            f"The audio job #{job.id} was given (its melody or intro) expired on "
            f"{_date(job.uploads_expired_at)} and is no longer kept: upload it again with "
            "`/music generate`."
        )


@dataclass(frozen=True)
class Pruned:
    """What :meth:`JobStore.prune` deleted: jobs' results, stored clips, jobs, and
    interaction tokens (expired ones)."""

    results: int
    uploads: int
    jobs: int
    tokens: int


@dataclass(frozen=True)
class GuildSettings:
    """A server's own settings; None (or empty) means "as the bot's configuration says"."""

    guild_id: int
    default_model: str | None = None
    allowed_models: tuple[str, ...] = ()
    max_duration: float | None = None
    max_jobs_per_user: int | None = None
    allowed_channels: tuple[int, ...] = ()
    paused: bool = False


@dataclass(frozen=True)
class Jam:
    """A relay jam: a thread where members take turns carrying one track on."""

    thread_id: int
    guild_id: int
    channel_id: int
    user_id: int
    title: str
    timeline_message_id: int | None = None


@dataclass(frozen=True)
class Segment:
    """One turn of a jam: the job that carried the track on, and who asked for it."""

    position: int
    job_id: int
    user_id: int


@dataclass(frozen=True)
class Turn:
    """A jam's turn as its timeline and export need it: the job without its audio inputs,
    and the length of the intro it carried on (0 for none; None if not known)."""

    segment: Segment
    job: Job
    intro_seconds: float | None


#: How many of a server's most recent finished jobs ``/music stats`` takes its medians of.
MEDIAN_OF = 1000


@dataclass(frozen=True)
class Stats:
    """A server's finished jobs (those the retention policy keeps), and the median wait and
    generation time of its last ``median_of`` of them."""

    served: int
    failed: int
    cancelled: int
    median_wait_seconds: float | None
    median_generation_seconds: float | None
    median_of: int = MEDIAN_OF


@dataclass(frozen=True)
class WorkerInfo:
    """A generation worker as it advertises itself in the store.

    Args:
        id: Unique for the worker's life (host, process and a random part).
        host: The machine it runs on.
        device: Where it runs models ("cpu", "cuda:1").
        models: The models it serves (None in the configuration: all the bot's).
        loaded: The models it has in memory now.
        jobs: The jobs it is running now.
        started_at: When it started (Unix time).
        seen_at: Its last heartbeat (Unix time).
    """

    id: str
    host: str
    device: str
    models: tuple[str, ...]
    loaded: tuple[str, ...] = ()
    jobs: tuple[int, ...] = ()
    started_at: float = 0.0
    seen_at: float = 0.0


#: Queue entries built at a time by :meth:`JobStore.queue_order` before it lets the event loop
#: run: 20,000 queued jobs are read without holding it for long.
ENTRY_CHUNK = 1000


class Channel(StrEnum):
    """What a store tells the processes that share it (``NOTIFY`` on PostgreSQL)."""

    #: There is work to claim: a job was released, queued again, or its server resumed.
    QUEUE = "musicgen_queue"
    #: A job started, progressed or ended: the gateway has something to tell.
    JOBS = "musicgen_jobs"
    #: A running job is to stop; the payload is its id.
    CANCEL = "musicgen_cancel"


#: Called on the event loop with a notification's payload ("" when the store lost track of
#: its notifications, e.g. after a reconnection: read the state again).
Listener = Callable[[str], None]


class JobStore(Protocol):
    """The bot's database, as the job service, the workers and the Discord layer use it.

    Every state change is a store operation, made in one transaction, so that any number of
    processes can share the store. Methods that change a job update the :class:`Job` passed in
    to match. Operations a worker makes on a job it runs are fenced: they apply only while the
    job is in the store as the caller holds it (same status and attempt), so a worker that lost
    its lease cannot overwrite the job's next run.
    """

    async def close(self) -> None: ...

    # Submitting and the queue

    async def add(self, job: Job) -> Job:
        """Record a new job, not yet released (it counts towards the limits, and waits for
        :meth:`release`), with its uploaded clips; give it its id and its place in the fair
        order."""
        ...

    async def release(self, job: Job, reply: ReplyAddress | None) -> None:
        """Record where the requester waits (if anywhere) and let workers claim the job."""
        ...

    async def live_counts(self, guild_id: int, user_id: int) -> tuple[int, int]:
        """The member's and the server's live jobs (queued, released or not, or running)."""
        ...

    async def position(self, job: Job) -> int | None:
        """1 for the job claimed next, and so on; None if ``job`` cannot be claimed now."""
        ...

    async def queued(self, guild_id: int) -> list[Job]:
        """A server's queued, released jobs in the order they will run."""
        ...

    async def queue_length(self) -> int:
        """Queued jobs in every server."""
        ...

    async def work_ahead(self, job: Job) -> list[WorkAhead]:
        """The claimable jobs ahead of ``job``, their takes summed by batch key."""
        ...

    async def queue_order(self) -> list[QueueEntry]:
        """Every job that can be claimed, in the order they will be (without audio)."""
        ...

    async def running(self) -> list[Job]:
        """The jobs running now, with their progress and worker."""
        ...

    async def request_cancel(self, job_id: int) -> JobStatus | None:
        """Cancel a queued job now (returns CANCELLED), or ask the worker running it to stop
        (returns RUNNING); None if the job is not live."""
        ...

    # Workers

    async def claim(
        self,
        worker_id: str,
        *,
        models: Sequence[str] | None,
        loaded: Sequence[str],
        max_rows: int,
        max_model_wait: float,
        lease_seconds: float,
        now: float | None = None,
    ) -> list[Job]:
        """Take the next batch for a worker, in fair order, and lease it (see the
        implementations for the rules); the jobs come without their clips."""
        ...

    async def heartbeat(
        self, worker_id: str, job_ids: Sequence[int], lease_seconds: float, now: float | None = None
    ) -> set[int]:
        """Extend the leases of the worker's running jobs; returns those it must stop."""
        ...

    async def requeue_expired(self, max_attempts: int, now: float | None = None) -> int:
        """Queue again the running jobs whose lease ran out (failing those that used up
        ``max_attempts``); returns how many moved."""
        ...

    async def set_progress(self, job: Job, done: int, total: int) -> None: ...
    async def load_uploads(self, job: Job) -> None: ...
    async def register_worker(self, info: WorkerInfo) -> None: ...
    async def update_worker(
        self, worker_id: str, loaded: Sequence[str], jobs: Sequence[int]
    ) -> None: ...
    async def forget_worker(self, worker_id: str) -> None: ...
    async def workers(self, seen_since: float) -> list[WorkerInfo]: ...

    # A job's life

    async def finish(self, job: Job, status: JobStatus, error: str | None = None) -> bool: ...
    async def requeue(self, job: Job, *, count_attempt: bool = True) -> bool: ...
    async def save_result(
        self, job: Job, audio: np.ndarray, sample_rate: int, take: int = 0
    ) -> None: ...
    async def load_result(self, job: Job, take: int = 0) -> tuple[np.ndarray, int]: ...
    async def mark_delivered(self, job: Job, result_url: str | None = None) -> None: ...
    async def count_failed_delivery(self, job: Job) -> None: ...
    async def keep_undelivered(self, job: Job, reason: str) -> None: ...
    async def undelivered(self) -> list[Job]: ...
    async def waiting_with_reply(self, now: float) -> list[Job]: ...
    async def get(self, job_id: int) -> Job | None: ...
    async def history(self, guild_id: int, user_id: int, limit: int = 10) -> list[Job]: ...
    async def finished_jobs(
        self, guild_id: int, user_id: int | None = None, limit: int = 25
    ) -> list[Job]: ...
    async def takes_since(
        self, guild_id: int, user_id: int, since: float
    ) -> list[tuple[float, int]]: ...
    async def stats(self, guild_id: int) -> Stats: ...
    async def prune(self, retention: Retention, now: float | None = None) -> Pruned: ...
    async def clear_expired_tokens(self, now: float | None = None) -> int: ...

    # Servers, generation rates, jams

    async def guild_settings(self, guild_id: int) -> GuildSettings: ...
    async def save_guild_settings(self, settings: GuildSettings) -> None: ...
    async def paused_guilds(self) -> list[int]: ...
    async def generation_rates(self, device: str) -> dict[tuple[str, int], float]: ...
    async def save_generation_rate(
        self, device: str, model: str, rows: int, rate: float
    ) -> None: ...
    async def add_jam(self, jam: Jam) -> None: ...
    async def jam(self, thread_id: int) -> Jam | None: ...
    async def jams_started_by(self, guild_id: int, user_id: int) -> list[int]: ...
    async def jam_of_job(self, job_id: int) -> Jam | None: ...
    async def turn_of_job(self, job_id: int) -> tuple[int, int] | None: ...
    async def replace_segment(self, jam: Jam, position: int, job: Job) -> Segment: ...
    async def add_segment(self, jam: Jam, job: Job) -> Segment: ...
    async def segments(self, thread_id: int) -> list[Segment]: ...
    async def turns(self, thread_id: int) -> list[Turn]: ...

    # Notifications

    def subscribe(self, channel: Channel, listener: Listener) -> None:
        """Call ``listener`` on the event loop whenever ``channel`` is notified."""
        ...


def gave_up(attempts: int) -> str:
    """Why a job whose runs kept dying (its worker stopped heartbeating) failed for good."""
    return (
        f"It stopped {attempts} times while generating, so it was given up: try a shorter "
        "duration or a smaller model."
    )


def is_postgres(database: str) -> bool:
    """Whether ``database`` (``storage.database``) names a PostgreSQL server."""
    return database.startswith(("postgresql://", "postgres://"))


def sqlite_path(database: str) -> Path:
    """The file of an SQLite ``database``: a path, or ``sqlite:///path``."""
    return (
        Path(database.removeprefix("sqlite://"))
        if database.startswith("sqlite://")
        else Path(database)
    )


async def open_store(database: str, *, owner: bool = True) -> JobStore:
    """Open the store ``database`` names (``storage.database``): a PostgreSQL address, else
    an SQLite file. ``owner`` is SQLite's: see :meth:`.sqlite.SqliteStore.open`.

    Raises:
        StoreError: the database cannot be opened; the message says why.
    """
    if is_postgres(database):
        from generation.jobs.postgres import PostgresStore  # only PostgreSQL users need psycopg

        return await PostgresStore.open(database)
    from generation.jobs.sqlite import SqliteStore

    return await SqliteStore.open(sqlite_path(database), owner=owner)


def _date(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d (UTC)", time.gmtime(timestamp))
